"""The benchmark harness (benchmarks/, ``python -m benchmarks`` from a checkout's root) runs
and writes well-formed JSON.  Tiny sizes and --quick: nothing here is timed
or compared against a speed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import benchmarks.__main__ as bench_cli
from benchmarks import harness, machine
from benchmarks.textbook import TextbookNet
from xpconv import info
from xpconv.models import DeepConvNet, SimpleConvNet

ROOT = Path(__file__).resolve().parents[1]
HAS_TORCH = importlib.util.find_spec("torch") is not None
IMPLS = ["xpconv", "torch", "textbook"] if HAS_TORCH else ["xpconv", "textbook"]


def check_structure(data, models, batches, modes, impls, kind):
    assert data["benchmark"] == "xpconv bench" and data["schema"] == harness.SCHEMA and data["kind"] == kind
    s = data["settings"]
    assert s["models"] == models and s["batch_sizes"] == batches and s["impls"] == impls and s["modes"] == modes
    assert s["dtype"] == "float32" and s["input_dim"] == [1, 28, 28]
    assert data["machine"]["cores"] >= 1 and data["machine"]["numpy"] == np.__version__
    cells = {(r["model"], r["batch"], r["mode"], r["impl"]) for r in data["results"]}
    want = {(m, b, mode, i) for m in models for b in batches for mode in modes for i in impls}
    assert cells == want and len(data["results"]) == len(want)
    for r in data["results"]:
        assert len(r["runs"]) == s["repeats"] and all(v > 0 for v in r["runs"])
        assert min(r["runs"]) <= r["samples_per_s"] <= max(r["runs"])
        assert r["steps_per_repeat"] >= 1
        assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] >= 0
    pairs = {(r["model"], r["batch"], r["mode"], r["a"], r["b"]) for r in data["ratios"]}
    want_pairs = {(m, b, mode, a, c) for m in models for b in batches for mode in modes
                  for k, a in enumerate(impls) for c in impls[k + 1:]}
    assert pairs == want_pairs
    for r in data["ratios"]:
        ra = next(x for x in data["results"] if (x["model"], x["batch"], x["mode"], x["impl"]) == (r["model"], r["batch"], r["mode"], r["a"]))
        rb = next(x for x in data["results"] if (x["model"], x["batch"], x["mode"], x["impl"]) == (r["model"], r["batch"], r["mode"], r["b"]))
        assert r["ratio"] == pytest.approx(ra["samples_per_s"] / rb["samples_per_s"])
        assert r["per_repeat_min"] <= r["per_repeat_max"]


def test_quick_suite_writes_json_with_every_cell_and_the_targets(tmp_path, capsys):
    out = tmp_path / "sub" / "bench.json"
    rc = bench_cli.run(["--quick", "--min-time", "0", "--models", "simple", "--batch-sizes", "100", "--modes", "train",
                        "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    check_structure(data, ["simple"], [100], ["train"], IMPLS, "suite")
    assert data["command"].startswith("python -m benchmarks --quick")
    names = [t["target"] for t in data["targets"]]
    assert "simple train b100: xpconv/textbook" in names
    assert any("20 epochs" in n for n in names)
    if HAS_TORCH:
        assert "simple train b100: xpconv/torch" in names
    for t in data["targets"]:
        assert t["met"] == (t["got"] <= t["want"] if "epochs" in t["target"] else t["got"] >= t["want"])
    table = capsys.readouterr().out
    assert "| simple | 100 | train |" in table and "| target |" in table
    assert not list(out.parent.glob(".bench-*")), "the atomic write left its temporary file behind"


def test_epochs_run_is_timed_and_reported(tmp_path, capsys):
    out = tmp_path / "run.json"
    rc = bench_cli.run(["--quick", "--min-time", "0", "--models", "simple", "--batch-sizes", "4", "--impls", "xpconv",
                        "--modes", "train", "--repeats", "1", "--epochs-run", "2", "--epoch-samples", "300", "--json", str(out)])
    assert rc == 0
    run = json.loads(out.read_text())["epochs_run"]
    assert (run["epochs"], run["samples_per_epoch"], run["batch"], run["model"]) == (2, 300, 100, "simple")
    assert run["seconds"] > 0 and run["minutes"] == pytest.approx(run["seconds"] / 60)
    assert run["train_samples_per_s"] == pytest.approx(600 / run["seconds"])
    assert "Trainer run: 2 epochs x 300 samples" in capsys.readouterr().out


def test_scaling_mode(tmp_path, capsys):
    out = tmp_path / "scaling.json"
    rc = bench_cli.run(["--scaling", "--quick", "--min-time", "0", "--models", "deep", "--batch-sizes", "1,3",
                   "--impls", "xpconv,textbook", "--modes", "train", "--threads", "1", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    check_structure(data, ["deep"], [1, 3], ["train"], ["xpconv", "textbook"], "scaling")
    assert data["settings"]["threads"] == 1 and "targets" not in data
    assert "KB/sample xpconv" in capsys.readouterr().out
    assert data["command"].startswith("python -m benchmarks --scaling")


def test_machine_record_comes_from_xpconv_info():
    m = machine.report("cpu", None)
    assert m["cpu"] == info.cpu_model() and m["env"] == info.thread_env()
    assert [b["internal_api"] for b in m["blas"]] == [b["internal_api"] for b in info.blas()["libraries"]]


def test_benchmarks_module_defaults_its_json_into_results(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_cli, "RESULTS", tmp_path)
    rc = bench_cli.main(["--quick", "--min-time", "0", "--models", "deep", "--batch-sizes", "2", "--threads", "1",
                       "--impls", "xpconv", "--repeats", "1"])
    assert rc == 0
    data = json.loads((tmp_path / "cpu-suite-quick.json").read_text())
    check_structure(data, ["deep"], [2], ["train", "infer"], ["xpconv"], "suite")


@pytest.mark.parametrize("argv,message", [
    (["--models", "resnet"], "unknown model"),
    (["--impls", "jax"], "unknown implementation"),
    (["--modes", "eval"], "unknown mode"),
])
def test_bad_choices_are_refused_by_name(argv, message, capsys):
    assert bench_cli.run(argv) == 2
    assert message in capsys.readouterr().err


def test_cuda_without_a_device_is_a_clear_error_not_a_crash(capsys, monkeypatch):
    from xpconv import backend

    monkeypatch.setattr(backend, "cuda_status", lambda: (False, "no CUDA here"))
    assert bench_cli.run(["--device", "cuda", "--quick"]) == 2
    assert "no usable CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["simple", "deep"])
def test_baselines_compute_the_same_network(model):
    """torch and textbook columns run xpconv's architecture with its initial weights:
    the same scores (dropout off) and, for the textbook, the same first-step loss.
    (torch's Dropout scales at training time, the book's at test time: the same cost,
    scores that differ by (1 - ratio) per dropout layer.)"""
    net = (SimpleConvNet if model == "simple" else DeepConvNet)(seed=0)
    x, t = harness._data(3)
    want = np.asarray(net.predict(x), dtype=np.float64)
    tb = TextbookNet(net, np)
    np.testing.assert_allclose(tb.predict(x), want, rtol=1e-3, atol=1e-5)
    if model == "simple":  # no dropout: the losses agree
        assert tb.train_step(x, t) == pytest.approx(float(net.loss(x, t)), rel=1e-4)
    if HAS_TORCH:
        import torch

        from xpconv.interop import to_torch

        mod = to_torch(net, dtype=torch.float32, dropout="inverted").eval()  # the harness's torch column
        with torch.no_grad():
            got = mod(torch.from_numpy(x)).numpy()
        for m in mod:
            if isinstance(m, torch.nn.Dropout):
                got = got * (1.0 - m.p)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)


def test_thread_limit_pins_torch_and_numba_and_restores_them():
    # numba's OpenMP layer shares libgomp with torch: setting numba's threads after
    # torch's would silently undo torch's (the order in thread_limit matters)
    torch = pytest.importorskip("torch")
    numba = pytest.importorskip("numba")
    before = (torch.get_num_threads(), numba.get_num_threads())
    with machine.thread_limit(1):
        assert (torch.get_num_threads(), numba.get_num_threads()) == (1, 1)
    assert (torch.get_num_threads(), numba.get_num_threads()) == before


# --------------------------------------------------------------------------- benchmarks/isa.py


def test_isa_cells_stand_for_the_level_they_name():
    """Each cell's forced Numba target is the instruction-set level its name says (xpconv's
    kernels choose their blocks from it), whatever the host."""
    pytest.importorskip("numba")
    from benchmarks import isa
    from xpconv.kernels import numba_ops

    want = {"avx2": ("avx2", False), "skylake-avx512": ("avx512", True), "icelake-server": ("avx512", True),
            "skylake-avx512-numba": ("avx512", False)}
    for cell, (level, wide) in want.items():
        env = isa.CELLS[cell][1]
        t = numba_ops.choose_target(env["NUMBA_CPU_NAME"], env["NUMBA_CPU_FEATURES"], "znver4", "+avx2,+fma,+avx512f,+avx512bw,+avx512dq,+avx512vl",
                                    env.get("XPCONV_NUMBA_TARGET", "auto"))
        assert (t["cpu"], t["level"], t["wide"]) == (env["NUMBA_CPU_NAME"], level, wide), cell
        assert env["ATEN_CPU_CAPABILITY"] in ("avx2", "avx512") and env["ONEDNN_MAX_CPU_ISA"].startswith(env["ATEN_CPU_CAPABILITY"].upper())
    assert isa.CELLS["host"][1] == {}


def test_isa_training_flops_count_every_layer():
    """2 x multiply-adds x (forward, dW, dx), less the first layer's dx: DeepConvNet's six 3x3
    convolutions (output sizes 28, 28, 14, 16, 8, 8) and its two affine layers."""
    pytest.importorskip("torch")
    from benchmarks import isa

    convs = [(1, 16, 28), (16, 16, 28), (16, 32, 14), (32, 32, 16), (32, 64, 8), (64, 64, 8)]
    macs = [c * f * 9 * s * s for c, f, s in convs] + [64 * 4 * 4 * 50, 50 * 10]
    assert isa.train_flops("deep") == 2 * (3 * sum(macs) - macs[0])
    simple = [1 * 30 * 25 * 24 * 24, 30 * 12 * 12 * 100, 100 * 10]
    assert isa.train_flops("simple") == 2 * (3 * sum(simple) - simple[0])


def test_isa_table_gives_ratio_rate_and_fraction_of_peak():
    from benchmarks import isa

    cell = {"cell": "avx2", "results": [
        {"model": "deep", "batch": 100, "mode": "train", "impl": "xpconv", "samples_per_s": 1000.0, "loadavg_1min": 1.5},
        {"model": "deep", "batch": 100, "mode": "train", "impl": "torch", "samples_per_s": 800.0, "loadavg_1min": 1.5}],
        "ratios": [{"model": "deep", "batch": 100, "mode": "train", "a": "xpconv", "b": "torch", "ratio": 1.25,
                    "per_repeat_min": 1.1, "per_repeat_max": 1.3}]}
    result = {"sgemm_gflops": {"1 core": 100.0, "all cores": 200.0}, "train_flops_per_sample": {"deep": 50e6}, "cells": [cell]}
    rows = isa.table(result).splitlines()
    assert rows[2] == "| deep | 100 | train | avx2 | 1,000 | 800 | 1.25x (1.10-1.30) | 50 | 25% | 1.5 |"


def test_isa_refuses_an_unknown_cell(capsys):
    from benchmarks import isa

    assert isa.main(["--cells", "host,avx3"]) == 2
    assert "unknown cell(s) ['avx3']" in capsys.readouterr().err
