"""Checkpoints: round trip, refusal of pickles and other unsafe files, atomic writes that
survive ``kill -9`` mid-save, and loading on a machine with NumPy only."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from xpconv import checkpoint as ck
from xpconv.backend import namespace_name, to_numpy
from xpconv.checkpoint import CheckpointError, atomic_write, load_checkpoint, load_params, read_checkpoint, save_checkpoint, save_params
from xpconv.models import DeepConvNet, SimpleConvNet, TwoLayerNet
from xpconv.optim import Adam, get_optimizer

ROOT = Path(__file__).resolve().parents[1]


def _env():
    """Subprocesses import this checkout's xpconv."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


SMALL = {"input_dim": [1, 8, 8], "conv_param": {"filter_num": 4, "filter_size": 3, "pad": 1, "stride": 1}, "hidden_size": 12, "output_size": 10}


def _small_net(seed=0, xp="numpy", dtype="float32"):
    return SimpleConvNet(**SMALL, weight_init_std=0.1, xp=xp, dtype=dtype, seed=seed)


def _data(n=20, seed=0):
    r = np.random.default_rng(seed)
    return r.random((n, 1, 8, 8), dtype=np.float32), r.integers(0, 10, n)


def _trained(optimizer="adam", steps=3, seed=0, **kw):
    net = _small_net(seed, **kw)
    opt = get_optimizer(optimizer, lr=0.01)
    x, t = _data()
    for _ in range(steps):
        opt.update(net.params, net.gradient(x, t))
    return net, opt, x


def _params(net):
    return {k: to_numpy(v) for k, v in net.params.items()}


def _assert_same_params(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adagrad", "adam"])
def test_checkpoint_round_trip(tmp_path, optimizer):
    net, opt, x = _trained(optimizer)
    history = [{"epoch": 1, "train_loss": 1.5, "train_acc": 0.5, "test_acc": 0.25, "seconds": 0.1}]
    path = save_checkpoint(tmp_path / "c.safetensors", net, opt, epoch=1, metrics=history, extra={"config": {"a": [1, 2]}, "note": "x"})
    assert path == tmp_path / "c.safetensors"

    got = load_checkpoint(path)
    assert isinstance(got.model, SimpleConvNet)
    assert namespace_name(got.model.xp) == "numpy"
    assert got.model.config == net.config
    _assert_same_params(_params(net), _params(got.model))
    np.testing.assert_array_equal(to_numpy(got.model.predict(x)), to_numpy(net.predict(x)))
    assert got.epoch == 1
    assert got.metrics == history
    assert got.extra == {"config": {"a": [1, 2]}, "note": "x"}
    assert got.model_name == "simple"
    assert got.metadata["xpconv_version"]
    assert got.metadata["model"]["dtype"] == "float32"

    # the optimizer comes back with its hyper-parameters, step count and every slot
    assert type(got.optimizer) is type(opt)
    assert got.optimizer.hyperparameters() == opt.hyperparameters()
    assert got.optimizer.iter == opt.iter == 3
    a, b = opt.state_dict(), got.optimizer.state_dict()
    assert set(a["slots"]) == set(b["slots"])
    for slot in a["slots"]:
        _assert_same_params({k: to_numpy(v) for k, v in a["slots"][slot].items()}, {k: to_numpy(v) for k, v in b["slots"][slot].items()})

    # one more step from the restored state equals one more step of the original
    xt, tt = _data(seed=5)
    opt.update(net.params, net.gradient(xt, tt))
    got.optimizer.update(got.model.params, got.model.gradient(xt, tt))
    _assert_same_params(_params(net), _params(got.model))


def test_float64_and_every_model_round_trip(tmp_path):
    nets = [
        _small_net(dtype="float64"),
        TwoLayerNet(64, 7, 10, xp="numpy", seed=1),
        DeepConvNet(input_dim=(1, 8, 8), hidden_size=6, xp="numpy", seed=2),
    ]
    for i, net in enumerate(nets):
        got = load_checkpoint(save_checkpoint(tmp_path / f"m{i}.safetensors", net, epoch=0))
        assert type(got.model) is type(net)
        assert got.optimizer is None
        _assert_same_params(_params(net), _params(got.model))
    assert to_numpy(load_checkpoint(tmp_path / "m0.safetensors").model.params["W1"]).dtype == np.float64


def test_save_params_load_params_same_format(tmp_path):
    net, _, x = _trained()
    p = tmp_path / "w.safetensors"
    net.save_params(p)
    tensors, meta = read_checkpoint(p)
    assert meta["kind"] == "params" and meta["format"] == "xpconv-checkpoint"
    assert sorted(tensors) == sorted(f"model/{k}" for k in net.params)
    _assert_same_params(_params(net), load_params(p))

    other = _small_net(seed=9)
    other.load_params(p)
    np.testing.assert_array_equal(to_numpy(other.predict(x)), to_numpy(net.predict(x)))
    # load_checkpoint rebuilds the model from a params file too
    _assert_same_params(_params(net), _params(load_checkpoint(p).model))
    # and a checkpoint is a params file as well
    c = save_checkpoint(tmp_path / "c.safetensors", net, Adam(), epoch=2)
    _assert_same_params(_params(net), load_params(c))


def test_checkpoint_from_another_namespace_holds_numpy(tmp_path):
    pytest.importorskip("torch")
    net = _small_net(xp="torch", seed=3)
    path = save_checkpoint(tmp_path / "t.safetensors", net, epoch=0)
    tensors, meta = read_checkpoint(path)
    assert meta["model"]["backend"] == "torch"
    assert all(isinstance(v, np.ndarray) for v in tensors.values())
    got = load_checkpoint(path)
    assert namespace_name(got.model.xp) == "numpy"
    _assert_same_params(_params(net), _params(got.model))


def test_loads_with_numpy_only(tmp_path):
    """A checkpoint written by a run on another library (here torch when installed, the
    stand-in for CuPy) loads and predicts in a process where torch, cupy and
    array_api_strict cannot be imported."""
    try:
        import torch  # noqa: F401

        xp = "torch"
    except ImportError:
        xp = "numpy"
    net = _small_net(xp=xp, seed=4)
    x, _ = _data(7, seed=2)
    path = save_checkpoint(tmp_path / "c.safetensors", net, Adam(lr=0.002), epoch=3)
    np.save(tmp_path / "x.npy", x)
    expected = to_numpy(net.predict(x))
    script = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "cupy", "cupyx", "array_api_strict", "jax"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import numpy as np
        from xpconv.checkpoint import load_checkpoint
        c = load_checkpoint(sys.argv[1])
        np.save(sys.argv[3], np.asarray(c.model.predict(np.load(sys.argv[2]))))
        assert not any(m.split(".")[0] in ("torch", "cupy") for m in sys.modules), sorted(sys.modules)
        print(type(c.model).__name__, c.epoch, type(c.optimizer).__name__, c.optimizer.lr)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(path), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=_env(),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["SimpleConvNet", "3", "Adam", "0.002"]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-5, atol=1e-6)


