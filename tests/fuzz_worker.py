"""The child process of tests/test_fuzz.py: reads examples from stdin, hands each to one of
xpconv's readers, and answers how it ended.

Started as ``python tests/fuzz_worker.py TARGET``: it imports what TARGET needs, caps its
own address space at what the imports took plus ``XPCONV_FUZZ_CAP_MB`` (700 by default),
says it is ready, then answers each example. Messages on both pipes are a 4-byte length
and a pickle (the two ends are this test suite; nothing read from a fuzzed file is
unpickled by ``pickle``).

An answer is ``{"status": "ok" | "refused" | "finding", "detail": one line}``:

* ``refused``: the reader raised its own error type (or ValueError) with one line that
  names the file (file readers) - a clear error;
* ``ok``: the reader returned, and the result is what the input says (checked per target);
* ``finding``: anything else - an exception of another type (MemoryError, TypeError,
  IndexError, ...), a message of several lines or without the file's name, a wrong result.

A crash or a hang is seen by the parent (the pipe closes, or no answer comes in time).
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import struct
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CAP_MB = int(os.environ.get("XPCONV_FUZZ_CAP_MB", "700"))


def send(obj) -> None:
    data = pickle.dumps(obj)
    sys.stdout.buffer.write(struct.pack("<I", len(data)) + data)
    sys.stdout.buffer.flush()


def receive():
    head = sys.stdin.buffer.read(4)
    if len(head) < 4:
        return None
    (n,) = struct.unpack("<I", head)
    return pickle.loads(sys.stdin.buffer.read(n))  # from the parent test process only


# ----------------------------------------------------------------------------- oracles


def same(a, b) -> bool:
    """Deep equality: arrays and scalars by dtype (byte order aside), shape and values
    (NaN equal to NaN)."""
    import numpy as np

    if isinstance(a, (np.ndarray, np.generic)) or isinstance(b, (np.ndarray, np.generic)):
        # bookpickle hands out arrays and scalars in native byte order: compare the values
        return (type(a) is type(b) and a.dtype.newbyteorder("=") == b.dtype.newbyteorder("=") and a.shape == b.shape
                and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if isinstance(a, np.dtype) or isinstance(b, np.dtype):
        return isinstance(a, np.dtype) and isinstance(b, np.dtype) and a == b
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) and a != a:
        return b != b
    return a == b


def oracle_loads(data: bytes):
    """The stream unpickled by ``pickle`` itself with the real NumPy functions of the
    allow-list (only run on a stream that bookpickle accepted)."""
    import importlib
    import io

    from xpconv.bookpickle import ALLOWED_GLOBALS

    class Allowed(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in ALLOWED_GLOBALS:
                raise pickle.UnpicklingError(f"{module}.{name}")
            return getattr(importlib.import_module("builtins" if module == "__builtin__" else module), name)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy.core's names, as NumPy 1.x wrote them
        return Allowed(io.BytesIO(data)).load()


# ----------------------------------------------------------------------------- targets


def target_pickle(path: Path, payload):
    from xpconv import bookpickle

    path.write_bytes(payload)
    obj = bookpickle.load(path)
    expected = oracle_loads(payload)
    if not same(obj, expected):
        return f"bookpickle.load gave {obj!r:.200} where pickle with NumPy's own functions gives {expected!r:.200}"
    return None


def target_checkpoint(path: Path, payload):
    from xpconv.checkpoint import load_checkpoint

    path.write_bytes(payload)
    ckpt = load_checkpoint(path)
    if not hasattr(ckpt.model, "predict"):
        return f"load_checkpoint gave a model without predict: {type(ckpt.model).__name__}"
    return None


def target_idx(path: Path, payload):
    import math

    import numpy as np

    from xpconv.datasets import read_idx

    path.write_bytes(payload)
    a = read_idx(path)
    if a.dtype != np.uint8:
        return f"read_idx gave dtype {a.dtype}"
    raw = payload
    if raw[:2] == b"\x1f\x8b":
        import gzip

        raw = gzip.decompress(raw)
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    if a.shape != dims or raw[4 + 4 * ndim:4 + 4 * ndim + math.prod(dims)] != a.tobytes():
        return f"read_idx gave shape {a.shape}; the header says {dims}"
    return None


def target_image(path: Path, payload):
    import numpy as np

    from xpconv.images import read_images

    name, data = payload
    path = path.with_name(name)
    path.write_bytes(data)
    labels, x, _ = read_images([path], (1, 8, 8))
    if x.dtype != np.float32 or x.ndim != 4 or x.shape[1:] != (1, 8, 8) or len(labels) != x.shape[0]:
        return f"read_images gave {x.dtype} {x.shape} for {len(labels)} labels"
    if not np.isfinite(x).all():
        return "read_images gave values that are not finite"
    if not name.endswith(".npy") and (x.min() < -1e-6 or x.max() > 1 + 1e-6):
        return f"read_images gave a picture with values outside [0, 1]: {x.min()}..{x.max()}"
    return None


def target_toml(path: Path, payload):
    from xpconv.recipes import read_config

    path.write_bytes(payload)
    cfg = read_config(path)
    if not isinstance(cfg, dict):
        return f"read_config gave {type(cfg).__name__}"
    return None


def target_from_torch(path: Path, payload):
    import numpy as np
    import torch

    from xpconv.interop import from_torch, to_torch
    from xpconv.models import SimpleConvNet

    state = {key: make_tensor(torch, spec) for key, spec in payload.items()}
    net = SimpleConvNet(input_dim=(1, 8, 8), conv_param={"filter_num": 2, "filter_size": 3, "pad": 1, "stride": 1},
                        hidden_size=4, output_size=3, xp="numpy", seed=0)
    from_torch(state, net)
    back = to_torch(net).state_dict()
    for key, value in state.items():
        if key not in back or not isinstance(value, torch.Tensor):
            return f"from_torch accepted {key!r} = {type(value).__name__}, which the model has no place for"
        want = value.detach().to_dense().to(torch.float64).numpy()
        got = back[key].detach().to(torch.float64).numpy()
        if want.shape != got.shape or not np.allclose(got, want, rtol=1e-3, atol=1e-6, equal_nan=True):
            return f"from_torch copied {key!r} wrong: {want.shape} {want.ravel()[:3]} became {got.shape} {got.ravel()[:3]}"
    return None


def make_tensor(torch, spec):
    kind, shape, dtype, extra = spec
    if kind == "value":
        return extra
    t = torch.arange(int(np.prod(shape)) if shape else 1, dtype=torch.float64).reshape(shape) / 7.0
    t = t.to(getattr(torch, dtype))
    if extra == "meta":
        t = t.to("meta")
    elif extra == "nan" and t.is_floating_point() and t.numel():
        t.view(-1)[0] = float("nan")
    elif extra == "sparse" and t.ndim == 2:
        t = t.to_sparse()
    elif extra == "transposed" and t.ndim >= 2:
        t = t.transpose(0, 1)
    return t


# ----------------------------------------------------------------------------- run folders on --resume


class RunFolder:
    """A run folder after one epoch (built once), damaged and resumed step by step as
    ``xpconv train --resume DIR/last.safetensors`` does, next to an ``outside`` folder
    (a sentinel file, the targets of links) that nothing may change."""

    def __init__(self):
        import shutil

        from xpconv.datasets import load_digits
        from xpconv.models import SimpleConvNet
        from xpconv.training import Run, Trainer

        self.shutil = shutil
        self.base = Path(tempfile.mkdtemp(prefix="xpconv-fuzz-run-"))
        self.folder = self.base / "run-fuzzed"
        self.template = self.base / "template"
        self.outside = self.base / "outside"
        (x, t), (xt, tt) = load_digits()
        self.data = (x[:40], t[:40], xt[:20], tt[:20])
        net = SimpleConvNet(input_dim=(1, 8, 8), conv_param={"filter_num": 2, "filter_size": 3, "pad": 1, "stride": 1},
                            hidden_size=4, output_size=10, xp="numpy", seed=0)
        Trainer(net, *self.data, epochs=1, mini_batch_size=20, verbose=False, seed=0,
                run=Run(out_dir=self.template, config={"model": "simple", "dataset": "digits"})).train()
        self.reset()

    def reset(self) -> None:
        for p in (self.folder, self.outside):
            if p.exists() or p.is_symlink():
                self.shutil.rmtree(p)
        self.shutil.copytree(self.template, self.folder)
        self.outside.mkdir()
        (self.outside / "sentinel.txt").write_bytes(b"outside the run folder\n")
        (self.outside / "folder").mkdir()
        self.epoch = 1

    def snapshot(self) -> dict:
        """Everything under ``outside`` and the base folder's names: what must not change."""
        seen: dict = {"base": sorted(p.name for p in self.base.iterdir())}
        for p in sorted(self.outside.rglob("*")):
            st = os.lstat(p)
            seen[str(p.relative_to(self.outside))] = (st.st_mode, st.st_size, st.st_mtime_ns,
                                                      p.read_bytes() if p.is_file() and not p.is_symlink() else None)
        return seen

    def content(self, spec) -> bytes:
        kind, value = spec
        if kind == "bytes":
            return value
        if kind == "repeat":  # (unit, count, tail): a long file without a long message
            unit, count, tail = value
            return unit * count + tail
        raise ValueError(f"unknown content {kind}")

    def damage(self, name: str, kind: str, spec) -> None:
        path = self.folder / name.replace("{pid}", str(os.getpid()))
        if path.is_symlink() or path.exists():
            (self.shutil.rmtree if path.is_dir() and not path.is_symlink() else os.unlink)(path)
        if kind == "delete":
            return
        if kind == "file":
            path.write_bytes(self.content(spec))
        elif kind == "sparse":  # a file of ``spec`` bytes that takes no disk
            with open(path, "wb") as f:
                f.truncate(spec)
        elif kind == "symlink":
            path.symlink_to(spec if spec.startswith("/dev/") else self.outside / spec)
        elif kind == "hardlink":
            os.link(self.outside / "sentinel.txt", path)
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "folder":
            path.mkdir()
            (path / "inside.txt").write_bytes(b"x")
        else:
            raise ValueError(f"unknown damage {kind}")

    def resume(self):
        """What --resume runs on the folder: claim it (temp files, the lock, the run files'
        checks, reconcile_run), train one more epoch (the lock taken again, the epoch's
        files written), release. None when the folder is right afterwards, else what is wrong."""
        from xpconv.checkpoint import load_checkpoint
        from xpconv.training import Run, Trainer, claim_run_folder

        before = self.snapshot()
        last = self.folder / "last.safetensors"
        jsonl = self.folder / "metrics.jsonl"
        self.jsonl_before = digest(jsonl) if jsonl.is_file() and not jsonl.is_symlink() else None
        try:
            ckpt = load_checkpoint(last)
            lock = claim_run_folder(self.folder, resume=last, overwrite=False, remove_now=False)
            try:
                run = Run.resume(ckpt, out_dir=self.folder)
                Trainer(ckpt.model, *self.data, epochs=ckpt.epoch + 1, mini_batch_size=20, verbose=False, seed=0,
                        optimizer=ckpt.optimizer, run=run).train()
            finally:
                lock.release()
        except MemoryError:
            raise
        except Exception as exc:
            wrong = self.outside_changed(before)
            if wrong:
                return f"{wrong} (and the resume raised {type(exc).__name__}: {str(exc)[:200]})"
            text = str(exc)
            if str(self.folder) not in text:
                return f"{type(exc).__name__} without the run folder's name: {text[:300]}"
            raise
        wrong = self.outside_changed(before)
        if wrong:
            return wrong
        self.epoch += 1
        return self.check_resumed()

    def outside_changed(self, before: dict) -> str | None:
        after = self.snapshot()
        if after != before:
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            return f"something outside the run folder changed: {changed}"
        return None

    def check_resumed(self) -> str | None:
        from xpconv.checkpoint import read_checkpoint
        from xpconv.training.runs import LOCK_NAME

        e = self.epoch
        got = read_checkpoint(self.folder / "last.safetensors")[1].get("epoch")
        if got != e:
            return f"last.safetensors holds epoch {got} after resuming to epoch {e}"
        try:
            doc = json.loads((self.folder / "metrics.json").read_bytes())
        except (OSError, ValueError) as exc:
            return f"metrics.json cannot be read after a resume: {exc}"
        final = doc.get("final") if isinstance(doc, dict) else None
        if not isinstance(final, dict) or final.get("epoch") != e or [r.get("epoch") for r in doc.get("epochs", [])] != list(range(1, e + 1)):
            return f"metrics.json does not hold epochs 1..{e}: {str(doc)[:200]}"
        jsonl = self.folder / "metrics.jsonl"
        size, end, sha = self.jsonl_before or (0, b"", None)
        if sha is not None and digest(jsonl, size)[2] != sha:
            return f"metrics.jsonl lost what it held (its first {size:,} bytes changed)"
        with open(jsonl, "rb") as f:
            f.seek(size)
            new = f.read(1 << 20)
        if size and end != b"\n" and not new.startswith(b"\n"):  # appended: lines of their own
            return f"metrics.jsonl's records were appended to its unfinished last line (ending {end!r})"
        try:
            added = [json.loads(line) for line in new.split(b"\n") if line.strip()]
        except ValueError:
            added = []
        if not added or not all(isinstance(r, dict) for r in added) or added[-1].get("epoch") != e:
            return f"the records appended to metrics.jsonl do not end with epoch {e}: {new[-200:]!r}"
        if (self.folder / LOCK_NAME).exists() or (self.folder / LOCK_NAME).is_symlink():
            owner = (self.folder / LOCK_NAME).read_bytes()[:200] if (self.folder / LOCK_NAME).is_file() else b"(not a file)"
            if str(os.getpid()).encode() in owner:
                return f"the lock is left behind after the run: {owner!r}"
        mine = [p.name for p in self.folder.iterdir() if p.name.endswith(".tmp") and f".{os.getpid()}." in p.name and p.is_file()
                and not p.is_symlink() and p.stat().st_mtime > self.started]
        if mine:
            return f"temp files of this process left behind: {mine}"
        return None


