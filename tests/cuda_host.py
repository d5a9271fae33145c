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
    #: True: launches are checked and recorded but not run (counting launches of large batches)
    count_only = False

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
        if HostModule.count_only:  # checked and counted; the results are not needed
            return
        blocks, threads = grid[0], block[0]
        if blocks * threads > EXACT_THREADS:
            blocks, threads = 2, 3
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
        get_default_memory_pool=lambda: _POOL,
        cuda=types.SimpleNamespace(runtime=FakeRuntime),
        __xpconv_fake__=True,
    )
    return m


class FakeRuntime:
    """``cupy.cuda.runtime``'s device queries: ``getDevice() -> int`` and
    ``memGetInfo() -> (free, total)`` in bytes, of an 80 GB device with :attr:`free` free
    (tests set ``device``/``free``)."""

    device = 0
    total = 80 << 30
    free = 79 << 30

    @staticmethod
    def getDevice() -> int:
        return FakeRuntime.device

    @staticmethod
    def memGetInfo() -> tuple[int, int]:
        return FakeRuntime.free, FakeRuntime.total


class FakeMemoryPool:
    """``cupy.get_default_memory_pool()``: the stand-in's arrays are NumPy's, so it holds nothing."""

    def free_bytes(self) -> int:
        return 0


_POOL = FakeMemoryPool()


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
        if out is not None:
            kwargs["out"] = _plain(out)
        result = getattr(ufunc, method)(*_plain(inputs), **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(result)

    def __array_function__(self, func, types, args, kwargs):
        if func.__name__ not in NO_LAUNCH:
            _count(func.__name__)
        return _wrap(func(*_plain(args), **_plain(kwargs)))

    def astype(self, dtype, *args, **kwargs):
        converts = np.dtype(dtype) != self.dtype or kwargs.get("copy", True) is True and args[:1] != (False,)
        if converts:
            _count("astype")
        plain = self.view(np.ndarray)
        return _wrap(plain.astype(dtype, *args, **kwargs))

    def copy(self, *args, **kwargs):
        _count("copy")
        plain = self.view(np.ndarray)
        return _wrap(plain.copy(*args, **kwargs))

    def _maybe_copy(self, name, fn):
        """A method that returns a view when it can and a copy otherwise (reshape, ravel)."""
        r = fn()
        if np.may_share_memory(r, self):
            return _wrap(r)
        _count(name)
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
        return _wrap(plain[pkey])

    def __setitem__(self, key, value):
        if isinstance(value, np.ndarray):
            _count("copy_into")
        plain, pkey, pvalue = self.view(np.ndarray), _plain(key), _plain(value)
        plain[pkey] = pvalue

    def fill(self, value):
        _count("fill")
        plain = self.view(np.ndarray)
        plain.fill(value)


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
        return np.ascontiguousarray(plain).view(Counted)

    m.empty = empty
    m.ascontiguousarray = ascontiguousarray
    return m
