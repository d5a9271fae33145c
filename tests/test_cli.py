"""The xpconv command end to end: train on the bundled digits (files, metrics.json, PNGs),
eval, predict (PNG and .npy), resume, NaN/inf, out of memory, Ctrl-C, clear errors, and a
short real-MNIST run."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xpconv import cli
from xpconv.checkpoint import load_checkpoint, load_params
from xpconv.datasets import load_digits
from xpconv.training import Trainer

from .conftest import shared_dataset

ROOT = Path(__file__).resolve().parents[1]
PNGS = ("curves.png", "misclassified.png", "filters.png")
RECORD_KEYS = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_acc", "lr", "seconds"}


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XPCONV_DATA_DIR", None)
    return env


def _xpconv(*args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "xpconv.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=_env())


def _main(capsys, *args):
    """Run ``xpconv ARGS`` in this process: (exit status, stdout, stderr)."""
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _strip(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")} for r in records]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    """``xpconv train --epochs 4`` on the bundled digits, as a user runs it (a subprocess)."""
    base = tmp_path_factory.mktemp("cli")
    out = base / "run"
    proc = _xpconv("train", "--epochs", 4, "--out", out, cwd=base)
    assert proc.returncode == 0, proc.stderr
    return out, proc


# ----------------------------------------------------------------------------- train


def test_train_output_and_files(run4):
    out, proc = run4
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"xpconv {cli.__version__}: SimpleConvNet on digits (1,294 train / 144 validation / 359 test), "
                               "numpy float32, AdaGrad lr 0.05, 4 epochs x 25 batches of 50, seed 0")
    assert lines[1] == "best.safetensors: the best validation epoch (--val-split 0.1, drawn by the seed); lr schedule constant"
    assert lines[2] == f"writing to {out}"
    for k in range(1, 5):
        assert re.match(rf"epoch {k}/4  train loss \d\.\d{{4}}  train acc \d\.\d{{4}}  val loss \d\.\d{{4}}  val acc \d\.\d{{4}}  "
                        rf"test acc \d\.\d{{4}}  lr 0\.05  ", lines[2 + k]), lines[2 + k]
    assert re.fullmatch(r"test accuracy of best.safetensors \d\.\d{4} \(epoch \d, chosen by its validation accuracy \d\.\d{4}\) "
                        r"after 4 epochs, .+", lines[7])
    assert lines[8] == f"results in {out}: metrics.json, last.safetensors, best.safetensors, curves.png, misclassified.png, filters.png"
    assert "Traceback" not in proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["metrics.json", "metrics.jsonl", "last.safetensors", "best.safetensors", *PNGS])
    mode = 0o666 & ~_umask()
    for p in out.iterdir():
        assert (p.stat().st_mode & 0o777) == mode, p  # not mkstemp's 0600


def test_metrics_json(run4):
    out, proc = run4
    m = json.loads((out / "metrics.json").read_text())
    assert set(m) >= {"epochs", "final", "config"}
    assert [r["epoch"] for r in m["epochs"]] == [1, 2, 3, 4]
    for r in m["epochs"]:
        assert set(r) >= RECORD_KEYS
        assert 0.0 <= r["train_acc"] <= 1.0 and 0.0 <= r["test_acc"] <= 1.0
        assert r["train_loss"] > 0 and r["seconds"] > 0
    losses = [r["train_loss"] for r in m["epochs"]]
    assert losses == sorted(losses, reverse=True)  # falls every epoch on this run
    final = m["final"]
    assert final["test_acc"] == m["epochs"][-1]["test_acc"]
    assert final["test_acc"] >= 0.95
    best = max(m["epochs"], key=lambda r: (r["val_acc"], -r["val_loss"]))  # the best validation epoch (first of equals)
    assert (final["best_epoch"], final["best_val_acc"], final["test_acc_of_best"]) == (best["epoch"], best["val_acc"], best["test_acc"])
    assert "best_test_acc" not in final  # the test set chose nothing
    cfg = m["config"]
    assert {k: cfg[k] for k in ("model", "dataset", "epochs", "batch_size", "optimizer", "lr", "seed", "dtype", "ranks")} == {
        "model": "simple", "dataset": "digits", "epochs": 4, "batch_size": 50, "optimizer": "adagrad", "lr": 0.05,
        "seed": 0, "dtype": "float32", "ranks": 1,
    }
    assert (cfg["train_samples"], cfg["test_samples"]) == (1438, 359)
    assert cfg["backend"] == "numpy" and cfg["input_dim"] == [1, 8, 8]
    # the per-epoch line shows the numbers that were written
    assert f"test acc {m['epochs'][0]['test_acc']:.4f}" in proc.stdout.splitlines()[3]

    c = load_checkpoint(out / "last.safetensors")
    assert c.epoch == 4 and c.metrics == m["epochs"] and c.extra["config"] == cfg


@pytest.mark.parametrize("name", PNGS)
def test_pngs_are_real_images(run4, name):
    path = run4[0] / name
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert w >= 400 and 150 <= h <= 2000
        grey = np.asarray(im.convert("L"), dtype=np.float64)
    assert grey.std() > 10  # not blank
    assert (grey > 250).mean() > 0.3  # a white page with drawings, not a dark mess


def test_default_train_reaches_97_percent(tmp_path, capsys, monkeypatch):
    """The issue's first promise: ``xpconv train`` with no options (the 20-epoch digits
    recipe) reaches >= 97% test accuracy."""
    monkeypatch.chdir(tmp_path)
    code, out, err = _main(capsys, "train", "--no-plots")
    assert code == 0, err
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and re.fullmatch(r"\d{8}-\d{6}", runs[0].name)  # runs/<timestamp>
    m = json.loads((runs[0] / "metrics.json").read_text())
    assert len(m["epochs"]) == 20
    assert m["final"]["test_acc"] >= 0.97


def test_other_model_dtype_and_optimizer(tmp_path, capsys):
    out = tmp_path / "mlp"
    code, text, err = _main(capsys, "train", "--model", "mlp", "--dtype", "float64", "--optimizer", "Nesterov",
                            "--epochs", 2, "--batch-size", 100, "--seed", 3, "--out", out)
    assert code == 0, err
    assert "TwoLayerNet on digits" in text and "numpy float64, Nesterov lr 0.01, 2 epochs x 12 batches of 100, seed 3" in text
    c = load_checkpoint(out / "last.safetensors")
    assert type(c.model).__name__ == "TwoLayerNet" and c.metadata["model"]["dtype"] == "float64"
    assert type(c.optimizer).__name__ == "Nesterov" and c.optimizer.lr == 0.01 and c.optimizer.iter == 24
    assert load_params(out / "last.safetensors")["W1"].dtype == np.float64
    cfg = json.loads((out / "metrics.json").read_text())["config"]
    assert (cfg["model"], cfg["optimizer"], cfg["dtype"], cfg["seed"], cfg["batch_size"]) == ("mlp", "nesterov", "float64", 3, 100)
    for name in PNGS:  # an MLP's filters.png shows its first hidden units as 8x8 images
        with Image.open(out / name) as im:
            im.verify()


def test_quiet(tmp_path, capsys):
    code, out, err = _main(capsys, "train", "--epochs", 1, "--quiet", "--no-plots", "--out", tmp_path / "q")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("test accuracy ") and lines[1].startswith("results in ")
    assert err == ""


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--model", "--dataset", "--data-dir", "--epochs", "--batch-size", "--optimizer", "--lr", "--seed",
                "--device", "--dtype", "--out", "--resume", "--quiet"):
        assert opt in text
    for word in ("simple", "deep", "mlp", "digits", "mnist", "fashion-mnist", "sgd", "momentum", "nesterov",
                 "adagrad", "rmsprop", "adam", "auto", "cpu", "cuda", "float32", "float64", "runs/<timestamp>"):
        assert word in text, word


# ----------------------------------------------------------------------------- eval and predict


def test_eval(run4, capsys):
    out = run4[0]
    m = json.loads((out / "metrics.json").read_text())
    code, text, err = _main(capsys, "eval", out / "last.safetensors")
    assert code == 0, err
    acc = m["final"]["test_acc"]
    assert f"{out / 'last.safetensors'} (SimpleConvNet, epoch 4) on digits test set: accuracy {acc:.4f} ({round(acc * 359)} of 359)" in text
    code, text, _ = _main(capsys, "eval", out / "best.safetensors", "--batch-size", 7)
    assert code == 0 and f"accuracy {m['final']['test_acc_of_best']:.4f}" in text


@pytest.fixture(scope="module")
def digits_test():
    return load_digits()[1]


def _predicted(out, x):
    model = load_checkpoint(out / "last.safetensors").model
    y = np.asarray(model.predict(x))
    p = np.exp(y - y.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return p.argmax(axis=1), p.max(axis=1)


def _parse_predictions(text):
    return [(m.group(1), int(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"^(.+?): class (\d) \(probability (\d\.\d{3})\)", text, re.M)]


def test_predict_npy(run4, digits_test, tmp_path, capsys):
    out = run4[0]
    x, _ = digits_test
    np.save(tmp_path / "batch.npy", x[:5])  # (N, C, H, W) float32
    np.save(tmp_path / "one.npy", x[7, 0])  # (H, W)
    np.save(tmp_path / "u8.npy", np.round(x[9, 0] * 255).astype(np.uint8))  # uint8 0..255
    code, text, err = _main(capsys, "predict", out / "last.safetensors", tmp_path / "batch.npy", tmp_path / "one.npy", tmp_path / "u8.npy")
    assert code == 0, err
    got = _parse_predictions(text)
    assert [g[0] for g in got] == [f"{tmp_path / 'batch.npy'}[{i}]" for i in range(5)] + [str(tmp_path / "one.npy"), str(tmp_path / "u8.npy")]
    cls, prob = _predicted(out, x[[0, 1, 2, 3, 4, 7, 9]])
    assert [g[1] for g in got] == cls.tolist()
    np.testing.assert_allclose([g[2] for g in got], prob, atol=2e-3)


def test_predict_png(run4, digits_test, tmp_path, capsys):
    """PNG input: grey, resized to the model's input, inverted when the background is light."""
    out = run4[0]
    x, t = digits_test
    cls, _ = _predicted(out, x[:20])
    i = int(np.flatnonzero(cls == t[:20])[0])  # an image the model gets right
    img = np.round(x[i, 0] * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "exact.png")  # 8x8, light ink on dark like the data
    big = Image.fromarray(255 - img).resize((64, 64), Image.NEAREST).convert("RGB")  # dark ink on white, larger, colour
    big.save(tmp_path / "scan.png")
    code, text, err = _main(capsys, "predict", out / "last.safetensors", tmp_path / "exact.png", tmp_path / "scan.png", "--top", "1")
    assert code == 0, err
    lines = text.splitlines()
    assert re.fullmatch(rf"{re.escape(str(tmp_path / 'exact.png'))}: class {t[i]} \(probability \d\.\d{{3}}\)", lines[0])
    assert re.fullmatch(rf"{re.escape(str(tmp_path / 'scan.png'))}: class {t[i]} \(probability \d\.\d{{3}}\)  \[resized 64x64 -> 8x8; inverted \(light background\)\]", lines[1])

    code, text, _ = _main(capsys, "predict", out / "last.safetensors", tmp_path / "exact.png", "--top", "3")
    m = re.fullmatch(r".+: (\d) \((\d\.\d{3})\), (\d) \((\d\.\d{3})\), (\d) \((\d\.\d{3})\)\n", text)
    assert m and int(m.group(1)) == t[i]
    assert float(m.group(2)) >= float(m.group(4)) >= float(m.group(6))


