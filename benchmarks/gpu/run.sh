#!/usr/bin/env bash
# Everything xpconv's GPU evidence needs, in one go, on the GPU machine (from the repo root):
#
#   XPCONV_COMMIT=<hash> bash benchmarks/gpu/run.sh            # all stages
#   bash benchmarks/gpu/run.sh kernels bench                     # some stages, in this order
#
# Stages (in order of value), each under its own cap (CAP_<stage> below; the caps add up to less than
# XPCONV_GPU_BUDGET seconds, default 330, so the whole run with its kill grace ends inside 6 minutes):
#   machine  nvidia-smi line, versions (Python, NumPy, CuPy, CUDA runtime/driver, torch, cuDNN), commit, tree hash
#   preflight benchmarks/gpu/preflight.py: NVRTC version, CUDA header folder, nvidia-* wheels; xpconv's RawModule
#            compiled, one launch, one cuBLAS product, copies back -- on failure the run STOPS (exit 3), saying why
#   kernels  pytest -m gpu tests/test_cupy_kernels.py (every CuPy kernel = generic path on the GPU), JUnit XML;
#            FAILS if any test failed or skipped (a skipped GPU test proves nothing)
#   bench    python -m benchmarks --device cuda   (xpconv on CuPy | PyTorch on CUDA: samples/s, peak memory)
#   epoch    benchmarks/gpu/epoch.py --profile    (one 60,000-sample epoch at batch 100 and 1000 vs torch; kernel profile)
#   gpu      python -m pytest -m gpu (the rest of the suite on the cupy namespace), a time limit per test
#            (pytest-timeout, or else `timeout` per test file), JUnit XML
#
# The verdict cannot pass over a failure: every stage's command is time-limited and its exit status
# counts (a killed or crashed stage FAILS it); each pytest stage first collects its tests, and FAILS
# when its JUnit XML is missing or empty, when fewer tests ran than were collected, or when any
# failed (kernels: or skipped).  A test file killed by its time limit leaves no XML: it is missed.
#
# Writes under $OUT (or benchmarks/results/gpu-local/ when OUT is unset): gpu-run.log (everything),
# summary.md (the short tables and the RESULT line, also printed last), bench-cuda.json, epoch.json,
# floor.md, kernels.xml, gpu.xml.  Exit status: 0 all good, 1 a stage failed, 3 preflight failed.
# Dry run on the CPU (tests/test_gpu_scripts.py): XPCONV_GPU_DRY_RUN=1 skips preflight's device checks;
# XPCONV_PYTEST=<command> stands in for `python -m pytest`, XPCONV_BENCH / XPCONV_EPOCH for the bench
# and epoch commands, XPCONV_GPU_PER_FILE=1 forces the per-file gpu stage, so the verdict logic runs
# on fake results.  Wheels the image lacks (array-api-compat, array-api-strict) come from .whl/
# (carried; see README.md): installed with pip when there is one, else unpacked (they are pure Python).
set -uo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root" || exit 2
# a hash of the source files that run (xpconv, tests, benchmarks): the GPU machine's copy has
# no .git, so the log carries this too; `bash benchmarks/gpu/run.sh --tree-hash` prints it here
tree_hash() {
  find xpconv tests benchmarks -type f \( -name '*.py' -o -name '*.cu' -o -name '*.sh' \) -not -path '*/results/*' \
    -not -path '*/__pycache__/*' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16
}
if [ "${1:-}" = "--tree-hash" ]; then
  tree_hash
  exit 0
