"""Book-compatible layers: ``forward(x)`` / ``backward(dout)``, gradients on
``.dW``/``.db`` (``.dgamma``/``.dbeta``), over any array namespace.

Each layer takes its namespace from the arrays it is given; none of them knows
which library it runs on.  Shapes: N batch, C channels, H/W height/width,
FN/FH/FW filters, OH/OW output.
"""

from __future__ import annotations

from . import ops
from .backend import Generator, asarray_in, device_of, dtype_name, namespace_of

__all__ = [
    "Affine",
    "AvgPooling",
    "BatchNormalization",
    "ConvBlock",
    "Convolution",
    "Dropout",
    "Pooling",
    "Relu",
    "Sigmoid",
    "SoftmaxWithLoss",
    "fuse",
]


def _shape(x) -> tuple:
    return tuple(int(s) for s in x.shape)


def _as_param_dtype(layer: str, x, ref):
    """x converted to the dtype of the layer's parameter ``ref`` (never up to float64
    behind a float32 layer's back)."""
    xp = namespace_of(x, ref)
    if x.dtype == ref.dtype:
        return x
    if not (xp.isdtype(x.dtype, "real floating") or xp.isdtype(x.dtype, "integral") or x.dtype == xp.bool):
        raise TypeError(f"{layer}: expected a real-valued input, got dtype {x.dtype}")
    return xp.astype(x, ref.dtype)


def _check_window_input(layer: str, x, FH: int, FW: int, stride, pad) -> None:
    if len(x.shape) != 4:
        raise ValueError(f"{layer}: expected a 4-D input (N, C, H, W), got shape {_shape(x)}")
    ops.conv_output_size(int(x.shape[2]), int(x.shape[3]), FH, FW, stride, pad, where=layer)


class Convolution:
    """2-D convolution. W: (FN, C, FH, FW), b: (FN,); x (N, C, H, W) -> (N, FN, OH, OW)."""

    def __init__(self, W, b, stride=1, pad=0):
        if len(W.shape) != 4:
            raise ValueError(f"Convolution: expected W of shape (FN, C, FH, FW), got {_shape(W)}")
        if _shape(b) != (int(W.shape[0]),):
            raise ValueError(f"Convolution: expected b of shape (FN,) = ({int(W.shape[0])},), got {_shape(b)}")
        namespace_of(W, b)
        self.W, self.b = W, b
        self.stride = ops.pair(stride, "Convolution stride")
        self.pad = ops.pair(pad, "Convolution pad")
        if min(self.stride) < 1:
            raise ValueError(f"Convolution: stride must be >= 1, got {stride!r}")
        self.dW = None
        self.db = None
        self._cache = None

    def _checked(self, x):
        FN, C, FH, FW = _shape(self.W)
        _check_window_input("Convolution", x, FH, FW, self.stride, self.pad)
        if int(x.shape[1]) != C:
            raise ValueError(f"Convolution: expected input with C={C} channels (N, {C}, H, W), got shape {_shape(x)}")
        return _as_param_dtype("Convolution", x, self.W)

    def forward(self, x):
        out, self._cache = ops.conv2d_forward(self._checked(x), self.W, self.b, self.stride, self.pad)
        return out

    def backward(self, dout, need_dx=True):
        """dL/dx (None when ``need_dx`` is false: a net's first layer skips it); sets .dW, .db."""
        if self._cache is None:
            raise RuntimeError("Convolution: backward() called before forward()")
        dx, self.dW, self.db = ops.conv2d_backward(dout, self._cache, need_dx=need_dx)
        return dx