# ----------------------------------------------------------------------------- errors speak to the user


def _fails(capsys, *args, code=2):
    got, out, err = _main(capsys, *args)
    assert got == code, (out, err)
    assert err.startswith("xpconv: error: "), err
    assert "Traceback" not in err
    return err


def test_bad_checkpoint_files(run4, tmp_path, capsys):
    err = _fails(capsys, "eval", tmp_path / "nope.safetensors")
    assert f"{tmp_path / 'nope.safetensors'}: no such checkpoint file" in err
    pkl = tmp_path / "model.pkl"
    pkl.write_bytes(pickle.dumps({"W1": np.zeros(3)}))
    for cmd in (("eval", pkl), ("predict", pkl, tmp_path / "x.npy"), ("train", "--resume", pkl)):
        err = _fails(capsys, *cmd)
        assert f"{pkl}: refusing to load: it is a Python pickle: unpickling can execute arbitrary code" in err
    half = tmp_path / "half.safetensors"
    half.write_bytes((run4[0] / "last.safetensors").read_bytes()[:5000])
    assert "truncated" in _fails(capsys, "eval", half)


def test_bad_predict_inputs(run4, tmp_path, capsys):
    ckpt = run4[0] / "last.safetensors"
    np.save(tmp_path / "mnist_sized.npy", np.zeros((2, 1, 28, 28), np.float32))
    err = _fails(capsys, "predict", ckpt, tmp_path / "mnist_sized.npy")
    assert f"{tmp_path / 'mnist_sized.npy'}: array of shape (2, 1, 28, 28); this model takes (1, 8, 8) images (or (N, 1, 8, 8))" in err
    np.save(tmp_path / "flat.npy", np.zeros(64, np.float32))
    assert "array of shape (64,)" in _fails(capsys, "predict", ckpt, tmp_path / "flat.npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert f"{tmp_path / 'objects.npy'}: not a plain .npy array" in _fails(capsys, "predict", ckpt, tmp_path / "objects.npy")
    (tmp_path / "fake.png").write_text("not really a picture")
    assert f"{tmp_path / 'fake.png'}: not an image xpconv reads" in _fails(capsys, "predict", ckpt, tmp_path / "fake.png")
    assert f"{tmp_path / 'missing.png'}: no such file" in _fails(capsys, "predict", ckpt, tmp_path / "missing.png")


def test_bad_train_and_eval_options(run4, tmp_path, capsys):
    ckpt = run4[0] / "last.safetensors"
    err = _fails(capsys, "eval", ckpt, "--dataset", "mnist")
    assert "takes inputs of shape (1, 8, 8), but mnist images are (1, 28, 28)" in err
    assert f"{ckpt} already has 4 of 4 epochs; pass --epochs N with N > 4" in _fails(capsys, "train", "--resume", ckpt)
    err = _fails(capsys, "train", "--resume", ckpt, "--epochs", 5, "--optimizer", "sgd")
    assert "--optimizer sgd does not match the checkpoint's 'adagrad'" in err
    assert "--model deep does not match" in _fails(capsys, "train", "--resume", ckpt, "--epochs", 5, "--model", "deep")
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _fails(capsys, "train", "--dataset", "mnist", "--data-dir", empty, "--no-download", "--out", tmp_path / "o")
    assert str(empty) in err and "t10k-images-idx3-ubyte.gz" in err
    for bad in (("--epochs", "0"), ("--lr", "-1"), ("--batch-size", "x"), ("--model", "resnet")):
        with pytest.raises(SystemExit) as info:
            cli.main(["train", *bad])
        assert info.value.code == 2
        assert "error:" in capsys.readouterr().err


def test_error_in_a_multi_rank_job_ends_every_rank(monkeypatch, tmp_path, capsys):
    """An error met by one rank calls MPI_Abort (through the communicator) instead of a
    normal exit that would wait for the other ranks forever."""
    calls = []

    class FakeComm:
        size = 2

        def abort(self, code, message):
            calls.append((code, message))

    class FakeDistributed:
        @staticmethod
        def current():
            return FakeComm()

    monkeypatch.setitem(sys.modules, "xpconv.distributed", FakeDistributed)
    err = _fails(capsys, "eval", tmp_path / "nope.safetensors")
    assert calls == [(2, err[len("xpconv: error: "):].strip())]
    FakeComm.size = 1
    _fails(capsys, "eval", tmp_path / "nope.safetensors")
    assert len(calls) == 1  # one process: a normal exit


# ----------------------------------------------------------------------------- resume, failures, Ctrl-C


def test_resume_repeats_an_uninterrupted_run(run4, tmp_path, capsys):
    full = run4[0]
    half = tmp_path / "half"
    assert _main(capsys, "train", "--epochs", 2, "--out", half, "--no-plots")[0] == 0
    code, out, err = _main(capsys, "train", "--resume", half / "last.safetensors", "--epochs", 4)
    assert code == 0, err
    assert f"resuming from {half / 'last.safetensors'} after epoch 2" in out
    assert re.search(r"^epoch 3/4 ", out, re.M) and not re.search(r"^epoch [12]/4 ", out, re.M)
    a, b = load_params(full / "last.safetensors"), load_params(half / "last.safetensors")
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (full, half))
    assert _strip(ma["epochs"]) == _strip(mb["epochs"])
    assert ma["final"] == mb["final"]
    assert mb["config"]["resumed_from"] == str(half / "last.safetensors")
    assert all((half / p).is_file() for p in PNGS)


