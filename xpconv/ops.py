"""Array operations of the convolutional stack, written once against the Array API.

Shapes use one vocabulary throughout: N batch, C channels, H/W height/width,
FN/FH/FW filters (a pool's window is FH x FW), SH/SW stride, PH/PW pad, OH/OW
output, with ``OH = (H + 2*PH - FH)//SH + 1``; a pooled output after a
convolution is POH/POW.  Public layout is NCHW.

Each op is a reference class here (:class:`Conv2d`, :class:`Conv2dReluMaxPool2d`,
:class:`MaxPool2d`, :class:`AvgPool2d`, :class:`Im2col`) with its forward and
backward side by side; they are the spec.  The functions (``conv2d_forward``,
``conv2d_backward``, ...) dispatch: a fast kernel registered in
:mod:`xpconv.kernels` for the arrays' namespace runs when it accepts the inputs
(NumPy: ``xpconv/kernels/numpy_ops.py``, CuPy: ``xpconv/kernels/cupy_ops.py``,
each class named as its reference here), else the reference does.  A forward
returns ``(out, cache)``; the :class:`Cache` holds the kernel that made it, so the
backward runs that kernel's backward.  ``impl=GENERIC`` runs the reference
explicitly (tests compare every kernel against it); ``impl=<kernel>`` runs one
given kernel.
"""

from __future__ import annotations

from typing import Any, Literal

import array_api_extra as xpx

from . import backend, kernels
from ._geometry import conv_output_size, pair
from ._typing import Array
from .backend import namespace_of
from .kernels import Kernel

__all__ = [
    "GENERIC",
    "REFERENCE",
    "AvgPool2d",
    "Cache",
    "Conv2d",
    "Conv2dReluMaxPool2d",
    "Im2col",
    "MaxPool2d",
    "Relu",
    "SoftmaxCrossEntropy",
    "avg_pool2d_backward",
    "avg_pool2d_forward",
    "check_label_range",
    "check_label_shape",
    "col2im",
    "conv2d_backward",
    "conv2d_forward",
    "conv2d_relu_max_pool2d_backward",
    "conv2d_relu_max_pool2d_forward",
    "conv_output_size",
    "cross_entropy_error",
    "im2col",
    "matmul",
    "max_pool2d_backward",
    "max_pool2d_forward",
    "pair",
    "relu_backward",
    "relu_forward",
    "softmax",
    "softmax_cross_entropy",
    "softmax_cross_entropy_backward",
    "softmax_cross_entropy_forward",
]

# --------------------------------------------------------------------------- dispatch

#: ``impl=GENERIC`` runs the reference classes of this module
GENERIC = "generic"

#: what ``impl=`` takes: None (the kernel registered for the arrays' namespace),
#: GENERIC (the reference), or one kernel object (that kernel instead of the
#: registered one).  A kernel that does not accept the inputs leaves them to the reference.
Impl = Literal["generic"] | Kernel | None


class Cache:
    """What a forward keeps for its backward: the ``kernel`` that ran (a reference
    class of this module or a registered kernel) and its opaque ``state``."""

    __slots__ = ("kernel", "state")

    def __init__(self, kernel: Kernel, state: Any):
        self.kernel, self.state = kernel, state

    def __repr__(self) -> str:
        return f"Cache({self.kernel.namespace}.{self.kernel.op})"


def _choose(op: str, impl: Impl, *arrays: Array) -> Kernel:
    """The kernel that runs ``op`` on ``arrays`` (see :data:`Impl`)."""
    if impl is None:
        fast = kernels.find(backend.namespace_name(namespace_of(*arrays)), op)
        if fast is not None and fast.accepts(*arrays):
            return fast
        return REFERENCE[op]
    if isinstance(impl, str):
        if impl != GENERIC:
            raise ValueError(f"impl must be None, {GENERIC!r} or a kernel object, got {impl!r}")
        return REFERENCE[op]
    if impl.op != op:
        raise ValueError(f"impl: expected a kernel for {op!r}, got one for {impl.op!r}")
    return impl if impl.accepts(*arrays) else REFERENCE[op]


