"""Run xpconv's CUDA kernel sources on the CPU, so their index arithmetic and the
host code that launches them are tested on machines without a GPU.

The ``.cu`` files are compiled as C++ by the host compiler with a small shim
(``__global__`` and friends defined away, ``blockIdx``/``threadIdx``/``blockDim``/
``gridDim`` as globals) and loaded with ctypes.  :func:`fake_cupy` returns a
stand-in ``cupy`` module whose arrays are NumPy arrays and whose ``RawModule``
runs those host builds: importing ``xpconv.kernels.cupy_ops`` against it runs the
real launch code on the CPU.

A launch is checked the way a GPU would need it: the argument count and every
argument's type against the kernel's C signature (CuPy passes a Python int as
int64 and a NumPy scalar by its bytes, so an int must be ``int32`` and a float of
the kernel's type), pointers to C-contiguous arrays of the right dtype, writable
where the kernel writes.  Then each thread of the launch runs in turn (all of
them for small launches, else 2 blocks of 3 threads, which still walks the
grid-stride loops).  Kernels of these sources share no memory between threads
and never synchronize, so running threads one after another is exact.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import types

import numpy as np

SHIM = r"""
#include <math.h>
#define __global__
#define __device__
#define __forceinline__ inline
struct xpc_uint3 { unsigned int x, y, z; };
static xpc_uint3 blockIdx, threadIdx, blockDim, gridDim;
extern "C" void xpc_emu_set(unsigned int block, unsigned int thread, unsigned int threads, unsigned int blocks)
{
    blockIdx.x = block; blockIdx.y = 0; blockIdx.z = 0;
    threadIdx.x = thread; threadIdx.y = 0; threadIdx.z = 0;
    blockDim.x = threads; blockDim.y = 1; blockDim.z = 1;
    gridDim.x = blocks; gridDim.y = 1; gridDim.z = 1;
}
"""

#: launches with at most this many threads run every thread; larger ones run 2 x 3
EXACT_THREADS = 4096

_POINTEE = {"float": np.float32, "double": np.float64, "int": np.int32, "long long": np.int64, "unsigned int": np.uint32}
_SCALAR = {"float": (np.float32, ctypes.c_float), "double": (np.float64, ctypes.c_double), "int": (np.int32, ctypes.c_int)}
_ENTRY = re.compile(r'extern\s+"C"\s+void\s+(\w+)\s*\(([^)]*)\)')


def compiler() -> str | None:
    """The host C++ compiler to use, or None."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


_BUILD_DIR = None


def _build_dir() -> str:
    global _BUILD_DIR
    if _BUILD_DIR is None:
        _BUILD_DIR = tempfile.mkdtemp(prefix="xpconv-cuda-host-")
    return _BUILD_DIR


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def _parse_params(text: str):
    params = []
    for raw in text.split(","):
        p = " ".join(raw.replace("__restrict__", " ").replace("*", " * ").split())
        if not p:
            continue
        *typ, _name = p.split(" ")
        pointer = "*" in typ
        const = "const" in typ
        base = " ".join(t for t in typ if t not in ("const", "*"))
        if base not in _POINTEE:
            raise ValueError(f"cannot read kernel parameter {raw!r}")
        params.append((base, pointer, const))
    return tuple(params)


class HostModule:
    """A host build of one CUDA source: ``get_function(name)`` like cupy.RawModule."""

    launches: list = []  # (kernel name, grid, block) of every launch, all modules

    def __init__(self, code: str, options=()):
        cxx = compiler()
        if cxx is None:
            raise RuntimeError("no host C++ compiler (g++ or clang++) to build CUDA sources for the CPU")
        key = hashlib.sha256(code.encode()).hexdigest()[:16]
        d = _build_dir()
        shim, src, lib = (os.path.join(d, f"{key}{ext}") for ext in ("_shim.h", ".cpp", ".so"))
        if not os.path.exists(lib):
            with open(shim, "w") as f:
                f.write(SHIM)
            with open(src, "w") as f:
                f.write(code)
            _run([cxx, "-std=c++14", "-O1", "-fPIC", "-shared", "-include", shim, "-x", "c++", src, "-o", lib + ".tmp"])
            os.replace(lib + ".tmp", lib)
        if not os.path.exists(lib + ".sig"):
            pre = _run([cxx, "-std=c++14", "-E", "-P", "-include", shim, "-x", "c++", src])
            sigs = {m.group(1): m.group(2) for m in _ENTRY.finditer(pre) if m.group(1).startswith("xpc_") and m.group(1) != "xpc_emu_set"}
            with open(lib + ".sig", "w") as f:
                json.dump(sigs, f)
        with open(lib + ".sig") as f:
            self.signatures = {k: _parse_params(v) for k, v in json.load(f).items()}
        self.lib = ctypes.CDLL(lib)
        self.lib.xpc_emu_set.argtypes = [ctypes.c_uint] * 4

    def get_function(self, name: str):
        if name not in self.signatures:
            raise AttributeError(f"no kernel {name!r} in this source; it has {sorted(self.signatures)}")
        return HostKernel(self, name, self.signatures[name])


