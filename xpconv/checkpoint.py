"""Checkpoints and parameter files that cannot execute code on load.

One file per checkpoint, in the `safetensors <https://github.com/huggingface/safetensors>`_
format: a JSON header followed by raw little-endian tensor bytes.  Nothing in it is
code, so loading a file from a stranger is as safe as reading a JSON document.

Tensors (always host NumPy copies, so a checkpoint written by a CuPy run loads on a
machine with NumPy only)::

    model/W1, model/b1, ...               parameters (and BatchNorm running statistics)
    optim/<slot>/<param>                  optimizer slots, e.g. optim/m/W1, optim/v/W1

The header's ``__metadata__`` holds one key, ``"xpconv"``, whose value is a JSON
document::

    {"format": "xpconv-checkpoint", "format_version": 1, "kind": "checkpoint" | "params",
     "xpconv_version": "...", "created": "...",
     "model": {"name": "simple", "class": "SimpleConvNet", "config": {...}, "dtype": "float32",
               "backend": "numpy", "params": ["W1", "b1", ...]},
     "epoch": 3,                                         # epochs completed (None: params only)
     "optimizer": {"type": "Adam", "hyper": {...}, "iter": 360, "slots": {"m": ["W1", ...], ...}},
     "rng": {"trainer": <bit-generator state>, "model": [<state per Dropout layer>]},
     "metrics": [{"epoch": 1, "train_loss": ..., ...}, ...],
     "extra": {...}}                                     # anything JSON the caller adds

Files are written atomically: a temporary file in the same folder is written, flushed
and fsync'ed, then renamed over the target with ``os.replace`` and the folder is
fsync'ed, so a crash (even ``kill -9``) mid-write leaves the previous file intact.

Loading refuses pickles (and archives that contain them: ``.npz``, torch ``.pt``) with
:class:`CheckpointError`: unpickling can run arbitrary code.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import signal
import struct
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from . import backend
from ._version import __version__

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "atomic_write",
    "load_checkpoint",
    "load_params",
    "read_checkpoint",
    "save_checkpoint",
    "save_params",
]

FORMAT = "xpconv-checkpoint"
FORMAT_VERSION = 1
SUFFIX = ".safetensors"
_META_KEY = "xpconv"
_MODEL = "model/"
_OPTIM = "optim/"
#: a safetensors header larger than this is not one of ours (or the file is damaged)
_MAX_HEADER = 100 * 2**20


class CheckpointError(Exception):
    """A checkpoint or parameter file cannot be written or read; the message names the file."""


# --------------------------------------------------------------------------- atomic writes


def atomic_write(path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never
    a mix: temp file in the same folder, write, flush, fsync, ``os.replace``, fsync
    of the folder. The file gets the mode of the one it replaces, or the umask's
    (usually 0644) when new. Returns the path."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    with _ctrl_c_deferred():  # a Ctrl-C lands after the write, never between mkstemp and cleanup
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        try:
            _chmod_like_new_file(fd, path)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        _fsync_dir(folder)
    return path


@contextlib.contextmanager
def _ctrl_c_deferred():
    """Hold back SIGINT (Python's KeyboardInterrupt) while the block runs and raise it
    when the block is done. Only in the main thread with Python's own handler installed;
    elsewhere the block runs as it is (a kill -9 is covered by the rename alone)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


def _umask() -> int:
    """The process's umask (read from /proc where possible: setting it to read it back
    is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _chmod_like_new_file(fd: int, path: Path) -> None:
    """Give the temp file (created 0600 by mkstemp) the mode the final file should have:
    the mode of the file it replaces, or what ``open(path, 'w')`` would give (0666 less
    the umask, usually 0644)."""
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~_umask()
    try:
        os.fchmod(fd, mode)
    except (AttributeError, OSError):  # no fchmod (Windows) or a file system without modes
        pass


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- RNG state


def model_generators(model) -> list:
    """The ``backend.Generator`` of each layer that draws random numbers during
    training (Dropout), in layer order."""
    gens = []
    for layer in getattr(model, "layers", ()):
        rng = getattr(layer, "rng", None)
        if isinstance(rng, backend.Generator):
            gens.append(rng)
    return gens


def rng_state(gen: "backend.Generator") -> dict:
    """JSON-serializable state of a ``backend.Generator``."""
    return _jsonable(gen.numpy.bit_generator.state)


def set_rng_state(gen: "backend.Generator", state: Mapping) -> None:
    """Restore a state written by :func:`rng_state`."""
    gen.numpy.bit_generator.state = dict(state)


# --------------------------------------------------------------------------- writing


def _host(x) -> np.ndarray:
    return np.ascontiguousarray(backend.to_numpy(x))


def _jsonable(obj):
    """Convert NumPy scalars/arrays and tuples inside ``obj`` to plain JSON types."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _model_meta(model) -> dict:
    state = model.state_arrays()
    return {
        "name": getattr(model, "name", type(model).__name__.lower()),
        "class": type(model).__name__,
        "config": _jsonable(getattr(model, "config", {}) or {}),
        "dtype": backend.dtype_name(model.dtype),
        "backend": backend.namespace_name(model.xp),
        "params": list(model.params),
    }, state


def _write(path, tensors: dict, meta: dict) -> Path:
    from safetensors.numpy import save as st_save

    path = Path(path)
    try:
        header = json.dumps(_jsonable(meta), allow_nan=True)
        data = st_save({k: _host(v) for k, v in tensors.items()}, metadata={_META_KEY: header})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot serialize checkpoint: {exc}") from exc
    try:
        return atomic_write(path, data)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write checkpoint: {exc}") from exc


def _base_meta(kind: str) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "xpconv_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def save_params(model, path) -> Path:
    """Write the model's parameters (host copies) and its name/config to ``path``."""
    model_meta, state = _model_meta(model)
    meta = {**_base_meta("params"), "model": model_meta}
    return _write(path, {_MODEL + k: v for k, v in state.items()}, meta)


def save_checkpoint(
    path,
    model,
    optimizer=None,
    *,
    epoch: int | None = None,
    metrics: list | None = None,
    rng: "backend.Generator | None" = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a training checkpoint atomically.

    ``epoch``: epochs completed; ``optimizer``: an ``xpconv.optim`` optimizer (its
    hyper-parameters, step count and slot arrays are stored); ``metrics``: the per-epoch
    records so far; ``rng``: the trainer's shuffling ``backend.Generator`` (the model's
    Dropout generators are stored too), so a resumed run repeats an uninterrupted one;
    ``extra``: any JSON-serializable dict (e.g. the run's configuration).
    """
    model_meta, state = _model_meta(model)
    tensors = {_MODEL + k: v for k, v in state.items()}
    opt_meta = None
    if optimizer is not None:
        sd = optimizer.state_dict()
        opt_meta = {"type": sd["type"], "hyper": _jsonable(sd["hyper"]), "iter": int(sd["iter"]), "slots": {}}
        for slot, values in sd["slots"].items():
            opt_meta["slots"][slot] = sorted(values)
            for key, arr in values.items():
                tensors[f"{_OPTIM}{slot}/{key}"] = arr
    meta = {
        **_base_meta("checkpoint"),
        "model": model_meta,
        "epoch": None if epoch is None else int(epoch),
        "optimizer": opt_meta,
        "rng": {
            "trainer": rng_state(rng) if rng is not None else None,
            "model": [rng_state(g) for g in model_generators(model)],
        },
        "metrics": list(metrics or []),
        "extra": dict(extra or {}),
    }
    return _write(path, tensors, meta)


# --------------------------------------------------------------------------- reading

_PICKLE_WHY = (
    "unpickling can execute arbitrary code, so xpconv never loads pickles; "
    "load it with the tool that wrote it (only if you trust it) and re-save it with xpconv.checkpoint.save_params"
)


def _sniff(path: Path, head: bytes) -> str | None:
    """Why ``head`` (the file's first bytes) is not a safetensors file, or None."""
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= _MAX_HEADER:
        return None  # a safetensors header, whatever the file is called
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return f"it is a Python pickle: {_PICKLE_WHY}"
    if head[:4] == b"PK\x03\x04":
        return (
            "it is a zip archive (a NumPy .npz or a PyTorch .pt/.pth file, which can hold pickles), "
            f"not safetensors; {_PICKLE_WHY}"
        )
    if head[:6] == b"\x93NUMPY":
        return "it is a NumPy .npy file, not an xpconv checkpoint (safetensors); load it with numpy.load(allow_pickle=False)"
    if head[:1] in (b"(", b"c", b"]", b"}") and path.suffix.lower() in (".pkl", ".pickle", ".p"):
        return f"it looks like a Python pickle (protocol 0/1): {_PICKLE_WHY}"
    if path.suffix.lower() in (".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".joblib"):
        return f"its name ({path.suffix}) says pickle: {_PICKLE_WHY}"
    return None


def read_checkpoint(path) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors, metadata) of a safetensors file, validated; never executes code.

    ``metadata`` is the decoded ``xpconv`` document, or ``{}`` for a plain safetensors
    file written by another tool. Raises CheckpointError naming the file otherwise.
    """
    from safetensors.numpy import load as st_load

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file (try {path / ('last' + SUFFIX)})") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint: {exc}") from None
    why = _sniff(path, data[:16])
    if why:
        raise CheckpointError(f"{path}: refusing to load: {why}")
    if len(data) < 8:
        raise CheckpointError(f"{path}: not a safetensors checkpoint (only {len(data)} bytes; truncated or empty)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER or 8 + n > len(data):
        raise CheckpointError(
            f"{path}: not a valid safetensors checkpoint (header of {n} bytes in a file of {len(data)} bytes: "
            "truncated, corrupt or another format)"
        )
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors checkpoint (corrupt header: {exc})") from None
    try:
        tensors = st_load(data)
    except Exception as exc:  # SafetensorError: truncated data, bad offsets, bad dtype
        raise CheckpointError(f"{path}: damaged safetensors checkpoint (truncated or corrupt): {exc}") from None
    raw = (header.get("__metadata__") or {}).get(_META_KEY)
    if raw is None:
        return tensors, {}
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(f"{path}: corrupt xpconv metadata in the checkpoint header: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: the header's xpconv metadata is not a {FORMAT} document")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written in checkpoint format {meta.get('format_version')} by xpconv "
            f"{meta.get('xpconv_version')}; this xpconv ({__version__}) reads format <= {FORMAT_VERSION}: upgrade xpconv"
        )
    return tensors, meta


def load_params(path) -> dict[str, np.ndarray]:
    """The model parameters in a file written by ``save_params`` or ``save_checkpoint``
    (or a plain safetensors file of named arrays), as host NumPy arrays keyed W1, b1, ..."""
    tensors, meta = read_checkpoint(path)
    if not meta:
        return dict(tensors)
    return {k[len(_MODEL) :]: v for k, v in tensors.items() if k.startswith(_MODEL)}


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns."""

    path: Path
    model: Any
    optimizer: Any  # an xpconv.optim optimizer with its state, or None
    epoch: int | None
    metrics: list = field(default_factory=list)
    rng_state: dict | None = None  # the trainer's shuffling generator
    extra: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.metadata["model"]["name"]


def load_checkpoint(path, *, xp=None, device=None, dtype=None, model=None) -> Checkpoint:
    """Read a checkpoint (or a params file) and rebuild what it describes.

    The model is rebuilt with ``models.build_model(name, config)`` in namespace ``xp``
    (a name or module) or on ``device`` ('cpu', 'cuda', 'auto'); NumPy when neither is
    given. ``dtype`` overrides the stored one. Pass ``model=`` to load the weights into
    a model you built yourself (needed for a custom ``Sequential``). The optimizer, when
    the file has one, is rebuilt with its hyper-parameters, step count and slots.
    """
    from . import models, optim

    path = Path(path)
    tensors, meta = read_checkpoint(path)
    if not meta:
        raise CheckpointError(f"{path}: a safetensors file without xpconv metadata; use load_params() for bare weights")
    mmeta = meta.get("model") or {}
    params = {k[len(_MODEL) :]: v for k, v in tensors.items() if k.startswith(_MODEL)}
    if model is None:
        name = mmeta.get("name")
        if name not in models.MODELS:
            raise CheckpointError(
                f"{path}: model {name!r} cannot be rebuilt from its config (known: {', '.join(models.MODELS)}); "
                "build it yourself and pass model=..."
            )
        if xp is None and device is None:
            xp = "numpy"
        try:
            model = models.build_model(name, mmeta.get("config") or {}, xp=xp, device=device, dtype=dtype or mmeta.get("dtype", "float32"), seed=0)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot rebuild model {name!r} from the stored config: {exc}") from exc
    try:
        model.load_state_arrays(params)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: the stored weights do not fit the model: {exc}") from exc

    rng = meta.get("rng") or {}
    gens = model_generators(model)
    for gen, state in zip(gens, rng.get("model") or []):
        set_rng_state(gen, state)

    opt = None
    ometa = meta.get("optimizer")
    if ometa:
        try:
            opt = optim.get_optimizer(ometa["type"].lower(), **ometa.get("hyper", {}))
            slots = {
                slot: {key: tensors[f"{_OPTIM}{slot}/{key}"] for key in keys} for slot, keys in ometa.get("slots", {}).items()
            }
            opt.load_state_dict({"type": ometa["type"], "iter": ometa.get("iter", 0), "slots": slots})
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot restore the optimizer state: {exc!r}") from exc
    return Checkpoint(
        path=path,
        model=model,
        optimizer=opt,
        epoch=meta.get("epoch"),
        metrics=list(meta.get("metrics") or []),
        rng_state=rng.get("trainer"),
        extra=dict(meta.get("extra") or {}),
        metadata=meta,
    )
