"""CuPy kernels for :mod:`xpconv.ops`, registered for the ``"cupy"`` namespace.

Each class here (:class:`Im2col`, :class:`Conv2d`, :class:`Conv2dReluMaxPool2d`,
:class:`MaxPool2d`, :class:`AvgPool2d`) registers itself with
``@register("cupy", op)`` and has the forward and backward of the reference class
of the same name in ``xpconv.ops``, whose result it gives; ``xpconv.ops`` runs it
for CuPy arrays it ``accepts``.  tests/test_cupy_kernels.py proves each equal to
the reference on a GPU, and without one through a host build of the same CUDA sources.

How the work is split:

* im2col, col2im, max/average pooling forward and backward are one CUDA kernel
  each (``conv.cu``, ``pool.cu``), one thread per output element.  Backward passes
  are gathers -- each input pixel sums what reaches it, in the generic code's
  order -- so there are no atomics and results are deterministic.
* Convolution is the im2col kernel + one cuBLAS product ``col @ W.T`` giving NHWC
  rows (col is freed at once: the backward keeps the input and rebuilds it, so no
  im2col matrix lives from forward to backward; a batch whose col would exceed
  the slice budget (``_col_budget``: 1/64 of the device's free memory, 8-128 MiB) is convolved slice by slice, so the transient is bounded too) + one kernel that adds the bias (and applies the ReLU, ``relu=True``) while
  moving them to NCHW.  Backward moves dout to NHWC rows in one kernel (applying
  the ReLU's mask), then cuBLAS for dW and dcol, a column sum for db and the
  col2im kernel; ``need_dx=False`` skips dcol and col2im.
* ``conv2d_relu_maxpool_forward`` never writes the convolution's output: one
  kernel reads the NHWC rows, adds the bias, applies the ReLU and max-pools into
  the NCHW result, recording each window's argmax (-1 where the ReLU passes no
  gradient).  Its backward is one gather kernel from the pooled gradient straight
  to the NHWC rows the two products need.

Inputs the kernels do not cover (dtypes other than float32/float64, mixed dtypes,
malformed shapes) are declined by ``accepts``: ``xpconv.ops`` runs the reference
for them, which also raises the user-facing errors.  The cache of a forward holds
the kernel that made it, so a backward always meets its own forward's state.

Kernel index arithmetic is 32-bit: a launch is split over the batch so that each
piece's arrays hold fewer than ``_INDEX_LIMIT`` elements.
"""

from __future__ import annotations

import cupy

from .._geometry import window
from . import UpdateKernel, col_bytes_for, cuda_source, register

_THREADS = 256
_MAX_BLOCKS = 1 << 16  # grid-stride loops cover larger launches
#: most elements one launch may touch in any array (32-bit indices, with room for the grid stride)
_INDEX_LIMIT = 2**31 - 1 - _THREADS * _MAX_BLOCKS
_SUFFIX = {"float32": "f32", "float64": "f64"}


# --------------------------------------------------------------------------- launching


def _suffix(*arrays) -> str | None:
    """Kernel suffix ('f32'/'f64') when all arrays share one dtype the kernels have."""
    dtype = arrays[0].dtype
    if any(a.dtype != dtype for a in arrays[1:]):
        return None
    return _SUFFIX.get(dtype.name)


