"""Red-team cases for checkpoints and the eval/predict commands: every hostile file or
option ends in one line on stderr naming the file or option, what was expected and what
came, with exit status 2 (1 for runtime failures), never a traceback unless --debug.

Each hostile file is handed to ``python -m xpconv eval|predict`` in a child process whose
peak resident memory (``RUSAGE_CHILDREN`` of a small wrapper process whose only child it is)
must stay under 700 MB; the child's
address space is capped at 4 GiB so that a regression fails here instead of exhausting the
machine, and a FIFO case has a timeout (a hang is killed and fails).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from xpconv import models
from xpconv._fileformat import CheckpointError, json_depth
from xpconv.checkpoint import load_checkpoint, save_checkpoint
from xpconv.models import SimpleConvNet, param_shapes
from xpconv.optim import Adam

ROOT = Path(__file__).resolve().parents[1]
RSS_LIMIT_MB = 700
SMALL = {"input_dim": [1, 8, 8], "conv_param": {"filter_num": 4, "filter_size": 3, "pad": 1, "stride": 1}, "hidden_size": 12, "output_size": 10}
RUN_CONFIG = {
    "model": "simple", "dataset": "digits", "data_dir": None, "model_config": SMALL, "input_dim": [1, 8, 8],
    "class_names": [str(i) for i in range(10)], "epochs": 3, "batch_size": 50, "optimizer": "adam", "lr": 0.001,
    "seed": 0, "split_seed": 0, "device": "cpu", "dtype": "float32",
}


# The case runs as the only child of a small wrapper interpreter, which reports the case's
# peak resident memory (RUSAGE_CHILDREN). Measured from this process instead, a child's
# ru_maxrss would start at this test process's own peak (Linux records the forked copy's
# high-water mark at exec), so a test run that had grown past the limit would fail every
# case. The case's address space is capped at 4 GiB, so a regression fails here instead of
# exhausting the machine.
_WRAPPER = r"""
import json, resource, subprocess, sys
def cap():
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
try:
    p = subprocess.run(sys.argv[2:], capture_output=True, stdin=subprocess.DEVNULL, preexec_fn=cap, timeout=float(sys.argv[1]))
    rc, out, err = p.returncode, p.stdout, p.stderr
except subprocess.TimeoutExpired as exc:  # killed (SIGKILL) and reaped by subprocess.run
    rc, out, err = -9, exc.stdout or b"", exc.stderr or b""
rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"rc": rc, "out": out.decode(errors="replace"), "err": err.decode(errors="replace"), "rss_mb": rss_mb}))
"""


def xpconv(*args, cwd, timeout: float = 120) -> tuple[int, str, str, float]:
    """Run ``python -m xpconv ARGS``: (exit status, stdout, stderr, peak RSS in MB). A
    child still running after ``timeout`` seconds is killed (status -9)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XPCONV_DATA_DIR": str(Path(cwd) / "no-data")}
    cmd = [sys.executable, "-c", _WRAPPER, str(timeout), sys.executable, "-m", "xpconv", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, stdin=subprocess.DEVNULL, timeout=timeout + 60)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    return res["rc"], res["out"], res["err"], res["rss_mb"]


