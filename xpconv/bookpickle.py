"""The book's pickled parameter files, read without running anything they contain.

*Deep Learning from Scratch* saves weights with ``pickle.dump(params, f)``: a dict of
NumPy arrays (``ch07/params.pkl``, ``ch08/deep_convnet_params.pkl``). A pickle is a small
program, and ``pickle.load`` runs whatever it names, so xpconv reads these files with an
allow-list unpickler instead:

* Before unpickling starts, the whole opcode stream is read with :mod:`pickletools`: every
  global it names (``GLOBAL`` or ``STACK_GLOBAL`` with literal names) must be in
  :data:`ALLOWED_GLOBALS`; persistent ids, the copyreg extension registry, ``INST``/``OBJ``/
  ``NEWOBJ`` object construction and out-of-band buffers are refused; so are memo indices and
  lengths that do not fit the file.
* While unpickling, ``find_class`` hands out *checking stand-ins*, never NumPy's own
  functions: ``_reconstruct`` accepts only ``(numpy.ndarray, (0,), b'b')``, ``dtype`` only a
  plain numeric type code (bool, int, uint, float, complex), an array's state must be a
  shape whose byte count equals the bytes that came with it, and all arrays together may not
  hold more bytes than the file. ``numpy.ndarray`` can be named but not called, and
  ``persistent_load`` always refuses.

Anything else raises :class:`UnsafePickleError` with one line that names the file and what
was refused (e.g. ``os.system``); since a refused global is never resolved, nothing in the
file has run by then. Dicts, lists, tuples, strings, numbers and bytes come from pickle
opcodes alone and need no global.

:func:`file_kind` tells files apart by their first bytes, never by their names: a
safetensors file (8-byte header length, then ``{``) is ``'safetensors'`` even when it is
called ``params.pkl``; a pickle (``\\x80`` and a protocol number, or a protocol-0/1 opcode
and a final ``.``) is ``'pickle'`` whatever it is called.

    >>> from xpconv import bookpickle
    >>> params = bookpickle.load_params("ch07/params.pkl")   # doctest: +SKIP
    >>> sorted(params), params["W1"].shape                   # doctest: +SKIP
    (['W1', 'W2', 'W3', 'b1', 'b2', 'b3'], (30, 1, 5, 5))
"""

from __future__ import annotations

import io
import itertools
import math
import os
import pickle
import pickletools
from pathlib import Path
from typing import Any

import numpy as np

from ._io import open_regular, read_regular, span_within

__all__ = [
    "ALLOWED_GLOBALS",
    "MAX_FILE_BYTES",
    "UnsafePickleError",
    "file_kind",
    "load",
    "load_params",
    "loads",
]

#: files larger than this are refused before they are read (the book's are 1-4 MB)
MAX_FILE_BYTES = 128 * 2**20
#: containers nested deeper than this are refused
MAX_DEPTH = 100
#: the most opcodes one pickle may hold (the book's files hold about a hundred)
MAX_OPCODES = 1_000_000
#: the most containers (dicts, lists, tuples, sets) and called globals one pickle may build
MAX_CONTAINERS = 100_000
#: the most items all its containers may be given together
MAX_ELEMENTS = 500_000
_MAX_NDIM = 32

#: the type codes a pickled dtype may name: bool, signed and unsigned ints, floats, complex
_DTYPE_CODES = frozenset(["b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"])


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle was refused (a global off the allow-list, a size that does not fit the file,
    a malformed stream, a path that is not a regular file); the one-line message names the
    file and what was refused. A ValueError too: the file's content is what is wrong."""


# ----------------------------------------------------------------------------- sniffing

_SAFETENSORS_MAX_HEADER = 100 * 2**20
# opcodes a protocol-0/1 pickle can start with (protocol 2+ starts with PROTO, b"\x80")
_P01_FIRST = frozenset(b"(]})NIJKLMFGSTUVXBCc")


def _kind_of(head: bytes, last: bytes, size: int) -> str:
    if len(head) >= 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if n <= _SAFETENSORS_MAX_HEADER and 8 + n <= size:
            return "safetensors"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if head[:1] and head[0] in _P01_FIRST and last == b".":
        return "pickle"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:6] == b"\x93NUMPY":
        return "npy"
    return "unknown"


