"""Each script in examples/ runs as is (with small settings) and does what it says."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from xpconv.checkpoint import load_checkpoint, load_params

from .conftest import shared_dataset

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(script, *args, cwd, timeout=300):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


def test_gradient_check(tmp_path):
    out = _run("gradient_check.py", cwd=tmp_path).stdout
    rows = re.findall(r"^\s+(\w+)\s+\(.*\)\s+\d+ positions\s+relative error (\S+)$", out, re.M)
    assert [k for k, _ in rows] == ["W1", "b1", "W2", "b2", "W3", "b3"]
    assert all(float(e) < 1e-6 for _, e in rows)
    assert re.search(r"^largest relative error \S+: OK \(tolerance 1e-06\)$", out, re.M)
    out = _run("gradient_check.py", "--model", "mlp", "--xp", "array_api_strict", "--probes", "0", cwd=tmp_path).stdout
    assert "TwoLayerNet on array_api_strict" in out and ": OK" in out
    assert re.search(r"W1\s+\(64, 10\)\s+640 positions", out)  # --probes 0: every position


def test_train_digits(tmp_path):
    out = _run("train_digits.py", "--epochs", 2, "--out", tmp_path / "d", cwd=tmp_path).stdout
    assert re.search(r"^epoch 2/2  train loss ", out, re.M)
    m = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert [r["epoch"] for r in m["epochs"]] == [1, 2]
    assert m["final"]["test_acc"] > 0.9
    for name in ("curves.png", "misclassified.png", "filters.png", "last.safetensors"):
        assert (tmp_path / "d" / name).is_file(), name
    assert load_checkpoint(tmp_path / "d" / "last.safetensors").epoch == 2


def test_train_mnist(tmp_path):
    data = shared_dataset("mnist")
    proc = _run("train_mnist.py", "--data-dir", data, "--no-download", "--epochs", 1, "--limit", 1000,
                "--out", tmp_path / "m", cwd=tmp_path)
    m = re.search(r"^test accuracy on all 2,000 test images: (\d\.\d{4})$", proc.stdout, re.M)
    assert m and float(m.group(1)) > 0.3  # 10 Adam steps from the book's tiny initial weights
    assert "splitting the 10,000-image test set" in proc.stderr
    params = load_params(tmp_path / "m" / "params.safetensors")
    assert params["W1"].shape == (30, 1, 5, 5) and params["W2"].shape == (30 * 12 * 12, 100)
    assert all(np.isfinite(v).all() for v in params.values())
    assert (tmp_path / "m" / "curves.png").is_file()


def test_memory_benchmark_script_runs(tmp_path):
    """benchmarks/memory_predict.py at tiny sizes (the numbers themselves live in
    benchmarks/results/, not in a test): it measures each way in a subprocess and writes
    its JSON."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "mem.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_predict.py"), "--data-dir", tmp_path / "none",
                           "--chunked-sizes", "300", "--whole-sizes", "300", "--book-sizes", "50", "100", "--chunk", "100",
                           "--out", out], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    runs = {(x["mode"], x["n"]): x for x in r["runs"]}
    assert set(runs) == {("chunked", 300), ("whole", 300), ("book", 50), ("book", 100)}
    assert all(x["peak_rss_mb"] >= x["rss_before_predict_mb"] > 10 for x in runs.values())
    assert runs[("chunked", 300)]["chunk"] == 100 and runs[("chunked", 300)]["data"] == "synthetic"
    assert r["book_estimate"]["from_sizes"] == [50, 100]
    assert r["same_labels"] == {"whole n=300": True}
    assert "written" in proc.stdout