def _poison_at(monkeypatch, epoch, iteration, action):
    real = Trainer.train_step

    def step(self, xb, tb):
        if self.position == {"epoch": epoch, "iteration": iteration}:
            action(self)
        return real(self, xb, tb)

    monkeypatch.setattr(Trainer, "train_step", step)


def test_nan_loss_stops_with_epoch_and_iteration(monkeypatch, tmp_path, capsys):
    def explode(trainer):
        trainer.network.params["W3"] = trainer.network.params["W3"] * float("nan")

    _poison_at(monkeypatch, 2, 5, explode)
    out = tmp_path / "nan"
    err = _fails(capsys, "train", "--epochs", 3, "--out", out)
    assert err.strip() == (
        f"xpconv: error: training diverged: the loss is nan at epoch 2, iteration 5 of 25; "
        f"the last good checkpoint is {out / 'last.safetensors'} (try a smaller --lr)"
    )
    c = load_checkpoint(out / "last.safetensors")
    assert c.epoch == 1 and all(np.isfinite(v).all() for v in load_params(out / "last.safetensors").values())
    assert len(json.loads((out / "metrics.json").read_text())["epochs"]) == 1


class OutOfMemoryError(MemoryError):
    """Named like cupy.cuda.memory.OutOfMemoryError."""


