"""The xpconv checkpoint file format: bytes and schema, nothing about models.

One file is a `safetensors <https://github.com/huggingface/safetensors>`_ file: a JSON
header, then raw little-endian tensor bytes. Nothing in it is code, so loading a file
from a stranger is as safe as reading a JSON document. It is written and read with the
safetensors library (reading goes through ``safe_open``: memory-mapped, header and
offsets validated by the library).

Tensors are host NumPy copies (a file written by a CuPy run loads where only NumPy is)::

    model/W1, model/b1, ...               parameters (and BatchNorm running statistics)
    optim/<slot>/<param>                  optimizer slots, e.g. optim/m/W1, optim/v/W1

The header's ``__metadata__`` holds one key, ``"xpconv"``, whose value is a JSON
document (format version 2)::

    {"format": "xpconv-checkpoint", "format_version": 2, "kind": "checkpoint" | "params",
     "xpconv_version": "...", "created": "...",
     "model": {"name": "simple", "class": "SimpleConvNet", "config": {...}, "dtype": "float32",
               "backend": "numpy", "params": ["W1", "b1", ...]},
     # kind "checkpoint" only:
     "epoch": 3,                                         # epochs completed (None: not counted)
     "optimizer": {"type": "Adam", "hyper": {...}, "iter": 360, "slots": {"m": ["W1", ...], ...}},
     "metrics": [{"epoch": 1, "train_loss": ..., ...}, ...],
     "extra": {...}}                                     # anything JSON the caller adds

Version 1 also stored ``"rng"`` (generator states that nothing restored: a resumed run
re-derives its permutations and Dropout masks from the seed and the step). Version-1
files are still read; :func:`read_file` drops that field.

Reading refuses pickles (and archives that may hold them: ``.npz``, torch ``.pt``) with
:class:`CheckpointError`: unpickling can run arbitrary code.

This module is a leaf below the core: ``models`` writes and reads parameter files through
it, and ``checkpoint`` (the public face) builds training checkpoints on it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_write
from ._version import __version__
from .backend import to_numpy

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MODEL_PREFIX",
    "OPTIM_PREFIX",
    "SUFFIX",
    "CheckpointError",
    "jsonable",
    "model_arrays",
    "read_file",
    "write_file",
]

FORMAT = "xpconv-checkpoint"
#: the version this xpconv writes; it reads 1 .. FORMAT_VERSION
FORMAT_VERSION = 2
SUFFIX = ".safetensors"
META_KEY = "xpconv"
MODEL_PREFIX = "model/"
OPTIM_PREFIX = "optim/"
KINDS = ("checkpoint", "params")


class CheckpointError(Exception):
    """A checkpoint or parameter file cannot be written or read; the message names the file."""


# --------------------------------------------------------------------------- writing


def jsonable(obj: Any) -> Any:
    """``obj`` with NumPy scalars/arrays, tuples and paths turned into plain JSON types."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_file(path: str | os.PathLike[str], tensors: Mapping[str, Any], document: Mapping[str, Any]) -> Path:
    """Write ``tensors`` (arrays of any namespace; host copies are stored) and the
    metadata ``document`` (``kind``, ``model``, ...; format, version, xpconv version and
    time are added) to ``path`` atomically. Returns the path."""
    from safetensors.numpy import save as st_save

    path = Path(path)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": document.get("kind"),
        "xpconv_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **{k: v for k, v in document.items() if k != "kind"},
    }
    try:
        header = json.dumps(jsonable(meta), allow_nan=True)
        data = st_save({k: np.ascontiguousarray(to_numpy(v)) for k, v in tensors.items()}, metadata={META_KEY: header})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot serialize checkpoint: {exc}") from exc
    try:
        return atomic_write(path, data)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write checkpoint: {exc}") from exc


# --------------------------------------------------------------------------- reading

_PICKLE_WHY = (
    "unpickling can execute arbitrary code, so xpconv never loads pickles; "
    "load it with the tool that wrote it (only if you trust it) and re-save it with xpconv.checkpoint.save_params"
)