def test_weights_that_do_not_fit_are_refused(tmp_path):
    path = save_params(_small_net(), tmp_path / "w.safetensors")
    other = SimpleConvNet(**{**SMALL, "hidden_size": 13}, xp="numpy", seed=0)
    with pytest.raises(CheckpointError, match=r"w\.safetensors.*do not fit"):
        load_checkpoint(path, model=other)


# ----------------------------------------------------------------------------- refusal of unsafe or broken files


class _Boom:
    """Unpickling this would create a marker file (what an attack would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["weights.pkl", "weights.safetensors", "weights.npy.bin"])
def test_pickle_is_refused_and_never_run(tmp_path, name):
    marker = tmp_path / "pwned"
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"W1": _Boom(marker)}, protocol=4))
    for load in (load_checkpoint, load_params, read_checkpoint):
        with pytest.raises(CheckpointError) as info:
            load(path)
        msg = str(info.value)
        assert str(path) in msg
        assert "pickle" in msg and "execute arbitrary code" in msg
    assert not marker.exists()


def test_protocol0_pickle_and_zip_archives_are_refused(tmp_path):
    p0 = tmp_path / "old.pkl"
    p0.write_bytes(pickle.dumps({"a": 1}, protocol=0))
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(p0)
    npz = tmp_path / "w.npz"
    np.savez(npz, W1=np.zeros(3))
    with pytest.raises(CheckpointError, match=r"zip archive.*pickles"):
        load_params(npz)
    npy = tmp_path / "w.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(CheckpointError, match=r"\.npy file"):
        load_params(npy)


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)

    good = save_checkpoint(tmp_path / "good.safetensors", _small_net(), Adam(), epoch=1)
    data = good.read_bytes()
    for cut in (4, 100, len(data) - 10):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=rf"cut{cut}\.safetensors: .*(truncated|damaged)"):
            load_checkpoint(bad)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is not a checkpoint at all\n")
    with pytest.raises(CheckpointError, match=r"notes\.safetensors: not a valid safetensors"):
        load_checkpoint(text)

    # a plain safetensors file from another tool: weights readable, no model to rebuild
    from safetensors.numpy import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"W1": np.ones((2, 2), np.float32)}, str(plain))
    assert list(load_params(plain)) == ["W1"]
    with pytest.raises(CheckpointError, match="without xpconv metadata"):
        load_checkpoint(plain)


def test_newer_format_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "FORMAT_VERSION", 99)
    path = save_params(_small_net(), tmp_path / "future.safetensors")
    monkeypatch.setattr(ck, "FORMAT_VERSION", 1)
    with pytest.raises(CheckpointError, match="format 99.*upgrade xpconv"):
        load_checkpoint(path)


# ----------------------------------------------------------------------------- atomic writes


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_atomic_write_modes_and_no_leftovers(tmp_path):
    p = atomic_write(tmp_path / "sub" / "a.txt", "one")
    assert p.read_text() == "one"
    assert (p.stat().st_mode & 0o777) == (0o666 & ~_umask())
    p.chmod(0o640)
    atomic_write(p, b"two")
    assert p.read_bytes() == b"two"
    assert (p.stat().st_mode & 0o777) == 0o640  # the mode of the file it replaces
    assert sorted(x.name for x in p.parent.iterdir()) == ["a.txt"]


def test_atomic_write_failure_leaves_old_file(tmp_path, monkeypatch):
    p = atomic_write(tmp_path / "a.bin", b"old")

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.os, "fsync", broken)
    with pytest.raises(OSError, match="No space"):
        atomic_write(p, b"new" * 1000)
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["a.bin"]  # the temp file is removed


_SAVER = textwrap.dedent(
    """
    import os, sys, time
    from xpconv.checkpoint import save_checkpoint
    from xpconv.models import SimpleConvNet
    from xpconv.optim import Adam

    path, where = sys.argv[1], sys.argv[2]

    def stall(what):
        print("STALLED " + what, flush=True)
        time.sleep(300)

    if where == "mid-data":
        real_fdopen = os.fdopen

        class HalfWriter:
            def __init__(self, f):
                self.f = f
            def __enter__(self):
                return self
            def __exit__(self, *exc):
                return self.f.__exit__(*exc)
            def write(self, data):
                self.f.write(data[: len(data) // 2])
                self.f.flush()
                os.fsync(self.f.fileno())
                stall("half of %d bytes written" % len(data))
            def __getattr__(self, name):
                return getattr(self.f, name)

        os.fdopen = lambda fd, *a, **k: HalfWriter(real_fdopen(fd, *a, **k))
    elif where == "before-rename":
        os.replace = lambda src, dst: stall("complete temp file, not renamed")

    net = SimpleConvNet(input_dim=(1, 8, 8), conv_param={"filter_num": 4, "filter_size": 3, "pad": 1, "stride": 1},
                        hidden_size=12, weight_init_std=0.1, xp="numpy", seed=77)
    save_checkpoint(path, net, Adam(), epoch=2)
    print("SAVED", flush=True)
    """
)


@pytest.mark.parametrize("where", ["mid-data", "before-rename"])
def test_kill_9_mid_save_keeps_previous_checkpoint(tmp_path, where):
    """A process killed with SIGKILL while it writes a checkpoint (stopped at a known point
    inside the write) leaves the previous checkpoint intact and loadable."""
    net, opt, _ = _trained()
    path = save_checkpoint(tmp_path / "last.safetensors", net, opt, epoch=1)
    before = path.read_bytes()

    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(path), where], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        line = proc.stdout.readline()
        assert line.startswith("STALLED"), line + proc.stderr.read()
        temps = [p for p in tmp_path.iterdir() if p.name != "last.safetensors"]
        assert len(temps) == 1 and temps[0].name.startswith(".last.safetensors.") and temps[0].stat().st_size > 0
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    assert path.read_bytes() == before
    got = load_checkpoint(path)
    assert got.epoch == 1
    _assert_same_params(_params(net), _params(got.model))


def test_unkilled_saver_replaces_checkpoint(tmp_path):
    """The same saver, not stopped, does replace the checkpoint (the test above is not
    passing because the subprocess never writes)."""
    path = save_checkpoint(tmp_path / "last.safetensors", _small_net(), epoch=1)
    out = subprocess.run([sys.executable, "-c", _SAVER, str(path), "normal"], capture_output=True, text=True, timeout=120, env=_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "SAVED"
    assert load_checkpoint(path).epoch == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]


def test_ctrl_c_during_a_write_lands_after_it(tmp_path, monkeypatch):
    """SIGINT in the middle of atomic_write: the file is written whole, no temp file is
    left, and the KeyboardInterrupt comes once the write is done."""
    import signal

    from xpconv import checkpoint

    real = checkpoint._chmod_like_new_file

    def interrupted(fd, path):
        os.kill(os.getpid(), signal.SIGINT)
        real(fd, path)

    monkeypatch.setattr(checkpoint, "_chmod_like_new_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_write(tmp_path / "metrics.json", "{}")
    assert (tmp_path / "metrics.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