def file_kind(source) -> str:
    """What a file is, from its bytes alone (its name is never looked at):
    ``'safetensors'``, ``'pickle'``, ``'zip'`` (.npz, torch .pt), ``'npy'`` or ``'unknown'``.

    ``source`` is a path or the file's bytes. A missing or unreadable path, and one that is
    not a regular file (a folder, FIFO or device: ``stat``-ed, never opened), is
    ``'unknown'`` (the loader that is then called says what is wrong with it)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source[:16]), bytes(source[-1:]), len(source)
        return _kind_of(*data)
    try:
        f, st = open_regular(source, "file")
        with f:
            head = f.read(16)
            f.seek(max(st.st_size - 1, 0))
            last = f.read(1)
    except (OSError, ValueError):
        return "unknown"
    return _kind_of(head, last, st.st_size)


# ----------------------------------------------------------------------------- static scan

_REFUSED_OPCODES = {
    "PERSID": "a persistent id (persistent_load is refused)",
    "BINPERSID": "a persistent id (persistent_load is refused)",
    "EXT1": "a global from the copyreg extension registry",
    "EXT2": "a global from the copyreg extension registry",
    "EXT4": "a global from the copyreg extension registry",
    "INST": "object construction (INST)",
    "OBJ": "object construction (OBJ)",
    "NEWOBJ": "object construction (NEWOBJ)",
    "NEWOBJ_EX": "object construction (NEWOBJ_EX)",
    "NEXT_BUFFER": "an out-of-band buffer",
    "READONLY_BUFFER": "an out-of-band buffer",
}
_STRING_OPS = frozenset(
    ["STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"]
)
_MEMO_PUT = frozenset(["PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"])
_MEMO_GET = frozenset(["GET", "BINGET", "LONG_BINGET"])
_NO_STACK_EFFECT = frozenset(["FRAME", "PROTO"]) | _MEMO_PUT
# opcodes that build a container (or call a global, which builds an object)
_BUILDS = frozenset(
    ["EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "EMPTY_SET", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "LIST", "DICT",
     "FROZENSET", "REDUCE"]
)
# opcodes that put a fixed number of items into a container (those after a MARK count the slice)
_ITEMS = {"APPEND": 1, "SETITEM": 1, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
# memo entries kept by the scan: names of globals (a longer string is never one)
_MAX_NAME = 512


class _Scan:
    """What the scan counts against the budget: opcodes, containers built, items put in them."""

    def __init__(self) -> None:
        self.opcodes = self.containers = self.elements = 0

    def add(self, opcodes: int = 0, containers: int = 0, elements: int = 0) -> None:
        self.opcodes += opcodes
        self.containers += containers
        self.elements += elements
        if self.opcodes > MAX_OPCODES:
            raise UnsafePickleError(f"more than {MAX_OPCODES:,} opcodes (the budget of a parameter file)")
        if self.containers > MAX_CONTAINERS:
            raise UnsafePickleError(f"more than {MAX_CONTAINERS:,} containers and calls (the budget of a parameter file)")
        if self.elements > MAX_ELEMENTS:
            raise UnsafePickleError(f"more than {MAX_ELEMENTS:,} items in containers (the budget of a parameter file)")


def _scan(data: bytes) -> int:
    """Read the opcode stream without executing it; raise UnsafePickleError (message
    without the file name) for anything refused. The stack is followed by its depth alone
    (MARKs included), so that the items each container receives are counted against the
    budget. Returns the pickle's length (up to and including STOP)."""
    memo: dict[int, str] = {}  # the memo entries that hold short strings (global names)
    memo_set = bytearray()  # one bit per memo index in use (MEMOIZE takes the count of them)
    memo_len = 0
    last: list[tuple[str, Any]] = []  # the latest stack pushes: ("str", value) or ("other", None)
    budget = _Scan()
    depth = 0  # objects on the stack (marks excluded)
    marks: list[int] = []  # the depth at each MARK
    markobject, stackslice = pickletools.markobject, pickletools.stackslice
    try:
        for op, op_arg, pos in pickletools.genops(io.BytesIO(data)):
            arg: Any = op_arg
            budget.add(opcodes=1)
            name = op.name
            if name in _REFUSED_OPCODES:
                what = _REFUSED_OPCODES[name]
                if name == "INST":
                    what += f" of {_short(str(arg).replace(' ', '.'))}"
                raise UnsafePickleError(f"{what} is not allowed")
            if name == "GLOBAL":
                module, _, gname = str(arg).partition(" ")
                _check_global(module, gname)
            # the stack's depth, as the unpickler will see it
            before, after = op.stack_before, op.stack_after
            if name == "MARK":
                marks.append(depth)
            elif name == "POP" and marks and marks[-1] == depth:
                marks.pop()  # POP of a MARK drops the mark
            elif markobject in before:
                if not marks:
                    raise UnsafePickleError(f"{name} at byte {pos} without a MARK")
                below = before.index(markobject)
                taken = depth - marks.pop()
                if name != "POP_MARK":
                    budget.add(elements=taken)
                depth -= taken + below
                if depth < (marks[-1] if marks else 0):
                    raise UnsafePickleError(f"{name} at byte {pos} takes more from the stack than it holds")
                depth += len(after)
            else:
                if stackslice in before or stackslice in after:  # pragma: no cover - every such opcode has a MARK
                    raise UnsafePickleError(f"opcode {name} is not understood")
                depth -= len(before)
                if depth < (marks[-1] if marks else 0):
                    raise UnsafePickleError(f"{name} at byte {pos} takes more from the stack than it holds")
                depth += len(after)
            if name in _BUILDS:
                budget.add(containers=1)
            if name in _ITEMS:
                budget.add(elements=_ITEMS[name])
            if name == "STOP":
                if depth or marks:
                    raise UnsafePickleError(f"{depth + len(marks):,} objects or marks left on the stack at STOP (byte {pos})")
                return (pos or 0) + 1
            if name in _MEMO_PUT:
                index = memo_len if name == "MEMOIZE" else int(arg)
                if index > budget.opcodes:
                    raise UnsafePickleError(
                        f"memo index {index} at opcode {budget.opcodes} (a legitimate pickle numbers them in order)"
                    )
                if depth <= (marks[-1] if marks else 0):
                    raise UnsafePickleError(f"{name} at byte {pos} with nothing on the stack to remember")
                byte, bit = divmod(index, 8)
                if byte >= len(memo_set):
                    memo_set.extend(bytes(byte + 1 - len(memo_set)))
                if not memo_set[byte] >> bit & 1:
                    memo_set[byte] |= 1 << bit
                    memo_len += 1
                if last and last[-1][0] == "str":
                    memo[index] = last[-1][1]
                else:
                    memo.pop(index, None)
                continue
            if name == "STACK_GLOBAL":
                if len(last) < 2 or last[-1][0] != "str" or last[-2][0] != "str":
                    raise UnsafePickleError("a global whose name is computed, not written in the file")
                _check_global(last[-2][1], last[-1][1])
            if name in _NO_STACK_EFFECT:
                continue
            if name in _STRING_OPS and isinstance(arg, str) and len(arg) <= _MAX_NAME:
                last.append(("str", arg))
            elif name in _MEMO_GET and int(arg) in memo:
                last.append(("str", memo[int(arg)]))
            else:
                last.append(("other", None))
            del last[:-2]
    except UnsafePickleError:
        raise
    except (ValueError, EOFError, OverflowError) as exc:  # truncated stream, bad opcode, lengths past the end
        raise UnsafePickleError(f"not a valid pickle ({_one_line(exc)})") from None
    raise UnsafePickleError("not a valid pickle (no STOP opcode)")  # pragma: no cover - genops raises first