def _state(where: str, cache: Any, op: str) -> tuple[Any, Any]:
    """(kernel, state) of a forward's cache, checked to come from ``op``'s forward."""
    if cache is None:
        raise RuntimeError(f"{where}: the forward ran with training=False and kept nothing")
    if not isinstance(cache, Cache) or cache.kernel.op != op:
        got = repr(cache) if isinstance(cache, Cache) else type(cache).__name__
        raise TypeError(f"{where}: expected the cache of {op}_forward, got a cache made by another op or backend ({got})")
    return cache.kernel, cache.state


def _check_4d(x: Array, where: str, what: str = "input") -> None:
    if len(x.shape) != 4:
        raise ValueError(f"{where}: expected a 4-D {what} (N, C, H, W), got shape {tuple(x.shape)}")


def _pad(xp: Any, x: Array, PH: int, PW: int, value: float = 0.0) -> Array:
    """x (N, C, H, W) with PH rows above and below and PW columns left and right of ``value``."""
    if PH == 0 and PW == 0:
        return x
    if not backend.is_mutable(xp):  # JAX: no writing into a fresh array
        return xpx.pad(x, ((0, 0), (0, 0), (PH, PH), (PW, PW)), constant_values=value, xp=xp)
    N, C, H, W = x.shape
    out = xp.full((N, C, H + 2 * PH, W + 2 * PW), value, dtype=x.dtype, device=backend.device_of(x))
    out[:, :, PH : PH + H, PW : PW + W] = x
    return out


class _Reference:
    """Base of the reference classes: they take every input."""

    namespace = GENERIC
    op = ""

    def accepts(self, *arrays: Array) -> bool:
        return True


# --------------------------------------------------------------------------- im2col / col2im


def _window_index(xp, FH: int, FW: int, OH: int, OW: int, SH: int, SW: int, Wp: int):
    """Flat positions in a padded (Hp, Wp) plane of every window element, ordered
    (FH, FW, OH, OW): element (y, x) of the window at output (i, j) sits at
    ``(y + i*SH) * Wp + x + j*SW``."""
    fy = xp.reshape(xp.arange(FH), (FH, 1, 1, 1))
    fx = xp.reshape(xp.arange(FW), (1, FW, 1, 1))
    oy = xp.reshape(xp.arange(OH) * SH, (1, 1, OH, 1))
    ox = xp.reshape(xp.arange(OW) * SW, (1, 1, 1, OW))
    return xp.reshape((fy + oy) * Wp + (fx + ox), (-1,))


# im2col/col2im for immutable namespaces: a gather and a scatter-add over the window
# positions, each compiled into one program where the library compiles (JAX) instead
# of a dozen op-by-op dispatches.


@backend.compiled(static_argnums=(1, 2, 3, 4, 5, 6, 7))
def _im2col_gather(x, FH: int, FW: int, SH: int, SW: int, PH: int, PW: int, pad_value: float):
    xp = namespace_of(x)
    N, C, H, W = x.shape
    OH, OW = conv_output_size(H, W, FH, FW, (SH, SW), (PH, PW))
    Hp, Wp = H + 2 * PH, W + 2 * PW
    img = xp.reshape(_pad(xp, x, PH, PW, pad_value), (N, C, Hp * Wp))
    col = xp.reshape(xp.take(img, _window_index(xp, FH, FW, OH, OW, SH, SW, Wp), axis=2), (N, C, FH, FW, OH, OW))
    return xp.reshape(xp.permute_dims(col, (0, 4, 5, 1, 2, 3)), (N * OH * OW, C * FH * FW))


@backend.compiled(static_argnums=(1, 2, 3, 4, 5, 6, 7, 8, 9, 10))
def _col2im_scatter(col, N: int, C: int, H: int, W: int, FH: int, FW: int, SH: int, SW: int, PH: int, PW: int):
    xp = namespace_of(col)
    OH, OW = conv_output_size(H, W, FH, FW, (SH, SW), (PH, PW), where="col2im")
    Hp, Wp = H + 2 * PH, W + 2 * PW
    c = xp.permute_dims(xp.reshape(col, (N, OH, OW, C, FH, FW)), (0, 3, 4, 5, 1, 2))
    flat = xp.zeros((N, C, Hp * Wp), dtype=col.dtype)
    # repeated positions (overlapping windows) accumulate
    flat = xpx.at(flat)[:, :, _window_index(xp, FH, FW, OH, OW, SH, SW, Wp)].add(xp.reshape(c, (N, C, -1)))
    return xp.reshape(flat, (N, C, Hp, Wp))[:, :, PH : PH + H, PW : PW + W]


