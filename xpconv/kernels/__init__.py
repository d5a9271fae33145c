"""Fast kernels, registered per (namespace, op) with their forward and backward together.

The registry
------------
A kernel is a small class with the generic op's ``forward`` and ``backward``
(same parameters as the reference class in :mod:`xpconv.ops`) and an
``accepts(*arrays)`` that says whether it covers these inputs (dtypes, shapes).
It registers itself with a decorator::

    @register("numpy", "conv2d")
    class Conv2d:
        def accepts(self, x, W, b) -> bool: ...
        def forward(self, x, W, b, stride=1, pad=0, *, relu=False): ...  # (out, state)
        def backward(self, dout, state, *, need_dx=True): ...

The ops are ``im2col`` (forward: im2col; backward: its adjoint col2im, with
col2im's arguments), ``conv2d``, ``conv2d_relu_max_pool2d``, ``max_pool2d`` and
``avg_pool2d``; their reference classes, which every kernel must equal, are
:data:`xpconv.ops.REFERENCE`.  ``accepts`` gets the forward's arrays (col2im: the
col) and answers without side effects.  A namespace's kernels live in ``<namespace>_ops.py`` here
(:mod:`.numpy_ops`, :mod:`.cupy_ops` with its CUDA sources ``*.cu`` loaded by
:mod:`.cuda_source`); the module is imported the first time :func:`find` is
asked about its namespace.

Optional modules (:data:`OPTIONAL`) load right after a namespace's own module when
their library imports and their environment switch is not ``"0"``: NumPy's
:mod:`.numba_ops` (numba is a dependency where Numba publishes wheels,
:data:`NUMBA_WHEELS`; ``XPCONV_NUMBA=0`` leaves it out).
Which ones loaded, and why one did not, is :data:`SKIPPED` (``xpconv info``
reports it).  Their kernels take the place of the namespace's kernels for the same op, and say
so: ``@register("numpy", "conv2d", replaces=numpy_ops.Conv2d)`` fails unless the
kernel registered before it is of that class (a second registration without
``replaces`` fails too), and the new instance keeps the old one as ``.replaces``,
which it runs for every case it does not cover.  So :func:`find` has one kernel
per (namespace, op), and which one is decided when the modules load.

How an op runs: ``xpconv.ops.conv2d_forward(x, ...)`` asks :func:`find` for the
kernel of x's namespace; if there is one and it ``accepts`` the inputs it runs,
else the reference class in ``xpconv.ops`` does.  The forward's cache
(:class:`xpconv.ops.Cache`) holds the kernel that made it, so
``ops.conv2d_backward(dout, cache)`` runs that kernel's backward.  ``impl=`` on
every forward chooses explicitly: ``impl="generic"`` (:data:`xpconv.ops.GENERIC`)
runs the reference, a kernel object runs that kernel.  There is no global switch.

Every kernel is tested equal to the reference (tests/test_numpy_kernels.py,
tests/test_cupy_kernels.py).  This package imports nothing from xpconv but
:mod:`xpconv._geometry`; a kernel module may import only this package, the
geometry and its array library.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable
from typing import Any, Protocol, TypeVar


def env_count(name: str, default: int) -> int:
    """A whole number >= 1 from the environment variable ``name`` (``default`` when unset or
    empty); anything else is a ValueError naming the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{name}: expected a whole number >= 1, got {raw!r}")
    return n


def col_bytes_from_env() -> int:
    """The im2col slice budget floor in bytes: ``XPCONV_COL_MIB`` (MiB, default 8)."""
    return env_count("XPCONV_COL_MIB", 8) << 20


#: the least bytes of im2col matrix (and of its gradient dcol) a GPU convolution may hold
#: at once (cupy_ops), and the budget where the device's free memory is unknown; set
#: ``XPCONV_COL_MIB`` to fix the budget at that many MiB whatever the device has.  Larger
#: batches are convolved slice by slice, one im2col launch and one product per slice.
COL_BYTES = col_bytes_from_env()
#: True when ``XPCONV_COL_MIB`` fixes the budget
COL_BYTES_FIXED = bool(os.environ.get("XPCONV_COL_MIB", "").strip())
#: the most a budget chosen from free memory may be: at 128 MiB DeepConvNet's peak
#: activation memory stays within 1.25x of what PyTorch's autograd saves at batch 1000
#: (``python benchmarks/gpu/floor.py``; 1.66x at 256 MiB) while its largest layer (0.45 MB
#: of columns per sample) runs in 4 slices instead of 54 at 8 MiB
COL_BYTES_MAX = 128 << 20
#: a budget chosen from free memory is at most this fraction of it (1/64)
COL_FREE_SHARE = 64


def col_bytes_for(free_bytes: int | None) -> int:
    """The im2col slice budget for a device with ``free_bytes`` free (None: unknown):
    ``XPCONV_COL_MIB`` when set, else 1/64 of the free memory, between :data:`COL_BYTES`
    and :data:`COL_BYTES_MAX` (any GPU with 8 GiB free gets the largest)."""
    if COL_BYTES_FIXED or free_bytes is None:
        return COL_BYTES
    return max(COL_BYTES, min(COL_BYTES_MAX, int(free_bytes) // COL_FREE_SHARE))


__all__ = ["MODULES", "OPTIONAL", "REGISTRY", "SCOPES", "SKIPPED", "Kernel", "UpdateKernel", "env_count", "find", "register", "register_step_scope", "step_scope"]


class Kernel(Protocol):
    """What a registered kernel provides (forward/backward take the op's arguments)."""

    namespace: str
    op: str

    def accepts(self, *arrays: Any) -> bool: ...

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]: ...

    def backward(self, *args: Any, **kwargs: Any) -> Any: ...  # (dout, state, ...); im2col's: col2im's


class UpdateKernel:
    """Base of an optimizer's fused update kernel (op ``"<name>_update"``): ``xpconv.optim``
    calls ``step(p, g, slots, weight_decay, **scalars)`` for the arrays it ``accepts``, and the
    optimizer's generic ``_step`` is the reference.  Under the registry's protocol its forward
    is that step; an update has no backward."""

    def accepts(self, *arrays: Any) -> bool:  # pragma: no cover - each subclass says what it covers
        raise NotImplementedError

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        self.step(*args, **kwargs)  # in place: nothing to return
        return None, None

    def backward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"{type(self).__name__}: an optimizer update has no backward")

    def step(self, p: Any, g: Any, slots: dict[str, Any], weight_decay: float = 0.0, **hyper: float) -> None:  # pragma: no cover
        raise NotImplementedError


