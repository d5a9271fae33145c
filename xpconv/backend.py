"""The one door between xpconv and array libraries.

Everything else in xpconv asks this module for a namespace (``xp``) and never
imports numpy, cupy or torch itself.  Here live:

* ``namespace_of(*arrays)`` -- the Array-API namespace of some arrays;
* ``get_namespace(name_or_module)`` -- a namespace by name ("numpy", "cupy",
  "torch", "array_api_strict", "jax") or from a module;
* ``is_writeable(x)`` / ``is_mutable(xp)`` -- whether arrays can be written in place
  (JAX's cannot: the ops, optimizers and gradient checks then build new arrays);
* ``compiled`` -- a pure array function compiled where the library compiles (JAX);
* ``library_device(xp, device)`` -- a device choice ('cpu', 'cuda', 'auto') as the
  device object or name that library takes;
* ``resolve_device("auto" | "cpu" | "cuda")`` -- which namespace a run uses,
  probing CUDA for real before choosing CuPy;
* transfers: ``to_numpy``, ``asarray_in``, ``device_of``;
* ``Generator`` -- seeded random numbers for every namespace (the standard has
  no random module): weights are drawn on the host, so one seed gives the same
  initial weights everywhere;
* ``cuda_status()`` -- why CUDA is or is not usable (for ``xpconv info``).
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from . import kernels  # the fast-path registry (it imports nothing of xpconv's but the geometry leaf)

__all__ = [
    "BackendUnavailable",
    "Generator",
    "asarray_in",
    "cuda_status",
    "device_of",
    "free_device_memory",
    "get_namespace",
    "is_mutable",
    "is_numpy_namespace",
    "is_writeable",
    "library_device",
    "namespace_name",
    "namespace_of",
    "resolve_device",
    "to_numpy",
]

#: pip extra to install for each optional backend
_EXTRAS = {
    "cupy": "pip install 'xpconv[cuda12]' (CUDA 12 driver) or 'xpconv[cuda13]' (CUDA 13 driver)",
    "torch": "pip install torch",
    "array_api_strict": "pip install 'xpconv[test]' (or pip install array-api-strict)",
    "numpy": "pip install numpy",
    "jax": "pip install jax",
}

_ALIASES = {
    "np": "numpy",
    "numpy": "numpy",
    "cp": "cupy",
    "cupy": "cupy",
    "torch": "torch",
    "pytorch": "torch",
    "array_api_strict": "array_api_strict",
    "array-api-strict": "array_api_strict",
    "strict": "array_api_strict",
    "jax": "jax",
    "jnp": "jax",
    "jax.numpy": "jax",
}

#: libraries whose namespace object is ``array_api_compat.<name>`` (the others are their own)
_COMPAT_WRAPPED = ("numpy", "cupy", "torch")


class BackendUnavailable(ImportError):
    """An array library (or the CUDA device it needs) cannot be used here."""


# --------------------------------------------------------------------------- namespaces


def namespace_of(*arrays: Any) -> ModuleType:
    """Array-API namespace of ``arrays`` (``None`` and Python scalars are ignored).

    Raises TypeError when the arrays come from different libraries or when none
    of them is an array.
    """
    key = tuple(type(a) for a in arrays)
    xp = _NAMESPACES.get(key)
    if xp is not None:
        return xp
    arrs = [a for a in arrays if a is not None and not isinstance(a, (int, float, bool, complex))]
    if not arrs:
        raise TypeError("namespace_of() needs at least one array, got none")
    try:
        xp = array_api_compat.array_namespace(*arrs)
    except TypeError as exc:
        kinds = sorted({type(a).__module__ + "." + type(a).__name__ for a in arrs})
        raise TypeError(f"expected arrays of one array library, got {', '.join(kinds)}: {exc}") from None
    if len(_NAMESPACES) >= 256:  # a handful of type combinations in practice; bounded anyway
        _NAMESPACES.clear()
    _NAMESPACES[key] = xp
    return xp


#: namespace_of's answers by the arguments' types: array_api_compat answers from the
#: types alone, so each layer, op and optimizer call after the first one with the same
#: kinds of arrays is a dict lookup instead of a walk over the array libraries
_NAMESPACES: dict[tuple[type, ...], ModuleType] = {}


def namespace_name(xp: ModuleType) -> str:
    """Short library name of a namespace: 'numpy', 'cupy', 'torch', 'array_api_strict' or 'jax'."""
    if array_api_compat.is_numpy_namespace(xp):
        return "numpy"
    if array_api_compat.is_cupy_namespace(xp):
        return "cupy"
    if array_api_compat.is_torch_namespace(xp):
        return "torch"
    if array_api_compat.is_array_api_strict_namespace(xp):
        return "array_api_strict"
    if array_api_compat.is_jax_namespace(xp) or getattr(xp, "__name__", None) == "jax":
        return "jax"
    return getattr(xp, "__name__", repr(xp))


def is_numpy_namespace(xp: ModuleType) -> bool:
    return array_api_compat.is_numpy_namespace(xp)


def is_writeable(x: Any) -> bool:
    """Whether ``x`` can be written in place (``x[i] = v``, ``x += y``).

    False for JAX arrays (immutable by design) and read-only NumPy views; code that
    updates arrays then assigns new ones instead (``array_api_extra.at``)."""
    return array_api_compat.is_writeable_array(x)


def compiled(*, static_argnums: tuple[int, ...] = ()):
    """Decorator for a pure array function of the generic ops: where the first
    argument's library compiles whole functions (JAX: ``jax.jit``, one program per
    shape and static arguments, cached) it runs compiled, which spares an eager
    library one dispatch (and one compilation) per op; elsewhere the function runs
    as written.  ``static_argnums`` are the Python ints that shape the program."""

    def decorate(fn):
        jitted = []

        @functools.wraps(fn)
        def run(*args):
            if namespace_name(namespace_of(args[0])) != "jax":
                return fn(*args)
            if not jitted:
                import jax

                jitted.append(jax.jit(fn, static_argnums=static_argnums))
            return jitted[0](*args)

        return run

    return decorate


@functools.cache
def is_mutable(xp: ModuleType) -> bool:
    """Whether arrays that namespace ``xp`` creates can be written in place: True for
    NumPy, CuPy, torch and array-api-strict, False for JAX."""
    return is_writeable(xp.zeros((1,)))


@functools.cache
def _import_by_name(name: str) -> ModuleType:
    canonical = _ALIASES.get(name.lower())
    if canonical is None:
        raise ValueError(
            f"unknown array namespace {name!r}; expected one of numpy, cupy, torch, array_api_strict, jax"
        )
    try:
        mod = importlib.import_module(canonical)
    except ImportError as exc:
        raise BackendUnavailable(
            f"array namespace {canonical!r} is not installed ({exc}); to use it: {_EXTRAS[canonical]}"
        ) from exc
    if canonical not in _COMPAT_WRAPPED:
        # array-api-strict and jax.numpy are Array-API namespaces themselves
        return importlib.import_module("jax.numpy") if canonical == "jax" else mod
    return importlib.import_module(f"array_api_compat.{canonical}")


def get_namespace(xp: str | ModuleType | None = None) -> ModuleType:
    """Array-API namespace from a name ('numpy', 'cupy', 'torch', 'array_api_strict', 'jax'),
    a library module (``numpy``, ``cupy``, ``torch``, ``jax``, ``jax.numpy``) or a
    namespace; ``None`` means NumPy.

    The result is the same object ``namespace_of`` returns for that library's arrays.
    """
    if xp is None:
        return _import_by_name("numpy")
    if isinstance(xp, str):
        if xp.lower() in ("auto", "cpu", "cuda", "gpu"):
            return resolve_device(xp)
        return _import_by_name(xp)
    if isinstance(xp, ModuleType):
        name = namespace_name(xp)
        if name in ("numpy", "cupy", "torch", "array_api_strict", "jax"):
            return _import_by_name(name)
        return xp
    raise TypeError(f"expected a namespace name or module for xp, got {type(xp).__name__}")


# --------------------------------------------------------------------------- CUDA probing


@functools.cache
def _import_cupy() -> tuple[ModuleType | None, str]:
    """(cupy, '') or (None, why it cannot be imported); once per process."""
    try:
        import cupy
    except ImportError:
        return None, f"CuPy is not installed; to use a GPU: {_EXTRAS['cupy']}"
    except Exception as exc:  # broken installs raise odd things at import
        return None, f"CuPy failed to import: {exc}"
    return cupy, ""


def cuda_status() -> tuple[bool, str]:
    """(usable, reason) for the *current* CUDA device. Usable means CuPy imports *and*
    that device does what a training step needs (:func:`_probe_cuda`): an allocation, an
    elementwise kernel, a cuBLAS product, a compile and launch of xpconv's own CUDA
    sources, and copies back. CuPy imports fine on machines with no usable driver, and a
    missing NVRTC, cuBLAS or CUDA header folder only shows at first use: the probe makes
    each a reason here rather than a crash in the first step.

    The probe's answer is cached per device, so a rank that selects its GPU after
    something asked about device 0 is told about its own device.
    ``cuda_status.cache_clear()`` forgets every answer."""
    cupy, why = _import_cupy()
    if cupy is None:
        return False, why
    try:
        n = cupy.cuda.runtime.getDeviceCount()
        if n < 1:
            return False, "no CUDA device found"
        device = int(cupy.cuda.runtime.getDevice())
    except Exception as exc:
        hint = _cuda_hint(cupy)
        return False, f"{type(exc).__name__}: {exc}" + (f" ({hint})" if hint else "")
    return _cuda_status_of(device, n)


@functools.cache
def _cuda_status_of(device: int, n: int) -> tuple[bool, str]:
    """:func:`cuda_status` of CUDA device ``device`` (the current one), probed once."""
    cupy, _ = _import_cupy()
    assert cupy is not None  # cuda_status asks only once CuPy imported
    why = _probe_cuda(cupy)
    if why:
        return False, why
    return True, f"{n} CUDA device(s)"


def _cuda_status_cache_clear() -> None:
    _import_cupy.cache_clear()
    _cuda_status_of.cache_clear()


cuda_status.cache_clear = _cuda_status_cache_clear  # type: ignore[attr-defined]


def _probe_cuda(cupy: ModuleType) -> str:
    """'' when the current device runs each thing a step needs, else what failed first and why.

    1. an allocation and an elementwise kernel (CuPy's own NVRTC compile), copied back;
    2. a small float32 product through cuBLAS, copied back and checked;
    3. xpconv's RawModule sources (``kernels/cuda_source.py``) compiled with NVRTC, and one
       launch of the im2col kernel (a 1x1 window: the columns are the input), checked."""
    from .kernels import cuda_source

    def failed(step: str, exc: BaseException) -> str:
        hint = _cuda_hint(cupy)
        detail = " ".join(str(exc).split())  # compiler logs span lines: the reason is one
        if len(detail) > 400:
            detail = detail[:400] + " ..."
        return f"{step} failed: {type(exc).__name__}: {detail}" + (f" ({hint})" if hint else "")

    try:
        a = cupy.arange(4, dtype=cupy.float32)
        got = float(cupy.asnumpy((a * 2).sum()))
    except Exception as exc:
        return failed("a CUDA allocation and elementwise kernel", exc)
    if got != 12.0:
        return f"an elementwise kernel gave {got}, expected 12.0"
    try:
        m = cupy.arange(6, dtype=cupy.float32).reshape(2, 3)
        prod = np.asarray(cupy.asnumpy(cupy.matmul(m, m.T)))
    except Exception as exc:
        return failed("a cuBLAS matrix product", exc)
    if prod.tolist() != [[5.0, 14.0], [14.0, 50.0]]:
        return f"a cuBLAS matrix product gave {prod.tolist()}, expected [[5.0, 14.0], [14.0, 50.0]]"
    for source in cuda_source.SOURCES:
        try:
            cuda_source.module(source).compile()
        except Exception as exc:
            return failed(f"compiling xpconv's CUDA source {source}.cu (NVRTC, options {' '.join(cuda_source.OPTIONS)})", exc)
    try:
        x = cupy.arange(4, dtype=cupy.float32)
        col = cupy.zeros(4, dtype=cupy.float32)
        i32 = np.int32
        # im2col of a 1x1x2x2 image with a 1x1 window: total, C, H, W, FH, FW, SH, SW, PH, PW, OH, OW, pad
        args = (x, col, i32(4), i32(1), i32(2), i32(2), i32(1), i32(1), i32(1), i32(1), i32(0), i32(0), i32(2), i32(2), np.float32(0))
        cuda_source.function("conv", "xpc_im2col_f32")((1,), (32,), args)
        cols = np.asarray(cupy.asnumpy(col))
    except Exception as exc:
        return failed("a launch of xpconv's im2col kernel", exc)
    if cols.tolist() != [0.0, 1.0, 2.0, 3.0]:
        return f"xpconv's im2col kernel gave {cols.tolist()}, expected [0.0, 1.0, 2.0, 3.0]"
    return ""


def _cuda_version(v: int) -> str:
    """12040 -> '12.4' (the encoding of cudaDriverGetVersion/cudaRuntimeGetVersion)."""
    return f"{v // 1000}.{v % 1000 // 10}"


def _cuda_hint(cupy: ModuleType) -> str:
    """What to do about a CUDA failure, from the driver's and CuPy's CUDA versions."""
    try:
        driver = cupy.cuda.runtime.driverGetVersion()
        runtime = cupy.cuda.runtime.runtimeGetVersion()
    except Exception:
        return ""
    if driver == 0:
        return ("no NVIDIA driver found: install the NVIDIA driver, or in Docker run with --gpus all "
                "and the NVIDIA Container Toolkit")
    have, need = driver // 1000, runtime // 1000
    if have >= need:
        return ""
    mismatch = (f"the NVIDIA driver supports CUDA {_cuda_version(driver)} but this CuPy is built for "
                f"CUDA {_cuda_version(runtime)}")
    if have < 12:
        return f"{mismatch}: upgrade the driver (>= 525 for xpconv[cuda12], >= 580 for xpconv[cuda13])"
    return f"{mismatch}: pip uninstall cupy-cuda{need}x && pip install 'xpconv[cuda{have}]', or upgrade the driver"


def resolve_device(device: str | None = "auto") -> ModuleType:
    """Namespace for a device choice.

    * ``"cpu"`` -- NumPy;
    * ``"cuda"``/``"gpu"`` -- CuPy, or BackendUnavailable saying why not;
    * ``"auto"``/``None`` -- CuPy if a CUDA device really works, else NumPy (with
      one warning when CuPy is installed but unusable).
    """
    choice = "auto" if device is None else str(device).lower()
    if choice == "cpu":
        return _import_by_name("numpy")
    if choice in ("cuda", "gpu"):
        ok, why = cuda_status()
        if not ok:
            raise BackendUnavailable(f"--device cuda was asked for but CUDA is not usable: {why}")
        return _import_by_name("cupy")
    if choice == "auto":
        ok, why = cuda_status()
        if ok:
            return _import_by_name("cupy")
        if "not installed" not in why:
            _warn_once(f"CuPy is installed but CUDA is not usable ({why}); falling back to NumPy on the CPU")
        return _import_by_name("numpy")
    raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")


def library_device(xp: ModuleType, device: Any) -> Any:
    """The ``device=`` argument namespace ``xp`` takes for a device choice.

    'auto', 'cpu', 'cuda' and 'gpu' are checked against the library: NumPy and
    array-api-strict compute on the CPU, CuPy on CUDA (both take no device object,
    so the result is None); JAX gets its device object for that platform (None for
    its default device, where parameters then stay); torch gets the name.  Any
    other value (torch's 'cuda:1', a JAX ``Device``) and None pass through."""
    if not isinstance(device, str) or device.lower() not in ("auto", "cpu", "cuda", "gpu"):
        return device
    choice = device.lower()
    name = namespace_name(xp)
    if choice == "auto":
        return None
    if name == "torch":
        return "cuda" if choice == "gpu" else choice
    if name == "jax":
        import jax

        platform = "cpu" if choice == "cpu" else "gpu"
        try:
            found = jax.devices(platform)
        except RuntimeError as exc:
            raise BackendUnavailable(f"device {device!r} was asked for but JAX has no {platform} device: {exc}") from None
        return None if found[0] == jax.devices()[0] else found[0]
    expected = {"numpy": ("cpu",), "array_api_strict": ("cpu",), "cupy": ("cuda", "gpu")}
    if choice not in expected.get(name, (choice,)):
        raise ValueError(f"device {device!r} does not fit xp={name!r}")
    return None


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------- transfers


def device_of(x: Any) -> Any:
    return array_api_compat.device(x)


def to_numpy(x: Any) -> np.ndarray:
    """A host NumPy copy (or view) of an array from any namespace."""
    if isinstance(x, np.ndarray):
        return x
    if array_api_compat.is_numpy_array(x):
        return np.asarray(x)
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().numpy()
    if array_api_compat.is_jax_array(x):
        return np.asarray(x)
    if isinstance(x, (int, float, bool, list, tuple)) or np.isscalar(x):
        return np.asarray(x)
    try:
        return np.from_dlpack(x)
    except Exception:
        return np.asarray(x)


def asarray_in(x: Any, xp: ModuleType, *, dtype: Any = None, device: Any = None, copy: bool | None = None) -> Any:
    """``x`` as an array of namespace ``xp`` (moving it across libraries via the host
    when it comes from another one)."""
    name = namespace_name(xp)
    try:
        src = namespace_of(x)
    except TypeError:
        src = None
    if src is not None and namespace_name(src) != name:
        x = to_numpy(x)
    if name == "array_api_strict" and isinstance(x, np.ndarray):
        # array_api_strict only accepts buffers and nested sequences, not foreign arrays
        x = np.ascontiguousarray(x)
        if dtype is None:
            dtype = getattr(xp, x.dtype.name)
        return xp.asarray(x, dtype=dtype, device=device, copy=copy)
    if device is None:
        return xp.asarray(x, dtype=dtype, copy=copy)
    return xp.asarray(x, dtype=dtype, device=device, copy=copy)


# --------------------------------------------------------------------------- random numbers


class Generator:
    """Seeded random numbers for any namespace.

    Values are drawn on the host with ``numpy.random.Generator(PCG64(seed))`` and
    then moved to the target namespace, so the same seed gives bit-identical
    weights on NumPy, CuPy, torch and array-api-strict.  Dropout masks on CuPy are
    drawn on the device from a seed taken from the host stream (still
    reproducible, but no host-to-device copy per step).
    """

    _np: np.random.Generator

    def __init__(self, seed: int | Sequence[int] | None | Generator = None):
        if isinstance(seed, Generator):
            self._np = seed._np
        else:
            self._np = np.random.default_rng(seed)

    @property
    def numpy(self) -> np.random.Generator:
        return self._np

    def normal(self, shape, *, xp=None, dtype="float32", device=None, scale: float = 1.0):
        xp = get_namespace(xp)
        host = (self._np.standard_normal(size=tuple(shape)) * scale).astype(_np_dtype(dtype))
        return asarray_in(host, xp, device=device)

    def uniform(self, shape, *, xp=None, dtype="float32", device=None, low=0.0, high=1.0):
        xp = get_namespace(xp)
        host = self._np.uniform(low, high, size=tuple(shape)).astype(_np_dtype(dtype))
        return asarray_in(host, xp, device=device)

    def permutation(self, n: int) -> np.ndarray:
        """A host permutation of range(n) (indexes host data before transfer)."""
        return self._np.permutation(n)

    def integers(self, low: int, high: int | None = None, size=None):
        return self._np.integers(low, high, size=size)

    def dropout_mask(self, shape, ratio: float, *, xp, dtype, device=None):
        """Array of 0/1 of ``dtype``: 1 where the unit is kept (probability 1 - ratio).

        Two 32-bit keys are drawn from this generator's host stream (no device work);
        the mask is then :func:`keep_mask` of those keys -- a counter-based hash of
        (keys, element index), computed where the array lives (one kernel on CuPy, the
        same integer arithmetic elsewhere), so every backend gives the same mask and
        none sets up a device random generator."""
        xp = get_namespace(xp)
        return keep_mask(tuple(int(s) for s in shape), ratio, self.dropout_keys(), xp=xp, dtype=dtype, device=device)

    def dropout_keys(self) -> tuple[int, int]:
        """The two 32-bit keys of the next Dropout mask, drawn from the host stream (what
        :meth:`dropout_mask` draws)."""
        k1, k2 = (int(k) for k in self._np.integers(0, 2**32, size=2, dtype=np.uint64))
        return k1, k2


#: Dropout's uniform draws are 24-bit: unit kept where (hash >> 8) >= round(ratio * 2**24)
DROPOUT_BITS = 24


def dropout_threshold(ratio: float) -> int:
    """The integer threshold of :func:`keep_mask` for a drop probability ``ratio``."""
    ratio = float(ratio)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"dropout ratio must be in [0, 1], got {ratio!r}")
    return int(round(ratio * 2**DROPOUT_BITS))


def _mul32(xp, a, c: int):
    """(a * c) mod 2**32 for int64 arrays a in [0, 2**32) and a 32-bit constant c,
    without overflowing 64 bits: a = hi * 2**16 + lo."""
    lo, hi = a & 0xFFFF, a >> 16
    return (lo * c + (((hi * (c & 0xFFFF)) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _mix32(xp, x):
    """lowbias32 (C. Wellons' integer hash), a bijection of 32-bit words, on int64 arrays."""
    x = x ^ (x >> 16)
    x = _mul32(xp, x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(xp, x, 0x846CA68B)
    return x ^ (x >> 16)


def _has_int64(xp: ModuleType) -> bool:
    """Whether ``xp`` makes int64 arrays (JAX does only with its x64 mode on)."""
    if namespace_name(xp) != "jax":
        return True
    import jax

    return bool(jax.config.read("jax_enable_x64"))


def keep_mask(shape, ratio: float, keys: tuple[int, int], *, xp, dtype, device=None):
    """Dropout mask of ``shape`` from 32-bit ``keys`` (k1, k2): element i (C order) is
    kept (1) where ``mix(mix(i ^ k1) ^ k2) >> 8 >= round(ratio * 2**24)``, mix being
    lowbias32.  Pure integer Array-API arithmetic (int64, no overflow), so NumPy,
    array-api-strict, torch and CuPy's kernel (``xpc_dropout_mask`` in step.cu, which
    runs instead on CuPy) give the same bits."""
    xp = get_namespace(xp)
    k1, k2 = (int(k) & 0xFFFFFFFF for k in keys)
    threshold = dropout_threshold(ratio)
    dt = resolve_dtype(xp, dtype)
    fast = kernels.find(namespace_name(xp), "dropout_mask")
    if fast is not None and fast.accepts(dt):
        return fast.forward(shape, k1, k2, threshold, dt)
    n = 1
    for s in shape:
        n *= int(s)
    if n >= 2**32:
        raise ValueError(f"Dropout: a mask of {n} elements is more than the hash's 2**32 positions")
    if not _has_int64(xp):  # JAX without x64: the same bits, computed on the host
        return asarray_in(to_numpy(keep_mask(shape, ratio, keys, xp=get_namespace("numpy"), dtype=dtype)), xp, device=device)
    idx = xp.arange(n, dtype=xp.int64, device=device) if device is not None else xp.arange(n, dtype=xp.int64)
    h = _mix32(xp, _mix32(xp, idx ^ k1) ^ k2)
    keep = (h >> (32 - DROPOUT_BITS)) >= threshold
    return xp.reshape(xp.astype(keep, dt), shape)


def zeros(shape, *, xp=None, dtype="float32", device=None):
    """Zeros of ``dtype`` in namespace ``xp`` (on ``device``)."""
    return asarray_in(np.zeros(tuple(shape), dtype=_np_dtype(dtype)), get_namespace(xp), device=device)


def _np_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, str):
        return np.dtype(dtype)
    try:
        return np.dtype(dtype)
    except TypeError:
        return np.dtype(str(dtype).rsplit(".", 1)[-1])


def dtype_name(dtype: Any) -> str:
    """'float32' / 'float64' / ... for a dtype object of any namespace."""
    return _np_dtype(dtype).name


def resolve_dtype(xp: ModuleType, dtype: Any) -> Any:
    """The namespace's dtype object for a name ('float32') or a dtype of any library."""
    name = dtype_name(dtype) if not isinstance(dtype, str) else dtype
    if name not in ("float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, got {name!r}")
    if name == "float64" and namespace_name(xp) == "jax":
        import jax

        if not jax.config.read("jax_enable_x64"):
            # JAX would silently hand back float32 arrays
            raise ValueError(
                "dtype float64 on JAX needs 64-bit mode: call jax.config.update('jax_enable_x64', True) "
                "at start-up, got it switched off"
            )
    return getattr(xp, name)


def free_device_memory(xp: ModuleType, device: Any = None) -> int | None:
    """Free bytes on the accelerator that ``xp`` (on ``device``) computes on, or None when
    its arrays live in host memory (NumPy, array-api-strict, torch on the CPU) or the
    library cannot tell (JAX on the CPU included). The Trainer keeps a dataset resident on a GPU only when it fits."""
    name = namespace_name(xp)
    try:
        if name == "cupy":
            import cupy

            free, _total = cupy.cuda.runtime.memGetInfo()
            # memory CuPy's pool already holds is free for our arrays too
            return int(free) + int(cupy.get_default_memory_pool().free_bytes())
        if name == "torch":
            import torch

            dev = torch.device(device) if device is not None else None
            if dev is None or dev.type != "cuda":
                return None
            free, _total = torch.cuda.mem_get_info(dev)
            return int(free)
        if name == "jax":
            import jax

            dev = device if device is not None else jax.devices()[0]
            stats = dev.memory_stats() if dev.platform != "cpu" else None
            if not stats or "bytes_limit" not in stats:
                return None
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    except Exception:
        return None
    return None