fi
OUT=${OUT:-$root/benchmarks/results/gpu-local}
mkdir -p "$OUT"
LOG=$OUT/gpu-run.log
SUMMARY=$OUT/summary.md
TMP=$(mktemp -d)  # each stage's own output, for the summary (not under $OUT: at most 8 files come back)
: >"$LOG"
: >"$SUMMARY"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
# one kernel cache for every stage (NVRTC compiles once), outside $OUT
export CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/xpconv-cupy-cache}
mkdir -p "$CUPY_CACHE_DIR"
BUDGET=${XPCONV_GPU_BUDGET:-330}
# each stage's cap in seconds (tests/test_gpu_scripts.py checks the defaults add up to less than BUDGET)
CAP_machine=${XPCONV_GPU_CAP_MACHINE:-25}
CAP_preflight=${XPCONV_GPU_CAP_PREFLIGHT:-35}
CAP_kernels=${XPCONV_GPU_CAP_KERNELS:-55}  # collection included
CAP_bench=${XPCONV_GPU_CAP_BENCH:-45}
CAP_epoch=${XPCONV_GPU_CAP_EPOCH:-70}
CAP_gpu=${XPCONV_GPU_CAP_GPU:-85}  # collection included
COLLECT_CAP=15   # of a pytest stage's cap, for collecting its tests
KILL_GRACE=5     # after a cap, TERM; KILL_GRACE seconds later, KILL
MIN_CAP=${XPCONV_GPU_MIN_CAP:-10}
PER_TEST=${XPCONV_GPU_PER_TEST:-60}  # seconds for one test of the gpu stage (pytest-timeout)
PER_FILE=${XPCONV_GPU_PER_FILE_CAP:-60}  # seconds for one test file of the gpu stage (without pytest-timeout)
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(machine preflight kernels bench epoch gpu)
PY=${PYTHON:-python3}
read -r -a PYTEST <<<"${XPCONV_PYTEST:-$PY -m pytest}"
read -r -a BENCH <<<"${XPCONV_BENCH:-$PY -m benchmarks --device cuda}"
read -r -a EPOCH <<<"${XPCONV_EPOCH:-$PY benchmarks/gpu/epoch.py --models simple,deep --batches 100,1000 --profile}"
DRY=${XPCONV_GPU_DRY_RUN:-}
failures=()

say() { printf '\n==== %s  [%ss elapsed]\n' "$*" "$SECONDS"; }
note() { printf '%s\n' "$*" | tee -a "$SUMMARY" >/dev/null; printf '%s\n' "$*"; }
# run_limited CAP CMD...: CMD under min(CAP, what is left of the budget); exit 124 when it was stopped
run_limited() {
  local cap=$1; shift
  local left=$((BUDGET - SECONDS))
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt "$MIN_CAP" ]; then
    echo "SKIPPED (budget): $*"
    return 124
  fi
  echo "\$ timeout $cap $*"
  timeout --kill-after="$KILL_GRACE" "$cap" "$@"
  local rc=$?
  [ "$rc" -eq 137 ] && rc=124  # killed after the grace: still "stopped by its time limit"
  [ "$rc" -eq 124 ] && echo "STOPPED by its time limit ($cap s): $*"
  return "$rc"
}
pytest_line() {
  local line
  line=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped|deselected)|^=+ .*(passed|failed|error).* in [0-9.]+s' "$1" | tail -1)
  echo "${line:-no pytest summary (stopped by its time limit? see gpu-run.log)}"
}
# collect ARGS...: how many tests pytest collects for ARGS (prints the number; exit status 1 when it cannot)
collect() {
  local listing n
  listing=$(run_limited "$COLLECT_CAP" "${PYTEST[@]}" -p no:cacheprovider -q --collect-only "$@" 2>&1)
  local rc=$?
  n=$(grep -cE '^[^ ]+::' <<<"$listing")
  if [ "$rc" -ne 0 ] || [ "$n" -eq 0 ]; then
    printf '%s\n' "$listing" | tail -5 >&2
    return 1
  fi
  echo "$n"
}
# stage_left STAGE_START CAP: seconds left of a stage's cap
stage_left() { echo $(($2 - (SECONDS - $1))); }

