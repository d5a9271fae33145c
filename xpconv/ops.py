"""Array operations of the convolutional stack, written once against the Array API.

Shapes use one vocabulary throughout: N batch, C channels, H/W height/width,
FN/FH/FW filters, SH/SW stride, PH/PW pad, OH/OW output, with
``OH = (H + 2*PH - FH)//SH + 1``.  Public layout is NCHW.

Every function here is the reference implementation.  A backend may register a
faster kernel with the same name and signature in ``xpconv.kernels``; the
dispatcher uses it unless fast paths are switched off (``use_fast_paths(False)``),
and the test-suite proves each one equal to the code below.  A backward op follows
its cache: the reference forward's cache (a tuple) goes to the reference backward, a
kernel's cache to that kernel's backward.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import array_api_extra as xpx

from . import backend
from .backend import namespace_of

__all__ = [
    "avg_pool2d_backward",
    "avg_pool2d_forward",
    "col2im",
    "conv2d_backward",
    "conv2d_forward",
    "conv2d_relu_maxpool_backward",
    "conv2d_relu_maxpool_forward",
    "conv_output_size",
    "cross_entropy_error",
    "im2col",
    "max_pool2d_backward",
    "max_pool2d_forward",
    "pair",
    "softmax",
    "softmax_cross_entropy",
    "use_fast_paths",
]

# --------------------------------------------------------------------------- dispatch

_state = threading.local()


def _fast_enabled() -> bool:
    return getattr(_state, "fast", True)


@contextlib.contextmanager
def use_fast_paths(enabled: bool = True):
    """Context manager: ``with use_fast_paths(False):`` runs the generic reference code."""
    old = _fast_enabled()
    _state.fast = bool(enabled)
    try:
        yield
    finally:
        _state.fast = old


def _kernel(xp, name: str):
    if not _fast_enabled():
        return None
    from . import kernels

    return kernels.lookup(backend.namespace_name(xp), name)


def _backward_kernel(xp, name: str, cache):
    """The backward that fits ``cache``: the reference code writes tuples, a fast
    forward kernel writes its own cache object, whose backward is the kernel's (even if
    fast paths were switched off between forward and backward)."""
    if isinstance(cache, tuple):
        return None
    from . import kernels

    fast = kernels.lookup(backend.namespace_name(xp), name)
    if fast is None:
        raise TypeError(f"{name}: got a cache made by another backend's kernel ({type(cache).__name__})")
    return fast


# --------------------------------------------------------------------------- shape helpers


def pair(value: Any, what: str = "value") -> tuple[int, int]:
    """An int or an (h, w) pair as a pair of non-negative ints."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{what} must be an int or an (h, w) pair, got {value!r}")
        h, w = value
    else:
        h = w = value
    try:
        h, w = int(h), int(w)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be an int or an (h, w) pair of ints, got {value!r}") from None
    if h < 0 or w < 0:
        raise ValueError(f"{what} must be non-negative, got {value!r}")
    return h, w


def conv_output_size(H: int, W: int, FH: int, FW: int, stride, pad, where: str = "im2col") -> tuple[int, int]:
    """(OH, OW); raises ValueError quoting the numbers when either is < 1."""
    SH, SW = pair(stride, "stride")
    PH, PW = pair(pad, "pad")
    if SH < 1 or SW < 1:
        raise ValueError(f"{where}: stride must be >= 1, got {(SH, SW)}")
    if FH < 1 or FW < 1:
        raise ValueError(f"{where}: filter size must be >= 1, got FH={FH}, FW={FW}")
    OH = (H + 2 * PH - FH) // SH + 1
    OW = (W + 2 * PW - FW) // SW + 1
    if OH < 1 or OW < 1:
        raise ValueError(
            f"{where}: filter larger than the padded input: "
            f"OH = (H + 2*PH - FH)//SH + 1 = ({H} + 2*{PH} - {FH})//{SH} + 1 = {OH}, "
            f"OW = (W + 2*PW - FW)//SW + 1 = ({W} + 2*{PW} - {FW})//{SW} + 1 = {OW}; both must be >= 1"
        )
    return OH, OW