class TorchLikeOOM(RuntimeError):
    pass


TorchLikeOOM.__name__ = "OutOfMemoryError"  # torch.OutOfMemoryError is a RuntimeError


@pytest.mark.parametrize("exc_type", [OutOfMemoryError, TorchLikeOOM])
def test_out_of_gpu_memory(monkeypatch, tmp_path, capsys, exc_type):
    def oom(trainer):
        raise exc_type("Out of memory allocating 1,327,104,000 bytes (allocated so far: 9,437,184,000 bytes).")

    _poison_at(monkeypatch, 2, 3, oom)
    out = tmp_path / "oom"
    err = _fails(capsys, "train", "--epochs", 3, "--out", out, "--batch-size", 100, code=1)
    assert err.strip() == (
        "xpconv: error: out of GPU memory at --batch-size 100 (Out of memory allocating 1,327,104,000 bytes "
        "(allocated so far: 9,437,184,000 bytes).): try a smaller --batch-size, e.g. --batch-size 50; "
        f"the last good checkpoint {out / 'last.safetensors'} is kept"
    )
    assert load_checkpoint(out / "last.safetensors").epoch == 1


def test_out_of_memory_in_eval(monkeypatch, run4, capsys):
    from xpconv.models import Sequential

    def oom(self, *a, **k):
        raise OutOfMemoryError("Out of memory allocating 9 bytes")

    monkeypatch.setattr(Sequential, "accuracy", oom)
    err = _fails(capsys, "eval", run4[0] / "last.safetensors", "--batch-size", 64, code=1)
    assert err.strip() == "xpconv: error: out of GPU memory at --batch-size 64 (Out of memory allocating 9 bytes): try a smaller --batch-size, e.g. --batch-size 32"


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "xpconv.cli", "train", "--epochs", "100000", "--no-plots", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=_env())
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.safetensors").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no epoch finished in 120 s"
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    m = re.search(r"^xpconv: interrupted at epoch (\d+), iteration (\d+); saved (\S+) \(mid-epoch weights\); "
                  r"resume exactly with --resume (\S+)$", stderr, re.M)
    assert m, stderr
    assert Path(m.group(3)) == out / "interrupted.safetensors"
    assert Path(m.group(4)) == out / "last.safetensors"
    done = load_checkpoint(out / "last.safetensors").epoch
    stopped = load_checkpoint(out / "interrupted.safetensors")
    assert stopped.epoch == done == int(m.group(1)) - 1
    assert stopped.extra["interrupted_at"] == {"epoch": int(m.group(1)), "iteration": int(m.group(2))}
    assert json.loads((out / "metrics.json").read_text())["interrupted_at"]["epoch"] == int(m.group(1))
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # no half-written files
    # and the run goes on from there
    more = _xpconv("train", "--resume", out / "last.safetensors", "--epochs", done + 1, "--no-plots", "-q", cwd=tmp_path)
    assert more.returncode == 0, more.stderr
    assert load_checkpoint(out / "last.safetensors").epoch == done + 1


