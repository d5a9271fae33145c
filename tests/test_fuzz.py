"""Property-based fuzzing of xpconv's readers: the book's pickles (bookpickle), checkpoint
files (safetensors header and metadata), IDX files, ``predict``'s inputs (PNG, ICO, JPEG,
... and .npy), TOML recipes, state dicts for ``from_torch`` and the files of a run folder
that ``xpconv train --resume`` reads and writes (lock file, metrics, temp files).

Every example is handed to a long-lived worker process (tests/fuzz_worker.py) whose
address space is capped at what its imports took plus 700 MB, with a deadline per example;
the worker is restarted when it dies. Each example must end in a clear error (the
reader's own exception type, one line naming the file) or a correct result; a crash, a
hang, a MemoryError, any other exception or a wrong result fails the test, and hypothesis
shrinks it to a small reproducer.

The short profile (about two minutes in all) runs in every test run; the long one on
demand: ``python -m pytest -m fuzz --hypothesis-profile=long tests/test_fuzz.py``.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import pickle
import select
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("fuzz_worker.py")

pytestmark = pytest.mark.fuzz

#: examples per target in the short profile (every test run: about two minutes in all)
SHORT = {"pickle": 1500, "checkpoint": 500, "idx": 1000, "image": 800, "toml": 800, "from_torch": 150, "run_folder": 60}
#: seconds an example may take before it counts as a hang
DEADLINE_S = 30.0


def fuzz_settings(target: str) -> settings:
    """The short profile's count; with a loaded profile of 1,000 examples or more (the
    'long' profile of tests/conftest.py, chosen with --hypothesis-profile=long: 6,000),
    that many thousandths of it per example of the short profile (6 x the short run)."""
    loaded = settings.default.max_examples
    n = SHORT[target] * loaded // 1000 if loaded >= 1000 else SHORT[target]
    return settings(max_examples=n, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


# ----------------------------------------------------------------------------- the worker


class Worker:
    """One worker process for one target, restarted when it dies or hangs."""

    def __init__(self, target: str, tmp: Path | None = None):
        self.target = target
        self.tmp = tmp  # the worker's TMPDIR (its scratch files), one of pytest's temp folders
        self.proc: subprocess.Popen | None = None
        self.counts = {"ok": 0, "refused": 0, "finding": 0}

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        if self.tmp is not None:
            env["TMPDIR"] = str(self.tmp)
        self.proc = subprocess.Popen([sys.executable, str(WORKER), self.target], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env)
        ready = self._read(120.0)
        assert ready and ready.get("ready"), f"the {self.target} fuzz worker did not start"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def _read(self, timeout: float):
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        end = time.monotonic() + timeout
        buf = b""
        need = 4
        while len(buf) < need:
            left = end - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return "hang"
            chunk = os.read(fd, need - len(buf))
            if not chunk:
                return "died"
            buf += chunk
            if need == 4 and len(buf) == 4:
                need = 4 + struct.unpack("<I", buf)[0]
        return pickle.loads(buf[4:])  # the worker's answer (our own child)

    def run(self, payload) -> dict:
        if self.proc is None:
            self.start()
        assert self.proc is not None and self.proc.stdin is not None
        data = pickle.dumps(payload)
        try:
            self.proc.stdin.write(struct.pack("<I", len(data)) + data)
            self.proc.stdin.flush()
        except BrokenPipeError:
            answer = "died"
        else:
            answer = self._read(DEADLINE_S)
        if answer in ("hang", "died"):
            code = self.proc.poll()
            self.stop()
            detail = f"no answer within {DEADLINE_S:.0f} s (killed)" if answer == "hang" else f"the worker died (exit status {code})"
            answer = {"status": "finding", "detail": detail}
        self.counts[answer["status"]] += 1
        return answer


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    made: dict[str, Worker] = {}

    def get(target: str) -> Worker:
        if target not in made:
            made[target] = Worker(target, tmp_path_factory.mktemp(f"fuzz-{target}"))
        return made[target]

    yield get
    for w in made.values():
        w.stop()
        print(f"\nfuzz {w.target}: {sum(w.counts.values())} examples, {w.counts}", file=sys.stderr)


def check(worker: Worker, payload) -> None:
    answer = worker.run(payload)
    assert answer["status"] in ("ok", "refused"), f"{worker.target}: {answer['detail']}"


# ----------------------------------------------------------------------------- mutations


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """``data`` with a few byte flips, cuts, insertions and repeated slices."""
    data = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "repeat", "truncate"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, draw(st.integers(0, 255))]))
        elif op == "cut":
            del data[i:i + draw(st.integers(1, 16))]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "repeat":
            j = min(len(data), i + draw(st.integers(1, 64)))
            data[i:i] = data[i:j] * draw(st.integers(1, 50))
        else:
            del data[i:]
    return bytes(data)


# ----------------------------------------------------------------------------- pickles

DTYPES = ["b1", "i1", "i2", "<i4", ">i8", "u1", "<u2", "u4", "u8", "<f2", "<f4", ">f8", "f8", "<c8", "c16"]
arrays = st.builds(
    lambda dt, shape, fortran, seed: (lambda a: np.asfortranarray(a) if fortran else a)(
        np.random.default_rng(seed).integers(0, 255, size=shape).astype(np.dtype(dt))),
    st.sampled_from(DTYPES), st.lists(st.integers(0, 4), max_size=3).map(tuple), st.booleans(), st.integers(0, 2**16))
leaves = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=8),
                   st.binary(max_size=8), arrays, arrays.map(lambda a: a.dtype), arrays.map(lambda a: a.ravel()[0] if a.size else None))
containers = st.recursive(leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.lists(inner, max_size=3).map(tuple),
    st.dictionaries(st.text(max_size=4), inner, max_size=4)), max_leaves=12)

# one opcode with its argument: what a hand-written stream may hold
_GLOBALS = [b"cnumpy\nndarray\n", b"cnumpy\ndtype\n", b"cnumpy.core.multiarray\n_reconstruct\n", b"cnumpy._core.multiarray\nscalar\n",
            b"cnumpy._core.numeric\n_frombuffer\n", b"c_codecs\nencode\n", b"c__builtin__\nbytes\n", b"cbuiltins\nbytes\n",
            b"\x8c\x05numpy\x8c\x05dtype\x93", b"cos\nsystem\n", b"cbuiltins\neval\n"]
opcode = st.one_of(
    st.sampled_from([b"(", b"}", b"]", b")", b"\x8f", b"N", b"\x88", b"\x89", b"R", b"b", b"\x85", b"\x86", b"\x87", b"t", b"l",
                     b"d", b"a", b"e", b"s", b"u", b"\x90", b"\x91", b"\x94", b"0", b"1", b"2", b"\x93"]),
    st.sampled_from(_GLOBALS),
    st.integers(0, 255).map(lambda i: b"K" + bytes([i])),
    st.integers(-2**31, 2**31 - 1).map(lambda i: b"J" + struct.pack("<i", i)),
    st.binary(max_size=12).map(lambda b: b"\x8a" + bytes([len(b)]) + b),
    st.floats().map(lambda f: b"G" + struct.pack(">d", f)),
    st.text(max_size=12).map(lambda s: (lambda b: b"\x8c" + bytes([len(b)]) + b)(s.encode()[:255])),
    st.binary(max_size=24).map(lambda b: b"C" + bytes([len(b)]) + b),
    st.tuples(st.integers(0, 2**64 - 1), st.binary(max_size=8)).map(lambda t: b"\x8e" + struct.pack("<Q", t[0]) + t[1]),
    st.integers(0, 40).map(lambda i: b"q" + bytes([i])),
    st.integers(0, 40).map(lambda i: b"h" + bytes([i])),
    st.sampled_from(["b1", "f8", "<f4", "i8", "O", "U3", "V8"]).map(lambda s: b"\x8c" + bytes([len(s)]) + s.encode()),
    st.just(b"\x8c\x01b"), st.just(b"C\x01b"), st.just(b"K\x00\x85"),
)


@st.composite
def pickles(draw) -> bytes:
    kind = draw(st.sampled_from(["valid", "mutated", "opcodes"]))
    if kind == "opcodes":
        ops = draw(st.lists(opcode, max_size=40))
        return b"\x80" + bytes([draw(st.integers(2, 5))]) + b"".join(ops) + draw(st.sampled_from([b".", b"", b"N."]))
    obj = draw(containers)
    data = pickle.dumps(obj, protocol=draw(st.integers(0, 5)))
    return data if kind == "valid" else draw(mutated(data))


@fuzz_settings("pickle")
@given(data=pickles())
def test_fuzz_bookpickle(workers, data):
    check(workers("pickle"), data)


# ----------------------------------------------------------------------------- checkpoints


def _good_checkpoint() -> bytes:
    import tempfile

    from xpconv.checkpoint import save_checkpoint
    from xpconv.models import SimpleConvNet
    from xpconv.optim import Adam

    net = SimpleConvNet(input_dim=(1, 8, 8), conv_param={"filter_num": 2, "filter_size": 3, "pad": 1, "stride": 1},
                        hidden_size=4, output_size=3, xp="numpy", seed=0)
    opt = Adam(lr=0.001)
    x = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    opt.update(net.params, net.gradient(x, np.arange(4) % 3))
    with tempfile.TemporaryDirectory() as d:
        p = save_checkpoint(Path(d) / "c.safetensors", net, opt, epoch=1,
                            metrics=[{"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "test_acc": 0.5, "seconds": 1.0, "samples_per_s": 4.0}],
                            extra={"config": {"model": "simple", "dataset": "digits", "input_dim": [1, 8, 8]}})
        return Path(p).read_bytes()


GOOD_CHECKPOINT = _good_checkpoint()
_N = struct.unpack("<Q", GOOD_CHECKPOINT[:8])[0]
GOOD_HEADER = json.loads(GOOD_CHECKPOINT[8:8 + _N])
GOOD_DATA = GOOD_CHECKPOINT[8 + _N:]

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=10), st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "model/W1", "simple", "Adam", "xpconv-checkpoint"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=10)


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


def _replace(doc, path, value):
    if not path:
        return value
    doc = json.loads(json.dumps(doc))
    obj = doc
    for part in path[:-1]:
        obj = obj[part]
    obj[path[-1]] = value
    return doc


@st.composite
def checkpoints(draw) -> bytes:
    header = json.loads(json.dumps(GOOD_HEADER))
    meta = json.loads(header["__metadata__"]["xpconv"])
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["meta", "header"])) if isinstance(header, dict) else "meta"
        doc = meta if where == "meta" else {k: v for k, v in header.items() if k != "__metadata__"}
        path = draw(st.sampled_from(list(_paths(doc))))
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete" and path:
            doc = _replace(doc, path, None)
            parent = doc
            for part in path[:-1]:
                parent = parent[part]
            del parent[path[-1]]
        elif action == "add":
            doc = _replace(doc, (draw(st.text(max_size=6)),), draw(json_values)) if isinstance(doc, dict) else doc
        else:
            doc = _replace(doc, path, draw(json_values))
        if where == "meta":
            meta = doc
        elif isinstance(doc, dict):
            header = {**doc, "__metadata__": header["__metadata__"]}
        else:
            header = doc
    if isinstance(header, dict):
        header["__metadata__"] = {"xpconv": json.dumps(meta)}
    text = json.dumps(header).encode()
    data = GOOD_DATA if draw(st.booleans()) else draw(mutated(GOOD_DATA))
    length = len(text) if draw(st.integers(0, 9)) else draw(st.integers(0, 2**64 - 1))
    return struct.pack("<Q", length) + text + data


@fuzz_settings("checkpoint")
@given(data=st.one_of(checkpoints(), mutated(GOOD_CHECKPOINT)))
def test_fuzz_checkpoint_reader(workers, data):
    check(workers("checkpoint"), data)


# ----------------------------------------------------------------------------- IDX


@st.composite
def idx_files(draw) -> bytes:
    ndim = draw(st.integers(0, 4))
    dims = draw(st.lists(st.one_of(st.integers(0, 30), st.integers(0, 2**32 - 1)), min_size=ndim, max_size=ndim))
    code = draw(st.sampled_from([0x08, 0x08, 0x09, 0x0B, 0x0D, 0x00, 0xFF]))
    head = bytes([0, 0, code, draw(st.sampled_from([ndim, ndim, draw(st.integers(0, 255))]))]) + struct.pack(f">{ndim}I", *dims)
    want = math.prod(dims)
    n = draw(st.sampled_from(["exact", "short", "long", "any"]))
    size = {"exact": want, "short": max(want - 1, 0), "long": want + 1, "any": draw(st.integers(0, 3000))}[n]
    raw = head + bytes(min(size, 100_000))
    if draw(st.booleans()):
        raw = gzip.compress(raw, mtime=0)
    return draw(mutated(raw)) if draw(st.booleans()) else raw


@fuzz_settings("idx")
@given(data=idx_files())
def test_fuzz_idx_reader(workers, data):
    check(workers("idx"), data)


# ----------------------------------------------------------------------------- predict's images


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@st.composite
def pictures(draw) -> tuple[str, bytes]:
    from PIL import Image

    kind = draw(st.sampled_from(["pillow", "png", "npy", "ico"]))
    if kind == "pillow":
        fmt, ext = draw(st.sampled_from([("PNG", "png"), ("JPEG", "jpg"), ("BMP", "bmp"), ("GIF", "gif"), ("TIFF", "tif"),
                                         ("WEBP", "webp"), ("PPM", "ppm"), ("ICO", "ico")]))
        modes = {"TIFF": ["L", "RGB", "RGBA", "1", "P", "I", "F", "I;16"], "PNG": ["L", "RGB", "RGBA", "1", "P", "I;16", "LA"]}
        mode = draw(st.sampled_from(modes.get(fmt, ["L", "RGB"])))
        w, h = draw(st.integers(1, 40)), draw(st.integers(1, 40))
        im = Image.fromarray(np.random.default_rng(draw(st.integers(0, 99))).integers(0, 255, (h, w), dtype=np.uint8)).convert(mode)
        buf = io.BytesIO()
        im.save(buf, format=fmt, **({"interlace": True} if fmt == "PNG" and draw(st.booleans()) else {}))
        return f"image.{ext}", draw(mutated(buf.getvalue()))
    if kind in ("png", "ico"):
        w = draw(st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)))
        h = draw(st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)))
        depth = draw(st.sampled_from([1, 2, 4, 8, 16, 3]))
        color = draw(st.sampled_from([0, 2, 3, 4, 6, 5]))
        ihdr = struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, draw(st.sampled_from([0, 1, 2])))
        rows = draw(st.integers(0, 70))
        raw = (b"\0" + bytes(min(w, 64) * 8)) * rows
        chunks = [_chunk(b"IHDR", ihdr)]
        if color == 3:
            chunks.append(_chunk(b"PLTE", bytes(3 * draw(st.integers(0, 256)))))
        c = zlib.compressobj()
        chunks.append(_chunk(b"IDAT", c.compress(raw) + (c.flush() if draw(st.booleans()) else b"")))
        chunks.append(_chunk(b"IEND", b""))
        data = b"\x89PNG\r\n\x1a\n" + b"".join(chunks)
        data = draw(mutated(data)) if draw(st.booleans()) else data
        if kind == "png":
            return "image.png", data
        listed = draw(st.integers(0, 255))
        entry = struct.pack("<BBBBHHII", listed, listed, 0, 0, 1, 32, len(data), 6 + 16)
        return "image.ico", draw(mutated(struct.pack("<HHH", 0, 1, 1) + entry + data))
    # .npy: a header written by hand, then data of some length
    descr = draw(st.sampled_from(["<f4", "<f8", "|u1", "<i2", ">f4", "<f2", "<c8", "|b1", "O", "<U3", "[('a', '<f4')]", "<M8[s]", "|V4"]))
    shape = draw(st.lists(st.one_of(st.integers(0, 9), st.integers(-2, 2**40)), max_size=5).map(tuple))
    header = {"descr": descr, "fortran_order": draw(st.booleans()), "shape": shape}
    text = repr(header) if draw(st.integers(0, 5)) else draw(st.text(max_size=60))
    text = text + " " * (-(len(text) + 11) % 64) + "\n"
    body = text.encode("latin1", errors="replace")
    version = draw(st.sampled_from([1, 2]))
    head = b"\x93NUMPY" + bytes([version, 0]) + (struct.pack("<H", len(body)) if version == 1 else struct.pack("<I", len(body)))
    n = draw(st.integers(0, 3000))
    return "image.npy", draw(mutated(head + body + bytes(n))) if draw(st.booleans()) else head + body + bytes(n)


@fuzz_settings("image")
@given(item=pictures())
def test_fuzz_predict_inputs(workers, item):
    check(workers("image"), item)


# ----------------------------------------------------------------------------- TOML recipes

KEYS = ["model", "dataset", "epochs", "batch_size", "optimizer", "lr", "seed", "split_seed", "device", "dtype", "data_dir", "model_config",
        "hidden_size", "conv_param", "filter_num", "pad", "stride", "input_dim", "x"]
toml_scalars = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(), st.text(max_size=8),
                         st.sampled_from(["simple", "deep", "digits", "mnist", "adam", "sgd", "cpu", "float32", "float16"]))
toml_values = st.recursive(toml_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)), max_leaves=8)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v))
    if isinstance(v, str):
        return json.dumps(v).replace("\\u007f", "\\u007F")
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


@st.composite
def recipes(draw) -> bytes:
    doc = draw(st.dictionaries(st.sampled_from(KEYS), toml_values, max_size=6))
    text = "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in doc.items())
    if draw(st.integers(0, 9)) == 0:
        text += "[model_config]\n" + "a = [" * draw(st.integers(1, 2000)) + "]" * 3
    data = text.encode("utf-8", errors="surrogatepass")
    return draw(mutated(data)) if draw(st.booleans()) else data


@fuzz_settings("toml")
@given(data=recipes())
def test_fuzz_toml_recipes(workers, data):
    check(workers("toml"), data)


# ----------------------------------------------------------------------------- from_torch

STATE_KEYS = ["0.weight", "0.bias", "3.weight", "3.bias", "5.weight", "5.bias", "1.weight", "extra"]
SHAPES = {"0.weight": (2, 1, 3, 3), "0.bias": (2,), "3.weight": (4, 32), "3.bias": (4,), "5.weight": (3, 4), "5.bias": (3,)}


@st.composite
def state_dicts(draw) -> dict:
    from xpconv.interop import to_torch
    from xpconv.models import SimpleConvNet

    net = SimpleConvNet(input_dim=(1, 8, 8), conv_param={"filter_num": 2, "filter_size": 3, "pad": 1, "stride": 1},
                        hidden_size=4, output_size=3, xp="numpy", seed=0)
    shapes = {k: tuple(v.shape) for k, v in to_torch(net).state_dict().items()}
    out = {}
    for key, shape in shapes.items():
        if draw(st.integers(0, 29)) == 0:
            continue  # missing
        if draw(st.integers(0, 14)) == 0:
            shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
        dtype = "float32" if draw(st.integers(0, 3)) else draw(st.sampled_from(["float64", "float16", "bfloat16", "int64", "complex64", "bool", "uint8"]))
        extra = None if draw(st.integers(0, 3)) else draw(st.sampled_from(["meta", "nan", "sparse", "transposed"]))
        out[key] = ("tensor", shape, dtype, extra)
    if draw(st.integers(0, 9)) == 0:
        out[draw(st.sampled_from([*STATE_KEYS, "0.weight_orig", ""]))] = ("value", None, None, draw(st.one_of(st.none(), st.integers(), st.text(max_size=3))))
    return out


@fuzz_settings("from_torch")
@given(state=state_dicts())
def test_fuzz_from_torch_state_dicts(workers, state):
    check(workers("from_torch"), state)



# ----------------------------------------------------------------------------- run folders on --resume

LOCK = ".xpconv-run.lock"
#: numbers as a file may hold them: JSON's own, and what Python's json reads beyond it
NUMBERS = ["1", "2", "0", "-1", "1.0", "1.5", "-0", "true", "false", "null", '"1"', "Infinity", "-Infinity", "NaN", "1e400", "-1e400",
           "1e9", "1000000000", "1000000001", str(2**31 - 1), str(2**31), str(2**63), str(2**64), "1" + "0" * 30, "9" * 5000]
#: pids of temp-file names: this worker's own ({pid}), init's, past any pid_t, 20 digits
PIDS = ["{pid}", "1", "0", "00000000001", str(2**22 + 1), str(2**31 - 1), str(2**31), str(2**32), str(2**64), "9" * 20, "9" * 200]
TEMP_OF = ["metrics.json", "metrics.jsonl", "last.safetensors", "best.safetensors", LOCK, "notes.txt"]

number = st.one_of(st.sampled_from(NUMBERS), st.integers(-2**70, 2**70).map(str), st.floats().map(json.dumps))
json_leaf = st.one_of(number, st.text(max_size=8).map(json.dumps), st.sampled_from(['"simple"', '"digits"', '"epoch"', '{}', '[]']))


def _obj(items) -> str:
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in items) + "}"


json_text = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
    st.lists(st.tuples(st.sampled_from(["epoch", "final", "epochs", "pid", "host", "start", "best_epoch", "test_acc", "config", "x"]), inner),
             max_size=4).map(_obj)), max_leaves=10)


@st.composite
def records(draw) -> str:
    """One line as metrics.jsonl holds, its numbers hostile."""
    keys = draw(st.lists(st.sampled_from(["epoch", "train_loss", "train_acc", "test_acc", "val_acc", "seconds"]), min_size=1, max_size=4, unique=True))
    return _obj((k, draw(st.one_of(number, json_text) if draw(st.integers(0, 3)) else json_text)) for k in keys)


@st.composite
def lock_records(draw) -> str:
    import socket

    fields = {"pid": draw(st.one_of(number, st.sampled_from(["{pid}", "1", str(os.getpid())]))),
              "host": draw(st.sampled_from([json.dumps(socket.gethostname()), '"elsewhere"', '""', "5", "null"])),
              "start": draw(st.sampled_from(["null", '"x"', '"1:2"', "7"])), "since": '"2026-01-01T00:00:00"'}
    keys = draw(st.lists(st.sampled_from(list(fields)), unique=True, max_size=4))
    return _obj((k, fields[k]) for k in keys).replace('"{pid}"', "{pid}")


def _cut(draw, text: str) -> str:
    """``text``, with its end cut off at some point half the time (a write cut short)."""
    return text[:draw(st.integers(0, len(text)))] if draw(st.booleans()) else text


@st.composite
def contents(draw, name: str):
    """What the damaged file holds: ("bytes", data) or ("repeat", (unit, count, tail)), a
    large file made in the worker."""
    kind = draw(st.sampled_from(["binary", "json", "records", "deep", "huge string", "many lines"]))
    if kind == "binary":
        return "bytes", draw(st.binary(max_size=300))
    if kind == "json":
        text = draw(lock_records()) if name == LOCK and draw(st.booleans()) else draw(json_text)
        if name == "metrics.json" and draw(st.booleans()):
            text = _obj([("epochs", "[" + ", ".join(draw(st.lists(records(), max_size=3))) + "]"),
                         ("final", _obj([("epoch", draw(number)), ("best_epoch", draw(number))])), ("config", draw(json_text))])
        return "bytes", _cut(draw, text).encode()
    if kind == "records":
        lines = draw(st.lists(records(), max_size=5))
        return "bytes", _cut(draw, "".join(line + "\n" for line in lines)).encode()
    if kind == "deep":
        return "repeat", (draw(st.sampled_from([b"[", b"{\"a\":", b"[{\"epoch\":"])), draw(st.integers(1, 200_000)), b"")
    if kind == "huge string":
        return "repeat", (b"x", draw(st.integers(1, 5_000_000)), b'"}\n')
    return "repeat", (draw(st.sampled_from([b"\n", b"{}\n", b'{"epoch": 1}\n', b"\r", b'{"epoch": 1e400}\n'])), draw(st.integers(1, 1_000_000)), b"")


@st.composite
def damages(draw) -> tuple:
    """One file of the run folder replaced: (name, how, what)."""
    name = draw(st.one_of(
        st.sampled_from([LOCK, "metrics.json", "metrics.jsonl", "best.safetensors"]),
        st.builds(lambda of, pid, tail: f".{of}.{pid}.{tail}.tmp", st.sampled_from(TEMP_OF), st.sampled_from(PIDS),
                  st.text("abcdefghijklmnopqrstuvwxyz0123456789_", min_size=8, max_size=8)),
        st.sampled_from([f"{LOCK}.{{pid}}", f"{LOCK}.stale.{{pid}}", f".{LOCK}.{{pid}}.{{pid}}.abcdefgh.tmp"])))
    how = draw(st.sampled_from(["file", "file", "file", "sparse", "symlink", "hardlink", "fifo", "folder", "delete"]))
    if how == "file":
        return name, how, draw(contents(name))
    if how == "sparse":  # around the readers' limits (a lock file: 4 KiB; metrics: 256 MiB), and far past them
        return name, how, draw(st.sampled_from([4096, 4097, 256 << 20, (256 << 20) + 1, 1 << 40]))
    if how == "symlink":
        return name, how, draw(st.sampled_from(["sentinel.txt", "folder", "missing", "/dev/zero", "/dev/null"]))
    return name, how, None


def test_fuzz_run_folder(workers):
    """Damage steps (a file of the run folder replaced by hostile content or a link, FIFO or
    folder) and resume steps (what ``xpconv train --resume`` runs: claim the folder, repair
    it, train an epoch, release the lock) in any order: each resume ends in one line naming
    the folder, or in a folder whose last.safetensors, metrics.json and metrics.jsonl agree
    on the new epoch; nothing outside the folder changes.

    A state machine rather than one example per folder: a resume changes the folder (it
    repairs files, takes over or refuses the lock, removes temp files, adds an epoch), and
    what the next damage and resume meet is that state, as for someone resuming a damaged
    folder again and again."""
    worker = workers("run_folder")

    class RunFolderSteps(RuleBasedStateMachine):
        @initialize()
        def fresh_run(self):
            check(worker, ("reset",))

        @rule(damage=damages())
        def damage(self, damage):
            check(worker, ("damage", *damage))

        @rule()
        def resume(self):
            check(worker, ("resume",))

        def teardown(self):
            if worker.proc is not None:
                check(worker, ("resume",))

    run_state_machine_as_test(RunFolderSteps, settings=settings(fuzz_settings("run_folder"), stateful_step_count=6))