class Im2col(_Reference):
    """Reference ``im2col`` (forward) and its adjoint ``col2im`` (backward)."""

    op = "im2col"

    def forward(self, input_data: Array, filter_h: int, filter_w: int, stride: Any = 1, pad: Any = 0, *, pad_value: float = 0.0) -> Array:
        xp = namespace_of(input_data)
        N, C, H, W = input_data.shape
        FH, FW = int(filter_h), int(filter_w)
        SH, SW = pair(stride, "stride")
        PH, PW = pair(pad, "pad")
        OH, OW = conv_output_size(H, W, FH, FW, (SH, SW), (PH, PW))
        if not backend.is_mutable(xp):  # JAX: one gather instead of FH*FW writes
            return _im2col_gather(input_data, FH, FW, SH, SW, PH, PW, float(pad_value))
        img = _pad(xp, input_data, PH, PW, pad_value)
        col = xp.empty((N, C, FH, FW, OH, OW), dtype=input_data.dtype, device=backend.device_of(input_data))
        for y in range(FH):
            y_stop = y + SH * (OH - 1) + 1
            for x in range(FW):
                x_stop = x + SW * (OW - 1) + 1
                col[:, :, y, x, :, :] = img[:, :, y:y_stop:SH, x:x_stop:SW]
        col = xp.permute_dims(col, (0, 4, 5, 1, 2, 3))
        return xp.reshape(col, (N * OH * OW, C * FH * FW))

    def backward(self, col: Array, input_shape: tuple[int, ...], filter_h: int, filter_w: int, stride: Any = 1, pad: Any = 0) -> Array:
        xp = namespace_of(col)
        N, C, H, W = (int(s) for s in input_shape)
        FH, FW = int(filter_h), int(filter_w)
        SH, SW = pair(stride, "stride")
        PH, PW = pair(pad, "pad")
        OH, OW = conv_output_size(H, W, FH, FW, (SH, SW), (PH, PW), where="col2im")
        if not backend.is_mutable(xp):  # JAX: one scatter-add instead of FH*FW in-place adds
            return _col2im_scatter(col, N, C, H, W, FH, FW, SH, SW, PH, PW)
        c = xp.permute_dims(xp.reshape(col, (N, OH, OW, C, FH, FW)), (0, 3, 4, 5, 1, 2))
        img = xp.zeros((N, C, H + 2 * PH, W + 2 * PW), dtype=col.dtype, device=backend.device_of(col))
        for y in range(FH):
            y_stop = y + SH * (OH - 1) + 1
            for x in range(FW):
                x_stop = x + SW * (OW - 1) + 1
                img[:, :, y:y_stop:SH, x:x_stop:SW] += c[:, :, y, x, :, :]
        return img[:, :, PH : PH + H, PW : PW + W]


def im2col(input_data: Array, filter_h: int, filter_w: int, stride: Any = 1, pad: Any = 0, *, pad_value: float = 0.0, impl: Impl = None) -> Array:
    """Unfold (N, C, H, W) into rows of patches: (N*OH*OW, C*FH*FW).

    Row ``(n*OH + i)*OW + j`` holds the C*FH*FW window whose top-left corner sits at
    (i*SH - PH, j*SW - PW), ordered channel-major, then filter row, then column.
    """
    _check_4d(input_data, "im2col")
    kernel = _choose("im2col", impl, input_data)
    return kernel.forward(input_data, filter_h, filter_w, stride, pad, pad_value=pad_value)