class HostKernel:
    def __init__(self, module: HostModule, name: str, params):
        self.module, self.name, self.params = module, name, params
        self.fn = getattr(module.lib, name)
        self.fn.restype = None

    def __call__(self, grid, block, args, **kwargs):
        if kwargs:
            raise TypeError(f"{self.name}: unexpected launch options {kwargs}")
        for what, dims in (("grid", grid), ("block", block)):
            if not (isinstance(dims, tuple) and 1 <= len(dims) <= 3 and all(isinstance(v, int) and v >= 1 for v in dims)):
                raise TypeError(f"{self.name}: {what} must be a tuple of 1-3 positive ints, got {dims!r}")
        if len(grid) != 1 or len(block) != 1:
            raise ValueError(f"{self.name}: these kernels index with x only, got grid={grid}, block={block}")
        if block[0] > 1024 or grid[0] > 2**31 - 1:
            raise ValueError(f"{self.name}: launch too large for CUDA: grid={grid}, block={block}")
        if len(args) != len(self.params):
            raise TypeError(f"{self.name}: takes {len(self.params)} arguments, got {len(args)}")
        cargs = []
        for i, (arg, (base, pointer, const)) in enumerate(zip(args, self.params)):
            where = f"{self.name} argument {i}"
            if pointer:
                if arg is None:
                    cargs.append(ctypes.c_void_p(None))
                    continue
                if not isinstance(arg, np.ndarray):
                    raise TypeError(f"{where}: expected an array for a {base}*, got {type(arg).__name__}")
                if arg.dtype != _POINTEE[base]:
                    raise TypeError(f"{where}: expected a {np.dtype(_POINTEE[base]).name} array for a {base}*, got {arg.dtype}")
                if not arg.flags.c_contiguous:
                    raise ValueError(f"{where}: the kernel needs a C-contiguous array, got strides {arg.strides}")
                if not const and not arg.flags.writeable:
                    raise ValueError(f"{where}: the kernel writes to this array, but it is read-only")
                cargs.append(ctypes.c_void_p(arg.ctypes.data))
            else:
                np_type, c_type = _SCALAR[base]
                if type(arg) is not np_type:
                    raise TypeError(
                        f"{where}: a {base} parameter needs a numpy.{np_type.__name__} scalar "
                        f"(CuPy would pass {type(arg).__name__} with other bytes), got {arg!r}"
                    )
                cargs.append(c_type(arg.item()))
        HostModule.launches.append((self.name, grid, block))
        blocks, threads = grid[0], block[0]
        if blocks * threads > EXACT_THREADS:
            blocks, threads = 2, 3
        if Capture.active is not None:
            # captured: the pointers and scalars as they are now, kept by value; runs at launch
            Capture.active.add(self.name, lambda: self._run(cargs, blocks, threads), args)
            return
        self._run(cargs, blocks, threads)

    def _run(self, cargs, blocks, threads):
        for b in range(blocks):
            for t in range(threads):
                self.module.lib.xpc_emu_set(b, t, threads, blocks)
                self.fn(*cargs)


#: what the stand-in's ``empty`` fills arrays with, so an element a kernel fails to
#: write shows up in a comparison instead of whatever the allocator left there
POISON = {"f": np.nan, "i": np.iinfo(np.int32).min + 7, "u": 0xDEAD, "b": True}


def poisoned_empty(shape, dtype=float, order="C"):
    """``numpy.empty`` with every element set to :data:`POISON` for its kind."""
    a = np.empty(shape, dtype=dtype, order=order)
    a.fill(_poison(a.dtype))
    return a


def _poison(dtype):
    """:data:`POISON` for ``dtype``'s kind (unsigned: as many of its bits as fit)."""
    v = POISON.get(dtype.kind, 0)
    return v & np.iinfo(dtype).max if dtype.kind == "u" else v