# ----------------------------------------------------------------------------- real MNIST


def test_short_mnist_training(tmp_path, capsys):
    """SimpleConvNet (the book's 30 5x5 filters) on the real MNIST test set split
    8,000 / 2,000: 3 epochs of Adam at lr 0.003 reach >= 95% (96.4% measured)."""
    data = shared_dataset("mnist")
    out = tmp_path / "mnist"
    code, text, err = _main(capsys, "train", "--dataset", "mnist", "--data-dir", data, "--no-download", "--epochs", 3,
                            "--lr", 0.003, "--no-plots", "--quiet", "--out", out)
    assert code == 0, err
    assert "splitting the 10,000-image test set into 8,000 train / 2,000 test" in err
    m = json.loads((out / "metrics.json").read_text())
    assert (m["config"]["train_samples"], m["config"]["test_samples"]) == (8000, 2000)
    assert m["config"]["model_config"]["conv_param"]["filter_num"] == 30
    assert m["final"]["test_acc"] >= 0.95, m["epochs"]
    # the checkpoint's stored data_dir is not used: the data folder is named on the command line
    code, text, err = _main(capsys, "eval", out / "last.safetensors", "--data-dir", data, "--no-download")
    assert code == 0, err
    assert f"on mnist test set: accuracy {m['final']['test_acc']:.4f} ({round(m['final']['test_acc'] * 2000):,} of 2,000)" in text