def col2im(col: Array, input_shape: tuple[int, ...], filter_h: int, filter_w: int, stride: Any = 1, pad: Any = 0, *, impl: Impl = None) -> Array:
    """Adjoint of :func:`im2col`: sum the patch rows (N*OH*OW, C*FH*FW) back into
    an (N, C, H, W) image; overlapping windows add up (on immutable namespaces
    one scatter-add through ``array_api_extra.at``)."""
    N, C, H, W = (int(s) for s in input_shape)
    FH, FW = int(filter_h), int(filter_w)
    SH, SW = pair(stride, "stride")
    PH, PW = pair(pad, "pad")
    OH, OW = conv_output_size(H, W, FH, FW, (SH, SW), (PH, PW), where="col2im")
    expected = (N * OH * OW, C * FH * FW)
    if tuple(col.shape) != expected:
        raise ValueError(f"col2im: expected col of shape (N*OH*OW, C*FH*FW) = {expected}, got {tuple(col.shape)}")
    kernel = _choose("im2col", impl, col)
    return kernel.backward(col, (N, C, H, W), FH, FW, (SH, SW), (PH, PW))


# --------------------------------------------------------------------------- convolution


class Conv2d(_Reference):
    """Reference convolution (+ optional ReLU): im2col, one matrix product, col2im back.
    Layer: :class:`xpconv.layers.Convolution`; kernels: ``numpy_ops.Conv2d``, ``cupy_ops.Conv2d``."""

    op = "conv2d"

    def forward(self, x: Array, W: Array, b: Array, stride: Any = 1, pad: Any = 0, *, relu: bool = False) -> tuple[Array, Any]:
        xp = namespace_of(x, W, b)
        N, C, H, Wd = x.shape
        FN, _, FH, FW = W.shape
        OH, OW = conv_output_size(H, Wd, FH, FW, stride, pad, where="Convolution")
        col = _IM2COL.forward(x, FH, FW, stride, pad)
        col_W = xp.reshape(W, (FN, C * FH * FW)).T
        out = col @ col_W + b
        out = xp.permute_dims(xp.reshape(out, (N, OH, OW, FN)), (0, 3, 1, 2))
        mask = None
        if relu:  # as layers.Relu does it
            mask = xp.astype(out > 0, out.dtype)
            out = out * mask
        return out, (tuple(x.shape), tuple(W.shape), col, col_W, stride, pad, mask)

    def backward(self, dout: Array, state: Any, *, need_dx: bool = True) -> tuple[Array | None, Array, Array]:
        xp = namespace_of(dout)
        x_shape, W_shape, col, col_W, stride, pad, mask = state
        if mask is not None:
            dout = dout * mask
        FN, C, FH, FW = W_shape
        d = xp.reshape(xp.permute_dims(dout, (0, 2, 3, 1)), (-1, FN))
        db = xp.sum(d, axis=0)
        dW = xp.reshape((col.T @ d).T, W_shape)
        if not need_dx:
            return None, dW, db
        dcol = d @ col_W.T
        dx = _IM2COL.backward(dcol, x_shape, FH, FW, stride, pad)
        return dx, dW, db


def conv2d_forward(x: Array, W: Array, b: Array, stride: Any = 1, pad: Any = 0, *, relu: bool = False, impl: Impl = None) -> tuple[Array, Cache]:
    """Convolution (cross-correlation) of x (N, C, H, W) with W (FN, C, FH, FW) plus
    b (FN,), followed by a ReLU when ``relu`` is true.  Returns ``(out, cache)``: out is
    (N, FN, OH, OW); cache goes to :func:`conv2d_backward`.  Reference: :class:`Conv2d`."""
    kernel = _choose("conv2d", impl, x, W, b)
    out, state = kernel.forward(x, W, b, stride, pad, relu=relu)
    return out, Cache(kernel, state)


def conv2d_backward(dout: Array, cache: Cache, *, need_dx: bool = True) -> tuple[Array | None, Array, Array]:
    """Gradients ``(dx, dW, db)`` of :func:`conv2d_forward` given dL/dout (N, FN, OH, OW),
    by the backward of the kernel that ran the forward; dx is None when ``need_dx``
    is false (the first layer of a net needs no dx)."""
    kernel, state = _state("conv2d_backward", cache, "conv2d")
    return kernel.backward(dout, state, need_dx=need_dx)