def _check_global(module: str, name: str) -> None:
    if (module, name) not in ALLOWED_GLOBALS:
        raise UnsafePickleError(
            f"global {module}.{name} is not on the allow-list (NumPy arrays, dtypes and plain containers only)"
        )


# ----------------------------------------------------------------------------- stand-ins


class _Budget:
    """Bytes that arrays built from the file may hold in all: at most the file's size (each
    array's bytes are in the file once), so a file cannot make xpconv allocate more.
    ``encoded`` is a second such budget, for the bytes ``_codecs.encode`` makes from strings
    (protocols 0-2 write an array's bytes as a string, which is in the file once too)."""

    def __init__(self, file_size: int):
        self.file_size = file_size
        self.left = file_size
        self.encoded = file_size

    def take(self, nbytes: int, what: str) -> None:
        if nbytes > self.file_size:
            raise UnsafePickleError(
                f"{what} needs {nbytes:,} bytes, more than the whole file ({self.file_size:,} bytes)"
            )
        if nbytes > self.left:
            raise UnsafePickleError(
                f"{what} needs {nbytes:,} bytes; the arrays would hold more bytes than the file ({self.file_size:,})"
            )
        self.left -= nbytes


def _take_exact(budget: _Budget, nbytes: int, got: int, what: str) -> None:
    """Check that ``what`` (``nbytes`` by its shape and dtype) came with exactly ``got``
    bytes and fits the budget, before anything is copied."""
    if nbytes > budget.file_size:
        budget.take(nbytes, what)  # raises: more than the whole file
    if got != nbytes:
        raise UnsafePickleError(f"{what} needs {nbytes:,} bytes but {got:,} came with it")
    budget.take(nbytes, what)


