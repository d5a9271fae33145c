"""benchmarks/gpu/: the scripts the first GPU session runs work before it does.

epoch.py runs its whole flow on the CPU (``--device cpu``: NumPy and torch's CPU, the
same code paths but CuPy's), floor.py's counts match FLOPs worked out by hand, and
run.sh parses, hashes the tree and runs its CPU-only stage.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
GPU = ROOT / "benchmarks" / "gpu"
HAS_TORCH = importlib.util.find_spec("torch") is not None


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_xpconv_gpu_{name}", GPU / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_epoch_script_runs_its_flow_on_the_cpu(tmp_path, capsys):
    epoch = _load("epoch")
    out = tmp_path / "epoch.json"
    argv = ["--device", "cpu", "--samples", "300", "--batches", "100", "--epochs", "2", "--json", str(out)]
    if not HAS_TORCH:
        argv.append("--no-torch")
    assert epoch.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["errors"] == []
    impls = [r["impl"] for r in data["results"]]
    assert impls == ["xpconv loop", "xpconv trainer"] + (["torch"] if HAS_TORCH else [])
    for r in data["results"]:
        assert len(r["epochs"]) == 2 and r["samples_per_s"] > 0 and r["batch"] == 100
        assert r["step_ms"] == pytest.approx(r["epoch_s"] / 3 * 1e3)  # 300 samples = 3 steps
    table = capsys.readouterr().out
    assert "## one 300-sample epoch" in table and "| simple | 100 | xpconv trainer |" in table


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_epoch_script_builds_the_same_architectures_in_torch():
    import numpy as np

    from xpconv.models import build_model

    epoch = _load("epoch")
    x, t = epoch.host_data(4)
    for model in ("simple", "deep"):
        net = epoch.torch_setup(model, 2, x, t, False, "cpu")[0]
        ours = build_model(model, xp="numpy", seed=0)
        theirs = [tuple(p.shape) for p in net.parameters()]
        mine = [np.asarray(v).shape for v in ours.params.values()]
        # layer by layer the same parameters (torch's Linear keeps W transposed)
        assert [t if len(t) != 2 else t[::-1] for t in theirs] == mine


def test_floor_counts_match_the_hand_worked_flops():
    floor = _load("floor")
    simple = floor.walk("simple")
    # conv 5x5, 1 -> 30 channels, 24x24 outputs: forward + dW (the first layer needs no dx)
    conv = 2 * (24 * 24) * 25 * 30 * 2
    # affine 4320 -> 100 and 100 -> 10: forward, dW, dx
    affine = 2 * 4320 * 100 * 3 + 2 * 100 * 10 * 3
    assert simple["flops"] == conv + affine == 4_326_000
    assert simple["params"] == 30 * 25 + 30 + 4320 * 100 + 100 + 100 * 10 + 10
    # the conv block as implemented (elements): im2col reads x and writes col; the product
    # reads col and writes y; bias/ReLU/pool reads y, writes out + argmax; the backward
    # gathers (dpool, argmax -> d), rebuilds col from x, dW reads d and col, db reads d
    x, col, y, pooled = 784, 576 * 25, 576 * 30, 30 * 12 * 12
    fwd = (x + col) + (col + y) + y + 2 * pooled
    bwd = (2 * pooled + y) + (x + col) + (y + col) + y
    assert simple["rows"][0][2] == (fwd + bwd) * 4
    deep = floor.walk("deep")
    shapes = [(1, 16, 28), (16, 16, 28), (16, 32, 14), (32, 32, 16), (32, 64, 8), (64, 64, 8)]  # (C, FN, OH=OW)
    convs = sum(2 * o * o * c * 9 * f * (2 if i == 0 else 3) for i, (c, f, o) in enumerate(shapes))
    assert deep["flops"] == convs + 2 * 1024 * 50 * 3 + 2 * 50 * 10 * 3
    text = floor.report("simple", 1000, 67.0, 3.0, 60_000)
    assert "260 GFLOP" in text and "| **total** | **4.326** |" in text


def test_floor_memory_counts_match_the_hand_worked_bytes():
    floor = _load("floor")
    whole = floor.memory("simple", 100, float("inf"))
    # xpconv keeps the image (col rebuilt from it), the int32 argmax, the affine's input
    # (the pooled output), the ReLU's output (the second affine's input) and the softmax
    assert whole["xp_saved"] == (784 + 4320 + 4320 + 100 + 10) * 4 * 100
    # torch: conv input, ReLU output (max-pool's input, 30x24x24), int64 indices, pooled
    # output (Linear's input), ReLU output, log-softmax
    assert whole["torch_saved"] == (784 + 17280 + 4320 + 100 + 10) * 4 * 100 + 4320 * 8 * 100
    sliced = floor.memory("simple", 1000, 8 << 20)
    assert sliced["xp_peak"] < floor.memory("simple", 1000, float("inf"))["xp_peak"]
    # the targets on paper: within 1.5x of torch's activation memory at the floor budget, and
    # at batch 1000 at the largest budget (an H100's); at batch 100 the larger budget costs at
    # most one budget's worth above torch's peak
    from xpconv.kernels import COL_BYTES, COL_BYTES_MAX

    for model in ("simple", "deep"):
        for batch in (100, 1000):
            r = floor.memory(model, batch, COL_BYTES)
            assert r["xp_peak"] <= 1.5 * r["torch_peak"], (model, batch, r)
            big = floor.memory(model, batch, COL_BYTES_MAX)
            assert big["xp_peak"] <= (1.5 * big["torch_peak"] if batch == 1000 else big["torch_peak"] + COL_BYTES_MAX), (model, batch, big)
    assert "| deep | 1000 |" in floor.memory_table(["deep"], [1000], COL_BYTES)


def test_slice_budget_comes_from_the_environment(monkeypatch):
    from xpconv import kernels

    monkeypatch.delenv("XPCONV_COL_MIB", raising=False)
    assert kernels.col_bytes_from_env() == 8 << 20
    monkeypatch.setenv("XPCONV_COL_MIB", "64")
    assert kernels.col_bytes_from_env() == 64 << 20
    for bad in ("0", "-3", "1.5", "lots"):
        monkeypatch.setenv("XPCONV_COL_MIB", bad)
        with pytest.raises(ValueError, match=f"XPCONV_COL_MIB: expected a whole number >= 1, got '{re.escape(bad)}'"):
            kernels.col_bytes_from_env()


def test_run_script_parses_hashes_the_tree_and_runs_its_cpu_stage(tmp_path):
    run = GPU / "run.sh"
    assert subprocess.run(["bash", "-n", str(run)]).returncode == 0
    h = subprocess.run(["bash", str(run), "--tree-hash"], capture_output=True, text=True, cwd=ROOT)
    assert h.returncode == 0 and re.fullmatch(r"[0-9a-f]{16}\n", h.stdout), h.stdout + h.stderr
    # (the machine stage's cap is for a GPU machine's CPUs; a shared CI box gets more time)
    env = dict(os.environ, OUT=str(tmp_path), XPCONV_COMMIT="test-commit", PYTHON=sys.executable, XPCONV_GPU_CAP_MACHINE="200")
    proc = subprocess.run(["bash", str(run), "machine"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert f"commit: test-commit (tree hash {h.stdout.strip()}; stages: machine)" in summary
    assert "## simple" in (tmp_path / "floor.md").read_text()
    assert summary.strip() in (tmp_path / "gpu-run.log").read_text()


# --------------------------------------------------------------------------- CuPy peak memory


def _fake_cupy_with_a_pool():
    """A cupy whose memory pool calls the active MemoryHooks like CuPy's does (on every
    malloc and free of pooled memory, with the rounded ``mem_size``), and keeps freed
    blocks cached: ``pool.total_bytes()`` only grows."""
    import types

    active = []

    class MemoryHook:
        def __enter__(self):
            active.append(self)
            return self

        def __exit__(self, *exc):
            active.remove(self)

    class Pool:
        total = 0
        live = 0

        def malloc(self, size):
            mem = -(-size // 512) * 512
            Pool.live += mem
            Pool.total = max(Pool.total, Pool.live)
            for h in active:
                h.malloc_postprocess(device_id=0, size=size, mem_size=mem, mem_ptr=1, pmem_id=1)
            return mem

        def free(self, mem):
            Pool.live -= mem
            for h in active:
                h.free_postprocess(device_id=0, mem_size=mem, mem_ptr=1, pmem_id=1)

        def total_bytes(self):
            return Pool.total

    stream = types.SimpleNamespace(synchronize=lambda: None)
    cuda = types.SimpleNamespace(memory_hook=types.SimpleNamespace(MemoryHook=MemoryHook),
                                 get_current_stream=lambda: stream)
    return types.SimpleNamespace(cuda=cuda, pool=Pool()), cuda.memory_hook


def test_cupy_peak_memory_counts_what_is_in_use_not_what_the_pool_caches(monkeypatch):
    from benchmarks import harness

    cupy, hook_module = _fake_cupy_with_a_pool()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cupy.cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.memory_hook", hook_module)
    pool = cupy.pool
    old_param = pool.malloc(4096)  # held from before the step (a parameter the step replaces)
    big = pool.malloc(100_000)
    pool.free(big)  # cached by the pool: its total stays high

    def step():
        a = pool.malloc(1000)  # 1024
        b = pool.malloc(3000)  # 3072
        pool.free(a)
        pool.free(old_param)  # the update frees the old parameter ...
        c = pool.malloc(4096)  # ... and allocates its new one
        pool.free(b)
        return c

    case = object.__new__(harness._XpconvCase)  # the CuPy case, without a model or a GPU
    case.cupy = cupy
    assert case.peak(step) == 1024 + 3072  # most in use at once above the start level
    assert pool.total_bytes() >= 100_000  # what pool growth would have reported instead
    epoch = _load("epoch")
    assert epoch.CupyPeak is harness.CupyPeak  # the GPU epoch script measures the same way


# --------------------------------------------------------------------------- run.sh cannot pass by skipping

RUN = GPU / "run.sh"
FAKE_PYTEST = '''
import os, sys, time
argv = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(" ".join(argv) + "\\n")
cases = os.environ["FAKE_JUNIT"].count("<testcase")
if "--collect-only" in argv:  # as pytest -q lists them: one node id a line
    paths = [a for a in argv if a.startswith("tests")]
    for i in range(len(paths) * cases + int(os.environ.get("FAKE_EXTRA_COLLECTED", "0"))):
        print(f"tests/test_fake.py::test_{i}")
    sys.exit(0)
if any(a.endswith(os.environ.get("FAKE_HANG", "-")) for a in argv):
    time.sleep(60)  # a test file that hangs: its time limit kills it before it writes XML
xml = next(a.split("=", 1)[1] for a in argv if a.startswith("--junitxml="))
if not os.environ.get("FAKE_NO_XML"):
    with open(xml, "w") as f:
        f.write("" if os.environ.get("FAKE_EMPTY_XML") else os.environ["FAKE_JUNIT"])
print(os.environ.get("FAKE_LINE", "1 passed in 0.10s"))
sys.exit(int(os.environ.get("FAKE_RC", "0")))
'''
#: a bench/epoch stand-in that writes its --json file and exits 0 (FAKE_STAGE_RC / FAKE_STAGE_NO_JSON to misbehave)
FAKE_STAGE = '''
import os, sys
argv = sys.argv[1:]
if not os.environ.get("FAKE_STAGE_NO_JSON"):
    with open(argv[argv.index("--json") + 1], "w") as f:
        f.write("{}")
print("## one 60,000-sample epoch")
sys.exit(int(os.environ.get("FAKE_STAGE_RC", "0")))
'''


def junit(*cases: str) -> str:
    return '<?xml version="1.0"?><testsuites><testsuite name="pytest">' + "".join(cases) + "</testsuite></testsuites>"


PASS = '<testcase classname="tests.test_cupy_kernels" name="test_conv[cupy]"/>'
SKIP = ('<testcase classname="tests.test_cupy_kernels" name="test_pool[cupy]">'
        '<skipped type="pytest.skip" message="no usable CUDA device (CuPy)"/></testcase>')
FAIL = '<testcase classname="tests.test_x" name="test_y"><failure message="boom"/></testcase>'


def dry_run(tmp_path, stages, junit_text, rc=0, **extra):
    fake = tmp_path / "fake_pytest.py"
    fake.write_text(FAKE_PYTEST)
    stage = tmp_path / "fake_stage.py"
    stage.write_text(FAKE_STAGE)
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), XPCONV_COMMIT="dry", PYTHON=sys.executable, XPCONV_GPU_DRY_RUN="1",
               XPCONV_PYTEST=f"{sys.executable} {fake}", FAKE_JUNIT=junit_text, FAKE_RC=str(rc),
               XPCONV_BENCH=f"{sys.executable} {stage}", XPCONV_EPOCH=f"{sys.executable} {stage}",
               FAKE_LOG=str(tmp_path / "pytest-calls.txt"), CUPY_CACHE_DIR=str(tmp_path / "cache"),
               XPCONV_SITE=str(tmp_path / "site"))
    env.update({k: str(v) for k, v in extra.items()})
    proc = subprocess.run(["bash", str(RUN), *stages], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    calls = (tmp_path / "pytest-calls.txt").read_text() if (tmp_path / "pytest-calls.txt").exists() else ""
    return proc, out, calls


def test_run_script_structure():
    text = RUN.read_text()
    assert subprocess.run(["bash", "-n", str(RUN)]).returncode == 0
    assert "set -uo pipefail" in text
    assert re.search(r"^export CUPY_CACHE_DIR=", text, re.M)
    assert re.search(r"^BUDGET=\$\{XPCONV_GPU_BUDGET:-330\}", text, re.M)
    assert "stages=(machine preflight kernels bench epoch gpu)" in text  # preflight before anything on the GPU
    # every pytest and python stage runs under the budget (run_limited = timeout), and the pytest stages write JUnit
    for line in re.findall(r"^\s*run_limited .*$", text, re.M):
        assert re.match(r'\s*run_limited ("\$\w+"|"\$\(stage_left "\$t0" "\$cap"\)") ', line), line
    assert text.count("--junitxml=") >= 2 and "--timeout=\"$PER_TEST\"" in text
    assert '"$OUT/kernels.xml"' in text and '"$OUT/gpu.xml"' in text
    assert not re.search(r"run_limited \d+ \$PY -m pytest", text), "pytest goes through ${PYTEST[@]} (the dry run's stand-in)"
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", "-S", "warning", str(RUN)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


def test_preflight_failure_stops_the_run_saying_why(tmp_path):
    # on this CPU the real preflight fails (no CuPy or no device): the run must stop there, exit 3
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), XPCONV_COMMIT="c", PYTHON=sys.executable,
               XPCONV_PYTEST=f"{sys.executable} -c 'raise SystemExit(\"pytest must not run\")'")
    env.pop("XPCONV_GPU_DRY_RUN", None)
    proc = subprocess.run(["bash", str(RUN), "preflight", "kernels"], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "RESULT: FAILED at preflight, the run stops here: PREFLIGHT FAILED: CUDA not usable: " in summary
    assert "nvidia-* packages:" in summary
    assert "==== kernels" not in proc.stdout and "pytest must not run" not in proc.stdout


def test_a_skipped_gpu_kernel_test_fails_the_run(tmp_path):
    proc, out, calls = dry_run(tmp_path, ["preflight", "kernels"], junit(PASS, SKIP), rc=0)
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "kernels (JUnit, 2 collected): 1 passed, 0 failed, 0 errors, 1 skipped" in summary
    assert "RESULT: FAILED: kernels: 1 passed, 0 failed, 0 errors, 1 skipped" in summary
    assert "-m gpu" in calls and f"--junitxml={out}/kernels.xml" in calls and "tests/test_cupy_kernels.py" in calls
    assert (out / "kernels.xml").exists()
    assert "skipped tests.test_cupy_kernels::test_pool[cupy]: no usable CUDA device (CuPy)" in proc.stdout


@pytest.mark.parametrize("junit_text, rc, ok", [(junit(PASS), 0, True), (junit(PASS, FAIL), 1, False), (junit(), 5, False)],
                         ids=["pass", "fail", "none-ran"])
def test_the_kernel_and_gpu_stages_pass_only_on_a_clean_result(tmp_path, junit_text, rc, ok):
    proc, out, calls = dry_run(tmp_path, ["preflight", "kernels", "gpu"], junit_text, rc=rc)
    summary = (out / "summary.md").read_text()
    assert (proc.returncode == 0) is ok, proc.stdout + proc.stderr
    assert ("RESULT: ok" in summary) is ok and ("RESULT: FAILED" in summary) is not ok
    assert (out / "gpu.xml").exists() or not ok  # JUnit of the last stage in the results, merged or direct
    gpu_calls = [c for c in calls.splitlines() if "test_cupy_kernels" not in c and "--collect-only" not in c]
    assert all("-m gpu" in c for c in gpu_calls) and (gpu_calls or "gpu: collection failed" in summary)
    import importlib.util as iu

    if iu.find_spec("pytest_timeout"):
        assert all("--timeout=60" in c for c in gpu_calls)
    else:  # one call per test file, each under `timeout`
        assert (len(gpu_calls) > 1 and re.search(r"\$ timeout \d+ .*-m gpu", proc.stdout)) or not ok


def test_junit_reader_counts_and_merges(tmp_path):
    jr = _load("junit")
    a, b = tmp_path / "a.xml", tmp_path / "b.xml"
    a.write_text(junit(PASS, SKIP))
    b.write_text(junit(PASS))
    assert jr.verdict([str(a)], no_skips=False)[0] == 0
    assert jr.verdict([str(a)], no_skips=True)[0] == 1
    rc, lines = jr.verdict([str(tmp_path / "missing.xml")], no_skips=False)
    assert rc == 1 and "no JUnit XML" in lines[-1]  # a killed run that wrote nothing fails
    jr.merge([str(a), str(b)], str(tmp_path / "m.xml"))
    assert jr.verdict([str(tmp_path / "m.xml")], no_skips=False)[1][0] == "2 passed, 0 failed, 0 errors, 1 skipped"


# --------------------------------------------------------------------------- run.sh cannot pass over a failure


def _gpu_stage_files() -> list[str]:
    """The test files run.sh's per-file gpu stage runs (its own selection, repeated)."""
    pick = re.compile(r"mark\.gpu|def test_[a-z0-9_]+\([^)]*\bxp\b")
    return sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").glob("test_*.py")
                  if f.name != "test_cupy_kernels.py" and pick.search(f.read_text()))