# ----------------------------------------------------------------------------- plotting corner cases


def _png_size(path):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_plot_corner_cases(tmp_path):
    from xpconv.models import TwoLayerNet
    from xpconv.plotting import plot_curves, plot_filters, plot_misclassified, save_run_plots

    hist = [{"epoch": e, "train_loss": 1.0 / e, "train_acc": 0.8 + 0.01 * e, "test_acc": 0.79 + 0.01 * e} for e in (4, 5, 6)]
    assert _png_size(plot_curves(hist, tmp_path / "resumed.png", [0.3] * 30, first_epoch=3)) == (1000, 400)
    assert _png_size(plot_curves(hist[:1], tmp_path / "one.png"))[0] == 1000  # a single epoch draws too

    x = np.zeros((5, 1, 8, 8), np.float32)
    t = np.array([0, 1, 2, 3, 4])
    assert _png_size(plot_misclassified(x, t, t, tmp_path / "none_wrong.png")) == (650, 160)  # wide enough for its text
    wide, _ = _png_size(plot_misclassified(np.zeros((50, 64), np.float32), np.zeros(50, int), np.ones(50, int), tmp_path / "flat.png"))
    assert wide > 1000  # flattened 8x8 images, 36 of 50 in a 9-column grid

    odd = TwoLayerNet(10, 4, 3, xp="numpy", seed=0)  # 10 inputs: no square picture
    path, why = plot_filters(odd, tmp_path / "filters.png")
    assert path is None and "10 inputs are not a square image" in why and not (tmp_path / "filters.png").exists()
    notes = save_run_plots(tmp_path / "run", odd, hist, np.zeros((6, 10), np.float32), np.arange(6) % 3)
    assert notes["filters.png"].startswith("not written")
    assert notes["misclassified.png"].endswith("of 6 test images misclassified")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["curves.png", "misclassified.png"]


# ----------------------------------------------------------------------------- one parser, recipes as data, images


def test_python_dash_m_xpconv_prints_the_version():
    proc = subprocess.run([sys.executable, "-m", "xpconv", "--version"], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"xpconv {cli.__version__}"


def test_one_parser_serves_every_subcommand():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"train", "eval", "predict", "serve", "info"}  # the benchmarks are `python -m benchmarks`, outside the package
    assert parser.parse_args(["info", "--json"]).json is True


def test_recipes_are_data():
    from dataclasses import FrozenInstanceError, replace

    from xpconv.recipes import RECIPES, Recipe, recipe

    r = recipe("digits", "simple")
    assert isinstance(r, Recipe) and (r.optimizer, r.lr, r.epochs, r.batch_size) == ("adagrad", 0.05, 20, 50)
    r.model_config["hidden_size"] = 7  # a copy: the table stays as it is
    assert RECIPES[("digits", "simple")].model_config["hidden_size"] == 100
    with pytest.raises(FrozenInstanceError):
        r.lr = 1.0
    # Fashion-MNIST takes the MNIST recipes without the translation measured on MNIST only
    assert (RECIPES[("mnist", "simple")].augment, RECIPES[("mnist", "deep")].augment) == (2, 2)
    assert replace(RECIPES[("fashion-mnist", "deep")], augment=2) == RECIPES[("mnist", "deep")]
    assert RECIPES[("fashion-mnist", "deep")].augment == RECIPES[("fashion-mnist", "simple")].augment == 0
    with pytest.raises(ValueError, match="no recipe for model 'resnet'"):
        recipe("digits", "resnet")