class _NoState:
    """A stand-in whose state a pickle cannot set: BUILD on it is refused (no attribute
    dict either), so nothing a file does outlives its load."""

    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]

    def __setstate__(self, state) -> None:
        raise UnsafePickleError(f"a state (BUILD) given to {self!r}, which takes none")


class _ClassName(_NoState):
    """What ``numpy.ndarray`` resolves to (one per load): a name that ``_reconstruct``
    accepts, never callable."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "numpy.ndarray"

    def __call__(self, *args, **kwargs):
        raise UnsafePickleError("numpy.ndarray may only be named as the class of _reconstruct; calling it is refused")


class _StandIn(_NoState):
    """A global the allow-list hands out: calls the checking function bound to one load."""

    __slots__ = ("_func", "_name")

    def __init__(self, name: str, func):
        self._name, self._func = name, func

    def __repr__(self) -> str:
        return self._name

    def __call__(self, *args, **kwargs):
        return self._func(*args, **kwargs)


class _Made(_NoState):
    """An array or scalar a stand-in made while unpickling; :func:`_finish` unwraps it."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __repr__(self) -> str:
        return "ndarray(...)" if isinstance(self.value, np.ndarray) else "scalar(...)"


def _flag(value, what: str) -> bool:
    if type(value) is bool or (type(value) is int and value in (0, 1)):
        return bool(value)
    raise UnsafePickleError(f"{what} must be True or False, got {_short(value)}")


def _shape(value, what: str) -> tuple[int, ...]:
    if type(value) is not tuple or len(value) > _MAX_NDIM or any(type(s) is not int or s < 0 for s in value):
        raise UnsafePickleError(f"{what} must be a tuple of at most {_MAX_NDIM} non-negative ints, got {_short(value)}")
    # a size of 0 beside sizes no array in such a file can have, or sizes too long to print; other
    # shapes too large are refused with their byte count against the data that comes with them
    if not span_within(value, MAX_FILE_BYTES) and (0 in value or not span_within(value, 10**100)):
        raise UnsafePickleError(f"{what} {_short(value)}: expected sizes multiplying to at most {MAX_FILE_BYTES:,}, even counting a size of 0 as 1")
    return value


class _DtypeStub:
    """A dtype named in the file: a numeric type code and, after BUILD, its byte order."""

    __slots__ = ("built", "code", "order")
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"dtype({self.code!r})"

    def __init__(self, code: str):
        self.code = code
        self.order = "="
        self.built = False

    def __setstate__(self, state) -> None:
        if self.built:
            raise UnsafePickleError("a dtype's state is set twice")
        ok = (
            type(state) is tuple
            and len(state) in (8, 9)
            and state[0] in (3, 4)
            and state[1] in ("<", ">", "|", "=")
            and state[2:5] == (None, None, None)
            and state[5:8] == (-1, -1, 0)
            and all(type(v) is int for v in state[5:8])
            and (len(state) == 8 or state[8] is None)
        )
        if not ok:
            raise UnsafePickleError(f"dtype state {_short(state)} is not that of a plain numeric dtype")
        self.order = state[1]
        self.built = True

    def resolve(self) -> np.dtype:
        dt = np.dtype(self.code)
        if self.order in ("<", ">"):
            return dt.newbyteorder("<" if self.order == "<" else ">")
        return dt


def _dtype_of(value, what: str) -> np.dtype:
    if not isinstance(value, _DtypeStub):
        raise UnsafePickleError(f"{what} must be a dtype from the file, got {_short(value)}")
    return value.resolve()


def _native(arr: np.ndarray) -> np.ndarray:
    """A writable array in native byte order, owning its memory."""
    if not arr.dtype.isnative:
        return arr.astype(arr.dtype.newbyteorder("="))
    return arr.copy(order="K")


