#!/usr/bin/env bash
# Everything xpconv's GPU evidence needs, in one go, on the GPU machine (from the repo root):
#
#   XPCONV_COMMIT=<hash> bash benchmarks/gpu/run.sh            # all stages
#   bash benchmarks/gpu/run.sh kernels bench                     # some stages, in this order
#
# Stages (in order of value, each under its own time limit, all under XPCONV_GPU_BUDGET seconds, default 500):
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
# Writes under $OUT (or benchmarks/results/gpu-local/ when OUT is unset): gpu-run.log (everything),
# summary.md (the short tables and the RESULT line, also printed last), bench-cuda.json, epoch.json,
# floor.md, kernels.xml, gpu.xml.  Exit status: 0 all good, 1 a stage failed, 3 preflight failed.
# Dry run on the CPU (tests/test_gpu_scripts.py): XPCONV_GPU_DRY_RUN=1 skips preflight's device checks and
# XPCONV_PYTEST=<command> stands in for `python -m pytest`, so the verdict logic runs on a fake result.
# Wheels the image lacks (array-api-compat, array-api-strict) come from .whl/ (carried; see README.md).
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
BUDGET=${XPCONV_GPU_BUDGET:-500}
PER_TEST=${XPCONV_GPU_PER_TEST:-120}  # seconds for one test of the gpu stage
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(machine preflight kernels bench epoch gpu)
PY=${PYTHON:-python3}
read -r -a PYTEST <<<"${XPCONV_PYTEST:-$PY -m pytest}"
DRY=${XPCONV_GPU_DRY_RUN:-}
failures=()

say() { printf '\n==== %s  [%ss elapsed]\n' "$*" "$SECONDS"; }
note() { printf '%s\n' "$*" | tee -a "$SUMMARY" >/dev/null; printf '%s\n' "$*"; }
# run_limited CAP CMD...: CMD under min(CAP, what is left of the budget minus 15 s)
run_limited() {
  local cap=$1; shift
  local left=$((BUDGET - SECONDS - 15))
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 20 ]; then
    echo "SKIPPED (budget): $*"
    return 124
  fi
  echo "\$ timeout $cap $*"
  timeout --kill-after=10 "$cap" "$@"
}
pytest_line() {
  local line
  line=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped|deselected)|^=+ .*(passed|failed|error).* in [0-9.]+s' "$1" | tail -1)
  echo "${line:-no pytest summary (stopped by its time limit? see gpu-run.log)}"
}