# ------------------------------------------------------------------ setup
WHEELS=${XPCONV_WHEELS:-.whl}  # folder of wheels to put on PYTHONPATH
SITE=${XPCONV_SITE:-/tmp/xpconv-site}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
      || { echo "FAILED: pip install of $WHEELS/"; exit 2; }
  else  # no pip on this image: the wheels are pure Python, so unpacking them is their install
    echo "note: no pip here -- unpacking $WHEELS/*.whl into $SITE"
    for w in "$WHEELS"/*.whl; do
      "$PY" -m zipfile -e "$w" "$SITE" || { echo "FAILED: unpacking $w"; exit 2; }
    done
  fi
  export PYTHONPATH="$root:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "note: no .whl/ here (run bash ../shared/device/wheels.sh first and carry .whl) -- using what is installed"
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
fi
commit=${XPCONV_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
tree=$(tree_hash)

note "# xpconv GPU run $(date -u +%Y-%m-%dT%H:%MZ)"
note ""
note "commit: $commit (tree hash $tree; stages: ${stages[*]})"

# the machine stage runs as one command under its cap (a hung nvidia-smi or import cannot stall the run)
machine_stage() {
  smi=$(timeout 5 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv,noheader 2>&1 | head -1)
  note "nvidia-smi: $smi"
  timeout 5 nvidia-smi 2>&1 | head -15
  "$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import platform
print(f"python {platform.python_version()}", end="")
try:
    import numpy; print(f", numpy {numpy.__version__}", end="")
    import cupy
    rt, drv = cupy.cuda.runtime.runtimeGetVersion(), cupy.cuda.runtime.driverGetVersion()
    print(f", cupy {cupy.__version__} (CUDA runtime {rt}, driver {drv})", end="")
except Exception as exc:
    print(f", cupy FAILED: {exc!r}", end="")
try:
    import torch
    print(f", torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA'})", end="")
except Exception as exc:
    print(f", torch FAILED: {exc!r}", end="")
print()
EOF
  "$PY" -c "import sys; from xpconv.cli import main; sys.exit(main(['info']))" 2>&1 | head -40
  "$PY" benchmarks/gpu/floor.py >"$OUT/floor.md" 2>&1 || { echo "floor.py FAILED"; return 1; }
}
export OUT SUMMARY PY
export -f note machine_stage

# pytest_stage NAME XML CAP VERDICT_ARGS -- PYTEST_ARGS...: collect, run under what is left of CAP, judge
pytest_stage() {
  local name=$1 xml=$2 cap=$3 vargs=$4; shift 5
  local t0=$SECONDS n rc
  rm -f "$xml"
  if ! n=$(collect "$@"); then
    note "$name: FAILED: pytest could not collect its tests (see gpu-run.log)"
    failures+=("$name: collection failed")
    return
  fi
  run_limited "$(stage_left "$t0" "$cap")" "${PYTEST[@]}" -p no:cacheprovider -q -rs --durations=10 --junitxml="$xml" "$@" \
    2>&1 | tee "$TMP/$name.txt"
  rc=${PIPESTATUS[0]}
  # shellcheck disable=SC2086  # vargs is a list of flags
  verdict=$("$PY" benchmarks/gpu/junit.py $vargs --expect "$n" "$xml")
  local vrc=$?
  echo "$verdict"
  note "pytest $name: $(pytest_line "$TMP/$name.txt")"
  note "$name (JUnit, $n collected): $verdict"
  if [ "$vrc" -ne 0 ]; then
    failures+=("$name: $(head -1 <<<"$verdict")")
  elif [ "$rc" -eq 124 ]; then
    failures+=("$name: stopped by its time limit")
  elif [ "$rc" -ne 0 ]; then
    failures+=("$name: pytest exited $rc")
  fi
}

for stage in "${stages[@]}"; do
  case $stage in
  machine)
    say machine
    run_limited "$CAP_machine" bash -c machine_stage
    rc=$?
    [ "$rc" -eq 0 ] || failures+=("machine: exit $rc")
    ;;
  preflight)
    say "preflight: benchmarks/gpu/preflight.py"
    pre=()
    [ -n "$DRY" ] && pre=(--dry-run)
    run_limited "$CAP_preflight" "$PY" benchmarks/gpu/preflight.py "${pre[@]}" 2>&1 | tee "$TMP/preflight.txt"
    rc=${PIPESTATUS[0]}
    grep -E '^(NVRTC|CUDA header folders|nvidia-\* packages):' "$TMP/preflight.txt" >>"$SUMMARY"
    if [ "$rc" -ne 0 ]; then
      why=$(grep -E '^PREFLIGHT FAILED' "$TMP/preflight.txt" | tail -1)
      [ "$rc" -eq 124 ] && why="stopped by its time limit"
      note ""
      note "RESULT: FAILED at preflight, the run stops here: ${why:-preflight.py exited $rc}"
      rm -rf "$TMP"
      say "summary (also in $SUMMARY)"
      cat "$SUMMARY"
      exit 3
    fi
    note "preflight: ok"
    ;;
  kernels)
    say "kernels: pytest -m gpu tests/test_cupy_kernels.py (no skips allowed)"
    pytest_stage kernels "$OUT/kernels.xml" "$CAP_kernels" --no-skips -- -m gpu tests/test_cupy_kernels.py
    ;;
  bench)
    say "bench: ${BENCH[*]}"
    run_limited "$CAP_bench" "${BENCH[@]}" --json "$OUT/bench-cuda.json" 2>&1 | tee "$TMP/bench.txt"
    rc=${PIPESTATUS[0]}
    { echo; echo "## python -m benchmarks --device cuda (last lines)"; echo; echo '```'; tail -40 "$TMP/bench.txt"; echo '```'; } >>"$SUMMARY"
    if [ "$rc" -ne 0 ]; then
      failures+=("bench: $([ "$rc" -eq 124 ] && echo "stopped by its time limit" || echo "exit $rc")")
    elif [ ! -s "$OUT/bench-cuda.json" ]; then
      failures+=("bench: no bench-cuda.json")
    fi
    ;;
  epoch)
    say "epoch: ${EPOCH[*]}"
    run_limited "$CAP_epoch" "${EPOCH[@]}" --json "$OUT/epoch.json" 2>&1 | tee "$TMP/epoch.txt"
    rc=${PIPESTATUS[0]}
    if grep -q '^## one 60,000-sample epoch' "$TMP/epoch.txt"; then
      { echo; sed -n '/^## one 60,000-sample epoch/,$p' "$TMP/epoch.txt"; grep '^### profile' "$TMP/epoch.txt"; } >>"$SUMMARY"
    else
      { echo; echo "epoch.py did not finish; its last lines:"; echo '```'; tail -15 "$TMP/epoch.txt"; echo '```'; } >>"$SUMMARY"
    fi
    if [ "$rc" -ne 0 ]; then
      failures+=("epoch: $([ "$rc" -eq 124 ] && echo "stopped by its time limit" || echo "exit $rc")")
    elif [ ! -s "$OUT/epoch.json" ]; then
      failures+=("epoch: no epoch.json")
    fi
    ;;
  gpu)
    if [ -z "${XPCONV_GPU_PER_FILE:-}" ] && "$PY" -c "import pytest_timeout" 2>/dev/null; then
      # one run; pytest-timeout ends a stuck test
      say "gpu: pytest -m gpu (whole suite on the cupy namespace, ${PER_TEST}s per test)"
      pytest_stage gpu "$OUT/gpu.xml" "$CAP_gpu" "" -- -m gpu --timeout="$PER_TEST" --ignore=tests/test_cupy_kernels.py tests
    else
      # one run per test file, each under `timeout`: a killed file leaves no XML, which FAILS the stage
      say "gpu: pytest -m gpu, file by file (${PER_FILE}s per file)"
      t0=$SECONDS
      files=()
      for f in tests/test_*.py; do
        [ "$f" = tests/test_cupy_kernels.py ] && continue
        grep -qE 'mark\.gpu|def test_[a-z0-9_]+\([^)]*\bxp\b' "$f" || continue  # gpu-marked, or on the xp fixture
        files+=("$f")
      done
      if ! n=$(collect -m gpu "${files[@]}"); then
        note "gpu: FAILED: pytest could not collect its tests (see gpu-run.log)"
        failures+=("gpu: collection failed")
      else
        xmls=()
        stopped=()
        for f in "${files[@]}"; do
          x="$TMP/gpu-$(basename "$f" .py).xml"
          xmls+=("$x")
          left=$(stage_left "$t0" "$CAP_gpu")
          [ "$left" -gt "$PER_FILE" ] && left=$PER_FILE
          run_limited "$left" "${PYTEST[@]}" -p no:cacheprovider -q -rs -m gpu --junitxml="$x" "$f" 2>&1 | tee -a "$TMP/gpu.txt"
          [ "${PIPESTATUS[0]}" -eq 124 ] && stopped+=("$f")
        done
        "$PY" benchmarks/gpu/junit.py --merge "$OUT/gpu.xml" "${xmls[@]}" >/dev/null
        # judged on the per-file XMLs: a file that wrote none counts as a failure
        verdict=$("$PY" benchmarks/gpu/junit.py --expect "$n" "${xmls[@]}")
        vrc=$?
        echo "$verdict"
        note "pytest -m gpu (without test_cupy_kernels.py): $(pytest_line "$TMP/gpu.txt")"
        note "gpu (JUnit, $n collected): $verdict"
        [ ${#stopped[@]} -eq 0 ] || note "gpu: stopped by the time limit: ${stopped[*]}"
        if [ "$vrc" -ne 0 ]; then
          failures+=("gpu: $(head -1 <<<"$verdict")")
        elif [ ${#stopped[@]} -ne 0 ]; then
          failures+=("gpu: stopped by the time limit: ${stopped[*]}")
        fi
      fi
    fi
    ;;
  *)
    echo "unknown stage $stage (expected machine preflight kernels bench epoch gpu)"
    failures+=("unknown stage $stage")
    ;;
  esac
done
rm -rf "$TMP"

if [ ${#failures[@]} -eq 0 ]; then
  note ""
  note "RESULT: ok (stages: ${stages[*]})"
else
  note ""
  note "RESULT: FAILED: $(IFS=';'; echo "${failures[*]}")"
fi

say "summary (also in $SUMMARY)"
cat "$SUMMARY"
[ ${#failures[@]} -eq 0 ] || exit 1
