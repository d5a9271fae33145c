"""NumPy kernels for :mod:`xpconv.ops`, registered for the ``"numpy"`` namespace.

Each class (:class:`Im2col`, :class:`Conv2d`, :class:`Conv2dReluMaxPool2d`,
:class:`MaxPool2d`, :class:`AvgPool2d`) registers itself with
``@register("numpy", op)`` and has the forward and backward of the reference class
of the same name in ``xpconv.ops``, with its results (tests/test_numpy_kernels.py
proves each one equal to the reference).

How they are fast (benchmarks/README.md has the measurements):

* **Channel-major layout inside.**  Activations are kept as (C, N, H, W) in memory
  and handed out as the transposed *view* (N, C, H, W), so callers see NCHW while
  the next kernel reads contiguous memory.  A convolution is then one GEMM,
  ``out (FN, N*OH*OW) = W (FN, C*FH*FW) @ col (C*FH*FW, N*OH*OW)``, whose rows are
  exactly W's rows -- no reordering of weights, and the output *is* the next
  layer's input layout.
* **Window views, not copy loops.**  The columns are one strided copy out of an
  ``as_strided`` view of the padded input (inner runs of OW contiguous values).
* **Bias inside the GEMM.**  ``col`` carries a row of ones and W a column of b, so
  the bias costs nothing forward, and db falls out of the dW GEMM backward.
* **Chunks that stay in cache.**  The batch goes through in slices whose columns
  fit in a few MiB; the column buffer is reused between slices and calls, and the
  backward recomputes the columns slice by slice instead of keeping N*OH*OW*K
  values alive (peak memory stays near the activations' size).
* **Fused conv + ReLU (+ max-pool).**  ReLU is applied in place on the GEMM output
  while it is in cache.  When a 2x2/stride-2 style pool follows, the columns are
  ordered pool-window-major, so the GEMM writes each window's members as
  contiguous blocks: the pool is a running ``np.maximum`` over ph*pw contiguous
  blocks, and its arg-max (first maximum, as the reference) is kept as uint8.
* **Winograd F(2x2,3x3) where it pays.**  A stride-1 3x3 convolution followed by a
  2x2/2 max-pool with >= WINOGRAD_MIN_C input channels runs its forward as Winograd:
  each 2x2 output tile is one pool window, so the four transformed outputs are the
  pool's blocks directly.  The backward is the im2col one (it reads only the padded
  input, the pooled output and the arg-max).
* **The first layer's dx is skipped** (``need_dx=False``), as torch skips it for
  inputs that need no gradient.

Everything stays in the input's floating dtype (float32 in, float32 out).
"""

from __future__ import annotations

import concurrent.futures
import threading

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .._geometry import conv_output_size, pair
from . import env_count, register

__all__ = ["AvgPool2d", "Conv2d", "Conv2dReluMaxPool2d", "Im2col", "MaxPool2d"]

#: bytes of column buffer per batch slice (the slice of samples that goes through
#: one GEMM); big enough for efficient GEMMs, small enough to stay in L2/L3 cache
CHUNK_BYTES = 4 << 20

_local = threading.local()

#: environment variable: worker threads for batch slices (default 1: BLAS alone
#: uses the cores).  Opt-in: with OPENBLAS_NUM_THREADS=1 and XPCONV_NUM_THREADS=2,
#: DeepConvNet trained 30-40% faster on a 2-core machine than with 2 BLAS threads,
#: SimpleConvNet not at all (benchmarks/README.md).
THREADS_ENV = "XPCONV_NUM_THREADS"
_pool_lock = threading.Lock()
_pools: dict = {}


def _workers() -> int:
    return env_count(THREADS_ENV, 1)


def _executor(n: int):
    with _pool_lock:
        ex = _pools.get(n)
        if ex is None:
            ex = _pools[n] = concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="xpconv-numpy")
        return ex