class _ArrayStub:
    """What ``_reconstruct`` returns: an array that gets its shape, dtype and bytes from
    BUILD, all checked before one byte is copied."""

    __slots__ = ("array", "budget")
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "ndarray(...)"

    def __init__(self, budget: _Budget):
        self.budget = budget
        self.array: np.ndarray | None = None

    def __setstate__(self, state) -> None:
        if self.array is not None:
            raise UnsafePickleError("an array's state is set twice")
        if type(state) is not tuple or len(state) not in (4, 5):
            raise UnsafePickleError(
                f"array state must be (version, shape, dtype, is_fortran, data), got {_short(state)}"
            )
        if len(state) == 5:
            if state[0] != 1 or type(state[0]) is not int:
                raise UnsafePickleError(f"array state version {_short(state[0])}; expected 1")
            state = state[1:]
        shape = _shape(state[0], "an array's shape")
        dt = _dtype_of(state[1], "an array's dtype")
        fortran = _flag(state[2], "an array's is_fortran flag")
        raw = state[3]
        what = f"an array of shape {shape} and dtype {dt.name}"
        if type(raw) not in (bytes, bytearray):
            raise UnsafePickleError(f"{what} must come with its bytes, got {_short(raw)}")
        _take_exact(self.budget, math.prod(shape) * dt.itemsize, len(raw), what)
        flat = np.frombuffer(raw, dtype=dt)
        self.array = _native(flat.reshape(shape, order="F" if fortran else "C"))


def _allowed(budget: _Budget) -> dict[tuple[str, str], Any]:
    """The stand-ins ``find_class`` hands out, made afresh for each load and bound to its
    file's byte budget."""
    ndarray = _ClassName()

    def _reconstruct(cls, shape, typecode):
        if cls is not ndarray or type(shape) is not tuple or shape != (0,) or type(shape[0]) is not int:
            raise UnsafePickleError(
                f"_reconstruct{_short((cls, shape, typecode))} refused; only _reconstruct(numpy.ndarray, (0,), b'b') rebuilds an array"
            )
        if typecode not in (b"b", "b"):
            raise UnsafePickleError(f"_reconstruct with type code {_short(typecode)} refused; expected b'b'")
        return _ArrayStub(budget)

    def _dtype(obj, align=False, copy=True):
        if type(obj) is not str or obj not in _DTYPE_CODES:
            raise UnsafePickleError(f"dtype {_short(obj)} refused; allowed: {', '.join(sorted(_DTYPE_CODES))}")
        _flag(align, "dtype's align")
        _flag(copy, "dtype's copy")
        return _DtypeStub(obj)

    def _scalar(dtype, data=None):
        dt = _dtype_of(dtype, "scalar's dtype")
        if type(data) is not bytes or len(data) != dt.itemsize:
            raise UnsafePickleError(f"a {dt.name} scalar needs {dt.itemsize} bytes, got {_short(data)}")
        budget.take(dt.itemsize, f"a {dt.name} scalar")
        return _Made(np.frombuffer(data, dtype=dt)[0].astype(dt.newbyteorder("=")))

    def _frombuffer(buf, dtype, shape, order, axis_order=None):
        dt = _dtype_of(dtype, "an array's dtype")
        shape = _shape(shape, "an array's shape")
        what = f"an array of shape {shape} and dtype {dt.name}"
        if type(buf) not in (bytes, bytearray):
            raise UnsafePickleError(f"{what} must come with its bytes in the file, got {_short(buf)}")
        if order not in ("C", "F", "K"):
            raise UnsafePickleError(f"{what}: order {_short(order)} refused; expected 'C', 'F' or 'K'")
        if order == "K" and axis_order is not None:
            if type(axis_order) not in (tuple, list) or sorted(axis_order) != list(range(len(shape))):
                raise UnsafePickleError(f"{what}: axis order {_short(axis_order)} is not a permutation of its axes")
            if any(type(a) is not int for a in axis_order):
                raise UnsafePickleError(f"{what}: axis order {_short(axis_order)} is not a permutation of its axes")
        _take_exact(budget, math.prod(shape) * dt.itemsize, len(buf), what)
        flat = np.frombuffer(buf, dtype=dt)
        if order == "K" and axis_order is not None:
            return _Made(_native(flat.reshape(shape, order="C").transpose(axis_order)))
        return _Made(_native(flat.reshape(shape, order="C" if order == "K" else order)))

    def _encode(obj, encoding="latin1"):
        # protocols 0-2 write bytes as _codecs.encode(text, 'latin1')
        if type(obj) is not str or encoding not in ("latin1", "latin-1"):
            raise UnsafePickleError(
                f"_codecs.encode{_short((obj, encoding))} refused; only (str, 'latin1') makes bytes"
            )
        if len(obj) > budget.encoded:
            raise UnsafePickleError(
                f"_codecs.encode of {len(obj):,} characters; the strings encoded would hold more bytes than the file ({budget.file_size:,})"
            )
        budget.encoded -= len(obj)
        return obj.encode("latin-1")

    def _bytes(*args):
        # protocols 0-2 write b"" as bytes()
        if args:
            raise UnsafePickleError(f"bytes{_short(args)} refused; only bytes() makes the empty bytes")
        return b""

    table: dict[tuple[str, str], Any] = {("numpy", "ndarray"): ndarray, ("numpy", "dtype"): _StandIn("numpy.dtype", _dtype)}
    for core in ("numpy.core", "numpy._core"):
        table[(f"{core}.multiarray", "_reconstruct")] = _StandIn(f"{core}.multiarray._reconstruct", _reconstruct)
        table[(f"{core}.multiarray", "scalar")] = _StandIn(f"{core}.multiarray.scalar", _scalar)
        table[(f"{core}.numeric", "_frombuffer")] = _StandIn(f"{core}.numeric._frombuffer", _frombuffer)
    table[("_codecs", "encode")] = _StandIn("_codecs.encode", _encode)
    table[("builtins", "bytes")] = _StandIn("builtins.bytes", _bytes)
    table[("__builtin__", "bytes")] = _StandIn("__builtin__.bytes", _bytes)
    return table