class _PoolingBase:
    _name = "Pooling"

    def __init__(self, pool_h, pool_w, stride=2, pad=0):
        self.pool_h, self.pool_w = int(pool_h), int(pool_w)
        if self.pool_h < 1 or self.pool_w < 1:
            raise ValueError(f"{self._name}: pool size must be >= 1, got {(pool_h, pool_w)}")
        self.stride = ops.pair(stride, f"{self._name} stride")
        self.pad = ops.pair(pad, f"{self._name} pad")
        if min(self.stride) < 1:
            raise ValueError(f"{self._name}: stride must be >= 1, got {stride!r}")
        self._cache = None

    def forward(self, x):
        _check_window_input(self._name, x, self.pool_h, self.pool_w, self.stride, self.pad)
        out, self._cache = self._fwd(x, self.pool_h, self.pool_w, self.stride, self.pad)
        return out

    def backward(self, dout):
        if self._cache is None:
            raise RuntimeError(f"{self._name}: backward() called before forward()")
        return self._bwd(dout, self._cache)


class Pooling(_PoolingBase):
    """Max pooling over pool_h x pool_w windows, stride 2 unless given (the book's
    default); x (N, C, H, W) -> (N, C, OH, OW)."""

    _name = "Pooling"
    _fwd = staticmethod(ops.max_pool2d_forward)
    _bwd = staticmethod(ops.max_pool2d_backward)


class AvgPooling(_PoolingBase):
    """Average pooling (zero padding counted in the window)."""

    _name = "AvgPooling"
    _fwd = staticmethod(ops.avg_pool2d_forward)
    _bwd = staticmethod(ops.avg_pool2d_backward)


class Affine:
    """Fully connected: W (D, M), b (M,); x (N, D) or (N, C, H, W) with C*H*W = D -> (N, M).
    backward restores the input's original shape."""

    def __init__(self, W, b):
        if len(W.shape) != 2:
            raise ValueError(f"Affine: expected W of shape (D, M), got {_shape(W)}")
        if _shape(b) != (int(W.shape[1]),):
            raise ValueError(f"Affine: expected b of shape (M,) = ({int(W.shape[1])},), got {_shape(b)}")
        namespace_of(W, b)
        self.W, self.b = W, b
        self.x = None
        self.original_x_shape = None
        self.dW = None
        self.db = None

    def forward(self, x):
        xp = namespace_of(x, self.W)
        D = int(self.W.shape[0])
        if len(x.shape) < 2:
            raise ValueError(f"Affine: expected input of shape (N, {D}) or (N, ...) with {D} features, got {_shape(x)}")
        feats = 1
        for s in x.shape[1:]:
            feats *= int(s)
        if feats != D:
            raise ValueError(
                f"Affine: expected {D} features per sample (W is {_shape(self.W)}), "
                f"got input of shape {_shape(x)} with {feats}"
            )
        self.original_x_shape = _shape(x)
        x = _as_param_dtype("Affine", xp.reshape(x, (int(x.shape[0]), D)), self.W)
        self.x = x
        return x @ self.W + self.b

    def backward(self, dout):
        xp = namespace_of(dout)
        dx = dout @ self.W.T
        self.dW = self.x.T @ dout
        self.db = xp.sum(dout, axis=0)
        return xp.reshape(dx, self.original_x_shape)


class Relu:
    def __init__(self):
        self.mask = None

    def forward(self, x):
        xp = namespace_of(x)
        self.mask = xp.astype(x > 0, x.dtype)
        return x * self.mask

    def backward(self, dout):
        return dout * self.mask


class Sigmoid:
    def __init__(self):
        self.out = None

    def forward(self, x):
        xp = namespace_of(x)
        self.out = 1.0 / (1.0 + xp.exp(-x))
        return self.out

    def backward(self, dout):
        return dout * (1.0 - self.out) * self.out


class Dropout:
    """Dropout as in the book: in training each unit is kept with probability
    1 - dropout_ratio; at test time outputs are scaled by 1 - dropout_ratio.
    ``rng`` is a seed or an ``xpconv.backend.Generator`` (masks are reproducible)."""

    def __init__(self, dropout_ratio=0.5, *, rng=None):
        if not 0.0 <= float(dropout_ratio) < 1.0:
            raise ValueError(f"Dropout: dropout_ratio must be in [0, 1), got {dropout_ratio!r}")
        self.dropout_ratio = float(dropout_ratio)
        self.rng = Generator(rng)
        self.mask = None

    def forward(self, x, train_flg=True):
        if train_flg:
            xp = namespace_of(x)
            self.mask = self.rng.dropout_mask(x.shape, self.dropout_ratio, xp=xp, dtype=x.dtype, device=device_of(x))
            return x * self.mask
        return x * (1.0 - self.dropout_ratio)

    def backward(self, dout):
        return dout * self.mask