def _sniff(path: Path, head: bytes) -> str | None:
    """Why a file that the safetensors library refused, starting with ``head``, is not
    one, when its first bytes or its name tell; else None."""
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


def read_file(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, metadata) of a safetensors file, validated; never executes code.

    ``metadata`` is the decoded ``xpconv`` document (schema-checked; a version-1
    document comes without its unused ``rng`` field), or ``{}`` for a plain safetensors
    file written by another tool. Raises :class:`CheckpointError` naming the file.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file (try {path / ('last' + SUFFIX)})") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint: {exc}") from None

    try:
        handle = safe_open(str(path), framework="numpy")
    except (SafetensorError, OSError) as exc:
        why = _sniff(path, head)
        if why:
            raise CheckpointError(f"{path}: refusing to load: {why}") from None
        if size < 8:
            raise CheckpointError(f"{path}: not a safetensors checkpoint (only {size} bytes; truncated or empty)") from None
        raise CheckpointError(
            f"{path}: not a valid safetensors checkpoint ({exc}; a file of {size} bytes: truncated, corrupt or another format)"
        ) from None
    try:
        with handle as f:
            header = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: damaged safetensors checkpoint (truncated or corrupt): {exc}") from None

    raw = header.get(META_KEY)
    if raw is None:
        return tensors, {}
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(f"{path}: corrupt xpconv metadata in the checkpoint header: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: the header's xpconv metadata is not a {FORMAT} document")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(
            f"{path}: the header's xpconv metadata has format_version {version!r}; expected an integer from 1 to {FORMAT_VERSION}"
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written in checkpoint format {version} by xpconv "
            f"{meta.get('xpconv_version')}; this xpconv ({__version__}) reads format <= {FORMAT_VERSION}: upgrade xpconv"
        )
    if version == 1:
        meta.pop("rng", None)  # generator states that no version restored
    _check_schema(path, meta)
    return tensors, meta


def _check_schema(path: Path, meta: Mapping[str, Any]) -> None:
    """Raise CheckpointError naming the first field of ``meta`` that has the wrong type."""

    def bad(field: str, expected: str) -> CheckpointError:
        return CheckpointError(f"{path}: bad xpconv metadata: {field} should be {expected}, got {meta_get(field)!r}")

    def meta_get(field: str) -> Any:
        obj: Any = meta
        for part in field.split("."):
            obj = obj.get(part) if isinstance(obj, Mapping) else None
        return obj

    if meta.get("kind") not in KINDS:
        raise bad("kind", " or ".join(repr(k) for k in KINDS))
    model = meta.get("model")
    if not isinstance(model, Mapping):
        raise bad("model", "an object")
    if not isinstance(model.get("name"), str):
        raise bad("model.name", "a string")
    if not isinstance(model.get("config", {}), Mapping):
        raise bad("model.config", "an object")
    if not isinstance(model.get("params", []), list):
        raise bad("model.params", "a list of names")
    epoch = meta.get("epoch")
    if epoch is not None and (not isinstance(epoch, int) or isinstance(epoch, bool)):
        raise bad("epoch", "an integer or null")
    opt = meta.get("optimizer")
    if opt is not None:
        if not isinstance(opt, Mapping):
            raise bad("optimizer", "an object or null")
        if not isinstance(opt.get("type"), str):
            raise bad("optimizer.type", "a string")
        if not isinstance(opt.get("hyper", {}), Mapping):
            raise bad("optimizer.hyper", "an object")
        if not isinstance(opt.get("slots", {}), Mapping):
            raise bad("optimizer.slots", "an object")
    if not isinstance(meta.get("metrics", []), list):
        raise bad("metrics", "a list")
    if not isinstance(meta.get("extra", {}), Mapping):
        raise bad("extra", "an object")


def model_arrays(tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The model's arrays (W1, b1, ..., BatchNorm statistics) of a file read by
    :func:`read_file`: the ``model/`` tensors, or every tensor of a plain safetensors file."""
    if not meta:
        return dict(tensors)
    return {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