def test_a_test_file_killed_by_its_time_limit_fails_the_run(tmp_path):
    files = _gpu_stage_files()
    assert len(files) > 2
    proc, out, calls = dry_run(tmp_path, ["gpu"], junit(PASS), XPCONV_GPU_PER_FILE=1, XPCONV_GPU_PER_FILE_CAP=2,
                               XPCONV_GPU_MIN_CAP=1, FAKE_HANG=files[1])
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"gpu (JUnit, {len(files)} collected): {len(files) - 1} passed, 0 failed, 0 errors, 0 skipped" in summary
    assert f"gpu: stopped by the time limit: {files[1]}" in summary
    assert "RESULT: FAILED: gpu: " in summary and "RESULT: ok" not in summary
    assert "no JUnit XML" in proc.stdout  # the killed file's missing XML is named
    assert len([c for c in calls.splitlines() if "--collect-only" not in c]) == len(files)  # the others still ran


def test_a_pytest_stage_killed_as_a_whole_fails_the_run(tmp_path):
    # one pytest call (the kernels stage), killed when the budget runs out
    proc, out, _ = dry_run(tmp_path, ["kernels"], junit(PASS), FAKE_HANG="tests/test_cupy_kernels.py",
                           XPCONV_GPU_BUDGET=4, XPCONV_GPU_MIN_CAP=1)
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "STOPPED by its time limit" in proc.stdout
    assert "RESULT: FAILED: kernels: 0 passed, 0 failed, 0 errors, 0 skipped" in summary