#: added to the variance before its square root (the book's 10e-7, i.e. 1e-6)
BN_EPS = 10e-7


class BatchNormalization:
    """Batch normalization over the batch axis, per feature (a 4-D input is
    flattened to (N, C*H*W) as in the book). gamma, beta: (D,); epsilon ``BN_EPS``."""

    def __init__(self, gamma, beta, momentum=0.9, running_mean=None, running_var=None):
        if len(gamma.shape) != 1 or _shape(gamma) != _shape(beta):
            raise ValueError(f"BatchNormalization: gamma and beta must be 1-D of one shape, got {_shape(gamma)} and {_shape(beta)}")
        self.gamma, self.beta = gamma, beta
        self.momentum = float(momentum)
        self.input_shape = None
        self.running_mean = running_mean
        self.running_var = running_var
        self.batch_size = None
        self.xc = None
        self.xn = None
        self.std = None
        self.dgamma = None
        self.dbeta = None

    def forward(self, x, train_flg=True):
        xp = namespace_of(x, self.gamma)
        self.input_shape = _shape(x)
        D = int(self.gamma.shape[0])
        feats = 1
        for s in x.shape[1:]:
            feats *= int(s)
        if feats != D:
            raise ValueError(f"BatchNormalization: expected {D} features per sample, got input of shape {_shape(x)}")
        x = _as_param_dtype("BatchNormalization", xp.reshape(x, (int(x.shape[0]), D)), self.gamma)
        if self.running_mean is None:
            self.running_mean = xp.zeros_like(self.gamma)
            self.running_var = xp.zeros_like(self.gamma)
        if train_flg:
            mu = xp.mean(x, axis=0)
            xc = x - mu
            var = xp.mean(xc**2, axis=0)
            std = xp.sqrt(var + BN_EPS)
            xn = xc / std
            self.batch_size = int(x.shape[0])
            self.xc, self.xn, self.std = xc, xn, std
            m = self.momentum
            self.running_mean = m * self.running_mean + (1 - m) * mu
            self.running_var = m * self.running_var + (1 - m) * var
        else:
            xn = (x - self.running_mean) / xp.sqrt(self.running_var + BN_EPS)
        out = self.gamma * xn + self.beta
        return xp.reshape(out, self.input_shape)

    def backward(self, dout):
        xp = namespace_of(dout)
        dout = xp.reshape(dout, (int(dout.shape[0]), -1))
        self.dbeta = xp.sum(dout, axis=0)
        self.dgamma = xp.sum(self.xn * dout, axis=0)
        dxn = self.gamma * dout
        dxc = dxn / self.std
        dstd = -xp.sum((dxn * self.xc) / (self.std * self.std), axis=0)
        dvar = 0.5 * dstd / self.std
        dxc = dxc + (2.0 / self.batch_size) * self.xc * dvar
        dmu = xp.sum(dxc, axis=0)
        dx = dxc - dmu / self.batch_size
        return xp.reshape(dx, self.input_shape)


class SoftmaxWithLoss:
    """Softmax followed by mean cross-entropy (computed through log-softmax). Labels:
    class indices (N,) or (N, 1), or one-hot (N, K). ``forward`` returns the loss as a 0-d array of the input's namespace
    (``float(loss)`` reads it)."""

    def __init__(self):
        self.loss = None
        self.y = None
        self.t = None
        self._t_one_hot = None

    def forward(self, x, t):
        xp = namespace_of(x)
        if len(x.shape) != 2:
            raise ValueError(f"SoftmaxWithLoss: expected scores of shape (N, K), got {_shape(x)}")
        t = label_indices(_labels_in(xp, t, x))
        if int(t.shape[0]) != int(x.shape[0]):
            raise ValueError(f"SoftmaxWithLoss: expected {int(x.shape[0])} labels (one per row of scores), got {int(t.shape[0])}")
        self.t = t
        self._t_one_hot = ops.labels_as_one_hot(t, int(x.shape[1]), x.dtype)
        # through log-softmax: the exact loss whose gradient backward() returns (the book
        # takes -log(y + 1e-7), smaller by about 1e-7 / y of the true class)
        self.loss, self.y = ops.softmax_cross_entropy(x, self._t_one_hot)
        return self.loss

    def backward(self, dout=1):
        N = int(self.y.shape[0])
        return (self.y - self._t_one_hot) * (dout / N)


