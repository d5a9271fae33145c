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
import math
import os
import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_write, file_kind, short, span_within, stat_regular
from ._version import __version__
from .backend import to_numpy

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MODEL_PREFIX",
    "OPTIM_PREFIX",
    "SUFFIX",
    "CheckpointError",
    "StoredFile",
    "jsonable",
    "model_arrays",
    "nonfinite",
    "open_file",
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


#: the most bytes a checkpoint file may have (a model of the book's size takes a few MB);
#: ``XPCONV_MAX_CHECKPOINT_BYTES`` raises it for a larger model of your own
MAX_FILE_BYTES = int(os.environ.get("XPCONV_MAX_CHECKPOINT_BYTES") or 4 << 30)
#: the most bytes of the safetensors JSON header (tensor table and metadata)
MAX_HEADER_BYTES = 16 << 20
#: the most bytes of the xpconv metadata document inside the header
MAX_META_BYTES = 8 << 20
#: the deepest nesting of JSON objects/arrays accepted in a header or metadata document
MAX_JSON_DEPTH = 32
#: the most tensors one file may list
MAX_TENSORS = 10_000

#: safetensors dtype codes -> NumPy dtype names
_ST_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "U32": "uint32",
    "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16", "BF16": "bfloat16",
    "F32": "float32", "F64": "float64",
}
_ITEMSIZE = {"bool": 1, "uint8": 1, "int8": 1, "uint16": 2, "int16": 2, "uint32": 4, "int32": 4, "uint64": 8,
             "int64": 8, "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def json_depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` in a JSON text (strings skipped), without parsing it."""
    bare = re.sub(r'"[^"\\]*(?:\\.[^"\\]*)*"', "", text)
    marks = np.frombuffer(re.sub(r"[^\[\]{}]", "", bare).encode("ascii"), dtype=np.uint8)
    if marks.size == 0:
        return 0
    steps = np.where((marks == ord("[")) | (marks == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def _bounded_json(path: Path, text: str, what: str, limit: int) -> Any:
    if len(text) > limit:
        raise CheckpointError(f"{path}: {what} of {len(text):,} bytes; expected at most {limit:,}")
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise CheckpointError(f"{path}: {what} nested {depth} deep; expected at most {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: corrupt {what}: {short(str(exc), 120)}") from None


class StoredFile:
    """A checkpoint file whose header is read and checked, its tensors not yet:
    ``meta`` (the xpconv document, ``{}`` for a plain safetensors file) and ``index``
    (tensor name -> (dtype name, shape)). :meth:`read` loads tensors through the
    safetensors library (memory-mapped, offsets validated); compare ``index`` with what
    you expect before reading."""

    def __init__(self, path: Path, size: int, index: dict[str, tuple[str, tuple[int, ...]]], meta: dict[str, Any]):
        self.path, self.size, self.index, self.meta = path, size, index, meta

    def read(self, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Host NumPy arrays of ``keys`` (default: every tensor)."""
        from safetensors import SafetensorError, safe_open

        keys = list(self.index) if keys is None else list(keys)
        path = self.path
        try:
            st = stat_regular(path, "checkpoint file")
        except (FileNotFoundError, ValueError) as exc:
            raise CheckpointError(str(exc)) from None
        if st.st_size != self.size:
            raise CheckpointError(f"{path}: changed while being read ({self.size:,} bytes, now {st.st_size:,})")
        try:
            with safe_open(str(path), framework="numpy") as f:
                return {key: f.get_tensor(key) for key in keys}
        except (SafetensorError, OSError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: damaged safetensors checkpoint (truncated or corrupt): {short(str(exc), 160)}") from None


def open_file(path: str | os.PathLike[str]) -> StoredFile:
    """Check a checkpoint file without reading its tensors: a regular file (``stat``
    first: a folder, FIFO or device is refused without being opened for reading) of a
    sane size, a safetensors header of bounded length and nesting, each tensor's dtype,
    shape and byte range, and the xpconv metadata against its schema. Raises
    :class:`CheckpointError` naming the file, what was expected and what came."""
    path = Path(path)
    try:
        st = stat_regular(path, "checkpoint file")
    except FileNotFoundError as exc:
        raise CheckpointError(str(exc)) from None
    except ValueError as exc:
        hint = f" (try {path / ('last' + SUFFIX)})" if path.is_dir() else ""
        raise CheckpointError(f"{exc}{hint}") from None
    size = st.st_size
    if size > MAX_FILE_BYTES:
        raise CheckpointError(
            f"{path}: a file of {size:,} bytes; expected a checkpoint of at most {MAX_FILE_BYTES:,} bytes "
            "(set XPCONV_MAX_CHECKPOINT_BYTES to allow more)"
        )
    try:
        # O_NONBLOCK: should the path have become a FIFO since the stat, opening does not hang
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint file: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        if file_kind(os.fstat(f.fileno()).st_mode) is not None:
            raise CheckpointError(f"{path}: is {file_kind(os.fstat(f.fileno()).st_mode)}, not a regular checkpoint file")
        head = f.read(16)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors checkpoint (only {size} bytes; truncated or empty)")
        why = _sniff(path, head)
        (n,) = struct.unpack("<Q", head[:8])
        if n > size - 8 or n > MAX_HEADER_BYTES or n < 2 or head[8:9] != b"{":
            if why:
                raise CheckpointError(f"{path}: refusing to load: {why}")
            raise CheckpointError(
                f"{path}: not a valid safetensors checkpoint: its first 8 bytes give a header of {n:,} bytes; expected "
                f"a JSON header of at most {min(MAX_HEADER_BYTES, max(size - 8, 0)):,} bytes (truncated, corrupt or another format)"
            )
        f.seek(8)
        raw = f.read(n)
    if len(raw) != n:
        raise CheckpointError(f"{path}: truncated safetensors header ({len(raw):,} of {n:,} bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not a safetensors checkpoint: the header is not UTF-8 text") from None
    header = _bounded_json(path, text, "safetensors header", MAX_HEADER_BYTES)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header should be a JSON object, got {type(header).__name__}")
    index = _tensor_index(path, header, size - 8 - n)
    extra = header.get("__metadata__")
    if extra is not None and not (isinstance(extra, dict) and all(isinstance(v, str) for v in extra.values())):
        raise CheckpointError(f"{path}: safetensors __metadata__ should map names to strings, got {short(extra)}")
    raw_meta = (extra or {}).get(META_KEY)
    if raw_meta is None:
        return StoredFile(path, size, index, {})
    meta = _bounded_json(path, raw_meta, "xpconv metadata", MAX_META_BYTES)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: the header's xpconv metadata is not a {FORMAT} document")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(
            f"{path}: the header's xpconv metadata has format_version {short(version)}; expected an integer from 1 to {FORMAT_VERSION}"
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written in checkpoint format {version} by xpconv "
            f"{short(meta.get('xpconv_version'))}; this xpconv ({__version__}) reads format <= {FORMAT_VERSION}: upgrade xpconv"
        )
    rng = meta.pop("rng", None)  # version 1's generator states, which nothing restored
    if rng is not None and not isinstance(rng, dict):
        raise CheckpointError(f"{path}: bad xpconv metadata: rng should be an object or absent, got {short(rng)}")
    _check_schema(path, meta, index)
    return StoredFile(path, size, index, meta)


def _tensor_index(path: Path, header: Mapping[str, Any], data_bytes: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype name, shape) of the header's tensors, each checked: known dtype,
    a shape of non-negative integers, byte range inside the data and of the shape's size."""
    index: dict[str, tuple[str, tuple[int, ...]]] = {}
    if len(header) > MAX_TENSORS + 1:
        raise CheckpointError(f"{path}: {len(header):,} tensors; expected at most {MAX_TENSORS:,}")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {short(name)}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: expected an object with dtype, shape and data_offsets, got {short(entry)}")
        stored = entry.get("dtype")
        dtype = _ST_DTYPES.get(stored) if isinstance(stored, str) else None
        if dtype is None:
            raise CheckpointError(f"{where}: dtype {short(entry.get('dtype'))}; expected one of {', '.join(_ST_DTYPES)}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and len(shape) <= 8 and all(_is_int(d) and d >= 0 for d in shape)):
            raise CheckpointError(f"{where}: shape should be a list of at most 8 integers >= 0, got {short(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
            raise CheckpointError(f"{where}: data_offsets should be [begin, end], got {short(offsets)}")
        if not span_within(shape, MAX_FILE_BYTES // _ITEMSIZE[dtype]):  # also a size of 0 beside sizes no array can have
            raise CheckpointError(f"{where}: shape {short(shape)} of {dtype}: expected at most {MAX_FILE_BYTES:,} bytes, even counting a size of 0 as 1")
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        begin, end = offsets
        if end - begin != nbytes or end > data_bytes:
            raise CheckpointError(
                f"{where}: shape {tuple(shape)} of {dtype} takes {nbytes:,} bytes; the header gives bytes "
                f"{begin:,}..{end:,} of {data_bytes:,} (truncated or corrupt)"
            )
        index[name] = (dtype, tuple(int(d) for d in shape))
    return index


def read_file(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, metadata) of a safetensors file, validated; never executes code.

    ``metadata`` is the decoded ``xpconv`` document (schema-checked; a version-1
    document comes without its unused ``rng`` field), or ``{}`` for a plain safetensors
    file written by another tool. Raises :class:`CheckpointError` naming the file.
    Every tensor is read: use :func:`open_file` to check shapes before reading.
    """
    stored = open_file(path)
    return stored.read(), stored.meta


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


#: the fields of one metrics row that must be there, and their kinds
METRICS_FIELDS = {"epoch": "int", "train_loss": "number", "train_acc": "number", "test_acc": "number"}


def _check_schema(path: Path, meta: Mapping[str, Any], index: Mapping[str, Any] | None = None) -> None:
    """Raise CheckpointError naming the first field of ``meta`` that has the wrong type
    or is out of range."""

    def bad(field: str, expected: str, got: Any = None) -> CheckpointError:
        value = meta_get(field) if got is None else got
        return CheckpointError(f"{path}: bad xpconv metadata: {field} should be {expected}, got {short(value)}")

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
    for key in ("class", "backend"):
        if key in model and not isinstance(model[key], str):
            raise bad(f"model.{key}", "a string")
    if "dtype" in model and model["dtype"] not in FLOAT_DTYPES:
        raise bad("model.dtype", "one of " + ", ".join(FLOAT_DTYPES))
    if not isinstance(model.get("config", {}), Mapping):
        raise bad("model.config", "an object")
    params = model.get("params", [])
    if not (isinstance(params, list) and all(isinstance(p, str) for p in params)):
        raise bad("model.params", "a list of names")
    epoch = meta.get("epoch")
    if epoch is not None and not (_is_int(epoch) and 0 <= epoch <= 10**9):
        raise bad("epoch", "an integer from 0 to 10**9 or null")
    opt = meta.get("optimizer")
    if opt is not None:
        if not isinstance(opt, Mapping):
            raise bad("optimizer", "an object or null")
        if not isinstance(opt.get("type"), str):
            raise bad("optimizer.type", "a string")
        hyper = opt.get("hyper", {})
        if not isinstance(hyper, Mapping):
            raise bad("optimizer.hyper", "an object")
        for k, v in hyper.items():
            if not (_is_number(v) and math.isfinite(v)):
                raise bad(f"optimizer.hyper.{k}", "a finite number", v)
        it = opt.get("iter", 0)
        if not (_is_int(it) and 0 <= it <= 10**15):
            raise bad("optimizer.iter", "an integer from 0 to 10**15")
        slots = opt.get("slots", {})
        if not isinstance(slots, Mapping):
            raise bad("optimizer.slots", "an object")
        for slot, keys in slots.items():
            if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
                raise bad(f"optimizer.slots.{slot}", "a list of parameter names", keys)
            for k in keys:
                if index and f"{OPTIM_PREFIX}{slot}/{k}" not in index:
                    raise CheckpointError(f"{path}: optimizer slot {short(slot)} lists {short(k)}, but the file has no tensor {short(f'{OPTIM_PREFIX}{slot}/{k}')}")
    metrics = meta.get("metrics", [])
    if not isinstance(metrics, list):
        raise bad("metrics", "a list")
    for i, row in enumerate(metrics):
        if not isinstance(row, Mapping):
            raise bad(f"metrics[{i}]", "an object", row)
        for key, kind in METRICS_FIELDS.items():
            v = row.get(key)
            if kind == "int" and not (isinstance(v, int) and _is_int(v) and 1 <= v <= 10**9):
                raise bad(f"metrics[{i}].{key}", "an integer from 1 to 10**9", v)
            if kind == "number" and not _is_number(v):
                raise bad(f"metrics[{i}].{key}", "a number", v)
    if not isinstance(meta.get("extra", {}), Mapping):
        raise bad("extra", "an object")
    config = meta_get("extra.config")
    if config is not None and not isinstance(config, Mapping):
        raise bad("extra.config", "an object")


def nonfinite(arrays: Mapping[str, np.ndarray]) -> str | None:
    """The name of the first floating array holding NaN or inf (and what it holds), or None."""
    for key, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.kind == "f" and a.size and not np.isfinite(a).all():
            n_nan, n_inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
            what = ", ".join(p for p in (f"{n_nan:,} NaN" if n_nan else "", f"{n_inf:,} inf" if n_inf else "") if p)
            return f"{key} ({what} of {a.size:,} values)"
    return None


def model_arrays(tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The model's arrays (W1, b1, ..., BatchNorm statistics) of a file read by
    :func:`read_file`: the ``model/`` tensors, or every tensor of a plain safetensors file."""
    if not meta:
        return dict(tensors)
    return {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