@pytest.mark.parametrize("how", ["FAKE_NO_XML", "FAKE_EMPTY_XML"])
def test_a_missing_or_empty_junit_file_fails_the_run(tmp_path, how):
    proc, out, _ = dry_run(tmp_path, ["kernels"], junit(PASS), **{how: 1})
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "RESULT: FAILED: kernels: 0 passed" in summary and "no JUnit XML" in proc.stdout


def test_fewer_tests_run_than_collected_fails_the_run(tmp_path):
    proc, out, _ = dry_run(tmp_path, ["kernels"], junit(PASS, PASS), FAKE_EXTRA_COLLECTED=1)
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "kernels (JUnit, 3 collected): 2 passed, 0 failed, 0 errors, 0 skipped" in summary
    assert "FAILED: 3 tests collected but 2 in the JUnit XML (the rest never ran)" in proc.stdout
    (tmp_path / "ok").mkdir()
    ok, out_ok, _ = dry_run(tmp_path / "ok", ["kernels"], junit(PASS, PASS))
    assert ok.returncode == 0 and "RESULT: ok" in (out_ok / "summary.md").read_text(), ok.stdout + ok.stderr


@pytest.mark.parametrize("stage", ["bench", "epoch"])
@pytest.mark.parametrize("how", ["crash", "no-json", "ok"])
def test_a_crashed_bench_or_epoch_stage_fails_the_run(tmp_path, stage, how):
    extra = {"crash": {"FAKE_STAGE_RC": 1}, "no-json": {"FAKE_STAGE_NO_JSON": 1}, "ok": {}}[how]
    proc, out, _ = dry_run(tmp_path, [stage], junit(PASS), **extra)
    summary = (out / "summary.md").read_text()
    if how == "ok":
        assert proc.returncode == 0 and "RESULT: ok" in summary, proc.stdout + proc.stderr
    else:
        assert proc.returncode == 1, proc.stdout + proc.stderr
        why = "exit 1" if how == "crash" else f"no {'bench-cuda' if stage == 'bench' else 'epoch'}.json"
        assert f"RESULT: FAILED: {stage}: {why}" in summary