def _check_4d(x, where: str, what: str = "input") -> None:
    if len(x.shape) != 4:
        raise ValueError(f"{where}: expected a 4-D {what} (N, C, H, W), got shape {tuple(x.shape)}")


def _pad(xp, x, PH: int, PW: int, value: float = 0.0):
    """x (N, C, H, W) with PH rows above and below and PW columns left and right of ``value``."""
    if PH == 0 and PW == 0:
        return x
    if not backend.is_mutable(xp):  # JAX: no writing into a fresh array
        return xpx.pad(x, ((0, 0), (0, 0), (PH, PH), (PW, PW)), constant_values=value, xp=xp)
    N, C, H, W = x.shape
    out = xp.full((N, C, H + 2 * PH, W + 2 * PW), value, dtype=x.dtype, device=backend.device_of(x))
    out[:, :, PH : PH + H, PW : PW + W] = x
    return out


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


def im2col(input_data, filter_h: int, filter_w: int, stride=1, pad=0, *, pad_value: float = 0.0):
    """Unfold (N, C, H, W) into rows of patches: (N*OH*OW, C*FH*FW).

    Row ``(n*OH + i)*OW + j`` holds the C*FH*FW window whose top-left corner sits at
    (i*SH - PH, j*SW - PW), ordered channel-major, then filter row, then column.
    """
    xp = namespace_of(input_data)
    _check_4d(input_data, "im2col")
    fast = _kernel(xp, "im2col")
    if fast is not None:
        return fast(input_data, filter_h, filter_w, stride, pad, pad_value=pad_value)
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


def col2im(col, input_shape, filter_h: int, filter_w: int, stride=1, pad=0):
    """Adjoint of :func:`im2col`: sum the patch rows (N*OH*OW, C*FH*FW) back into
    an (N, C, H, W) image; overlapping windows add up (on immutable namespaces
    one scatter-add through ``array_api_extra.at``)."""
    xp = namespace_of(col)
    N, C, H, W = (int(s) for s in input_shape)
    FH, FW = int(filter_h), int(filter_w)
    SH, SW = pair(stride, "stride")
    PH, PW = pair(pad, "pad")
    OH, OW = conv_output_size(H, W, FH, FW, (SH, SW), (PH, PW), where="col2im")
    expected = (N * OH * OW, C * FH * FW)
    if tuple(col.shape) != expected:
        raise ValueError(f"col2im: expected col of shape (N*OH*OW, C*FH*FW) = {expected}, got {tuple(col.shape)}")
    fast = _kernel(xp, "col2im")
    if fast is not None:
        return fast(col, (N, C, H, W), FH, FW, (SH, SW), (PH, PW))
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


# --------------------------------------------------------------------------- convolution


def conv2d_forward(x, W, b, stride=1, pad=0, *, relu=False):
    """Convolution (cross-correlation) of x (N, C, H, W) with W (FN, C, FH, FW) plus
    b (FN,), followed by a ReLU when ``relu`` is true.  Returns ``(out, cache)``: out is
    (N, FN, OH, OW); cache is opaque and goes to :func:`conv2d_backward`."""
    xp = namespace_of(x, W, b)
    fast = _kernel(xp, "conv2d_forward")
    if fast is not None:
        return fast(x, W, b, stride, pad, relu=relu)
    N, C, H, Wd = x.shape
    FN, _, FH, FW = W.shape
    OH, OW = conv_output_size(H, Wd, FH, FW, stride, pad, where="Convolution")
    col = im2col(x, FH, FW, stride, pad)
    col_W = xp.reshape(W, (FN, C * FH * FW)).T
    out = col @ col_W + b
    out = xp.permute_dims(xp.reshape(out, (N, OH, OW, FN)), (0, 3, 1, 2))
    mask = None
    if relu:  # as layers.Relu does it
        mask = xp.astype(out > 0, out.dtype)
        out = out * mask
    return out, (tuple(x.shape), tuple(W.shape), col, col_W, stride, pad, mask)


