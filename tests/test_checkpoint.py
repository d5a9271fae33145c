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

from xpconv import _fileformat, _io
from xpconv import layers as L
from xpconv._io import atomic_write
from xpconv.backend import Generator, namespace_name, to_numpy
from xpconv.checkpoint import CheckpointError, load_checkpoint, load_params, read_checkpoint, save_checkpoint, save_params
from xpconv.models import DeepConvNet, Sequential, SimpleConvNet, TwoLayerNet
from xpconv.optim import Adam, get_optimizer

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"


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
    monkeypatch.setattr(_fileformat, "FORMAT_VERSION", 99)
    path = save_params(_small_net(), tmp_path / "future.safetensors")
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=r"format 99.*reads format <= 2: upgrade xpconv"):
        load_checkpoint(path)


def test_a_custom_sequential_needs_model_to_load(tmp_path):
    r = np.random.default_rng(0)
    net = Sequential([L.Affine(r.random((4, 3), dtype=np.float32), np.zeros(3, np.float32))])
    path = save_checkpoint(tmp_path / "custom.safetensors", net, epoch=0)
    with pytest.raises(CheckpointError, match=r"custom\.safetensors: model 'sequential' cannot be rebuilt.*pass model="):
        load_checkpoint(path)
    other = Sequential([L.Affine(np.ones((4, 3), np.float32), np.ones(3, np.float32))])
    assert load_checkpoint(path, model=other).model is other
    _assert_same_params(_params(net), _params(other))


def _write_with_document(path, document, tensors=None):
    import json

    from safetensors.numpy import save_file

    save_file(tensors or {"model/W1": np.ones((2, 2), np.float32)}, str(path), metadata={"xpconv": json.dumps(document)})
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format_version": None}, r"format_version None; expected an integer from 1 to 2"),
        ({"format_version": "2"}, r"format_version '2'; expected an integer"),
        ({"format_version": 0}, r"format_version 0; expected an integer"),
        ({"kind": "weights"}, r"bad xpconv metadata: kind should be 'checkpoint' or 'params', got 'weights'"),
        ({"model": ["W1"]}, r"bad xpconv metadata: model should be an object, got \['W1'\]"),
        ({"epoch": "3"}, r"bad xpconv metadata: epoch should be an integer from 0 to 10\*\*9 or null, got '3'"),
        ({"optimizer": {"type": 7}}, r"bad xpconv metadata: optimizer\.type should be a string, got 7"),
        ({"metrics": {"epoch": 1}}, r"bad xpconv metadata: metrics should be a list"),
    ],
)
def test_metadata_of_the_wrong_shape_is_named(tmp_path, change, message):
    good = {"format": "xpconv-checkpoint", "format_version": 2, "kind": "checkpoint", "model": {"name": "simple", "config": {}, "params": ["W1"]}, "epoch": 1}
    path = _write_with_document(tmp_path / "odd.safetensors", {**good, **change})
    with pytest.raises(CheckpointError, match=r"odd\.safetensors: .*" + message):
        read_checkpoint(path)
    read_checkpoint(_write_with_document(tmp_path / "good.safetensors", good))  # the unchanged document passes


def test_header_length_that_starts_like_a_pickle_is_read(tmp_path):
    """A safetensors file starts with its header length (8 bytes, little-endian); a
    length of 65536 + 640 gives b"\\x80\\x02...", which is also how a pickle starts. The
    file loads: only a file the safetensors library refuses is examined for being a pickle."""
    import struct

    net = TwoLayerNet(4, 3, 2, xp="numpy", seed=0)
    path = tmp_path / "w.safetensors"
    target, pad = 65536 + 640, 0
    for _ in range(20):
        save_checkpoint(path, net, epoch=0, extra={"pad": "x" * pad})
        (n,) = struct.unpack("<Q", path.read_bytes()[:8])
        if n == target:
            break
        pad += target - n if abs(target - n) > 8 else (1 if n < target else -1)
    assert path.read_bytes()[:2] == b"\x80\x02"
    _assert_same_params(_params(net), _params(load_checkpoint(path).model))
    assert len(load_checkpoint(path).extra["pad"]) == pad


# ----------------------------------------------------------------------------- format versions


def test_files_are_written_in_format_2_without_rng_fields(tmp_path):
    net, opt, _ = _trained()
    _, meta = read_checkpoint(save_checkpoint(tmp_path / "c.safetensors", net, opt, epoch=1))
    assert meta["format_version"] == _fileformat.FORMAT_VERSION == 2
    assert set(meta) == {"format", "format_version", "kind", "xpconv_version", "created", "model", "epoch", "optimizer", "metrics", "extra"}
    _, meta = read_checkpoint(save_params(net, tmp_path / "p.safetensors"))
    assert meta["format_version"] == 2
    assert set(meta) == {"format", "format_version", "kind", "xpconv_version", "created", "model"}
    with pytest.raises(TypeError, match="rng"):
        save_checkpoint(tmp_path / "c.safetensors", net, opt, epoch=1, rng=None)