def digest(path: Path, size: int | None = None) -> tuple[int, bytes, str]:
    """(size, last byte, SHA-256) of a file's first ``size`` bytes (all of it): of their
    first and last MiB, so that a 1 TiB sparse file is not read whole."""
    import hashlib

    n = os.path.getsize(path) if size is None else size
    with open(path, "rb") as f:
        head = f.read(min(n, 1 << 20))
        f.seek(max(n - (1 << 20), 0))
        tail = f.read(min(n, 1 << 20))
    return n, tail[-1:], hashlib.sha256(head + tail).hexdigest()


_RUN: RunFolder | None = None


def target_run_folder(path: Path, payload):
    global _RUN
    import time

    if _RUN is None:
        _RUN = RunFolder()
    op, *args = payload
    if op == "reset":
        _RUN.reset()
        return None
    if op == "damage":
        _RUN.damage(*args)
        return None
    _RUN.started = time.time()
    return _RUN.resume()


import numpy as np  # noqa: E402 - make_tensor's product

TARGETS = {
    "pickle": (target_pickle, "params.pkl", "xpconv.bookpickle", "UnsafePickleError"),
    "checkpoint": (target_checkpoint, "model.safetensors", "xpconv._fileformat", "CheckpointError"),
    "idx": (target_idx, "t10k-images-idx3-ubyte", "xpconv.datasets", "DatasetError"),
    "image": (target_image, "image.png", "xpconv.images", "ImageError"),
    "toml": (target_toml, "recipe.toml", "xpconv.recipes", "ConfigError"),
    "from_torch": (target_from_torch, "", "xpconv.interop", None),
    "run_folder": (target_run_folder, "", "xpconv.training.runs", "RunFolderError"),
}