#: every (module, name) a pickle may name: what NumPy 1.x and 2.x write for arrays, dtypes
#: and scalars with protocols 0-5 (``numpy.ndarray`` only as the class of ``_reconstruct``),
#: plus ``_codecs.encode`` and ``bytes``, which protocols 0-2 use to write bytes
ALLOWED_GLOBALS = frozenset(_allowed(_Budget(0)))


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, budget: _Budget):
        super().__init__(file)
        self._table = _allowed(budget)

    def find_class(self, module, name):
        stand_in = self._table.get((module, name))
        if stand_in is None:
            _check_global(str(module), str(name))  # raises, naming it
        return stand_in

    def persistent_load(self, pid):
        raise UnsafePickleError(f"a persistent id ({_short(pid)}) is not allowed")


# ----------------------------------------------------------------------------- results


def _finish(obj, depth: int, seen: dict[int, Any]):
    """Replace the stand-ins by NumPy arrays and dtypes throughout dicts, lists and tuples
    (each container once: ``seen`` maps the id of each container and stand-in visited to
    its result; scalars, strings and bytes are returned as they are, unrecorded)."""
    if depth > MAX_DEPTH:
        raise UnsafePickleError(f"containers nested deeper than {MAX_DEPTH} levels")
    kind = type(obj)
    if kind in (str, bytes, int, float, bool, complex, type(None), bytearray):
        return obj
    key = id(obj)
    if key in seen:
        return seen[key]
    if kind is _ArrayStub:
        if obj.array is None:
            raise UnsafePickleError("an array without its shape, dtype and data")
        out: Any = obj.array
    elif kind is _Made:
        out = obj.value
    elif kind is _DtypeStub:
        out = obj.resolve()
    elif kind is _ClassName:
        raise UnsafePickleError("the class numpy.ndarray itself appears in the data")
    elif kind is _StandIn:
        raise UnsafePickleError(f"the function {obj!r} itself appears in the data")
    elif kind is dict:
        seen[key] = obj
        for k in list(obj):
            obj[k] = _finish(obj[k], depth + 1, seen)
        return obj
    elif kind is list:
        seen[key] = obj
        obj[:] = [_finish(v, depth + 1, seen) for v in obj]
        return obj
    elif kind is tuple:
        out = tuple(_finish(v, depth + 1, seen) for v in obj)
    elif kind in (set, frozenset):  # opcodes alone made them; their items are hashable, so no stand-ins
        for v in obj:
            _finish(v, depth + 1, seen)
        out = obj
    else:  # pragma: no cover - every object a pickle can make here is handled above
        raise UnsafePickleError(f"an object of type {kind.__name__} in the data")
    seen[key] = out
    return out