def fails(*args, cwd, code=2, timeout=120, expect=()):
    """Run a case that must fail: one line on stderr, the exit status, bounded memory;
    returns the line."""
    rc, out, err, rss = xpconv(*args, cwd=cwd, timeout=timeout)
    assert rc == code, (rc, out, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xpconv"), err
    assert "\x1b" not in err
    assert rss < RSS_LIMIT_MB, f"peak RSS {rss:.0f} MB"
    for piece in expect:
        assert piece in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- files to attack


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A small training checkpoint as ``xpconv train`` writes it (digits, Adam with state)."""
    folder = tmp_path_factory.mktemp("good")
    net = SimpleConvNet(**SMALL, weight_init_std=0.1, xp="numpy", seed=0)
    opt = Adam(lr=0.001)
    x = np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32)
    t = np.arange(20) % 10
    opt.update(net.params, net.gradient(x, t))
    metrics = [{"epoch": 1, "train_loss": 2.3, "train_acc": 0.1, "test_acc": 0.1, "seconds": 1.0, "samples_per_s": 10.0}]
    return save_checkpoint(folder / "last.safetensors", net, opt, epoch=1, metrics=metrics, extra={"config": RUN_CONFIG})


def _parts(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["xpconv"])  # noqa: SIM118 - safe_open is no dict


def crafted(src: Path, dst: Path, meta=None, tensors=None, raw_meta: str | None = None) -> Path:
    """``src`` rewritten with ``meta(document)`` / ``tensors(dict)`` applied (each
    changes its argument in place) or the metadata text replaced by ``raw_meta``."""
    arrays, doc = _parts(src)
    if meta:
        meta(doc)
    if tensors:
        tensors(arrays)
    save_file(arrays, str(dst), metadata={"xpconv": raw_meta if raw_meta is not None else json.dumps(doc)})
    return dst


def _set(path: str, value):
    def change(doc):
        *head, last = path.split(".")
        obj = doc
        for part in head:
            obj = obj[part]
        obj[last] = value

    return change


# ----------------------------------------------------------------------------- not a regular file


@pytest.mark.parametrize(("target", "kind"), [("/dev/zero", "a character device"), ("/dev/urandom", "a character device")])
def test_links_to_devices_are_refused_without_reading(tmp_path, target, kind):
    link = tmp_path / "model.safetensors"
    link.symlink_to(target)
    for command in (("eval", link), ("predict", link, link)):
        fails(*command, cwd=tmp_path, expect=(str(link), f"is {kind}, not a regular checkpoint file"))


def test_fifo_and_folder_checkpoints_are_refused_without_hanging(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    fails("eval", fifo, cwd=tmp_path, timeout=60, expect=(str(fifo), "is a FIFO (named pipe), not a regular checkpoint file"))
    fails("eval", tmp_path, cwd=tmp_path, expect=("is a folder, not a regular checkpoint file", "last.safetensors"))
    fails("eval", tmp_path / "nope.safetensors", cwd=tmp_path, expect=("no such checkpoint file",))


def test_sparse_giant_files_are_refused_by_size_or_header(tmp_path):
    big = tmp_path / "big.safetensors"
    with open(big, "wb") as f:
        f.truncate(6 << 30)  # 6 GB of holes: nothing on disk, nothing must be read
    fails("eval", big, cwd=tmp_path, expect=("a file of 6,442,450,944 bytes; expected a checkpoint of at most",))
    lying = tmp_path / "lying.safetensors"
    with open(lying, "wb") as f:
        f.write(struct.pack("<Q", 1 << 30) + b"{")
        f.truncate((1 << 30) + 100)  # a 1 GB "header" of holes
    fails("eval", lying, cwd=tmp_path, expect=("header of 1,073,741,824 bytes; expected a JSON header of at most 16,777,216",))


@pytest.mark.parametrize("shape,expect", [
    ("[0, 1099511627776, 1099511627776]", "expected at most 4,294,967,296 bytes, even counting a size of 0 as 1"),
    ("[0, 1" + "0" * 5000 + "]", "corrupt safetensors header: 'Exceeds the limit (4300 digits)"),  # json.loads refuses it
])
def test_an_empty_tensor_with_sizes_no_array_can_have_is_one_line(tmp_path, shape, expect):
    """A size of 0 beside sizes NumPy cannot hold (its "array is too big" came through before),
    also sizes of thousands of digits: refused in one line, the shape cut short."""
    from xpconv.checkpoint import load_params

    header = ('{"W1": {"dtype": "F32", "shape": ' + shape + ', "data_offsets": [0, 0]}}').encode()
    p = tmp_path / "empty-but-huge.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError) as err:
        load_params(p)
    msg = str(err.value)
    assert "empty-but-huge.safetensors" in msg and expect in msg, msg
    assert len(msg) < 300 and "\n" not in msg, msg


# ----------------------------------------------------------------------------- header and metadata


def test_deeply_nested_metadata_is_one_line(tmp_path, good):
    deep = "[" * 100_000 + "]" * 100_000
    doc = json.dumps({**_parts(good)[1], "extra": "X"}).replace('"X"', deep)
    path = crafted(good, tmp_path / "deep.safetensors", raw_meta=doc)
    fails("eval", path, cwd=tmp_path, expect=("xpconv metadata nested 100001 deep; expected at most 32 levels",))
    assert json_depth('{"a": "[[[[", "b": [[1]]}') == 3  # brackets inside strings do not count


def test_oversized_metadata_is_refused(tmp_path, good):
    doc = json.dumps({**_parts(good)[1], "extra": {"pad": "x" * (9 << 20)}})
    path = crafted(good, tmp_path / "fat.safetensors", raw_meta=doc)
    fails("eval", path, cwd=tmp_path, expect=("xpconv metadata of", "expected at most 8,388,608"))


SCHEMA_CASES = [
    ("model", ["W1"], "model should be an object, got ['W1']"),
    ("rng", [1, 2], "rng should be an object or absent, got [1, 2]"),
    ("extra", ["config"], "extra should be an object, got ['config']"),
    ("optimizer.type", 5, "optimizer.type should be a string, got 5"),
    ("optimizer.iter", -1, "optimizer.iter should be an integer from 0 to 10**15, got -1"),
    ("epoch", "3", "epoch should be an integer from 0 to 10**9 or null, got '3'"),
    ("metrics", [{"epoch": 1, "train_loss": 2.3}], "metrics[0].train_acc should be a number, got None"),
    ("extra.config.dataset", "imagenet", "config.dataset should be one of digits, mnist, fashion-mnist, got 'imagenet'"),
    ("extra.config.input_dim", 8, "config.input_dim should be [channels, height, width] of positive integers, got 8"),
    ("model.config.input_dim", 8, "config.input_dim should be [channels, height, width] of positive integers, got 8"),
    ("model.config.hidden_size", "12", "config.hidden_size should be an integer from 1 to 2,147,483,648, got '12'"),
    ("optimizer.type", "Adamax", "optimizer.type should be one of sgd, momentum, nesterov, adagrad, rmsprop, adam, got 'Adamax'"),
    ("optimizer.hyper.lr", -1, "bad stored optimizer.hyper: Adam: lr must be a positive number, got -1"),
]


@pytest.mark.parametrize(("field", "value", "message"), SCHEMA_CASES, ids=[f"{c[0]}={c[1]!r}" for c in SCHEMA_CASES])
def test_metadata_out_of_schema_is_one_line(tmp_path, good, field, value, message):
    path = crafted(good, tmp_path / "odd.safetensors", meta=_set(field, value))
    fails("eval", path, cwd=tmp_path, expect=(str(path), message))


@pytest.mark.parametrize(("value", "shown"), [("abc", "'abc'"), (0, "0")])
def test_resume_refuses_a_bad_batch_size(tmp_path, good, value, shown):
    path = crafted(good, tmp_path / "odd.safetensors", meta=_set("extra.config.batch_size", value))
    fails("train", "--resume", path, "--epochs", 3, "--no-plots", "--device", "cpu", cwd=tmp_path,
          expect=(str(path), f"config.batch_size should be an integer from 1 to 1,000,000,000, got {shown}"))


def test_resume_refuses_a_negative_adam_step(tmp_path, good):
    path = crafted(good, tmp_path / "odd.safetensors", meta=_set("optimizer.iter", -1))
    fails("train", "--resume", path, "--epochs", 3, "--no-plots", "--device", "cpu", cwd=tmp_path,
          expect=("optimizer.iter should be an integer from 0 to 10**15, got -1",))


# ----------------------------------------------------------------------------- shapes before allocation


def test_a_config_promising_a_huge_model_allocates_nothing(tmp_path, good):
    path = crafted(good, tmp_path / "huge.safetensors", meta=_set("model.config.hidden_size", 1_000_000))
    assert path.stat().st_size < 400_000
    line = fails("eval", path, cwd=tmp_path, expect=("do not fit", "parameter 'W2': expected shape (64, 1000000), got (64, 12)"))
    assert "batch-size" not in line
    impossible = crafted(good, tmp_path / "impossible.safetensors", meta=_set("model.config.hidden_size", 10**30))
    fails("eval", impossible, cwd=tmp_path, expect=("config.hidden_size should be an integer from 1 to 2,147,483,648",))


def test_param_shapes_match_the_built_models():
    cases = {
        "simple": SMALL,
        "deep": {"input_dim": [1, 16, 16], "hidden_size": 7, "output_size": 3},
        "mlp": {"input_size": 5, "hidden_size": 4, "output_size": 3},
        "multi_layer": {"input_size": 6, "hidden_size_list": [5, 4], "output_size": 3},
        "multi_layer_extend": {"input_size": 6, "hidden_size_list": [5, 4], "output_size": 3, "use_batchnorm": True},
    }
    for name, config in cases.items():
        net = models.build_model(name, config, seed=0)
        built = {k: (tuple(v.shape), True) for k, v in net.params.items()}
        computed = param_shapes(name, config)
        assert {k: v for k, v in computed.items() if v[1]} == built, name
        assert computed == net.expected_arrays(), name


# ----------------------------------------------------------------------------- weights


def test_non_finite_weights_stop_eval_and_predict(tmp_path, good):
    def poison(arrays):
        arrays["model/W2"][3, 4] = np.nan
        arrays["model/b3"][0] = np.inf

    path = crafted(good, tmp_path / "nan.safetensors", tensors=poison)
    image = tmp_path / "x.npy"
    np.save(image, np.zeros((1, 8, 8), np.float32))
    expect = ("expected finite weights", "model/W2 (1 NaN of 768 values)")
    fails("eval", path, cwd=tmp_path, expect=expect)
    fails("predict", path, image, cwd=tmp_path, expect=expect)


def test_integer_tensor_in_a_float_checkpoint_is_refused(tmp_path, good):
    def to_int8(arrays):
        arrays["model/W1"] = arrays["model/W1"].astype(np.int8)

    path = crafted(good, tmp_path / "int8.safetensors", tensors=to_int8)
    fails("eval", path, cwd=tmp_path, expect=("parameter 'W1': expected a floating-point array", "got int8"))
    net = SimpleConvNet(**SMALL, seed=1)
    before = {k: np.array(v) for k, v in net.params.items()}
    with pytest.raises(CheckpointError, match="got int8"):
        net.load_params(path)
    assert all(np.array_equal(before[k], v) for k, v in net.params.items())


def test_float64_weights_load_into_float32_with_one_warning(tmp_path, good):
    def widen(arrays):
        for k in list(arrays):
            arrays[k] = arrays[k].astype(np.float64)

    path = crafted(good, tmp_path / "f64.safetensors", tensors=widen)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = load_checkpoint(path)
    said = [str(w.message) for w in caught if "converted" in str(w.message)]
    assert said == ["6 stored array(s) of float64 converted to the model's float32"]
    assert ckpt.model.params["W1"].dtype == np.float32


def test_a_failed_load_leaves_the_model_untouched(tmp_path, good):
    net = SimpleConvNet(**SMALL, seed=1)
    before = {k: np.array(v) for k, v in net.params.items()}
    arrays, _ = _parts(good)
    weights = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("model/")}
    with pytest.raises(ValueError, match=r"parameter 'W3': expected shape \(12, 10\), got \(12, 9\)"):
        net.load_params({**weights, "W3": weights["W3"][:, :9]})
    with pytest.raises(KeyError, match="parameters missing"):
        net.load_params({k: v for k, v in weights.items() if k != "b3"})
    assert all(np.array_equal(before[k], v) for k, v in net.params.items())
    net.load_params(good)
    assert np.array_equal(np.array(net.params["W1"]), weights["W1"])


# ----------------------------------------------------------------------------- what is printed and where data goes


def test_class_names_are_printed_escaped(tmp_path, good):
    names = ["\x1b[2J\x1b]0;pwned\x07zero"] + [str(i) for i in range(1, 10)]
    path = crafted(good, tmp_path / "names.safetensors", meta=_set("extra.config.class_names", names))
    image = tmp_path / "x.npy"
    np.save(image, np.zeros((1, 8, 8), np.float32))
    rc, out, err, _ = xpconv("predict", path, image, "--top", 10, cwd=tmp_path)
    assert rc == 0, err
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b[2J\\x1b]0;pwned\\x07zero" in out


def test_a_stored_data_dir_is_never_read_created_or_downloaded_into(tmp_path, good):
    target = tmp_path / "planted"
    config = dict(RUN_CONFIG, dataset="mnist", data_dir=str(target), input_dim=[1, 28, 28])
    path = crafted(good, tmp_path / "mnist.safetensors", meta=_set("extra.config", config))
    line = fails("eval", path, "--no-download", "--device", "cpu", cwd=tmp_path)
    assert str(target) not in line
    assert not target.exists()


# ----------------------------------------------------------------------------- predict inputs and options


def _png_header_only(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    return path


def test_predict_refuses_hostile_inputs(tmp_path, good):
    bomb = _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    fails("predict", good, bomb, cwd=tmp_path, expect=(str(bomb), "an image or frame of 400,000,000 pixels; expected at most 16,000,000 pixels"))
    fake = tmp_path / "fake.npy"
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr("x.npy", b"\x93NUMPY")
    fails("predict", good, fake, cwd=tmp_path, expect=(str(fake), "expected a .npy array, got a zip archive"))
    structured = tmp_path / "structured.npy"
    np.save(structured, np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")]))
    fails("predict", good, structured, cwd=tmp_path, expect=(str(structured), "got a structured dtype"))
    huge = tmp_path / "huge.npy"
    with open(huge, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (100_000, 1, 64, 64)})
    fails("predict", good, huge, cwd=tmp_path, expect=(str(huge), "409,600,000 values); expected at most 16,000,000 values"))
    fails("predict", good, tmp_path, cwd=tmp_path, expect=(f"{tmp_path}: is a folder, not a regular image file",))
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    fails("predict", good, fifo, cwd=tmp_path, timeout=60, expect=(f"{fifo}: is a FIFO (named pipe), not a regular image file",))
    fails("predict", good, "/dev/zero", cwd=tmp_path, expect=("/dev/zero: is a character device, not a regular image file",))
    fails("predict", good, tmp_path / "missing.png", cwd=tmp_path, expect=("missing.png: no such file",))


def test_options_out_of_range_name_the_option(tmp_path):
    line = fails("train", "--seed", "-1", cwd=tmp_path, expect=("argument --seed: expected an integer from 0 to 2**63-1, got -1",))
    assert line.startswith("xpconv train: error:")
    fails("eval", "x.safetensors", "--batch-size", "0", cwd=tmp_path, expect=("argument --batch-size: expected an integer from 1 to 1,000,000,000, got 0",))


def test_debug_shows_the_traceback(tmp_path, good):
    path = crafted(good, tmp_path / "odd.safetensors", meta=_set("model", ["W1"]))
    rc, _, err, _ = xpconv("--debug", "eval", path, cwd=tmp_path)
    assert rc == 1 and "Traceback" in err and "CheckpointError" in err
    rc, _, err, _ = xpconv("eval", path, "--debug", cwd=tmp_path)
    assert rc == 1 and "Traceback" in err


def test_a_good_checkpoint_still_evaluates(tmp_path, good):
    rc, out, err, rss = xpconv("eval", good, "--device", "cpu", cwd=tmp_path)
    assert rc == 0, err
    assert "on digits test set: accuracy" in out
    assert rss < RSS_LIMIT_MB