def main() -> None:
    import importlib

    name = sys.argv[1]
    func, filename, module, error = TARGETS[name]
    mod = importlib.import_module(module)
    own = getattr(mod, error) if error else ValueError
    if name == "run_folder":  # a run folder's files, or its checkpoints
        from xpconv.checkpoint import CheckpointError

        own = (own, CheckpointError)
    for extra in ("xpconv.images", "xpconv.checkpoint", "PIL.Image", "PIL.PngImagePlugin"):
        importlib.import_module(extra)
    if name == "from_torch":
        importlib.import_module("torch")
    if name == "run_folder":
        for extra in ("xpconv.training", "xpconv.datasets", "xpconv.models"):
            importlib.import_module(extra)
    from xpconv._io import proc_status

    size = proc_status("VmSize") or "0 kB"
    base = int(size.split()[0]) * 1024
    limit = base + (CAP_MB << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    scratch = Path(tempfile.mkdtemp(prefix="xpconv-fuzz-"))
    send({"ready": True, "cap_mb": limit >> 20})
    while True:
        msg = receive()
        if msg is None:
            return
        path = scratch / (filename or "unused")
        for old in scratch.iterdir():
            old.unlink()
        try:
            wrong = func(path, msg)
        except MemoryError:
            send({"status": "finding", "detail": "MemoryError (the address space cap was reached)"})
            continue
        except Exception as exc:
            text = str(exc)
            where = "".join(traceback.format_tb(exc.__traceback__)[-2:]).strip().replace("\n", " | ")
            if not isinstance(exc, own) and not (name == "from_torch" and isinstance(exc, (ValueError, TypeError)) and text.startswith("from_torch")):
                send({"status": "finding", "detail": f"{type(exc).__name__}: {text[:300]} at {where[-400:]}"})
            elif not text.strip() or "\n" in text.strip():
                send({"status": "finding", "detail": f"{type(exc).__name__} of {len(text.splitlines())} lines: {text[:300]!r}"})
            elif filename and path.name not in text and path.parent.name not in text:
                send({"status": "finding", "detail": f"{type(exc).__name__} without the file's name: {text[:300]}"})
            elif len(text) > 2000:
                send({"status": "finding", "detail": f"{type(exc).__name__} of {len(text):,} characters: {text[:200]}"})
            else:
                send({"status": "refused", "detail": f"{type(exc).__name__}: {text[:300]}"})
            continue
        send({"status": "finding", "detail": wrong} if wrong else {"status": "ok", "detail": ""})


if __name__ == "__main__":
    main()