class _HostUniformMasks(Generator):
    """Dropout masks as xpconv drew them when the version-1 file was written: host
    uniforms >= ratio from the model's own stream (masks now come from a hash)."""

    def dropout_mask(self, shape, ratio, *, xp, dtype, device=None):
        keep = (self.numpy.random(tuple(shape), dtype=np.float32) >= ratio).astype(np.dtype(str(dtype).rsplit(".", 1)[-1]))
        return keep


def _v1_recipe():
    """What tests/data/checkpoint-v1.safetensors was written from (tests/data/README.md)."""
    cp = [{"filter_num": 2, "filter_size": 3, "pad": 1, "stride": 1}] * 6
    net = DeepConvNet(input_dim=(1, 8, 8), conv_params=cp, hidden_size=3, output_size=4, seed=0)
    for layer in net.layers:
        if isinstance(layer, L.Dropout):
            layer.rng = _HostUniformMasks(layer.rng)  # the same stream, drawn as the writer drew it
    opt = Adam(lr=0.01)
    r = np.random.default_rng(0)
    x = r.random((5, 1, 8, 8), dtype=np.float32)
    t = r.integers(0, 4, 5)
    opt.update(net.params, net.gradient(x, t))
    return net, opt, x


def test_version_1_checkpoint_is_read(tmp_path):
    from safetensors.numpy import load_file

    path = DATA / "checkpoint-v1.safetensors"
    stored = load_file(str(path))
    tensors, meta = read_checkpoint(path)
    assert meta["format_version"] == 1 and meta["kind"] == "checkpoint"
    assert "rng" not in meta  # stored in version 1, used by nothing, dropped on reading
    assert sorted(tensors) == sorted(stored)

    got = load_checkpoint(path)
    assert isinstance(got.model, DeepConvNet) and got.epoch == 1 and got.model_name == "deep"
    assert not hasattr(got, "rng_state")
    assert got.metrics == [{"epoch": 1, "train_loss": 1.25, "train_acc": 0.5, "test_acc": 0.25, "seconds": 0.5}]
    assert got.extra == {"config": {"model": "deep"}, "seed": 0}
    _assert_same_params({k[len("model/") :]: v for k, v in stored.items() if k.startswith("model/")}, _params(got.model))
    assert type(got.optimizer) is Adam and got.optimizer.iter == 1 and got.optimizer.lr == 0.01

    # the file holds what its recipe computes, and the restored run continues like the recipe's
    net, opt, x = _v1_recipe()
    for k, v in _params(net).items():
        np.testing.assert_allclose(_params(got.model)[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
    t = np.arange(5) % 4
    for model in (net, got.model):  # the same Dropout masks for both (a run seeds them per step from its seed)
        for i, layer in enumerate(layer for layer in model.layers if isinstance(layer, L.Dropout)):
            layer.rng = Generator([0, 2, i])
    opt.update(net.params, net.gradient(x, t))
    got.optimizer.update(got.model.params, got.model.gradient(x, t))
    for k, v in _params(net).items():
        np.testing.assert_allclose(_params(got.model)[k], v, rtol=1e-5, atol=1e-7, err_msg=k)

    # saved again, it is a version-2 file with the same content
    again = load_checkpoint(save_checkpoint(tmp_path / "v2.safetensors", got.model, got.optimizer, epoch=got.epoch, metrics=got.metrics))
    assert again.metadata["format_version"] == 2 and again.epoch == 1
    _assert_same_params(_params(got.model), _params(again.model))


def test_version_1_params_file_is_read():
    path = DATA / "params-v1.safetensors"
    _, meta = read_checkpoint(path)
    assert meta["format_version"] == 1 and meta["kind"] == "params"
    want = _params(TwoLayerNet(4, 3, 2, xp="numpy", seed=0))  # initial weights: drawn on the host from the seed
    _assert_same_params(want, load_params(path))
    net = TwoLayerNet(4, 3, 2, xp="numpy", seed=5)
    net.load_params(path)
    _assert_same_params(want, _params(net))
    _assert_same_params(want, _params(load_checkpoint(path).model))


# ----------------------------------------------------------------------------- atomic writes


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_checkpoint_keeps_atomic_write_as_an_alias():
    from xpconv import checkpoint

    assert checkpoint.atomic_write is atomic_write


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

    monkeypatch.setattr(_io.os, "fsync", broken)
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
    real = _io._chmod_like_new_file

    def interrupted(fd, path):
        os.kill(os.getpid(), signal.SIGINT)
        real(fd, path)

    monkeypatch.setattr(_io, "_chmod_like_new_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "metrics.json", "{}")
    assert (tmp_path / "metrics.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