def fake_cupy() -> types.ModuleType:
    """A stand-in for the ``cupy`` module: NumPy arrays, host-built RawModules, and
    an ``empty`` that poisons new arrays (NaN, a sentinel int).

    It carries only what ``xpconv.kernels.cupy_ops`` may use; anything else is an
    AttributeError, so code that strays from that subset fails here too.
    """
    m = types.ModuleType("cupy")
    m.__dict__.update(
        ndarray=np.ndarray,
        empty=poisoned_empty,
        ascontiguousarray=np.ascontiguousarray,
        matmul=np.matmul,
        int32=np.int32,
        int64=np.int64,
        dtype=np.dtype,
        float32=np.float32,
        float64=np.float64,
        RawModule=HostModule,
        __xpconv_fake__=True,
    )
    return m


# ====================================================================== counting launches

#: NumPy functions that are views or metadata on a GPU too (no kernel launch)
NO_LAUNCH = frozenset({
    "reshape", "transpose", "permute_dims", "squeeze", "expand_dims", "broadcast_to", "broadcast_arrays",
    "moveaxis", "swapaxes", "shape", "ndim", "size", "result_type", "can_cast", "may_share_memory",
    "shares_memory", "iscomplexobj", "isrealobj", "ravel", "atleast_1d", "atleast_2d", "copyto_view",
})


class LaunchCount:
    """What one stretch of code would launch on CuPy, as counted by :class:`Counted`
    arrays and the host-built kernels: ``elementwise`` (ufunc calls, reductions,
    matrix products, copies), ``kernels`` (xpconv's own RawModule launches) and
    ``names`` (every launch, in order)."""

    active: LaunchCount | None = None

    def __init__(self):
        self.names: list[str] = []
        self.elementwise = 0
        self._kernels0 = 0

    def __enter__(self):
        LaunchCount.active = self
        self._kernels0 = len(HostModule.launches)
        return self

    def __exit__(self, *exc):
        LaunchCount.active = None
        self.kernel_names = [name for name, _, _ in HostModule.launches[self._kernels0:]]
        self.names += self.kernel_names

    @property
    def kernels(self) -> int:
        return len(getattr(self, "kernel_names", []))

    @property
    def total(self) -> int:
        return self.elementwise + self.kernels

    def add(self, name: str) -> None:
        self.elementwise += 1
        self.names.append(name)


def _count(name: str) -> None:
    if LaunchCount.active is not None:
        LaunchCount.active.add(name)


def _plain(v):
    if isinstance(v, Counted):
        return v.view(np.ndarray)
    if isinstance(v, (tuple, list)):
        return type(v)(_plain(a) for a in v)
    return v


def _wrap(v):
    if isinstance(v, np.ndarray) and not isinstance(v, Counted):
        return v.view(Counted)
    if isinstance(v, np.generic):  # CuPy reductions give 0-d arrays, not scalars
        return np.asarray(v).view(Counted)
    if isinstance(v, tuple):
        return tuple(_wrap(a) for a in v)
    return v