def conv2d_backward(dout, cache, *, need_dx=True):
    """Gradients ``(dx, dW, db)`` of :func:`conv2d_forward` given dL/dout (N, FN, OH, OW);
    dx is None when ``need_dx`` is false (the first layer of a net needs no dx)."""
    xp = namespace_of(dout)
    fast = _backward_kernel(xp, "conv2d_backward", cache)
    if fast is not None:
        return fast(dout, cache, need_dx=need_dx)
    x_shape, W_shape, col, col_W, stride, pad, mask = cache
    if mask is not None:
        dout = dout * mask
    FN, C, FH, FW = W_shape
    d = xp.reshape(xp.permute_dims(dout, (0, 2, 3, 1)), (-1, FN))
    db = xp.sum(d, axis=0)
    dW = xp.reshape((col.T @ d).T, W_shape)
    if not need_dx:
        return None, dW, db
    dcol = d @ col_W.T
    dx = col2im(dcol, x_shape, FH, FW, stride, pad)
    return dx, dW, db


def conv2d_relu_maxpool_forward(x, W, b, stride, pad, pool_h, pool_w, pool_stride, pool_pad=0, *, training=True):
    """Convolution + ReLU + max pooling as one op (the classic CNN block): the same
    result as :func:`conv2d_forward` with ``relu=True`` followed by
    :func:`max_pool2d_forward`.  Returns ``(out, cache)``, out (N, FN, PH, PW) with PH
    the pooled height.  ``training=False`` lets a kernel skip what only the backward
    needs."""
    xp = namespace_of(x, W, b)
    fast = _kernel(xp, "conv2d_relu_maxpool_forward")
    if fast is not None:
        return fast(x, W, b, stride, pad, pool_h, pool_w, pool_stride, pool_pad, training=training)
    out, conv_cache = conv2d_forward(x, W, b, stride, pad, relu=True)
    out, pool_cache = max_pool2d_forward(out, pool_h, pool_w, pool_stride, pool_pad)
    return out, (conv_cache, pool_cache)


def conv2d_relu_maxpool_backward(dout, cache, *, need_dx=True):
    """Gradients ``(dx, dW, db)`` of :func:`conv2d_relu_maxpool_forward`."""
    xp = namespace_of(dout)
    fast = _backward_kernel(xp, "conv2d_relu_maxpool_backward", cache)
    if fast is not None:
        return fast(dout, cache, need_dx=need_dx)
    conv_cache, pool_cache = cache
    return conv2d_backward(max_pool2d_backward(dout, pool_cache), conv_cache, need_dx=need_dx)


# --------------------------------------------------------------------------- pooling


def max_pool2d_forward(x, pool_h: int, pool_w: int, stride=1, pad=0):
    """Max pooling of (N, C, H, W) over pool_h x pool_w windows; padding counts as
    -inf (never the maximum).  Returns ``(out, cache)``, out (N, C, OH, OW)."""
    xp = namespace_of(x)
    fast = _kernel(xp, "max_pool2d_forward")
    if fast is not None:
        return fast(x, pool_h, pool_w, stride, pad)
    N, C, H, W = x.shape
    OH, OW = conv_output_size(H, W, pool_h, pool_w, stride, pad, where="Pooling")
    col = xp.reshape(im2col(x, pool_h, pool_w, stride, pad, pad_value=-float("inf")), (-1, pool_h * pool_w))
    arg_max = xp.argmax(col, axis=1)
    out = xp.max(col, axis=1)
    out = xp.permute_dims(xp.reshape(out, (N, OH, OW, C)), (0, 3, 1, 2))
    return out, (tuple(x.shape), pool_h, pool_w, stride, pad, arg_max)


def max_pool2d_backward(dout, cache):
    """dL/dx of max pooling: each window's gradient goes to exactly one input (the
    first maximum when several tie)."""
    xp = namespace_of(dout)
    fast = _backward_kernel(xp, "max_pool2d_backward", cache)
    if fast is not None:
        return fast(dout, cache)
    x_shape, PH_, PW_, stride, pad, arg_max = cache
    N, C, H, W = x_shape
    pool = PH_ * PW_
    d = xp.reshape(xp.permute_dims(dout, (0, 2, 3, 1)), (-1, 1))
    hit = xp.arange(pool, device=backend.device_of(dout))[None, :] == arg_max[:, None]
    dcol = xp.astype(hit, dout.dtype) * d
    dcol = xp.reshape(dcol, (-1, C * pool))
    return col2im(dcol, x_shape, PH_, PW_, stride, pad)


