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


def test_run_script_parses_hashes_the_tree_and_runs_its_cpu_stage(tmp_path):
    run = GPU / "run.sh"
    assert subprocess.run(["bash", "-n", str(run)]).returncode == 0
    h = subprocess.run(["bash", str(run), "--tree-hash"], capture_output=True, text=True, cwd=ROOT)
    assert h.returncode == 0 and re.fullmatch(r"[0-9a-f]{16}\n", h.stdout), h.stdout + h.stderr
    env = dict(os.environ, OUT=str(tmp_path), XPCONV_COMMIT="test-commit", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(run), "machine"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert f"commit: test-commit (tree hash {h.stdout.strip()}; stages: machine)" in summary
    assert "## simple" in (tmp_path / "floor.md").read_text()
    assert summary.strip() in (tmp_path / "gpu-run.log").read_text()