# what a malformed or hostile stream can raise from inside pickle.Unpickler.load
_LOAD_ERRORS = (
    pickle.UnpicklingError,
    TypeError,
    ValueError,
    EOFError,
    AttributeError,
    IndexError,
    KeyError,
    OverflowError,
    RecursionError,
    MemoryError,
)


def loads(data: bytes, *, source: str = "<bytes>") -> Any:
    """Unpickle ``data`` with the allow-list (see the module's docstring); ``source`` names
    it in errors. Returns the object with NumPy arrays in place of the pickled ones."""
    data = bytes(data)
    try:
        end = _scan(data)
        budget = _Budget(end)
        obj = _Unpickler(io.BytesIO(data), budget).load()
        return _finish(obj, 0, {})
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{source}: refusing to load: {exc}; nothing in the file was run") from None
    except _LOAD_ERRORS as exc:  # a stand-in called with the wrong arguments, a truncated stream, ...
        raise UnsafePickleError(
            f"{source}: refusing to load: {type(exc).__name__}: {_one_line(exc)}; nothing in the file was run"
        ) from None


def load(path, *, max_bytes: int = MAX_FILE_BYTES) -> Any:
    """:func:`loads` of the file at ``path``. The path is ``stat``-ed first: a folder, FIFO,
    device or socket is refused without being read (a link is followed to what it names),
    and so is a file over ``max_bytes``."""
    path = Path(path)
    try:
        size = os.stat(path).st_size
    except OSError:
        size = 0  # read_regular says what is wrong
    if size > max_bytes:
        raise UnsafePickleError(f"{path}: refusing to load: {size:,} bytes, more than the limit of {max_bytes:,}")
    try:
        data = read_regular(path, "parameter file", max_bytes=max_bytes)
    except FileNotFoundError:
        raise UnsafePickleError(f"{path}: no such file") from None
    except ValueError as exc:
        raise UnsafePickleError(str(exc)) from None
    return loads(data, source=str(path))


def load_params(path, *, max_bytes: int = MAX_FILE_BYTES) -> dict[str, np.ndarray]:
    """The parameters in a file written by the book's ``save_params``: a dict of name ->
    NumPy array (e.g. ``W1``, ``b1``, ...). Anything else raises :class:`UnsafePickleError`."""
    obj = load(path, max_bytes=max_bytes)
    if type(obj) is not dict:
        raise UnsafePickleError(f"{path}: holds a {type(obj).__name__}; expected a dict of name -> array")
    for k, v in obj.items():
        if type(k) is not str or not isinstance(v, np.ndarray):
            raise UnsafePickleError(
                f"{path}: entry {_short(k)} is a {type(v).__name__}; expected a dict of name -> array"
            )
    return obj


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an error's message, at most ``limit`` characters (pickle's own
    errors quote the bytes they failed on, which may be the whole file)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else "(no message)"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _short(value, limit: int = 80) -> str:
    """A short one-line repr of a value from the file, built from its first items and
    characters only: a huge string, bytes object, number or container is never turned
    into text in full."""
    text = " ".join(_brief(value, 3).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _brief(value, level: int) -> str:
    kind = type(value)
    if kind in (str, bytes, bytearray):
        if len(value) <= 40:
            return repr(value)
        return f"<{len(value):,} {'characters' if kind is str else 'bytes'}: {repr(value[:8])}...>"
    if kind is int:
        return repr(value) if value.bit_length() <= 128 else f"<an int of {value.bit_length():,} bits>"
    if kind in (float, complex, bool, type(None)) or isinstance(value, (_NoState, _ArrayStub, _DtypeStub)):
        return repr(value)
    if kind in (tuple, list, set, frozenset, dict):
        if level <= 0:
            return "(...)" if kind is tuple else "[...]" if kind is list else "{...}"
        items = list(itertools.islice(value.items() if kind is dict else value, 6))
        if kind is dict:
            parts = [f"{_brief(k, level - 1)}: {_brief(v, level - 1)}" for k, v in items]
        else:
            parts = [_brief(v, level - 1) for v in items]
        if len(value) > len(items):
            parts.append(f"... ({len(value):,} items)")
        inner = ", ".join(parts)
        if kind is tuple:
            return f"({inner}{',' if len(value) == 1 else ''})"
        if kind is list:
            return f"[{inner}]"
        if kind is dict:
            return "{" + inner + "}"
        return f"{kind.__name__}({{{inner}}})" if value else f"{kind.__name__}()"
    return f"<{kind.__name__}>"