class Conv2dReluMaxPool2d(_Reference):
    """Reference Convolution + ReLU + max pooling: :class:`Conv2d` then :class:`MaxPool2d`.
    Layer: :class:`xpconv.layers.ConvBlock`; kernels: ``numpy_ops.Conv2dReluMaxPool2d``,
    ``cupy_ops.Conv2dReluMaxPool2d``."""

    op = "conv2d_relu_max_pool2d"

    def forward(self, x: Array, W: Array, b: Array, stride: Any, pad: Any, pool_h: int, pool_w: int, pool_stride: Any, pool_pad: Any = 0, *, training: bool = True) -> tuple[Array, Any]:
        out, conv_state = _CONV2D.forward(x, W, b, stride, pad, relu=True)
        out, pool_state = _MAX_POOL2D.forward(out, pool_h, pool_w, pool_stride, pool_pad)
        return out, (conv_state, pool_state)

    def backward(self, dout: Array, state: Any, *, need_dx: bool = True) -> tuple[Array | None, Array, Array]:
        conv_state, pool_state = state
        return _CONV2D.backward(_MAX_POOL2D.backward(dout, pool_state), conv_state, need_dx=need_dx)


def conv2d_relu_max_pool2d_forward(
    x: Array, W: Array, b: Array, stride: Any, pad: Any, pool_h: int, pool_w: int, pool_stride: Any, pool_pad: Any = 0,
    *, training: bool = True, impl: Impl = None,
) -> tuple[Array, Cache | None]:
    """Convolution + ReLU + max pooling as one op (the classic CNN block): the same
    result as :func:`conv2d_forward` with ``relu=True`` followed by
    :func:`max_pool2d_forward`.  Returns ``(out, cache)``, out (N, FN, POH, POW), the
    pooled height and width.  ``training=False`` lets a kernel keep nothing for a
    backward (the cache is then None).  Reference: :class:`Conv2dReluMaxPool2d`."""
    kernel = _choose("conv2d_relu_max_pool2d", impl, x, W, b)
    out, state = kernel.forward(x, W, b, stride, pad, pool_h, pool_w, pool_stride, pool_pad, training=training)
    return out, None if state is None else Cache(kernel, state)


def conv2d_relu_max_pool2d_backward(dout: Array, cache: Cache, *, need_dx: bool = True) -> tuple[Array | None, Array, Array]:
    """Gradients ``(dx, dW, db)`` of :func:`conv2d_relu_max_pool2d_forward`."""
    kernel, state = _state("conv2d_relu_max_pool2d_backward", cache, "conv2d_relu_max_pool2d")
    return kernel.backward(dout, state, need_dx=need_dx)


# --------------------------------------------------------------------------- pooling


class MaxPool2d(_Reference):
    """Reference max pooling (padding counts as -inf; ties: the first maximum).
    Layer: :class:`xpconv.layers.Pooling`; kernels: ``numpy_ops.MaxPool2d``, ``cupy_ops.MaxPool2d``."""

    op = "max_pool2d"

    def forward(self, x: Array, pool_h: int, pool_w: int, stride: Any = 1, pad: Any = 0) -> tuple[Array, Any]:
        xp = namespace_of(x)
        N, C, H, W = x.shape
        OH, OW = conv_output_size(H, W, pool_h, pool_w, stride, pad, where="Pooling")
        col = xp.reshape(_IM2COL.forward(x, pool_h, pool_w, stride, pad, pad_value=-float("inf")), (-1, pool_h * pool_w))
        arg_max = xp.argmax(col, axis=1)
        out = xp.max(col, axis=1)
        out = xp.permute_dims(xp.reshape(out, (N, OH, OW, C)), (0, 3, 1, 2))
        return out, (tuple(x.shape), pool_h, pool_w, stride, pad, arg_max)

    def backward(self, dout: Array, state: Any) -> Array:
        xp = namespace_of(dout)
        x_shape, FH, FW, stride, pad, arg_max = state
        N, C, H, W = x_shape
        pool = FH * FW
        d = xp.reshape(xp.permute_dims(dout, (0, 2, 3, 1)), (-1, 1))
        hit = xp.arange(pool, device=backend.device_of(dout))[None, :] == arg_max[:, None]
        dcol = xp.astype(hit, dout.dtype) * d
        dcol = xp.reshape(dcol, (-1, C * pool))
        return _IM2COL.backward(dcol, x_shape, FH, FW, stride, pad)