# ------------------------------------------------------------------ setup
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/xpconv-site .whl/*.whl \
    || { echo "FAILED: pip install of .whl/"; exit 2; }
  export PYTHONPATH="$root:/tmp/xpconv-site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "note: no .whl/ here (run bash ../shared/device/wheels.sh first and carry .whl) -- using what is installed"
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
fi
commit=${XPCONV_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
tree=$(tree_hash)

note "# xpconv GPU run $(date -u +%Y-%m-%dT%H:%MZ)"
note ""
note "commit: $commit (tree hash $tree; stages: ${stages[*]})"

for stage in "${stages[@]}"; do
  case $stage in
  machine)
    say machine
    smi=$(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv,noheader 2>&1 | head -1)
    note "nvidia-smi: $smi"
    nvidia-smi 2>&1 | head -15
    $PY - <<'EOF' 2>&1 | tee -a "$SUMMARY"
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
    $PY -c "import sys; from xpconv.cli import main; sys.exit(main(['info']))" 2>&1 | head -40
    $PY benchmarks/gpu/floor.py >"$OUT/floor.md" 2>&1 || echo "floor.py FAILED"
    ;;
  preflight)
    say "preflight: benchmarks/gpu/preflight.py"
    pre=()
    [ -n "$DRY" ] && pre=(--dry-run)
    run_limited 120 "$PY" benchmarks/gpu/preflight.py "${pre[@]}" 2>&1 | tee "$TMP/preflight.txt"
    rc=${PIPESTATUS[0]}
    grep -E '^(NVRTC|CUDA header folders|nvidia-\* packages):' "$TMP/preflight.txt" >>"$SUMMARY"
    if [ "$rc" -ne 0 ]; then
      why=$(grep -E '^PREFLIGHT FAILED' "$TMP/preflight.txt" | tail -1)
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
    run_limited 150 "${PYTEST[@]}" -p no:cacheprovider -q -rs --durations=10 -m gpu --junitxml="$OUT/kernels.xml" \
      tests/test_cupy_kernels.py 2>&1 | tee "$TMP/kernels.txt"
    verdict=$("$PY" benchmarks/gpu/junit.py --no-skips "$OUT/kernels.xml")
    rc=$?
    echo "$verdict"
    note "pytest -m gpu tests/test_cupy_kernels.py: $(pytest_line "$TMP/kernels.txt")"
    note "kernels (JUnit): $verdict"
    [ "$rc" -eq 0 ] || failures+=("kernels: $(head -1 <<<"$verdict")")
    ;;
  bench)
    say "bench: python -m benchmarks --device cuda"
    if [ -f benchmarks/__main__.py ]; then
      run_limited 200 $PY -m benchmarks --device cuda --json "$OUT/bench-cuda.json" 2>&1 | tee "$TMP/bench.txt"
      { echo; echo "## python -m benchmarks --device cuda (last lines)"; echo; echo '```'; tail -40 "$TMP/bench.txt"; echo '```'; } >>"$SUMMARY"
    else
      note "bench: benchmarks/__main__.py is missing in this tree -- the epoch stage still compares with torch"
    fi
    ;;
  epoch)
    say "epoch: benchmarks/gpu/epoch.py"
    run_limited 150 $PY benchmarks/gpu/epoch.py --models simple,deep --batches 100,1000 --profile --json "$OUT/epoch.json" \
      2>&1 | tee "$TMP/epoch.txt"
    if grep -q '^## one 60,000-sample epoch' "$TMP/epoch.txt"; then
      { echo; sed -n '/^## one 60,000-sample epoch/,$p' "$TMP/epoch.txt"; grep '^### profile' "$TMP/epoch.txt"; } >>"$SUMMARY"
    else
      { echo; echo "epoch.py did not finish; its last lines:"; echo '```'; tail -15 "$TMP/epoch.txt"; echo '```'; } >>"$SUMMARY"
    fi
    ;;
  gpu)
    say "gpu: pytest -m gpu (whole suite on the cupy namespace, ${PER_TEST}s per test)"
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then  # one run, pytest-timeout ends a stuck test
      run_limited 400 "${PYTEST[@]}" -p no:cacheprovider -q -rs -m gpu --durations=15 --timeout="$PER_TEST" \
        --junitxml="$OUT/gpu.xml" --ignore=tests/test_cupy_kernels.py tests 2>&1 | tee "$TMP/gpu.txt"
    else  # no pytest-timeout: one run per test file, each under `timeout`; a kill loses one file's results
      xmls=()
      for f in tests/test_*.py; do
        [ "$f" = tests/test_cupy_kernels.py ] && continue
        grep -qE 'mark\.gpu|def test_[a-z0-9_]+\([^)]*\bxp\b' "$f" || continue  # gpu-marked, or on the xp fixture
        x="$TMP/gpu-$(basename "$f" .py).xml"
        xmls+=("$x")
        run_limited "$((PER_TEST * 3))" "${PYTEST[@]}" -p no:cacheprovider -q -rs -m gpu --junitxml="$x" "$f" 2>&1 | tee -a "$TMP/gpu.txt"
      done
      "$PY" benchmarks/gpu/junit.py --merge "$OUT/gpu.xml" "${xmls[@]}" >/dev/null
    fi
    verdict=$("$PY" benchmarks/gpu/junit.py "$OUT/gpu.xml")
    rc=$?
    echo "$verdict"
    note "pytest -m gpu (without test_cupy_kernels.py): $(pytest_line "$TMP/gpu.txt")"
    note "gpu (JUnit): $verdict"
    [ "$rc" -eq 0 ] || failures+=("gpu: $(head -1 <<<"$verdict")")
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