def _launch(source: str, kernel: str, sfx: str, N: int, out_per_sample: int, per_sample=(), shared=(), ints=(), tail=()):
    """Run ``xpc_<kernel>_<sfx>`` of ``<source>.cu``, one thread per output element,
    ``out_per_sample`` of them for each of N samples.

    Arguments go in the kernels' order: the ``per_sample`` arrays (one equal block
    per sample each, or None), the ``shared`` arrays, the element count, ``ints``
    as int32, then ``tail`` (scalars already of the kernel's type: CuPy would pass
    a Python int as int64).  When the batch is too large for 32-bit indices the
    launch repeats over slices of it.
    """
    if N == 0 or out_per_sample == 0:
        return
    per = max([out_per_sample] + [a.size // N for a in per_sample if a is not None])
    if per > _INDEX_LIMIT:
        raise ValueError(
            f"xpc_{kernel}: one sample needs {per} elements in one CUDA launch, more than the "
            f"kernels' 32-bit index limit of {_INDEX_LIMIT}"
        )
    fn = cuda_source.function(source, f"xpc_{kernel}_{sfx}")
    int_args = tuple(cupy.int32(v) for v in ints)
    step = _INDEX_LIMIT // per
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        if n1 - n0 == N:
            arrays = tuple(per_sample)
        else:
            arrays = tuple(None if a is None else a[n0 * (a.shape[0] // N) : n1 * (a.shape[0] // N)] for a in per_sample)
        total = (n1 - n0) * out_per_sample
        blocks = min(-(-total // _THREADS), _MAX_BLOCKS)
        fn((blocks,), (_THREADS,), (*arrays, *shared, cupy.int32(total), *int_args, *tail))


def _geometry(H: int, W: int, FH: int, FW: int, stride, pad, where: str):
    """(SH, SW, PH, PW, OH, OW), validated with the generic code's messages."""
    return tuple(window(H, W, FH, FW, stride, pad, where))


def _dout(where: str, dout, expected, dtype):
    """dout checked against the forward's output shape, as a C-contiguous array of the forward's dtype."""
    if tuple(dout.shape) != tuple(expected):
        raise ValueError(f"{where} backward: expected dout of shape {tuple(expected)}, got {tuple(dout.shape)}")
    return cupy.ascontiguousarray(dout if dout.dtype == dtype else dout.astype(dtype))


def _neg_inf(dtype):
    return dtype.type(-float("inf"))


class _Cache:
    """A kernel's state for its backward (fields named by each subclass's slots)."""

    __slots__ = ()

    def __init__(self, **fields):
        for name, value in fields.items():
            setattr(self, name, value)


# --------------------------------------------------------------------------- im2col / col2im


@register("cupy", "im2col")
class Im2col:
    """im2col and its adjoint col2im, one kernel each; reference: :class:`xpconv.ops.Im2col`."""

    def accepts(self, *arrays) -> bool:
        return _suffix(*arrays) is not None

    def forward(self, input_data, filter_h, filter_w, stride=1, pad=0, *, pad_value=0.0):
        """(N, C, H, W) -> (N*OH*OW, C*FH*FW) in one kernel; see :func:`xpconv.ops.im2col`."""
        N, C, H, W = (int(s) for s in input_data.shape)
        FH, FW = int(filter_h), int(filter_w)
        geom = _geometry(H, W, FH, FW, stride, pad, "im2col")
        return _im2col(cupy.ascontiguousarray(input_data), _suffix(input_data), FH, FW, *geom, pad_value)

    def backward(self, col, input_shape, filter_h, filter_w, stride=1, pad=0):
        """(N*OH*OW, C*FH*FW) -> (N, C, H, W), overlapping windows summed, in one
        gather kernel; see :func:`xpconv.ops.col2im` (which checked col's shape)."""
        shape = tuple(int(s) for s in input_shape)
        N, C, H, W = shape
        FH, FW = int(filter_h), int(filter_w)
        SH, SW, PH, PW, OH, OW = _geometry(H, W, FH, FW, stride, pad, "col2im")
        return _col2im(cupy.ascontiguousarray(col), _suffix(col), shape, FH, FW, SH, SW, PH, PW, OH, OW)


def _im2col(x, sfx, FH, FW, SH, SW, PH, PW, OH, OW, pad_value):
    N, C, H, W = x.shape
    K, P = C * FH * FW, OH * OW
    col = cupy.empty((N * P, K), dtype=x.dtype)
    ints = (C, H, W, FH, FW, SH, SW, PH, PW, OH, OW)
    _launch("conv", "im2col", sfx, N, P * K, (x, col), (), ints, (x.dtype.type(pad_value),))
    return col


def _col2im(col, sfx, x_shape, FH, FW, SH, SW, PH, PW, OH, OW, out=None):
    N, C, H, W = x_shape
    x = cupy.empty(x_shape, dtype=col.dtype) if out is None else out
    _launch("conv", "col2im", sfx, N, C * H * W, (col, x), (), (C, H, W, FH, FW, SH, SW, PH, PW, OH, OW))
    return x


# --------------------------------------------------------------------------- convolution


class _ConvCache(_Cache):
    __slots__ = ("x_shape", "W_shape", "Wm", "x", "sfx", "geometry", "relu_out")
    # Wm: W as (FN, C*FH*FW); x: the (contiguous) input, whose im2col the backward
    # rebuilds -- holding col from forward to backward would keep C*FH*FW/(SH*SW)
    # times the input alive per layer; sfx: kernel suffix; geometry: (SH, SW, PH, PW, OH, OW);
    # relu_out: the output when a ReLU was applied (its mask is out > 0), else None


class _ConvPoolCache(_Cache):
    __slots__ = ("conv", "pool", "pool_geometry", "argmax")
    # conv: _ConvCache of the convolution; pool: (FH, FW) of the pool window;
    # pool_geometry: (SH, SW, PH, PW, POH, POW); argmax: int32 (N, FN, POH, POW)
    # window positions, -1 where no gradient


def _convolvable(x, W, b) -> str | None:
    """The kernel suffix when the kernels cover this convolution, else None."""
    sfx = _suffix(x, W, b)
    if sfx is None or len(x.shape) != 4 or len(W.shape) != 4:
        return None
    if tuple(b.shape) != (W.shape[0],) or x.shape[1] != W.shape[1]:
        return None
    return sfx


#: the im2col slice budget of each device (by id), chosen at its first convolution
_COL_BUDGETS: dict[int, int] = {}


def _col_budget() -> int:
    """The current device's im2col slice budget (``xpconv.kernels.col_bytes_for``): from its
    free memory, counting the blocks CuPy's pool holds free, when it first convolves."""
    device = int(cupy.cuda.runtime.getDevice())
    budget = _COL_BUDGETS.get(device)
    if budget is None:
        free, _total = cupy.cuda.runtime.memGetInfo()
        budget = _COL_BUDGETS[device] = col_bytes_for(int(free) + int(cupy.get_default_memory_pool().free_bytes()))
    return budget


def _chunks(N: int, bytes_per_sample: int):
    """(n0, n1) slices of the batch whose im2col matrix fits the slice budget (at least one sample each)."""
    step = max(1, _col_budget() // max(1, bytes_per_sample))
    return [(n0, min(N, n0 + step)) for n0 in range(0, N, step)]


def _conv_rows(x, W, stride, pad, sfx):
    """im2col + cuBLAS: y (N*OH*OW, FN), the convolution without bias in NHWC rows,
    and the cache the backward needs.  The im2col matrix is built per slice of the
    batch (``_chunks``) and freed after its product, so at most the slice budget of it
    exist at once."""
    N, C, H, Wd = (int(s) for s in x.shape)
    FN, _, FH, FW = (int(s) for s in W.shape)
    geom = _geometry(H, Wd, FH, FW, stride, pad, "Convolution")
    x = cupy.ascontiguousarray(x)
    Wm = cupy.ascontiguousarray(W).reshape(FN, C * FH * FW)
    P, K = geom[4] * geom[5], C * FH * FW
    chunks = _chunks(N, P * K * x.dtype.itemsize)
    if len(chunks) == 1:
        y = _im2col(x, sfx, FH, FW, *geom, 0.0) @ Wm.T  # the column matrix is freed with the expression
    else:
        y = cupy.empty((N * P, FN), dtype=x.dtype)
        for n0, n1 in chunks:
            cupy.matmul(_im2col(x[n0:n1], sfx, FH, FW, *geom, 0.0), Wm.T, out=y[n0 * P : n1 * P])
    # the backward rebuilds col from x (one im2col launch per slice, no memory held in between)
    return y, _ConvCache(x_shape=(N, C, H, Wd), W_shape=(FN, C, FH, FW), Wm=Wm, x=x, sfx=sfx, geometry=geom, relu_out=None)


def _conv_grads(d, cache: _ConvCache, need_dx: bool):
    """(dx, dW, db) from d = dL/d(output) as NHWC rows (N*OH*OW, FN); the im2col
    matrix is rebuilt from the kept input and dcol made, slice by slice of the
    batch as in the forward (dW summed over the slices)."""
    db = d.sum(axis=0)
    N, C, H, Wd = cache.x_shape
    FN, _, FH, FW = cache.W_shape
    SH, SW, PH, PW, OH, OW = cache.geometry
    P = OH * OW
    chunks = _chunks(N, P * C * FH * FW * d.dtype.itemsize)
    dx = cupy.empty(cache.x_shape, dtype=d.dtype) if need_dx and len(chunks) > 1 else None
    dW = None
    for n0, n1 in chunks:
        x = cache.x if len(chunks) == 1 else cache.x[n0:n1]
        dn = d if len(chunks) == 1 else d[n0 * P : n1 * P]
        part = dn.T @ _im2col(x, cache.sfx, FH, FW, SH, SW, PH, PW, OH, OW, 0.0)
        if dW is None:
            dW = part
        else:
            dW += part
        if need_dx:
            xs = (n1 - n0, C, H, Wd)
            out = dx[n0:n1] if dx is not None else None
            piece = _col2im(dn @ cache.Wm, _SUFFIX[d.dtype.name], xs, FH, FW, SH, SW, PH, PW, OH, OW, out=out)
            if dx is None:
                dx = piece
    return dx, dW.reshape(cache.W_shape), db  # type: ignore[union-attr]


@register("cupy", "conv2d")
class Conv2d:
    """Convolution (+ ReLU): im2col kernel + cuBLAS + one bias(+ReLU)/NCHW kernel;
    reference: :class:`xpconv.ops.Conv2d`."""

    def accepts(self, *arrays) -> bool:
        return _convolvable(*arrays) is not None

    def forward(self, x, W, b, stride=1, pad=0, *, relu=False):
        """See :func:`xpconv.ops.conv2d_forward`."""
        sfx = _convolvable(x, W, b)
        y, cache = _conv_rows(x, W, stride, pad, sfx)
        N, FN = cache.x_shape[0], cache.W_shape[0]
        OH, OW = cache.geometry[4:]
        P = OH * OW
        out = cupy.empty((N, FN, OH, OW), dtype=x.dtype)
        _launch("conv", "bias_nhwc_to_nchw", sfx, N, FN * P, (y, out), (cupy.ascontiguousarray(b),), (FN, P, int(bool(relu))))
        if relu:
            cache.relu_out = out
        return out, cache

    def backward(self, dout, state, *, need_dx=True):
        """One NHWC(+ReLU mask) kernel + cuBLAS + column sum + col2im kernel; see
        :func:`xpconv.ops.conv2d_backward`."""
        N = state.x_shape[0]
        FN = state.W_shape[0]
        OH, OW = state.geometry[4:]
        P = OH * OW
        dtype = state.x.dtype
        dout = _dout("Convolution", dout, (N, FN, OH, OW), dtype)
        d = cupy.empty((N * P, FN), dtype=dtype)
        _launch("conv", "nchw_to_nhwc", _SUFFIX[dtype.name], N, P * FN, (dout, state.relu_out, d), (), (FN, P))
        return _conv_grads(d, state, need_dx)


@register("cupy", "conv2d_relu_max_pool2d")
class Conv2dReluMaxPool2d:
    """Convolution + ReLU + max pooling: im2col kernel + cuBLAS + one
    bias/ReLU/max-pool kernel (the convolution's output is never written);
    reference: :class:`xpconv.ops.Conv2dReluMaxPool2d`."""

    def accepts(self, *arrays) -> bool:
        return _convolvable(*arrays) is not None

    def forward(self, x, W, b, stride, pad, pool_h, pool_w, pool_stride, pool_pad=0, *, training=True):
        """See :func:`xpconv.ops.conv2d_relu_max_pool2d_forward`.  With
        ``training=False`` nothing is kept for a backward (the state is None)."""
        sfx = _convolvable(x, W, b)
        N, C, H, Wd = (int(s) for s in x.shape)
        FN, _, FH, FW = (int(s) for s in W.shape)
        KH, KW = int(pool_h), int(pool_w)
        OH, OW = _geometry(H, Wd, FH, FW, stride, pad, "Convolution")[4:]
        pgeom = _geometry(OH, OW, KH, KW, pool_stride, pool_pad, "Pooling")
        POH, POW = pgeom[4:]
        y, conv = _conv_rows(x, W, stride, pad, sfx)
        out = cupy.empty((N, FN, POH, POW), dtype=x.dtype)
        argmax = cupy.empty((N, FN, POH, POW), dtype=cupy.int32) if training else None
        ints = (FN, OH, OW, KH, KW, *pgeom)
        _launch("conv", "bias_relu_maxpool", sfx, N, FN * POH * POW, (y, out, argmax), (cupy.ascontiguousarray(b),), ints, (_neg_inf(x.dtype),))
        if not training:
            return out, None
        return out, _ConvPoolCache(conv=conv, pool=(KH, KW), pool_geometry=pgeom, argmax=argmax)

    def backward(self, dout, state, *, need_dx=True):
        """One gather kernel from the pooled gradient to NHWC rows + cuBLAS + column sum
        + col2im kernel; see :func:`xpconv.ops.conv2d_relu_max_pool2d_backward`."""
        conv = state.conv
        N = conv.x_shape[0]
        FN = conv.W_shape[0]
        OH, OW = conv.geometry[4:]
        POH, POW = state.pool_geometry[4:]
        dtype = conv.x.dtype
        dout = _dout("Convolution+ReLU+Pooling", dout, (N, FN, POH, POW), dtype)
        d = cupy.empty((N * OH * OW, FN), dtype=dtype)
        ints = (FN, OH, OW, *state.pool, *state.pool_geometry)
        _launch("conv", "maxpool_bwd_nhwc", _SUFFIX[dtype.name], N, OH * OW * FN, (dout, state.argmax, d), (), ints)
        return _conv_grads(d, conv, need_dx)


# --------------------------------------------------------------------------- pooling


class _PoolCache(_Cache):
    __slots__ = ("x_shape", "pool", "geometry", "dtype", "argmax")
    # pool: (FH, FW) of the window; geometry: (SH, SW, PH, PW, OH, OW);
    # argmax: int32 (N, C, OH, OW) window positions (max pooling), else None

    def ints(self):
        N, C, H, W = self.x_shape
        return (H, W, *self.pool, *self.geometry)


def _poolable(x) -> bool:
    return _suffix(x) is not None and len(x.shape) == 4


def _pool_forward(where: str, x, pool_h, pool_w, stride, pad, with_argmax: bool):
    """(out, cache) of a pooling forward, allocated; the caller launches its kernel."""
    N, C, H, W = (int(s) for s in x.shape)
    KH, KW = int(pool_h), int(pool_w)
    geom = _geometry(H, W, KH, KW, stride, pad, where)
    OH, OW = geom[4:]
    out = cupy.empty((N, C, OH, OW), dtype=x.dtype)
    argmax = cupy.empty((N, C, OH, OW), dtype=cupy.int32) if with_argmax else None
    cache = _PoolCache(x_shape=(N, C, H, W), pool=(KH, KW), geometry=geom, dtype=x.dtype, argmax=argmax)
    return out, cache


def _pool_dout(where: str, dout, cache):
    N, C, H, W = cache.x_shape
    OH, OW = cache.geometry[4:]
    return _dout(where, dout, (N, C, OH, OW), cache.dtype), cupy.empty((N, C, H, W), dtype=cache.dtype)


@register("cupy", "max_pool2d")
class MaxPool2d:
    """Max pooling, one kernel each way; reference: :class:`xpconv.ops.MaxPool2d`."""

    def accepts(self, *arrays) -> bool:
        return _poolable(*arrays)

    def forward(self, x, pool_h, pool_w, stride=1, pad=0):
        """One kernel that also records each window's first argmax; see
        :func:`xpconv.ops.max_pool2d_forward`."""
        x = cupy.ascontiguousarray(x)
        out, cache = _pool_forward("Pooling", x, pool_h, pool_w, stride, pad, True)
        N, C, OH, OW = out.shape
        _launch("pool", "max_pool_fwd", _suffix(x), N, C * OH * OW, (x, out, cache.argmax), (), cache.ints(), (_neg_inf(x.dtype),))
        return out, cache

    def backward(self, dout, state):
        """One gather kernel: each input pixel sums the gradients of the windows whose
        argmax it is; see :func:`xpconv.ops.max_pool2d_backward`."""
        dout, dx = _pool_dout("Pooling", dout, state)
        N, C, H, W = state.x_shape
        _launch("pool", "max_pool_bwd", _SUFFIX[state.dtype.name], N, C * H * W, (dout, state.argmax, dx), (), state.ints())
        return dx


@register("cupy", "avg_pool2d")
class AvgPool2d:
    """Average pooling (zero padding counted), one kernel each way; reference:
    :class:`xpconv.ops.AvgPool2d`."""

    def accepts(self, *arrays) -> bool:
        return _poolable(*arrays)

    def forward(self, x, pool_h, pool_w, stride=1, pad=0):
        """See :func:`xpconv.ops.avg_pool2d_forward`."""
        x = cupy.ascontiguousarray(x)
        out, cache = _pool_forward("AvgPooling", x, pool_h, pool_w, stride, pad, False)
        N, C, OH, OW = out.shape
        _launch("pool", "avg_pool_fwd", _suffix(x), N, C * OH * OW, (x, out), (), cache.ints())
        return out, cache

    def backward(self, dout, state):
        """One gather kernel: each input pixel sums dout / (FH*FW) over the windows
        covering it; see :func:`xpconv.ops.avg_pool2d_backward`."""
        dout, dx = _pool_dout("AvgPooling", dout, state)
        N, C, H, W = state.x_shape
        _launch("pool", "avg_pool_bwd", _SUFFIX[state.dtype.name], N, C * H * W, (dout, dx), (), state.ints())
        return dx


# --------------------------------------------------------------------------- ReLU, softmax + cross-entropy


def _flat_ok(*arrays) -> str | None:
    """Kernel suffix when the arrays share one dtype of the kernels, else None."""
    if any(not isinstance(a, cupy.ndarray) for a in arrays):
        return None
    return _suffix(*arrays)


@register("cupy", "relu")
class Relu:
    """ReLU, one kernel each way (the forward's output is the backward's mask);
    reference: :class:`xpconv.ops.Relu`."""

    def accepts(self, *arrays) -> bool:
        return _flat_ok(*arrays) is not None and arrays[0].size < _INDEX_LIMIT

    def forward(self, x):
        """See :func:`xpconv.ops.relu_forward`."""
        x = cupy.ascontiguousarray(x)
        out = cupy.empty(x.shape, dtype=x.dtype)
        _launch("step", "relu_fwd", _suffix(x), 1, x.size, (x, out))
        return out, out

    def backward(self, dout, state):
        """See :func:`xpconv.ops.relu_backward`."""
        out = state
        dout = _dout("Relu", dout, out.shape, out.dtype)
        dx = cupy.empty(out.shape, dtype=out.dtype)
        _launch("step", "relu_bwd", _suffix(out), 1, out.size, (dout, out, dx))
        return dx


@register("cupy", "softmax_cross_entropy")
class SoftmaxCrossEntropy:
    """Softmax + mean cross-entropy against class indices: one kernel (one thread per
    row) writes y and each row's loss / N, one sum gives the loss; backward is one
    kernel.  One-hot targets go to the reference.  Reference:
    :class:`xpconv.ops.SoftmaxCrossEntropy`."""

    def accepts(self, *arrays) -> bool:
        x, t = arrays
        return (
            _flat_ok(x) is not None and isinstance(t, cupy.ndarray) and len(x.shape) == 2 and len(t.shape) == 1
            and t.dtype.kind in "iu" and x.size < _INDEX_LIMIT
        )

    def forward(self, x, t):
        """See :func:`xpconv.ops.softmax_cross_entropy_forward`."""
        x = cupy.ascontiguousarray(x)
        N, K = (int(s) for s in x.shape)
        t = cupy.ascontiguousarray(t if t.dtype == cupy.int64 else t.astype(cupy.int64))
        y = cupy.empty((N, K), dtype=x.dtype)
        rows = cupy.empty((N,), dtype=x.dtype)
        _launch("step", "softmax_xent_fwd", _suffix(x), 1, N, (x, t, y, rows), (), (K,), (x.dtype.type(1.0 / N),))
        return (rows.sum(), y), (y, t)

    def backward(self, dout, state):
        """See :func:`xpconv.ops.softmax_cross_entropy_backward`: dout a Python number
        goes into the kernel's scale; an array multiplies afterwards (one launch more)."""
        y, t = state
        N, K = (int(s) for s in y.shape)
        number = isinstance(dout, (int, float))
        scale = (float(dout) if number else 1.0) / N
        dx = cupy.empty((N, K), dtype=y.dtype)
        _launch("step", "softmax_xent_bwd", _suffix(y), 1, N * K, (y, t, dx), (), (K,), (y.dtype.type(scale),))
        return dx if number else dx * dout


# --------------------------------------------------------------------------- Dropout masks


@register("cupy", "dropout_mask")
class DropoutMask:
    """A Dropout mask from two 32-bit keys in one kernel: the counter-based hash of
    :func:`xpconv.backend.keep_mask` (no curand generator set up); reference:
    ``xpconv.backend.keep_mask`` on any other namespace."""

    def accepts(self, dtype) -> bool:
        try:
            return cupy.dtype(dtype).name in _SUFFIX
        except TypeError:
            return False

    def forward(self, shape, k1, k2, threshold, dtype):
        dtype = cupy.dtype(dtype)
        mask = cupy.empty(tuple(shape), dtype=dtype)
        if mask.size >= _INDEX_LIMIT:
            raise ValueError(f"Dropout: a mask of {mask.size} elements is more than one launch's {_INDEX_LIMIT}")
        sfx = _SUFFIX[mask.dtype.name]
        ints = (_as_int32(k1), _as_int32(k2), int(threshold))
        _launch("step", "dropout_mask", sfx, 1, mask.size, (mask,), (), ints)
        return mask


def _as_int32(v: int) -> int:
    """A 32-bit word as the signed int with its bits (the kernel reads it unsigned)."""
    v = int(v) & 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


# --------------------------------------------------------------------------- optimizer updates


class _Update(UpdateKernel):
    """One optimizer's update of one parameter in one kernel launch."""

    slots: tuple[str, ...] = ()

    def accepts(self, p, g, *slots) -> bool:
        arrays = (p, g, *slots)
        return (
            _flat_ok(*arrays) is not None and all(a.flags.c_contiguous and a.shape == p.shape for a in arrays)
            and p.size < _INDEX_LIMIT
        )

    def tail(self, dtype, weight_decay=0.0, **hyper) -> tuple:  # pragma: no cover - each subclass has its own
        """The kernel's trailing scalars (of ``dtype``'s type) for these hyper-parameters."""
        raise NotImplementedError


def _tail(dtype, *values):
    """Scalars of ``dtype``'s type for a kernel's tail arguments."""
    return tuple(dtype.type(v) for v in values)


@register("cupy", "sgd_update")
class SgdUpdate(_Update):
    """:class:`xpconv.optim.SGD`'s update, one launch per parameter."""

    def tail(self, dtype, weight_decay=0.0, *, lr):
        return _tail(dtype, weight_decay, lr)

    def step(self, p, g, slots, weight_decay=0.0, *, lr):
        tail, sfx = self.tail(p.dtype, weight_decay, lr=lr), _SUFFIX[p.dtype.name]
        _launch("step", "sgd", sfx, 1, p.size, (p, g), (), (), tail)


@register("cupy", "momentum_update")
class MomentumUpdate(_Update):
    """:class:`xpconv.optim.Momentum`'s update, one launch per parameter."""

    slots = ("v",)

    def tail(self, dtype, weight_decay=0.0, *, lr, momentum):
        return _tail(dtype, weight_decay, lr, momentum)

    def step(self, p, g, slots, weight_decay=0.0, *, lr, momentum):
        tail, sfx, arrays = self.tail(p.dtype, weight_decay, lr=lr, momentum=momentum), _SUFFIX[p.dtype.name], (p, g, slots["v"])
        _launch("step", "momentum", sfx, 1, p.size, arrays, (), (), tail)


@register("cupy", "nesterov_update")
class NesterovUpdate(_Update):
    """:class:`xpconv.optim.Nesterov`'s update, one launch per parameter."""

    slots = ("v",)

    def tail(self, dtype, weight_decay=0.0, *, lr, momentum):
        return _tail(dtype, weight_decay, lr, momentum, momentum * momentum, (1.0 + momentum) * lr)

    def step(self, p, g, slots, weight_decay=0.0, *, lr, momentum):
        tail, sfx, arrays = self.tail(p.dtype, weight_decay, lr=lr, momentum=momentum), _SUFFIX[p.dtype.name], (p, g, slots["v"])
        _launch("step", "nesterov", sfx, 1, p.size, arrays, (), (), tail)


@register("cupy", "adagrad_update")
class AdagradUpdate(_Update):
    """:class:`xpconv.optim.AdaGrad`'s update, one launch per parameter."""

    slots = ("h",)

    def tail(self, dtype, weight_decay=0.0, *, lr):
        return _tail(dtype, weight_decay, lr, 1.0, 1.0)

    def step(self, p, g, slots, weight_decay=0.0, *, lr):
        tail, sfx, arrays = self.tail(p.dtype, weight_decay, lr=lr), _SUFFIX[p.dtype.name], (p, g, slots["h"])
        _launch("step", "adagrad", sfx, 1, p.size, arrays, (), (0,), tail)


@register("cupy", "rmsprop_update")
class RmspropUpdate(_Update):
    """:class:`xpconv.optim.RMSprop`'s update (the AdaGrad kernel with a decaying sum), one launch per parameter."""

    slots = ("h",)

    def tail(self, dtype, weight_decay=0.0, *, lr, decay_rate):
        return _tail(dtype, weight_decay, lr, decay_rate, 1.0 - decay_rate)

    def step(self, p, g, slots, weight_decay=0.0, *, lr, decay_rate):
        tail, sfx, arrays = self.tail(p.dtype, weight_decay, lr=lr, decay_rate=decay_rate), _SUFFIX[p.dtype.name], (p, g, slots["h"])
        _launch("step", "adagrad", sfx, 1, p.size, arrays, (), (1,), tail)


@register("cupy", "adam_update")
class AdamUpdate(_Update):
    """:class:`xpconv.optim.Adam`'s update, one launch per parameter (was twelve)."""

    slots = ("m", "v")

    def tail(self, dtype, weight_decay=0.0, *, lr_t, beta1, beta2):
        return _tail(dtype, weight_decay, lr_t, 1.0 - beta1, 1.0 - beta2)

    def step(self, p, g, slots, weight_decay=0.0, *, lr_t, beta1, beta2):
        tail = self.tail(p.dtype, weight_decay, lr_t=lr_t, beta1=beta1, beta2=beta2)
        sfx, arrays = _SUFFIX[p.dtype.name], (p, g, slots["m"], slots["v"])
        _launch("step", "adam", sfx, 1, p.size, arrays, (), (), tail)

__all__ = [
    "AdagradUpdate", "AdamUpdate", "AvgPool2d", "Conv2d", "Conv2dReluMaxPool2d", "DropoutMask", "Im2col", "MaxPool2d",
    "MomentumUpdate", "NesterovUpdate", "Relu", "RmspropUpdate", "SgdUpdate", "SoftmaxCrossEntropy",
]