def avg_pool2d_forward(x, pool_h: int, pool_w: int, stride=1, pad=0):
    """Average pooling; zero padding is counted in the window (as
    torch's ``count_include_pad=True``).  Returns ``(out, cache)``."""
    xp = namespace_of(x)
    fast = _kernel(xp, "avg_pool2d_forward")
    if fast is not None:
        return fast(x, pool_h, pool_w, stride, pad)
    N, C, H, W = x.shape
    OH, OW = conv_output_size(H, W, pool_h, pool_w, stride, pad, where="AvgPooling")
    col = xp.reshape(im2col(x, pool_h, pool_w, stride, pad), (-1, pool_h * pool_w))
    out = xp.mean(col, axis=1)
    out = xp.permute_dims(xp.reshape(out, (N, OH, OW, C)), (0, 3, 1, 2))
    return out, (tuple(x.shape), pool_h, pool_w, stride, pad)


def avg_pool2d_backward(dout, cache):
    xp = namespace_of(dout)
    fast = _backward_kernel(xp, "avg_pool2d_backward", cache)
    if fast is not None:
        return fast(dout, cache)
    x_shape, PH_, PW_, stride, pad = cache
    N, C, H, W = x_shape
    pool = PH_ * PW_
    d = xp.reshape(xp.permute_dims(dout, (0, 2, 3, 1)), (-1, 1)) / pool
    dcol = xp.reshape(d * xp.ones((1, pool), dtype=dout.dtype, device=backend.device_of(dout)), (-1, C * pool))
    return col2im(dcol, x_shape, PH_, PW_, stride, pad)


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


def one_hot(t, num_classes: int, dtype):
    """(N,) integer class indices -> (N, num_classes) one-hot of ``dtype``."""
    xp = namespace_of(t)
    classes = xp.arange(num_classes, device=backend.device_of(t))
    return xp.astype(classes[None, :] == t[:, None], dtype)


def labels_as_one_hot(t, num_classes: int, dtype, where: str = "SoftmaxWithLoss"):
    """Validate labels (class indices (N,) or one-hot (N, K)) and return them one-hot."""
    xp = namespace_of(t)
    if len(t.shape) == 2:
        if t.shape[1] != num_classes:
            raise ValueError(f"{where}: one-hot labels must have {num_classes} columns, got shape {tuple(t.shape)}")
        return xp.astype(t, dtype)
    if len(t.shape) != 1:
        raise ValueError(f"{where}: expected labels of shape (N,) or (N, {num_classes}), got {tuple(t.shape)}")
    if xp.isdtype(t.dtype, "real floating"):
        raise TypeError(f"{where}: class-index labels must be integers, got dtype {t.dtype}")
    if not xp.isdtype(t.dtype, "integral"):
        raise TypeError(f"{where}: labels must be integer class indices or one-hot, got dtype {t.dtype}")
    if t.shape[0] and bool(xp.any((t < 0) | (t >= num_classes))):
        lo, hi = int(xp.min(t)), int(xp.max(t))
        raise ValueError(f"{where}: labels out of range: expected 0 <= t < {num_classes}, got min {lo}, max {hi}")
    return one_hot(t, num_classes, dtype)


def softmax_cross_entropy(x, t_one_hot):
    """Mean cross-entropy of softmax(x) (N, K) against one-hot targets, computed
    through log-softmax (no log(0)).  Returns ``(loss, y)`` with y = softmax(x);
    loss is a 0-d array of x's namespace."""
    xp = namespace_of(x)
    N = x.shape[0]
    logp = log_softmax(x)
    loss = -xp.sum(t_one_hot * logp) / N
    return loss, xp.exp(logp)


def cross_entropy_error(y, t):
    """Book-compatible cross-entropy of probabilities y against labels t (indices or one-hot)."""
    xp = namespace_of(y)
    if len(y.shape) == 1:
        y = xp.reshape(y, (1, -1))
        t = xp.reshape(t, (1, -1)) if len(t.shape) == 1 and t.shape[0] == y.shape[1] else xp.reshape(t, (1,))
    oh = labels_as_one_hot(t, y.shape[1], y.dtype, where="cross_entropy_error")
    return -xp.sum(oh * xp.log(y + 1e-7)) / y.shape[0]