class ConvBlock:
    """Convolution -> Relu [-> Pooling] of a :class:`~xpconv.models.Sequential` run as
    one fused op (``ops.conv2d_forward(relu=True)`` or
    ``ops.conv2d_relu_maxpool_forward``): the same numbers as the three layers one
    after the other, with fewer passes over memory.  Gradients land on the
    Convolution's ``.dW``/``.db``; the Relu and Pooling layers keep no state."""

    def __init__(self, conv: Convolution, relu: Relu, pool: "Pooling | None" = None):
        self.conv, self.relu, self.pool = conv, relu, pool
        self._cache = None

    def forward(self, x, train_flg=True):
        c, p = self.conv, self.pool
        x = c._checked(x)
        if p is None:
            out, self._cache = ops.conv2d_forward(x, c.W, c.b, c.stride, c.pad, relu=True)
        else:
            out, self._cache = ops.conv2d_relu_maxpool_forward(
                x, c.W, c.b, c.stride, c.pad, p.pool_h, p.pool_w, p.stride, p.pad, training=train_flg
            )
        return out

    def backward(self, dout, need_dx=True):
        if self._cache is None:
            raise RuntimeError("ConvBlock: backward() called before a training forward()")
        back = ops.conv2d_backward if self.pool is None else ops.conv2d_relu_maxpool_backward
        dx, self.conv.dW, self.conv.db = back(dout, self._cache, need_dx=need_dx)
        return dx


def fuse(layers: list) -> list:
    """The steps that run ``layers``: each Convolution followed by Relu (and a max
    Pooling) becomes one :class:`ConvBlock`; every other layer stands alone."""
    steps, i, n = [], 0, len(layers)
    while i < n:
        layer = layers[i]
        if type(layer) is Convolution and i + 1 < n and type(layers[i + 1]) is Relu:
            pool = layers[i + 2] if i + 2 < n and type(layers[i + 2]) is Pooling else None
            steps.append(ConvBlock(layer, layers[i + 1], pool))
            i += 2 if pool is None else 3
        else:
            steps.append(layer)
            i += 1
    return steps


def label_indices(t):
    """Integer labels shaped (N, 1) (the book's chapter 7 gradient check) as (N,)
    class indices; any other labels unchanged."""
    if len(t.shape) == 2 and int(t.shape[1]) == 1:
        xp = namespace_of(t)
        if xp.isdtype(t.dtype, "integral"):
            return xp.reshape(t, (-1,))
    return t


def _labels_in(xp, t, like):
    try:
        same = namespace_of(t) is xp
    except TypeError:
        same = False
    return t if same else asarray_in(t, xp, device=device_of(like))


def describe(layer) -> str:
    """One-line summary of a layer (for model summaries)."""
    name = type(layer).__name__
    if isinstance(layer, Convolution):
        FN, C, FH, FW = _shape(layer.W)
        return f"{name}({C}->{FN}, {FH}x{FW}, stride={layer.stride}, pad={layer.pad}, {dtype_name(layer.W.dtype)})"
    if isinstance(layer, _PoolingBase):
        return f"{name}({layer.pool_h}x{layer.pool_w}, stride={layer.stride}, pad={layer.pad})"
    if isinstance(layer, Affine):
        D, M = _shape(layer.W)
        return f"{name}({D}->{M}, {dtype_name(layer.W.dtype)})"
    if isinstance(layer, Dropout):
        return f"{name}({layer.dropout_ratio})"
    return f"{name}()"