class Counted(np.ndarray):
    """A NumPy array standing in for a CuPy array, counting the kernel launches CuPy
    would make for what is done with it.

    What it counts, honestly: one launch per ufunc call (every elementwise
    operator, including in-place ones, ``matmul`` -- one cuBLAS call on CuPy --
    and every ``ufunc.reduce``: ``sum``/``max``/...), one per NumPy function reached
    through ``__array_function__`` except the view-only ones in :data:`NO_LAUNCH`,
    one per ``astype`` that converts, ``copy``, fancy-index read or array
    assignment into a slice.  It does not see memory set-up that CuPy does without
    a kernel (``empty``), counts ``zeros``/``full`` only when made from a Counted
    array (``zeros_like``), and does not model CuPy's copies of non-contiguous
    arrays inside ``reshape`` or cuBLAS (xpconv's hot paths pass contiguous arrays).
    xpconv's own kernels are counted from :attr:`HostModule.launches`."""

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        _count(f"{ufunc.__name__}.{method}" if method != "__call__" else ufunc.__name__)
        if Capture.active is not None:
            return Capture.active.ufunc(ufunc, method, inputs, out, kwargs)
        if out is not None:
            kwargs["out"] = _plain(out)
        result = getattr(ufunc, method)(*_plain(inputs), **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(result)

    def __array_function__(self, func, types, args, kwargs):
        if func.__name__ not in NO_LAUNCH:
            _count(func.__name__)
        if Capture.active is not None:
            return Capture.active.function(func, args, kwargs)
        return _wrap(func(*_plain(args), **_plain(kwargs)))

    def astype(self, dtype, *args, **kwargs):
        converts = np.dtype(dtype) != self.dtype or kwargs.get("copy", True) is True and args[:1] != (False,)
        if converts:
            _count("astype")
        plain = self.view(np.ndarray)
        if converts and Capture.active is not None:
            return Capture.active.computed("astype", lambda: plain.astype(dtype, *args, **kwargs), plain.astype(dtype, *args, **kwargs))
        return _wrap(plain.astype(dtype, *args, **kwargs))

    def copy(self, *args, **kwargs):
        _count("copy")
        plain = self.view(np.ndarray)
        if Capture.active is not None:
            return Capture.active.computed("copy", lambda: plain.copy(*args, **kwargs), plain.copy(*args, **kwargs))
        return _wrap(plain.copy(*args, **kwargs))

    def _maybe_copy(self, name, fn):
        """A method that returns a view when it can and a copy otherwise (reshape, ravel)."""
        r = fn()
        if np.may_share_memory(r, self):
            return _wrap(r)
        _count(name)
        if Capture.active is not None:
            return Capture.active.computed(name, fn, r)
        return _wrap(r)

    def reshape(self, *shape, **kwargs):
        plain = self.view(np.ndarray)
        return self._maybe_copy("reshape", lambda: plain.reshape(*shape, **kwargs))

    def ravel(self, *args, **kwargs):
        plain = self.view(np.ndarray)
        return self._maybe_copy("ravel", lambda: plain.ravel(*args, **kwargs))

    def flatten(self, *args, **kwargs):
        plain = self.view(np.ndarray)
        return self._maybe_copy("flatten", lambda: plain.flatten(*args, **kwargs))

    def __getitem__(self, key):
        keys = key if isinstance(key, tuple) else (key,)
        plain, pkey = self.view(np.ndarray), _plain(key)
        if any(isinstance(k, (np.ndarray, list)) for k in keys):
            _count("take")
            if Capture.active is not None:
                return Capture.active.computed("take", lambda: plain[pkey], plain[pkey])
        r = plain[pkey]
        if isinstance(r, np.generic) and Capture.active is not None:  # CuPy: a 0-d view, not a host scalar
            return _wrap(plain[(*keys, Ellipsis)])
        return _wrap(r)

    def __setitem__(self, key, value):
        if isinstance(value, np.ndarray):
            _count("copy_into")
        plain, pkey, pvalue = self.view(np.ndarray), _plain(key), _plain(value)
        if Capture.active is not None:
            Capture.active.add("copy_into", lambda: plain.__setitem__(pkey, pvalue), (self, value))
            return
        plain[pkey] = pvalue

    def fill(self, value):
        _count("fill")
        plain = self.view(np.ndarray)
        if Capture.active is not None:
            Capture.active.add("fill", lambda: plain.fill(value), (self,))
            return
        plain.fill(value)

    def set(self, arr, stream=None):
        """CuPy's host-to-device copy into this array."""
        if Capture.active is not None:
            raise RuntimeError("stream capture: a copy from pageable host memory cannot be captured")
        HostToDevice.copies += 1
        self.view(np.ndarray)[...] = np.asarray(arr)

    # reading a value on the host waits for the device: CUDA refuses that while capturing
    def _host_read(self, what):
        if Capture.active is not None:
            raise RuntimeError(f"stream capture: {what} reads an array on the host (a device sync), which CUDA refuses while capturing")

    def __float__(self):
        self._host_read("float()")
        return float(self.view(np.ndarray))

    def __int__(self):
        self._host_read("int()")
        return int(self.view(np.ndarray))

    def __bool__(self):
        self._host_read("bool()")
        return bool(self.view(np.ndarray))

    def item(self, *args):
        self._host_read("item()")
        return self.view(np.ndarray).item(*args)

    def tolist(self):
        self._host_read("tolist()")
        return self.view(np.ndarray).tolist()


def counted(a) -> Counted:
    """``a`` as a :class:`Counted` array (a view: writes reach ``a``)."""
    return np.asarray(a).view(Counted)


def counting_cupy() -> types.ModuleType:
    """:func:`fake_cupy` whose arrays are :class:`Counted` (``empty`` poisons them too),
    so cupy_ops' own array operations are counted as CuPy would launch them."""
    m = fake_cupy()

    def empty(shape, dtype=float, order="C"):
        return poisoned_empty(shape, dtype, order).view(Counted)

    def ascontiguousarray(a):
        if isinstance(a, np.ndarray) and a.flags.c_contiguous:
            return a if isinstance(a, Counted) else a.view(Counted)
        _count("ascontiguousarray")
        plain = _plain(a)
        if Capture.active is not None:
            return Capture.active.computed("ascontiguousarray", lambda: np.ascontiguousarray(plain), np.ascontiguousarray(plain))
        return np.ascontiguousarray(plain).view(Counted)

    m.empty = empty
    m.ascontiguousarray = ascontiguousarray
    return m


# ====================================================================== a fake CUDA graph capture


class HostToDevice:
    """How many host-to-device copies (``ndarray.set``) the stand-in made."""

    copies = 0


def _poisoned_like(r) -> np.ndarray:
    a = np.empty(np.shape(r), dtype=np.asarray(r).dtype)
    a.fill(_poison(a.dtype))
    return a


def _arrays_in(obj):
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _arrays_in(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _arrays_in(o)


class Capture:
    """A stream capture, faithful where it matters for a CUDA graph of a training step.

    While one is :attr:`active`, nothing that would run on the device runs: every
    host-built kernel launch (:class:`HostKernel`) and every array operation on
    :class:`Counted` arrays -- ufunc calls (elementwise, ``matmul``, ``reduce``/
    ``accumulate``/``at``), NumPy functions through ``__array_function__`` (``copyto``,
    ``zeros_like``, ``concatenate``, ``where``, ...), ``astype``, ``copy``, fancy-index
    reads, writes into slices, ``fill`` and the copies ``reshape``/``ravel`` make -- is
    recorded with the array objects it reads and writes and every Python or NumPy
    scalar by value.  An operation making a new array gets a result array now (its
    "device address"), filled with :data:`POISON` so that nothing can use values
    computed at capture time; :meth:`replay` (``Graph.launch()``) runs the recording in
    order, writing into those same arrays (``out=``/``copyto``).  Views (reshape,
    transpose, basic slices) share memory as device views do and are not recorded.
    Reading an array on the host (``float()``, ``item()``, ``bool()``, ``tolist()``) and
    host-to-device copies raise, as CUDA's capture does.

    What it does not see: NumPy work on plain ``ndarray``s that never meets a Counted
    one (the stand-in's arrays are Counted, the model's are made so by the tests),
    ndarray methods implemented in C that are not ufuncs (``argmax``, ``sort``; they
    would run at capture on poisoned inputs and leave poison, so a step using them
    fails the comparisons rather than passing), and streams: all recorded work is one
    sequence, as on the single side stream the graph is captured on."""

    active: Capture | None = None

    def __init__(self):
        self.nodes: list[tuple[str, object, tuple]] = []

    def add(self, name: str, fn, refs) -> None:
        self.nodes.append((name, fn, tuple(_arrays_in(refs))))

    def replay(self) -> None:
        for _, fn, _ in self.nodes:
            fn()

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.nodes]

    def computed(self, name: str, fn, trial):
        """A new array ``fn()`` would make: a poisoned result now, filled at each replay."""
        res = _poisoned_like(trial)
        self.add(name, lambda: np.copyto(res, fn(), casting="no"), (res,))
        return _wrap(res)

    def ufunc(self, ufunc, method, inputs, out, kwargs):
        fn = getattr(ufunc, method)
        name = f"{ufunc.__name__}.{method}" if method != "__call__" else ufunc.__name__
        pin = _plain(inputs)
        if method == "at":  # in place into inputs[0]
            self.add(name, lambda: fn(*pin, **kwargs), inputs)
            return None
        if out is not None:
            pout = _plain(out)
            self.add(name, lambda: fn(*pin, out=pout, **kwargs), (inputs, out))
            return out[0] if len(out) == 1 else out
        with np.errstate(all="ignore"):
            trial = fn(*pin, **kwargs)  # only for the results' shapes and dtypes
        several = isinstance(trial, tuple)
        results = tuple(_poisoned_like(r) for r in (trial if several else (trial,)))
        target = results if several else results[0]

        def run():
            with np.errstate(all="ignore"):
                fn(*pin, out=target, **kwargs)

        self.add(name, run, (inputs, results))
        return tuple(_wrap(r) for r in results) if several else _wrap(results[0])

    def function(self, func, args, kwargs):
        pa, pk = _plain(args), _plain(kwargs)
        if func is np.copyto or kwargs.get("out") is not None:
            self.add(func.__name__, lambda: func(*pa, **pk), (args, kwargs))
            return kwargs.get("out")
        with np.errstate(all="ignore"):
            trial = func(*pa, **pk)
        inputs = list(_arrays_in((pa, pk)))
        if isinstance(trial, np.generic):
            trial = np.asarray(trial)
        if not isinstance(trial, np.ndarray):
            if isinstance(trial, tuple) and all(isinstance(r, np.ndarray) for r in trial):
                if all(any(np.may_share_memory(r, a) for a in inputs) for r in trial):
                    return _wrap(trial)
                raise NotImplementedError(f"the fake capture does not record {func.__name__}, which makes several arrays")
            return trial  # metadata: shapes, dtypes, Python values
        if any(np.may_share_memory(trial, a) for a in inputs):
            return _wrap(trial)  # a view: no launch on a GPU either
        return self.computed(func.__name__, lambda: func(*pa, **pk), trial)


class FakeEvent:
    pass


class FakeGraph:
    """What ``Stream.end_capture()`` returns: ``launch()`` replays the recording."""

    def __init__(self, capture: Capture):
        self.capture = capture
        self.launches = 0

    def launch(self, stream=None):
        self.launches += 1
        self.capture.replay()


class FakeStream:
    """``cupy.cuda.Stream``: a context that makes it current, events, capture."""

    current: list = []

    def __init__(self, null=False, non_blocking=False, ptds=False):
        self.null = bool(null)
        self.capture: Capture | None = None

    def __enter__(self):
        FakeStream.current.append(self)
        return self

    def __exit__(self, *exc):
        FakeStream.current.pop()

    def record(self, event=None):
        return event if event is not None else FakeEvent()

    def wait_event(self, event):
        pass

    def synchronize(self):
        if self.capture is not None:
            raise RuntimeError("stream capture: synchronizing a capturing stream")

    def begin_capture(self, mode=None):
        if self.null:
            raise RuntimeError("cannot capture on the default (legacy) stream")
        if Capture.active is not None:
            raise RuntimeError("stream capture: already capturing")
        if FakeStream.current[-1:] != [self]:
            raise RuntimeError("stream capture: the capturing stream is not the current one, so the step's work would not be captured")
        if not FakeAllocator.stack:
            raise RuntimeError("stream capture with CuPy's default memory pool: freed arrays would be reused while the graph writes them")
        self.capture = Capture.active = Capture()

    def is_capturing(self):
        return self.capture is not None

    def end_capture(self):
        if self.capture is None:
            raise RuntimeError("stream capture: the stream is not capturing")
        capture, self.capture = self.capture, None
        Capture.active = None
        return FakeGraph(capture)


FakeStream.null_stream = FakeStream(null=True)  # type: ignore[attr-defined]


class FakeMemoryPool:
    """``cupy.cuda.MemoryPool``: ``malloc`` is what ``using_allocator`` is given."""

    def malloc(self, size):  # pragma: no cover - the stand-in's arrays are NumPy's
        raise NotImplementedError


class FakeAllocator:
    stack: list = []


class _UsingAllocator:
    def __init__(self, malloc):
        self.malloc = malloc

    def __enter__(self):
        FakeAllocator.stack.append(self.malloc)
        return self

    def __exit__(self, *exc):
        FakeAllocator.stack.pop()


def _get_current_stream():
    return FakeStream.current[-1] if FakeStream.current else FakeStream.null_stream  # type: ignore[attr-defined]


def _copyto(dst, src):
    if Capture.active is not None:
        pd, ps = _plain(dst), _plain(src)
        Capture.active.add("copyto", lambda: np.copyto(pd, ps), (dst, src))
        return
    np.copyto(_plain(dst), _plain(src))


def graph_cupy() -> types.ModuleType:
    """:func:`counting_cupy` with ``cupy.cuda``'s graph surface faked: ``Stream``
    (``begin_capture``/``end_capture``/``record``/``wait_event``), ``Graph.launch``,
    ``MemoryPool``, ``using_allocator``, ``get_current_stream``, and ``copyto``.  See
    :class:`Capture` for what a capture records."""
    m = counting_cupy()
    m.cuda = types.SimpleNamespace(  # type: ignore[attr-defined]
        Stream=FakeStream,
        MemoryPool=FakeMemoryPool,
        using_allocator=_UsingAllocator,
        get_current_stream=_get_current_stream,
    )
    m.copyto = _copyto  # type: ignore[attr-defined]
    return m