def _for_slices(N: int, step: int, body):
    """[body(n0, n1) for each batch slice of ``step`` samples], in order.

    With several workers ($XPCONV_NUM_THREADS) the slices run concurrently (NumPy's
    loops and BLAS release the GIL), so the copies, masks and pooling between the
    GEMMs use every core too.  Each worker has its own scratch buffers; slices touch
    disjoint samples; the caller sums any partial results."""
    w = _workers() if N > 1 else 1
    if w > 1:
        step = max(1, min(step, -(-N // (2 * w))))  # at least two slices per worker
    slices = [(n0, min(N, n0 + step)) for n0 in range(0, N, step)]
    if w <= 1 or len(slices) < 2 or threading.current_thread().name.startswith("xpconv-numpy"):
        return [body(a, b) for a, b in slices]
    return list(_executor(w).map(lambda s: body(*s), slices))


def _scratch(name: str, size: int, dtype) -> np.ndarray:
    """A reusable 1-D work buffer of at least ``size`` elements (one per name, dtype
    and thread).  Only ever used inside one kernel call; never returned or cached."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    key = (name, np.dtype(dtype).str)
    buf = bufs.get(key)
    if buf is None or buf.size < size:
        buf = bufs[key] = np.empty(max(size, 1), dtype)
    return buf[:size]


# --------------------------------------------------------------------------- layout helpers


def _cnhw(x, dtype) -> np.ndarray:
    """(N, C, H, W) -> (C, N, H, W), C-contiguous, of ``dtype``: a view when the
    memory already is channel-major (a kernel's output), else one copy."""
    t = np.asarray(x).transpose(1, 0, 2, 3)
    if t.dtype == dtype and t.flags.c_contiguous:
        return t
    return np.ascontiguousarray(t, dtype=dtype)


def _padded(a: np.ndarray, PH: int, PW: int, value=0.0) -> np.ndarray:
    """(A, B, H, W) -> (A, B, H + 2*PH, W + 2*PW) with a border of ``value``."""
    if PH == 0 and PW == 0:
        return a
    A, B, H, W = a.shape
    out = np.empty((A, B, H + 2 * PH, W + 2 * PW), a.dtype)
    out[:, :, :PH] = value
    out[:, :, PH + H :] = value
    out[:, :, PH : PH + H, :PW] = value
    out[:, :, PH : PH + H, PW + W :] = value
    out[:, :, PH : PH + H, PW : PW + W] = a
    return out


class _Geometry:
    """Shapes of one convolution (the house vocabulary)."""

    __slots__ = ("N", "C", "H", "W", "FN", "FH", "FW", "SH", "SW", "PH", "PW", "OH", "OW", "K")

    def __init__(self, x_shape, W_shape, stride, pad):
        self.N, self.C, self.H, self.W = (int(s) for s in x_shape)
        self.FN, C, self.FH, self.FW = (int(s) for s in W_shape)
        if C != self.C:
            raise ValueError(f"Convolution: expected input with C={C} channels (N, {C}, H, W), got shape {tuple(x_shape)}")
        self.SH, self.SW = pair(stride, "stride")
        self.PH, self.PW = pair(pad, "pad")
        self.OH, self.OW = conv_output_size(self.H, self.W, self.FH, self.FW, (self.SH, self.SW), (self.PH, self.PW), where="Convolution")
        self.K = self.C * self.FH * self.FW


def _positions(g: _Geometry, n: int, strides, pool):
    """Shape and strides of the output-position axes of n samples in a padded
    (C, n, Hp, Wp) array: (n, OH, OW) in natural order, or with ``pool=(ph, pw)``
    pool-window-major (ph, pw, n, OH//ph, OW//pw): position (QY*ph + py, QX*pw + px)."""
    _, sN, sH, sW = strides
    rH, rW = g.SH * sH, g.SW * sW
    if pool is None:
        return (n, g.OH, g.OW), (sN, rH, rW)
    ph, pw = pool
    return (ph, pw, n, g.OH // ph, g.OW // pw), (rH, rW, sN, ph * rH, pw * rW)


def _slice_step(g: _Geometry, pool, itemsize: int) -> int:
    """Samples per batch slice: the slice's columns fit in CHUNK_BYTES."""
    return max(1, min(g.N, CHUNK_BYTES // ((g.K + 1) * _per_sample(g, pool) * itemsize)))


def _per_sample(g: _Geometry, pool) -> int:
    return g.OH * g.OW if pool is None else (g.OH // pool[0]) * pool[0] * (g.OW // pool[1]) * pool[1]


def _cols(xpad: np.ndarray, g: _Geometry, pool, n0: int, n1: int) -> np.ndarray:
    """The columns of samples n0:n1 in this thread's scratch buffer: (K + 1,
    positions), rows ordered C, FH, FW as W's columns, positions as
    :func:`_positions`, and a last row of ones (for the bias)."""
    K1 = g.K + 1
    m = (n1 - n0) * _per_sample(g, pool)
    col = _scratch("col", K1 * m, xpad.dtype).reshape(K1, m)
    sC, _, sH, sW = xpad.strides
    shape, strides = _positions(g, n1 - n0, xpad.strides, pool)
    win = as_strided(xpad[:, n0:n1], (g.C, g.FH, g.FW) + shape, (sC, sH, sW) + strides, writeable=False)
    col[: g.K].reshape(win.shape)[...] = win
    col[g.K] = 1
    return col


def _scatter_add(dxpad: np.ndarray, dcol: np.ndarray, g: _Geometry, pool=None) -> None:
    """Adjoint of the window copy: add dcol (K, positions of dxpad's samples) into
    the padded gradient dxpad (C, n, Hp, Wp).  One strided add per filter tap
    (FH*FW of them); each tap's target positions never overlap."""
    n = dxpad.shape[1]
    shape, strides = _positions(g, n, dxpad.strides, pool)
    dv = dcol.reshape((g.C, g.FH, g.FW) + shape)
    sC = dxpad.strides[0]
    for ky in range(g.FH):
        for kx in range(g.FW):
            t = as_strided(dxpad[:, :, ky:, kx:], (g.C,) + shape, (sC,) + strides)
            np.add(t, dv[:, ky, kx], out=t)


def _weights_with_bias(W, b, dtype) -> np.ndarray:
    """[W.reshape(FN, K) | b] as one (FN, K + 1) matrix of ``dtype``."""
    FN = int(W.shape[0])
    Wa = np.empty((FN, W.size // FN + 1), dtype)
    Wa[:, :-1] = np.reshape(W, (FN, -1))
    Wa[:, -1] = b
    return Wa


#: input channels from which the fused conv-relu-max-pool forward of a stride-1 3x3
#: convolution with a 2x2/2 pool runs as Winograd F(2x2,3x3) (benchmarks/README.md:
#: 1.10-1.15x faster than the im2col GEMM at C=64, within noise at C=16 and 32)
WINOGRAD_MIN_C = 64

# Winograd F(2x2,3x3): Y = A^T [(G g G^T) * (B^T d B)] A on 4x4 input tiles at stride 2
_WG = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])


def _winograd_ok(g: _Geometry, pool, ps, pp) -> bool:
    """Whether the fused forward may run as Winograd F(2x2,3x3): 3x3 filter, stride 1,
    a 2x2 pool of stride 2 without pad, even output size, enough channels."""
    return (g.FH, g.FW, g.SH, g.SW) == (3, 3, 1, 1) and pool == (2, 2) and ps == (2, 2) and pp == (0, 0) and g.OH % 2 == 0 and g.OW % 2 == 0 and g.C >= WINOGRAD_MIN_C


def _winograd_step(g: _Geometry, itemsize: int) -> int:
    """Samples per batch slice of the Winograd forward: its 16 transformed tiles
    (16*C values per output pair of rows/columns) fit in CHUNK_BYTES."""
    return max(1, min(g.N, CHUNK_BYTES // (16 * max(g.C, g.FN) * (g.OH // 2) * (g.OW // 2) * itemsize)))


def _winograd_weights(W, b, dt) -> tuple[np.ndarray, np.ndarray]:
    """U = G g G^T per filter, as 16 (FN, C) matrices (computed in float64), and b."""
    FN, C = int(W.shape[0]), int(W.shape[1])
    U = np.einsum("ij,fcjk,lk->ilfc", _WG, np.asarray(W, np.float64), _WG)
    return np.ascontiguousarray(U.reshape(16, FN, C), dt), np.asarray(b, dt)


def _winograd_blocks(xpad: np.ndarray, U: np.ndarray, b: np.ndarray, g: _Geometry, n0: int, n1: int) -> np.ndarray:
    """conv + bias of samples n0:n1 as (4, FN, n*QH*QW): block k = 2*a + c holds output
    (2*QY + a, 2*QX + c), i.e. the k-th member of pool window (QY, QX) -- the layout
    of the pool-window-major GEMM output."""
    C, FN, dt = g.C, g.FN, xpad.dtype
    TH, TW, n = g.OH // 2, g.OW // 2, n1 - n0
    P = n * TH * TW
    x = xpad[:, n0:n1]
    d = [[x[:, :, i : i + 2 * TH - 1 : 2, j : j + 2 * TW - 1 : 2] for j in range(4)] for i in range(4)]
    T = _scratch("wT", 16 * C * P, dt).reshape(4, 4, C, n, TH, TW)
    for j in range(4):  # B^T d: rows
        np.subtract(d[0][j], d[2][j], out=T[0, j])
        np.add(d[1][j], d[2][j], out=T[1, j])
        np.subtract(d[2][j], d[1][j], out=T[2, j])
        np.subtract(d[1][j], d[3][j], out=T[3, j])
    Tr = T.reshape(4, 4, C, P)
    V = _scratch("wV", 16 * C * P, dt).reshape(4, 4, C, P)
    np.subtract(Tr[:, 0], Tr[:, 2], out=V[:, 0])  # (B^T d) B: columns
    np.add(Tr[:, 1], Tr[:, 2], out=V[:, 1])
    np.subtract(Tr[:, 2], Tr[:, 1], out=V[:, 2])
    np.subtract(Tr[:, 1], Tr[:, 3], out=V[:, 3])
    M = np.matmul(U, V.reshape(16, C, P), out=_scratch("wM", 16 * FN * P, dt).reshape(16, FN, P)).reshape(4, 4, FN, P)
    S = _scratch("wS", 8 * FN * P, dt).reshape(2, 4, FN, P)  # A^T M: rows
    np.add(M[0], M[1], out=S[0])
    S[0] += M[2]
    np.subtract(M[1], M[2], out=S[1])
    S[1] -= M[3]
    Y = _scratch("wY", 4 * FN * P, dt).reshape(2, 2, FN, P)  # (A^T M) A: columns
    np.add(S[:, 0], S[:, 1], out=Y[:, 0])
    Y[:, 0] += S[:, 2]
    np.subtract(S[:, 1], S[:, 2], out=Y[:, 1])
    Y[:, 1] -= S[:, 3]
    Y += b[:, None]
    return Y.reshape(4, FN, P)


# --------------------------------------------------------------------------- im2col


@register("numpy", "im2col")
class Im2col:
    """im2col as one copy out of a strided window view; col2im (its backward) as one
    strided add per filter tap.  Reference: :class:`xpconv.ops.Im2col`."""

    def accepts(self, *arrays) -> bool:
        return True

    def forward(self, input_data, filter_h, filter_w, stride=1, pad=0, *, pad_value=0.0):
        """ops.im2col: (N*OH*OW, C*FH*FW)."""
        x = np.asarray(input_data)
        N, C, H, W = x.shape
        FH, FW = int(filter_h), int(filter_w)
        SH, SW = pair(stride, "stride")
        PH, PW = pair(pad, "pad")
        OH, OW = conv_output_size(H, W, FH, FW, (SH, SW), (PH, PW))
        xpad = _padded(x, PH, PW, pad_value)
        sN, sC, sH, sW = xpad.strides
        win = as_strided(xpad, (N, OH, OW, C, FH, FW), (sN, SH * sH, SW * sW, sC, sH, sW), writeable=False)
        return np.ascontiguousarray(win).reshape(N * OH * OW, C * FH * FW)

    def backward(self, col, input_shape, filter_h, filter_w, stride=1, pad=0):
        """ops.col2im: the rows (N*OH*OW, C*FH*FW) summed into (N, C, H, W), tap by
        tap in the reference's order (so the sums are the reference's)."""
        N, C, H, W = (int(s) for s in input_shape)
        FH, FW = int(filter_h), int(filter_w)
        SH, SW = pair(stride, "stride")
        PH, PW = pair(pad, "pad")
        OH, OW = conv_output_size(H, W, FH, FW, (SH, SW), (PH, PW), where="col2im")
        c = np.asarray(col).reshape(N, OH, OW, C, FH, FW)
        img = np.zeros((N, C, H + 2 * PH, W + 2 * PW), c.dtype)
        for y in range(FH):
            for x in range(FW):
                tap = img[:, :, y : y + SH * (OH - 1) + 1 : SH, x : x + SW * (OW - 1) + 1 : SW]
                tap += c[:, :, :, :, y, x].transpose(0, 3, 1, 2)
        return img[:, :, PH : PH + H, PW : PW + W]


# --------------------------------------------------------------------------- convolution


class _ConvCache:
    """State of a convolution (pool=None) or of the fused conv-relu-max-pool."""

    __slots__ = ("g", "xpad", "Wa", "out", "pool", "idx", "dtype", "W_shape")
    composed = False

    def __init__(self, g, xpad, Wa, out, pool, idx, dtype, W_shape):
        self.g, self.xpad, self.Wa, self.out = g, xpad, Wa, out
        self.pool, self.idx, self.dtype, self.W_shape = pool, idx, dtype, W_shape


@register("numpy", "conv2d")
class Conv2d:
    """Convolution (+ ReLU) as channel-major GEMMs; reference: :class:`xpconv.ops.Conv2d`."""

    def accepts(self, *arrays) -> bool:
        return True

    def forward(self, x, W, b, stride=1, pad=0, *, relu=False):
        """ops.conv2d_forward: (N, FN, OH, OW) as a view of channel-major memory."""
        g = _Geometry(x.shape, W.shape, stride, pad)
        dt = np.result_type(x, W, b)
        xpad = _padded(_cnhw(x, dt), g.PH, g.PW)
        Wa = _weights_with_bias(W, b, dt)
        out = np.empty((g.FN, g.N, g.OH, g.OW), dt)

        def body(n0, n1):
            o = out[:, n0:n1].reshape(g.FN, -1)
            np.matmul(Wa, _cols(xpad, g, None, n0, n1), out=o)
            if relu:
                np.maximum(o, 0, out=o)

        _for_slices(g.N, _slice_step(g, None, xpad.itemsize), body)
        cache = _ConvCache(g, xpad, Wa, out if relu else None, None, None, dt, tuple(W.shape))
        return out.transpose(1, 0, 2, 3), cache

    def backward(self, dout, state, *, need_dx=True):
        """ops.conv2d_backward for a state of :meth:`forward`."""
        dt = np.result_type(dout, state.dtype)
        return _conv_backward(_cnhw(dout, dt), state, need_dx)


def _sum(parts):
    """Sum of the per-slice partial gradients."""
    total = parts[0].copy()
    for p in parts[1:]:
        total += p
    return total


def _flat_view(a: np.ndarray, n0: int, n1: int, L: int, offset: int = 0) -> np.ndarray:
    """(A, n1 - n0, L) view of a C-contiguous (A, N, Hp, Wp) array: for each sample,
    the L values starting ``offset`` elements into its image, read as one flat run
    (rows run on into the next ones)."""
    sA, sN = a.strides[0], a.strides[1]
    start = n0 * a.shape[2] * a.shape[3] + offset
    return as_strided(a.reshape(-1)[start:], (a.shape[0], n1 - n0, L), (sA, sN, a.itemsize))


def _conv_backward_flat(d: np.ndarray, cache: _ConvCache, need_dx: bool):
    """_conv_backward for stride 1 in the *flat-row* layout.

    Position (oh, ow) of a sample is numbered p = oh*Wp + ow over the padded width
    Wp, so filter tap (ky, kx) reads the flat run x[ky*Wp + kx + p] for p < L =
    (OH-1)*Wp + OW: one long contiguous run per (channel, tap, sample) for the
    columns, and the same for the col2im scatter.  The FW-1 positions per row with
    ow >= OW are junk: their dz is 0, so they add nothing to dW, db or dx."""
    g, pool, dt = cache.g, cache.pool, cache.dtype
    FN, K, C = g.FN, g.K, g.C
    xpad = np.ascontiguousarray(cache.xpad)
    Wp = xpad.shape[3]
    L = (g.OH - 1) * Wp + g.OW
    dxpad = np.zeros(xpad.shape, dt) if need_dx else None
    WT = np.ascontiguousarray(cache.Wa[:, :K].T) if need_dx else None
    QH, QW = d.shape[2], d.shape[3]
    Q = QH * QW

    def body(n0, n1):
        n = n1 - n0
        col = _scratch("fcol", (K + 1) * n * L, dt).reshape(K + 1, n * L)
        for ky in range(g.FH):  # the columns: C*FH*FW runs of L per sample
            for kx in range(g.FW):
                src = _flat_view(xpad, n0, n1, L, ky * Wp + kx)
                r = ky * g.FW + kx
                col[: K].reshape(C, g.FH * g.FW, n, L)[:, r] = src
        col[K] = 1
        dz = _scratch("fdz", FN * n * L, dt).reshape(FN, n, L)
        dz[...] = 0
        # dz's valid positions as (FN, n, OH, OW)
        sF, sN = dz.strides[0], dz.strides[1]
        isz = dz.itemsize
        dchunk = d[:, n0:n1]
        if pool is None:
            valid = as_strided(dz, (FN, n, g.OH, g.OW), (sF, sN, Wp * isz, isz))
            if cache.out is not None:  # the fused ReLU: its output > 0 is its mask
                np.multiply(dchunk, cache.out[:, n0:n1] > 0, out=valid)
            else:
                np.copyto(valid, dchunk)
        else:  # each pooled gradient goes to its window's (first) maximum, if the ReLU passed it
            ph, pw = pool
            dm = np.multiply(dchunk, cache.out[:, n0:n1] > 0, out=_scratch("dm", FN * n * Q, dt).reshape(FN, n, QH, QW))
            idx = cache.idx[:, n0 * Q : n1 * Q].reshape(FN, n, QH, QW)
            hit = _scratch("hit", FN * n * Q, bool).reshape(FN, n, QH, QW)
            for py in range(ph):
                for px in range(pw):
                    tgt = as_strided(dz.reshape(-1)[py * Wp + px :], (FN, n, QH, QW), (sF, sN, ph * Wp * isz, pw * isz))
                    # every position of a window gets dm or 0 (copyto(where=) is ~7x slower)
                    np.multiply(dm, np.equal(idx, py * pw + px, out=hit), out=tgt)
        dzf = dz.reshape(FN, n * L)
        if need_dx:
            dcol = np.matmul(WT, dzf, out=_scratch("dcol", K * n * L, dt).reshape(K, n * L))
            dv = dcol.reshape(C, g.FH * g.FW, n, L)
            for ky in range(g.FH):
                for kx in range(g.FW):
                    tgt = _flat_view(dxpad, n0, n1, L, ky * Wp + kx)
                    np.add(tgt, dv[:, ky * g.FW + kx], out=tgt)
        return dzf @ col.T

    step = max(1, min(g.N, CHUNK_BYTES // ((K + 1) * L * xpad.itemsize)))
    return _backward_result(_sum(_for_slices(g.N, step, body)), dxpad, cache)


def _conv_backward(d: np.ndarray, cache: _ConvCache, need_dx: bool):
    """Shared backward of conv2d_forward and the fused conv-relu-maxpool.

    d: dL/d(output) channel-major, (FN, N, QH, QW) for the pooled kernel, else
    (FN, N, OH, OW).  Per batch slice: mask by the ReLU (and route through the pool
    arg-max), then dW|db += dz @ col.T and dcol = W.T @ dz scattered into dx."""
    g, pool, dt = cache.g, cache.pool, cache.dtype
    if g.SH == 1 and g.SW == 1 and need_dx:  # its win is the scatter; without dx the columns below are cheaper
        return _conv_backward_flat(d, cache, need_dx)
    FN, K = g.FN, g.K
    dxpad = np.zeros(cache.xpad.shape, dt) if need_dx else None
    WT = np.ascontiguousarray(cache.Wa[:, :K].T) if need_dx else None
    npool = 1 if pool is None else pool[0] * pool[1]
    Q = d.shape[2] * d.shape[3]

    def body(n0, n1):
        col = _cols(cache.xpad, g, pool, n0, n1)
        m = (n1 - n0) * Q
        dchunk = d[:, n0:n1].reshape(FN, m)
        if cache.out is not None:  # the fused ReLU: its output > 0 is its mask
            mask = np.greater(cache.out[:, n0:n1].reshape(FN, m), 0, out=_scratch("mask", FN * m, bool).reshape(FN, m))
            dm = np.multiply(dchunk, mask, out=_scratch("dm", FN * m, dt).reshape(FN, m))
        else:
            dm = dchunk
        if pool is None:
            dz = dm
        else:  # each pooled gradient goes to its window's (first) maximum
            dz = _scratch("dz", FN * npool * m, dt).reshape(FN, npool, m)
            idx = cache.idx[:, n0 * Q : n1 * Q]
            hit = _scratch("hit", FN * m, bool).reshape(FN, m)
            for k in range(npool):
                np.multiply(dm, np.equal(idx, k, out=hit), out=dz[:, k])
            dz = dz.reshape(FN, npool * m)
        if need_dx:
            dcol = np.matmul(WT, dz, out=_scratch("dcol", K * dz.shape[1], dt).reshape(K, -1))
            _scatter_add(dxpad[:, n0:n1], dcol, g, pool)
        return dz @ col.T

    return _backward_result(_sum(_for_slices(g.N, _slice_step(g, pool, cache.xpad.itemsize), body)), dxpad, cache)


def _backward_result(dWa: np.ndarray, dxpad, cache: _ConvCache):
    """(dx, dW, db) from the summed [dW | db] rows and the padded dx (None: no dx wanted)."""
    g = cache.g
    dW = np.ascontiguousarray(dWa[:, : g.K]).reshape(cache.W_shape)
    db = dWa[:, g.K].copy()
    if dxpad is None:
        return None, dW, db
    dx = dxpad[:, :, g.PH : g.PH + g.H, g.PW : g.PW + g.W]
    return dx.transpose(1, 0, 2, 3), dW, db


class _Composed:
    """State of a conv-relu-max-pool that ran as two kernels (pool not tiling)."""

    __slots__ = ("conv", "pool")
    composed = True

    def __init__(self, conv, pool):
        self.conv, self.pool = conv, pool


@register("numpy", "conv2d_relu_max_pool2d")
class Conv2dReluMaxPool2d:
    """Convolution + ReLU + max pooling fused; reference: :class:`xpconv.ops.Conv2dReluMaxPool2d`."""

    def accepts(self, *arrays) -> bool:
        return True

    def forward(self, x, W, b, stride, pad, pool_h, pool_w, pool_stride, pool_pad=0, *, training=True):
        """ops.conv2d_relu_max_pool2d_forward.  When the pool windows tile the image
        (stride == pool size, no pad) the GEMM writes pool-window-major blocks and the
        pool is a running maximum over them; otherwise conv+relu, then max-pool."""
        g = _Geometry(x.shape, W.shape, stride, pad)
        ph, pw = int(pool_h), int(pool_w)
        ps, pp = pair(pool_stride, "Pooling stride"), pair(pool_pad, "Pooling pad")
        QH, QW = conv_output_size(g.OH, g.OW, ph, pw, ps, pp, where="Pooling")
        if ps != (ph, pw) or pp != (0, 0):
            out, conv_cache = _CONV2D.forward(x, W, b, stride, pad, relu=True)
            out, pool_cache = _MAX_POOL2D.forward(out, ph, pw, ps, pp)
            return out, _Composed(conv_cache, pool_cache)
        dt = np.result_type(x, W, b)
        xpad = _padded(_cnhw(x, dt), g.PH, g.PW)
        Wa = _weights_with_bias(W, b, dt)
        FN, npool, Q = g.FN, ph * pw, QH * QW
        out = np.empty((FN, g.N, QH, QW), dt)
        idx = np.empty((FN, g.N * Q), np.uint8 if npool <= 256 else np.intp) if training else None
        wino = _winograd_weights(W, b, dt) if _winograd_ok(g, (ph, pw), ps, pp) else None

        def body(n0, n1):
            m = (n1 - n0) * Q
            if wino is None:
                col = _cols(xpad, g, (ph, pw), n0, n1)
                z = _scratch("z", FN * npool * m, dt).reshape(FN, npool, m)
                np.matmul(Wa, col, out=z.reshape(FN, npool * m))
                z = z.transpose(1, 0, 2)  # (npool, FN, m): block k = k-th window member
            else:
                z = _winograd_blocks(xpad, *wino, g, n0, n1)
            o = out[:, n0:n1].reshape(FN, m)
            np.copyto(o, z[0])
            if training:
                ix = idx[:, n0 * Q : n1 * Q]
                ix[...] = 0
                gt = _scratch("gt", FN * m, bool).reshape(FN, m)
                hit = _scratch("hitk", FN * m, idx.dtype).reshape(FN, m)
                for k in range(1, npool):  # strictly greater: the first maximum wins, as argmax
                    np.greater(z[k], o, out=gt)
                    # k exceeds every index so far: max(ix, gt*k) sets k exactly where gt
                    # (two plain integer loops; copyto(where=) is several times slower)
                    np.multiply(gt, idx.dtype.type(k), out=hit, dtype=idx.dtype)
                    np.maximum(ix, hit, out=ix)
                    np.maximum(o, z[k], out=o)
            else:
                for k in range(1, npool):
                    np.maximum(o, z[k], out=o)
            np.maximum(o, 0, out=o)  # relu(max(z)) == max(relu(z))

        step = _slice_step(g, (ph, pw), xpad.itemsize) if wino is None else _winograd_step(g, xpad.itemsize)
        _for_slices(g.N, step, body)
        cache = _ConvCache(g, xpad, Wa, out, (ph, pw), idx, dt, tuple(W.shape)) if training else None
        return out.transpose(1, 0, 2, 3), cache

    def backward(self, dout, state, *, need_dx=True):
        """ops.conv2d_relu_max_pool2d_backward for a state of the forward above."""
        if state.composed:
            return _CONV2D.backward(_MAX_POOL2D.backward(dout, state.pool), state.conv, need_dx=need_dx)
        dt = np.result_type(dout, state.dtype)
        return _conv_backward(_cnhw(dout, dt), state, need_dx)


# --------------------------------------------------------------------------- pooling


def _pool_taps(xpad: np.ndarray, ph, pw, SH, SW, OH, OW):
    """The ph*pw strided views (A, B, OH, OW) of a padded (A, B, Hp, Wp) array, one
    per window position, in the reference's order (row-major in the window)."""
    for py in range(ph):
        for px in range(pw):
            yield xpad[:, :, py : py + SH * (OH - 1) + 1 : SH, px : px + SW * (OW - 1) + 1 : SW]


class _PoolCache:
    __slots__ = ("x_shape", "pool", "stride", "pad", "out_hw", "idx", "dtype")

    def __init__(self, x_shape, pool, stride, pad, out_hw, idx, dtype):
        self.x_shape, self.pool, self.stride, self.pad = x_shape, pool, stride, pad
        self.out_hw, self.idx, self.dtype = out_hw, idx, dtype


def _pool_setup(x, pool_h, pool_w, stride, pad, where):
    N, C, H, W = (int(s) for s in x.shape)
    ph, pw = int(pool_h), int(pool_w)
    SH, SW = pair(stride, "stride")
    PH, PW = pair(pad, "pad")
    OH, OW = conv_output_size(H, W, ph, pw, (SH, SW), (PH, PW), where=where)
    return (N, C, H, W), (ph, pw), (SH, SW), (PH, PW), (OH, OW)


@register("numpy", "max_pool2d")
class MaxPool2d:
    """Max pooling over strided taps; reference: :class:`xpconv.ops.MaxPool2d`."""

    def accepts(self, *arrays) -> bool:
        return True

    def forward(self, x, pool_h, pool_w, stride=1, pad=0):
        """ops.max_pool2d_forward: a running maximum over the ph*pw strided taps, and the
        first arg-max as uint8."""
        shape, (ph, pw), (SH, SW), (PH, PW), (OH, OW) = _pool_setup(x, pool_h, pool_w, stride, pad, "Pooling")
        xc = _padded(_cnhw(x, x.dtype), PH, PW, -np.inf)
        taps = _pool_taps(xc, ph, pw, SH, SW, OH, OW)
        out = np.array(next(taps))
        idx = np.zeros(out.shape, np.uint8 if ph * pw <= 256 else np.intp)
        gt = np.empty(out.shape, bool)
        hit = np.empty(out.shape, idx.dtype)
        for k, tap in enumerate(taps, start=1):
            np.greater(tap, out, out=gt)
            np.multiply(gt, idx.dtype.type(k), out=hit, dtype=idx.dtype)  # k > every index so far
            np.maximum(idx, hit, out=idx)
            np.maximum(out, tap, out=out)
        return out.transpose(1, 0, 2, 3), _PoolCache(shape, (ph, pw), (SH, SW), (PH, PW), (OH, OW), idx, x.dtype)

    def backward(self, dout, state):
        """ops.max_pool2d_backward: each window's gradient to its first maximum."""
        N, C, H, W = state.x_shape
        (ph, pw), (SH, SW), (PH, PW), (OH, OW) = state.pool, state.stride, state.pad, state.out_hw
        d = _cnhw(dout, np.result_type(dout, state.dtype))
        dx = np.zeros((C, N, H + 2 * PH, W + 2 * PW), d.dtype)
        hit = np.empty(d.shape, bool)
        part = np.empty(d.shape, d.dtype)
        for k, tap in enumerate(_pool_taps(dx, ph, pw, SH, SW, OH, OW)):
            np.multiply(d, np.equal(state.idx, k, out=hit), out=part)
            tap += part
        return dx[:, :, PH : PH + H, PW : PW + W].transpose(1, 0, 2, 3)


@register("numpy", "avg_pool2d")
class AvgPool2d:
    """Average pooling over strided taps; reference: :class:`xpconv.ops.AvgPool2d`."""

    def accepts(self, *arrays) -> bool:
        return True

    def forward(self, x, pool_h, pool_w, stride=1, pad=0):
        """ops.avg_pool2d_forward (zero padding counted in the window)."""
        shape, (ph, pw), (SH, SW), (PH, PW), (OH, OW) = _pool_setup(x, pool_h, pool_w, stride, pad, "AvgPooling")
        xc = _padded(_cnhw(x, x.dtype), PH, PW, 0.0)
        taps = _pool_taps(xc, ph, pw, SH, SW, OH, OW)
        out = np.array(next(taps))
        for tap in taps:
            out += tap
        out /= ph * pw
        return out.transpose(1, 0, 2, 3), _PoolCache(shape, (ph, pw), (SH, SW), (PH, PW), (OH, OW), None, x.dtype)

    def backward(self, dout, state):
        """ops.avg_pool2d_backward: dout / (ph*pw) added to every tap."""
        N, C, H, W = state.x_shape
        (ph, pw), (SH, SW), (PH, PW), (OH, OW) = state.pool, state.stride, state.pad, state.out_hw
        d = _cnhw(dout, np.result_type(dout, state.dtype)) / (ph * pw)
        dx = np.zeros((C, N, H + 2 * PH, W + 2 * PW), d.dtype)
        for tap in _pool_taps(dx, ph, pw, SH, SW, OH, OW):
            tap += d
        return dx[:, :, PH : PH + H, PW : PW + W].transpose(1, 0, 2, 3)


_CONV2D, _MAX_POOL2D = Conv2d(), MaxPool2d()