def max_pool2d_forward(x: Array, pool_h: int, pool_w: int, stride: Any = 1, pad: Any = 0, *, impl: Impl = None) -> tuple[Array, Cache]:
    """Max pooling of (N, C, H, W) over pool_h x pool_w windows; padding counts as
    -inf (never the maximum).  Returns ``(out, cache)``, out (N, C, OH, OW).
    Reference: :class:`MaxPool2d`."""
    kernel = _choose("max_pool2d", impl, x)
    out, state = kernel.forward(x, pool_h, pool_w, stride, pad)
    return out, Cache(kernel, state)


def max_pool2d_backward(dout: Array, cache: Cache) -> Array:
    """dL/dx of max pooling: each window's gradient goes to exactly one input (the
    first maximum when several tie)."""
    kernel, state = _state("max_pool2d_backward", cache, "max_pool2d")
    return kernel.backward(dout, state)


class AvgPool2d(_Reference):
    """Reference average pooling (zero padding counted in the window).
    Layer: :class:`xpconv.layers.AvgPooling`; kernels: ``numpy_ops.AvgPool2d``, ``cupy_ops.AvgPool2d``."""

    op = "avg_pool2d"

    def forward(self, x: Array, pool_h: int, pool_w: int, stride: Any = 1, pad: Any = 0) -> tuple[Array, Any]:
        xp = namespace_of(x)
        N, C, H, W = x.shape
        OH, OW = conv_output_size(H, W, pool_h, pool_w, stride, pad, where="AvgPooling")
        col = xp.reshape(_IM2COL.forward(x, pool_h, pool_w, stride, pad), (-1, pool_h * pool_w))
        out = xp.mean(col, axis=1)
        out = xp.permute_dims(xp.reshape(out, (N, OH, OW, C)), (0, 3, 1, 2))
        return out, (tuple(x.shape), pool_h, pool_w, stride, pad)

    def backward(self, dout: Array, state: Any) -> Array:
        xp = namespace_of(dout)
        x_shape, FH, FW, stride, pad = state
        N, C, H, W = x_shape
        pool = FH * FW
        d = xp.reshape(xp.permute_dims(dout, (0, 2, 3, 1)), (-1, 1)) / pool
        dcol = xp.reshape(d * xp.ones((1, pool), dtype=dout.dtype, device=backend.device_of(dout)), (-1, C * pool))
        return _IM2COL.backward(dcol, x_shape, FH, FW, stride, pad)


def avg_pool2d_forward(x: Array, pool_h: int, pool_w: int, stride: Any = 1, pad: Any = 0, *, impl: Impl = None) -> tuple[Array, Cache]:
    """Average pooling; zero padding is counted in the window (as
    torch's ``count_include_pad=True``).  Returns ``(out, cache)``.  Reference: :class:`AvgPool2d`."""
    kernel = _choose("avg_pool2d", impl, x)
    out, state = kernel.forward(x, pool_h, pool_w, stride, pad)
    return out, Cache(kernel, state)


def avg_pool2d_backward(dout: Array, cache: Cache) -> Array:
    """dL/dx of average pooling: dout / (FH*FW) to every input of each window."""
    kernel, state = _state("avg_pool2d_backward", cache, "avg_pool2d")
    return kernel.backward(dout, state)


_IM2COL, _CONV2D, _MAX_POOL2D = Im2col(), Conv2d(), MaxPool2d()

#: op name -> its reference implementation (the spec every registered kernel equals)
REFERENCE: dict[str, Any] = {
    k.op: k for k in (_IM2COL, _CONV2D, Conv2dReluMaxPool2d(), _MAX_POOL2D, AvgPool2d())
}


# --------------------------------------------------------------------------- softmax / loss