def test_the_stage_caps_fit_the_budget_and_the_run_fits_six_minutes():
    text = RUN.read_text()
    caps = {m[0]: int(m[1]) for m in re.findall(r"^CAP_(\w+)=\$\{XPCONV_GPU_CAP_\w+:-(\d+)\}", text, re.M)}
    stages = re.search(r"stages=\(([a-z ]+)\)", text)[1].split()
    assert sorted(caps) == sorted(stages)
    budget = int(re.search(r"^BUDGET=\$\{XPCONV_GPU_BUDGET:-(\d+)\}", text, re.M)[1])
    grace = int(re.search(r"^KILL_GRACE=(\d+)", text, re.M)[1])
    assert sum(caps.values()) < budget
    # every stage killed at its cap, each after its grace, and 15 s of set-up: still under 6 minutes
    assert sum(caps.values()) + grace * len(caps) + 15 <= 360, (caps, grace)
    # every stage's command runs under run_limited (machine too: as one command)
    assert 'run_limited "$CAP_machine" bash -c machine_stage' in text
    for stage in stages:
        assert f'"$CAP_{stage}"' in text, stage


def test_the_wheels_go_on_the_path_without_pip(tmp_path):
    """An image without pip: the wheels are unpacked onto PYTHONPATH instead."""
    import zipfile

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "xpc_probe-1.0-py3-none-any.whl", "w") as z:
        z.writestr("xpc_probe.py", "WHERE = 'from the wheel'\n")
    nopip = tmp_path / "python"
    nopip.write_text(f'#!/bin/sh\nif [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "No module named pip" >&2; exit 1; fi\n'
                     f'exec {sys.executable} "$@"\n')
    nopip.chmod(0o755)
    probe = tmp_path / "probe.py"
    probe.write_text("import sys, xpc_probe\nprint(xpc_probe.WHERE)\nopen(sys.argv[sys.argv.index('--json') + 1], 'w').write('{}')\n")
    proc, out, _ = dry_run(tmp_path, ["bench"], junit(PASS), XPCONV_WHEELS=wheels, PYTHON=nopip, XPCONV_BENCH=f"{nopip} {probe}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no pip here -- unpacking" in proc.stdout and "from the wheel" in proc.stdout