def test_config_file_sets_the_recipe_and_options_win(tmp_path, capsys):
    cfg_file = tmp_path / "recipe.toml"
    cfg_file.write_text('model = "simple"\noptimizer = "adam"\nlr = 0.002\nepochs = 3\nbatch_size = 100\nseed = 5\n\n'
                        '[model_config]\nhidden_size = 20\nconv_param = { filter_num = 6 }\n')
    out = tmp_path / "run"
    code, text, err = _main(capsys, "train", "--config", cfg_file, "--epochs", 1, "--no-plots", "--quiet", "--out", out)
    assert code == 0, err
    cfg = json.loads((out / "metrics.json").read_text())["config"]
    assert (cfg["optimizer"], cfg["lr"], cfg["batch_size"], cfg["seed"], cfg["epochs"]) == ("adam", 0.002, 100, 5, 1)
    assert cfg["model_config"]["hidden_size"] == 20 and cfg["model_config"]["conv_param"]["filter_num"] == 6
    assert cfg["model_config"]["weight_init_std"] == 0.1  # the digits recipe's, not replaced by the file
    assert cfg["model_config"]["conv_param"] == {"filter_num": 6, "filter_size": 3, "pad": 1, "stride": 1}
    assert cfg["config_file"] == str(cfg_file)
    assert load_params(out / "last.safetensors")["W1"].shape == (6, 1, 3, 3)


@pytest.mark.parametrize("text, message", [
    ('epochs = 0\n', "epochs must be an integer from 1 to 1,000,000,000, got 0"),
    ('optimizer = "adamw"\n', "optimizer must be one of sgd, momentum"),
    ('learning_rate = 0.1\n', "unknown key 'learning_rate'"),
    ('lr = "fast"\n', "lr must be a finite number > 0, got 'fast'"),
    ('epochs = [\n', "not a valid TOML file"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    err = _fails(capsys, "train", "--config", path, "--out", tmp_path / "run")
    assert f"{path}: {message}" in err and len(err.splitlines()) == 1


def test_config_file_errors_without_training(run4, tmp_path, capsys):
    assert f"{tmp_path / 'none.toml'}: no such config file" in _fails(capsys, "train", "--config", tmp_path / "none.toml")
    (tmp_path / "ok.toml").write_text("epochs = 5\n")
    err = _fails(capsys, "train", "--config", tmp_path / "ok.toml", "--resume", run4[0] / "last.safetensors")
    assert "--config with --resume" in err


def test_images_module_reads_npy_and_png(tmp_path):
    from xpconv.images import ImageError, read_images

    a = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    np.save(tmp_path / "a.npy", a)
    Image.fromarray(np.full((16, 16), 250, np.uint8)).save(tmp_path / "white.png")
    labels, x, notes = read_images([tmp_path / "a.npy", tmp_path / "white.png"], (1, 8, 8))
    assert labels == [f"{tmp_path / 'a.npy'}[{i}]" for i in range(3)] + [str(tmp_path / "white.png")]
    assert x.shape == (4, 1, 8, 8) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:3], a)
    np.testing.assert_allclose(x[3], 1 - 250 / 255, atol=1e-6)  # light background: inverted
    assert notes[str(tmp_path / "white.png")] == ["resized 16x16 -> 8x8", "inverted (light background)"]
    with pytest.raises(ImageError, match="no such file"):
        read_images([tmp_path / "gone.png"], (1, 8, 8))


def test_predict_probabilities_are_the_models_softmax(run4, digits_test, tmp_path, capsys):
    out = run4[0]
    x, _ = digits_test
    np.save(tmp_path / "b.npy", x[:6])
    code, text, err = _main(capsys, "predict", out / "last.safetensors", tmp_path / "b.npy")
    assert code == 0, err
    _, prob = _predicted(out, x[:6])
    np.testing.assert_allclose([g[2] for g in _parse_predictions(text)], prob, atol=6e-4)