def softmax(x):
    """Softmax over the last axis, shifted by the row maximum so exp never overflows."""
    xp = namespace_of(x)
    z = x - xp.max(x, axis=-1, keepdims=True)
    e = xp.exp(z)
    return e / xp.sum(e, axis=-1, keepdims=True)


def log_softmax(x):
    xp = namespace_of(x)
    z = x - xp.max(x, axis=-1, keepdims=True)
    return z - xp.log(xp.sum(xp.exp(z), axis=-1, keepdims=True))


def one_hot(t, num_classes: int, dtype, *, poison: bool = False):
    """(N,) integer class indices -> (N, num_classes) one-hot of ``dtype``.  With
    ``poison`` a row whose label is outside [0, num_classes) is NaN, so a loss over
    labels nobody has read on the host comes out NaN rather than a plausible number."""
    xp = namespace_of(t)
    classes = xp.arange(num_classes, device=backend.device_of(t))
    oh = xp.astype(classes[None, :] == t[:, None], dtype)
    if not poison:
        return oh
    valid = (t >= 0) & (t < num_classes)
    return xp.where(valid[:, None], oh, xp.asarray(float("nan"), dtype=dtype, device=backend.device_of(t)))


def check_label_shape(t, num_classes: int, where: str = "SoftmaxWithLoss") -> None:
    """Labels must be class indices (N,) of an integer dtype or one-hot (N, num_classes);
    looks at shapes and dtypes only (never reads the values)."""
    xp = namespace_of(t)
    if len(t.shape) == 2:
        if t.shape[1] != num_classes:
            raise ValueError(f"{where}: one-hot labels must have {num_classes} columns, got shape {tuple(t.shape)}")
        return
    if len(t.shape) != 1:
        raise ValueError(f"{where}: expected labels of shape (N,) or (N, {num_classes}), got {tuple(t.shape)}")
    if xp.isdtype(t.dtype, "real floating"):
        raise TypeError(f"{where}: class-index labels must be integers, got dtype {t.dtype}")
    if not xp.isdtype(t.dtype, "integral"):
        raise TypeError(f"{where}: labels must be integer class indices or one-hot, got dtype {t.dtype}")


def check_label_range(t, num_classes: int | None, where: str = "SoftmaxWithLoss") -> None:
    """Class indices (N,) must lie in [0, num_classes) (``None``: only >= 0).  This
    reads the labels: on a device array it waits for the device, so it belongs where
    data enters (the host side, once per run), never inside a training step."""
    if len(t.shape) != 1 or not t.shape[0]:
        return
    xp = namespace_of(t)
    bad = t < 0 if num_classes is None else (t < 0) | (t >= num_classes)
    if bool(xp.any(bad)):
        lo, hi = int(xp.min(t)), int(xp.max(t))
        expected = "0 <= t" if num_classes is None else f"0 <= t < {num_classes}"
        raise ValueError(f"{where}: labels out of range: expected {expected}, got min {lo}, max {hi}")


def labels_as_one_hot(t, num_classes: int, dtype, where: str = "SoftmaxWithLoss", *, check: bool = True):
    """Validate labels (class indices (N,) or one-hot (N, K)) and return them one-hot.
    ``check=False`` skips the range check (no read of the values); a label out of
    range then gives a NaN row (see :func:`one_hot`)."""
    xp = namespace_of(t)
    check_label_shape(t, num_classes, where)
    if len(t.shape) == 2:
        return xp.astype(t, dtype)
    if check:
        check_label_range(t, num_classes, where)
    return one_hot(t, num_classes, dtype, poison=not check)


def softmax_cross_entropy(x, t_one_hot):
    """Mean cross-entropy of softmax(x) (N, K) against one-hot targets, computed
    through log-softmax (no log(0)).  Returns ``(loss, y)`` with y = softmax(x);
    loss is a 0-d array of x's namespace."""
    xp = namespace_of(x)
    N = x.shape[0]
    logp = log_softmax(x)
    loss = -xp.sum(t_one_hot * logp) / N
    return loss, xp.exp(logp)