#: the module holding each namespace's kernels (imported on first use)
MODULES: dict[str, str] = {"numpy": "numpy_ops", "cupy": "cupy_ops"}

#: namespace -> optional kernel modules loaded after MODULES' one, as (module, the
#: library it needs, the environment variable whose value "0" leaves it out)
OPTIONAL: dict[str, tuple[tuple[str, str, str], ...]] = {"numpy": (("numba_ops", "numba", "XPCONV_NUMBA"),)}

#: optional module -> why it did not load (the environment switch, or the library missing)
SKIPPED: dict[str, str] = {}

#: where the ``numba`` dependency is installed with xpconv: the platforms and Pythons Numba
#: publishes wheels for (pyproject.toml's markers say the same)
NUMBA_WHEELS = "Linux x86_64/aarch64 and Windows AMD64 with Python 3.10-3.14, Windows ARM64 with 3.12-3.14, macOS with 3.10-3.13"

#: (namespace name, op) -> the registered kernel instance
REGISTRY: dict[tuple[str, str], Kernel] = {}

_loaded: set[str] = set()

K = TypeVar("K", bound=type)


def register(namespace: str, op: str, *, replaces: type | None = None) -> Callable[[K], K]:
    """Class decorator: register an instance of the class as the ``op`` kernel of
    ``namespace`` (``"numpy"``, ``"cupy"``); sets ``cls.namespace`` and ``cls.op``.

    ``replaces``: the class of the kernel registered before for (namespace, op), which
    this one takes the place of (the instance gets it as ``.replaces``); without it the
    op must not have a kernel yet."""

    def deco(cls: K) -> K:
        old = REGISTRY.get((namespace, op))
        if type(old) is not (type(None) if replaces is None else replaces):
            raise ValueError(
                f"register({namespace!r}, {op!r}): expected the kernel registered before to be "
                f"{'none' if replaces is None else replaces.__qualname__}, got {'none' if old is None else type(old).__qualname__}"
            )
        cls.namespace, cls.op = namespace, op  # type: ignore[attr-defined]
        kernel = cls()
        if old is not None:
            kernel.replaces = old
        REGISTRY[(namespace, op)] = kernel
        return cls

    return deco


def find(namespace: str, op: str) -> Kernel | None:
    """The kernel registered for ``op`` on ``namespace`` (a namespace name, as
    :func:`xpconv.backend.namespace_name` gives it), or None."""
    if namespace not in _loaded:
        _load(namespace)
    return REGISTRY.get((namespace, op))


#: namespace name -> context-manager classes kernel modules add with
#: :func:`register_step_scope`; :func:`step_scope` enters them around a model's pass
SCOPES: dict[str, list[Callable[[], Any]]] = {}


def register_step_scope(namespace: str) -> Callable[[K], K]:
    """Class decorator: enter an instance of the class (a context manager) around every
    forward/backward pass a model makes on ``namespace`` (:func:`step_scope`)."""

    def deco(cls: K) -> K:
        SCOPES.setdefault(namespace, []).append(cls)
        return cls

    return deco


def step_scope(namespace: str) -> contextlib.AbstractContextManager:
    """What the kernels of ``namespace`` want around a model's pass (e.g. thread
    settings of the optional Numba kernels); a no-op for most namespaces."""
    if namespace not in _loaded:
        _load(namespace)
    scopes = SCOPES.get(namespace)
    if not scopes:
        return contextlib.nullcontext()
    if len(scopes) == 1:
        return scopes[0]()
    stack = contextlib.ExitStack()
    for scope in scopes:
        stack.enter_context(scope())
    return stack


def _load(namespace: str) -> None:
    _loaded.add(namespace)
    mod = MODULES.get(namespace)
    if mod is None:
        return
    importlib.import_module(f"{__name__}.{mod}")
    for opt, library, env in OPTIONAL.get(namespace, ()):
        if os.environ.get(env, "").strip() == "0":
            SKIPPED[opt] = f"off: {env}=0"
            continue
        try:
            importlib.import_module(library)
        except ImportError as exc:  # not installed, or not importable with this NumPy: the namespace's own kernels stay
            SKIPPED[opt] = _why_missing(library, exc)
            continue
        importlib.import_module(f"{__name__}.{opt}")


def _why_missing(library: str, exc: ImportError) -> str:
    import importlib.util
    import platform
    import sys

    if importlib.util.find_spec(library) is not None:
        return f"{library} is installed but does not import: {exc}"
    here = f"{platform.system()} {platform.machine()}, Python {sys.version_info[0]}.{sys.version_info[1]}"
    if library == "numba":
        return f"numba is not installed: xpconv installs it where Numba publishes wheels ({NUMBA_WHEELS}); here: {here}"
    return f"{library} is not installed ({here})"