class SoftmaxCrossEntropy(_Reference):
    """Reference softmax + mean cross-entropy, forward and backward.  Labels are class
    indices (N,) (a label outside [0, K) makes the loss and its row of the gradient
    NaN: nothing is read on the host here) or one-hot / soft targets (N, K) of x's dtype.
    Layer: :class:`xpconv.layers.SoftmaxWithLoss`; kernel: ``cupy_ops.SoftmaxCrossEntropy``
    (one kernel each way)."""

    op = "softmax_cross_entropy"

    def forward(self, x: Array, t: Array) -> tuple[tuple[Array, Array], Any]:
        K = int(x.shape[1])
        oh = one_hot(t, K, x.dtype, poison=True) if len(t.shape) == 1 else t
        loss, y = softmax_cross_entropy(x, oh)
        return (loss, y), (y, oh)

    def backward(self, dout: Any, state: Any) -> Array:
        y, oh = state
        return (y - oh) * (dout / int(y.shape[0]))


def softmax_cross_entropy_forward(x: Array, t: Array, *, impl: Impl = None) -> tuple[Array, Array, Cache]:
    """(loss, y, cache) of softmax + mean cross-entropy of scores x (N, K) against
    labels t (class indices (N,) or targets (N, K) of x's dtype; shapes checked by the
    caller).  Reads nothing on the host.  Reference: :class:`SoftmaxCrossEntropy`."""
    kernel = _choose("softmax_cross_entropy", impl, x, t)
    (loss, y), state = kernel.forward(x, t)
    return loss, y, Cache(kernel, state)


def softmax_cross_entropy_backward(dout: Any, cache: Cache) -> Array:
    """dL/dx = (y - onehot(t)) * dout / N (dout: a Python number or 0-d array)."""
    kernel, state = _state("softmax_cross_entropy_backward", cache, "softmax_cross_entropy")
    return kernel.backward(dout, state)


class Relu(_Reference):
    """Reference ReLU: forward keeps the mask (x > 0) as x's dtype for backward.
    Layer: :class:`xpconv.layers.Relu`; kernel: ``cupy_ops.Relu`` (one kernel each way)."""

    op = "relu"

    def forward(self, x: Array) -> tuple[Array, Any]:
        xp = namespace_of(x)
        mask = xp.astype(x > 0, x.dtype)
        return x * mask, mask

    def backward(self, dout: Array, state: Any) -> Array:
        return dout * state


def relu_forward(x: Array, *, impl: Impl = None) -> tuple[Array, Cache]:
    """``x * (x > 0)`` elementwise (the book's ReLU: a NaN stays NaN).  Reference: :class:`Relu`."""
    kernel = _choose("relu", impl, x)
    out, state = kernel.forward(x)
    return out, Cache(kernel, state)


def relu_backward(dout: Array, cache: Cache) -> Array:
    """dout where the forward's input was > 0, else 0."""
    kernel, state = _state("relu_backward", cache, "relu")
    return kernel.backward(dout, state)


REFERENCE.update({k.op: k for k in (SoftmaxCrossEntropy(), Relu())})


def matmul(a: Array, b: Array) -> Array:
    """``a @ b`` of 2-D arrays (the reference); a ``"matmul"`` kernel of their namespace runs the
    products it ``accepts`` (NumPy with the compiled kernels: a pass's large products split over
    Numba's threads, :class:`xpconv.kernels.numba_ops.Matmul`).  Layer: :class:`xpconv.layers.Affine`."""
    kernel = kernels.find(backend.namespace_name(namespace_of(a, b)), "matmul")
    if kernel is not None and kernel.accepts(a, b):
        return kernel.forward(a, b)[0]
    return a @ b


def cross_entropy_error(y, t):
    """Book-compatible cross-entropy of probabilities y against labels t (indices or one-hot)."""
    xp = namespace_of(y)
    if len(y.shape) == 1:
        y = xp.reshape(y, (1, -1))
        t = xp.reshape(t, (1, -1)) if len(t.shape) == 1 and t.shape[0] == y.shape[1] else xp.reshape(t, (1,))
    oh = labels_as_one_hot(t, y.shape[1], y.dtype, where="cross_entropy_error")
    return -xp.sum(oh * xp.log(y + 1e-7)) / y.shape[0]
