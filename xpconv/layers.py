"""Book-compatible layers: ``forward(x)`` / ``backward(dout)``, gradients on
``.dW``/``.db`` (``.dgamma``/``.dbeta``), over any array namespace.

Each layer takes its namespace from the arrays it is given; none of them knows
which library it runs on.  Shapes: N batch, C channels, H/W height/width,
FN/FH/FW filters, SH/SW stride, PH/PW pad, OH/OW output.

Every layer follows :class:`xpconv._typing.Layer`: ``forward(x, train_flg=True)``
(layers without a training mode ignore the flag), ``backward(dout)``,
``param_names()`` (the attributes holding its trainable arrays, gradients on
``d<name>``) and ``describe()`` (its one-line summary, also its ``repr``).
The window layers (Convolution, Pooling, AvgPooling, ConvBlock) run the ops of
:mod:`xpconv.ops`; ``impl=`` chooses the implementation as there (None: the
registered kernel for the arrays' namespace, ``"generic"``: the reference).
"""

from __future__ import annotations

from typing import Any

from . import ops
from ._geometry import conv_output_size, pair
from ._typing import Array
from .backend import Generator, asarray_in, device_of, dtype_name, is_numpy_namespace, namespace_of

__all__ = [
    "Affine",
    "AvgPooling",
    "BatchNormalization",
    "ChannelBatchNormalization",
    "ConvBlock",
    "Convolution",
    "Dropout",
    "Pooling",
    "Relu",
    "Sigmoid",
    "SoftmaxWithLoss",
    "LayerBase",
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
    conv_output_size(int(x.shape[2]), int(x.shape[3]), FH, FW, stride, pad, where=layer)


class LayerBase:
    """What every layer here has unless it says otherwise (the protocol is
    :class:`xpconv._typing.Layer`)."""

    #: ``backward(dout, need_dx=False)`` skips dL/dx (a net's first step needs none)
    can_skip_dx = False

    def forward(self, x: Array, train_flg: bool = True) -> Array:
        raise NotImplementedError

    def backward(self, dout: Array) -> Array:
        raise NotImplementedError

    def param_names(self) -> tuple[str, ...]:
        """Attributes holding trainable arrays, in the book's order (gradients on ``d<name>``)."""
        return ()

    def describe(self) -> str:
        """One line for model summaries."""
        return f"{type(self).__name__}()"

    def __repr__(self) -> str:
        return self.describe()


class Convolution(LayerBase):
    """2-D convolution. W: (FN, C, FH, FW), b: (FN,); x (N, C, H, W) -> (N, FN, OH, OW).

    Forward and backward: :func:`xpconv.ops.conv2d_forward` / :func:`~xpconv.ops.conv2d_backward`,
    whose reference is :class:`xpconv.ops.Conv2d`; the fast kernels are the
    ``Conv2d`` classes of ``xpconv/kernels/numpy_ops.py`` and
    ``xpconv/kernels/cupy_ops.py`` (CUDA sources ``xpconv/kernels/conv.cu``).  Inside a
    :class:`~xpconv.models.Sequential`, a Convolution followed by Relu (and max
    Pooling) runs as one :class:`ConvBlock` (``Conv2dReluMaxPool2d`` kernels)."""

    can_skip_dx = True

    def __init__(self, W: Array, b: Array, stride: Any = 1, pad: Any = 0, *, impl: ops.Impl = None):
        if len(W.shape) != 4:
            raise ValueError(f"Convolution: expected W of shape (FN, C, FH, FW), got {_shape(W)}")
        if isinstance(b, (int, float)) and not isinstance(b, bool):  # the book's Convolution(w, 0): one bias for all
            xp = namespace_of(W)
            b = xp.full((int(W.shape[0]),), float(b), dtype=W.dtype, device=device_of(W))
        if _shape(b) != (int(W.shape[0]),):
            raise ValueError(f"Convolution: expected b of shape (FN,) = ({int(W.shape[0])},), got {_shape(b)}")
        namespace_of(W, b)
        self.W, self.b = W, b
        self.stride = pair(stride, "Convolution stride")
        self.pad = pair(pad, "Convolution pad")
        self.impl = impl
        if min(self.stride) < 1:
            raise ValueError(f"Convolution: stride must be >= 1, got {stride!r}")
        self.dW = None
        self.db = None
        self._cache: ops.Cache | None = None

    def _checked(self, x):
        FN, C, FH, FW = _shape(self.W)
        _check_window_input("Convolution", x, FH, FW, self.stride, self.pad)
        if int(x.shape[1]) != C:
            raise ValueError(f"Convolution: expected input with C={C} channels (N, {C}, H, W), got shape {_shape(x)}")
        return _as_param_dtype("Convolution", x, self.W)

    def forward(self, x: Array, train_flg: bool = True) -> Array:
        self._cache = None  # the last pass's state goes before this one's is built
        out, self._cache = ops.conv2d_forward(self._checked(x), self.W, self.b, self.stride, self.pad, impl=self.impl)
        return out

    def backward(self, dout: Array, need_dx: bool = True) -> Array | None:
        """dL/dx (None when ``need_dx`` is false: a net's first layer skips it); sets .dW, .db."""
        if self._cache is None:
            raise RuntimeError("Convolution: backward() called before forward()")
        dx, self.dW, self.db = ops.conv2d_backward(dout, self._cache, need_dx=need_dx)
        return dx

    def param_names(self) -> tuple[str, ...]:
        return ("W", "b")

    def describe(self) -> str:
        FN, C, FH, FW = _shape(self.W)
        return f"Convolution({C}->{FN}, {FH}x{FW}, stride={self.stride}, pad={self.pad}, {dtype_name(self.W.dtype)})"


class _PoolingBase(LayerBase):
    _name = "Pooling"
    _fwd: Any  # the op's forward and backward (set by each subclass)
    _bwd: Any

    def __init__(self, pool_h: int, pool_w: int, stride: Any = 2, pad: Any = 0, *, impl: ops.Impl = None):
        self.pool_h, self.pool_w = pair((pool_h, pool_w), f"{self._name} pool size")
        if self.pool_h < 1 or self.pool_w < 1:
            raise ValueError(f"{self._name}: pool size must be >= 1, got {(pool_h, pool_w)}")
        self.stride = pair(stride, f"{self._name} stride")
        self.pad = pair(pad, f"{self._name} pad")
        self.impl = impl
        if min(self.stride) < 1:
            raise ValueError(f"{self._name}: stride must be >= 1, got {stride!r}")
        if self.pad[0] >= self.pool_h or self.pad[1] >= self.pool_w:  # a window of padding only
            raise ValueError(f"{self._name}: pad must be smaller than the window {(self.pool_h, self.pool_w)}, got {pad!r}")
        self._cache: ops.Cache | None = None

    def forward(self, x: Array, train_flg: bool = True) -> Array:
        _check_window_input(self._name, x, self.pool_h, self.pool_w, self.stride, self.pad)
        self._cache = None  # the last pass's state goes before this one's is built
        out, self._cache = self._fwd(x, self.pool_h, self.pool_w, self.stride, self.pad, impl=self.impl)
        return out

    def backward(self, dout: Array) -> Array:
        if self._cache is None:
            raise RuntimeError(f"{self._name}: backward() called before forward()")
        return self._bwd(dout, self._cache)

    def describe(self) -> str:
        return f"{self._name}({self.pool_h}x{self.pool_w}, stride={self.stride}, pad={self.pad})"


class Pooling(_PoolingBase):
    """Max pooling over pool_h x pool_w windows, stride 2 unless given (the book's
    default); x (N, C, H, W) -> (N, C, OH, OW).
    Ops: :func:`xpconv.ops.max_pool2d_forward`/``_backward`` (reference
    :class:`xpconv.ops.MaxPool2d`; kernels: ``MaxPool2d`` in ``xpconv/kernels/``)."""

    _name = "Pooling"
    _fwd = staticmethod(ops.max_pool2d_forward)
    _bwd = staticmethod(ops.max_pool2d_backward)


class AvgPooling(_PoolingBase):
    """Average pooling (zero padding counted in the window).  Ops:
    :func:`xpconv.ops.avg_pool2d_forward`/``_backward`` (reference :class:`xpconv.ops.AvgPool2d`)."""

    _name = "AvgPooling"
    _fwd = staticmethod(ops.avg_pool2d_forward)
    _bwd = staticmethod(ops.avg_pool2d_backward)


class Affine(LayerBase):
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

    def forward(self, x: Array, train_flg: bool = True) -> Array:
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
        return ops.matmul(x, self.W) + self.b

    def backward(self, dout: Array) -> Array:
        xp = namespace_of(dout)
        dx = ops.matmul(dout, self.W.T)
        self.dW = ops.matmul(self.x.T, dout)
        self.db = xp.sum(dout, axis=0)
        return xp.reshape(dx, self.original_x_shape)

    def param_names(self) -> tuple[str, ...]:
        return ("W", "b")

    def describe(self) -> str:
        D, M = _shape(self.W)
        return f"Affine({D}->{M}, {dtype_name(self.W.dtype)})"


class Relu(LayerBase):
    """max(x, 0) as ``x * (x > 0)``; ``.mask`` is the forward's (x > 0) in x's dtype
    (None after a fused kernel ran: that keeps its own state).  Ops:
    :func:`xpconv.ops.relu_forward`/``_backward`` (one kernel each way on CuPy)."""

    def __init__(self, *, impl: ops.Impl = None):
        self.mask = None
        self.impl = impl
        self._cache: ops.Cache | None = None

    def forward(self, x: Array, train_flg: bool = True) -> Array:
        self._cache = None
        out, self._cache = ops.relu_forward(x, impl=self.impl)
        self.mask = self._cache.state if self._cache.kernel is ops.REFERENCE["relu"] else None
        return out

    def backward(self, dout: Array) -> Array:
        if self._cache is None:
            raise RuntimeError("Relu: backward() called before forward()")
        return ops.relu_backward(dout, self._cache)


class Sigmoid(LayerBase):
    def __init__(self):
        self.out = None

    def forward(self, x: Array, train_flg: bool = True) -> Array:
        xp = namespace_of(x)
        self.out = 1.0 / (1.0 + xp.exp(-x))
        return self.out

    def backward(self, dout: Array) -> Array:
        return dout * (1.0 - self.out) * self.out


class Dropout(LayerBase):
    """Dropout as in the book: in training each unit is kept with probability
    1 - dropout_ratio; at test time outputs are scaled by 1 - dropout_ratio.
    ``rng`` is a seed or an ``xpconv.backend.Generator`` (masks are reproducible)."""

    def __init__(self, dropout_ratio=0.5, *, rng=None):
        if not 0.0 <= float(dropout_ratio) < 1.0:
            raise ValueError(f"Dropout: dropout_ratio must be in [0, 1), got {dropout_ratio!r}")
        self.dropout_ratio = float(dropout_ratio)
        self.rng = Generator(rng)
        self.mask = None

    def forward(self, x: Array, train_flg: bool = True) -> Array:
        if train_flg:
            xp = namespace_of(x)
            self.mask = self.rng.dropout_mask(x.shape, self.dropout_ratio, xp=xp, dtype=x.dtype, device=device_of(x))
            return x * self.mask
        return x * (1.0 - self.dropout_ratio)

    def backward(self, dout: Array) -> Array:
        return dout * self.mask

    def describe(self) -> str:
        return f"Dropout({self.dropout_ratio})"


#: added to the variance before its square root (the book's 10e-7, i.e. 1e-6)
BN_EPS = 10e-7


class BatchNormalization(LayerBase):
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

    def forward(self, x: Array, train_flg: bool = True) -> Array:
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
        if train_flg and int(x.shape[0]) == 0:
            raise ValueError("BatchNormalization: expected a training batch of at least one sample, got N=0")
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

    def backward(self, dout: Array) -> Array:
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

    def param_names(self) -> tuple[str, ...]:
        return ("gamma", "beta")


class ChannelBatchNormalization(BatchNormalization):
    """Batch normalization per channel, for convolutions (PyTorch's ``BatchNorm2d``): over
    an (N, C, H, W) batch each channel is normalized over its N*H*W values, with one gamma
    and beta per channel: (C,). The book's :class:`BatchNormalization` instead normalizes
    each of the C*H*W activations on its own. Same momentum, epsilon and running statistics."""

    def forward(self, x: Array, train_flg: bool = True) -> Array:
        if len(x.shape) != 4:
            raise ValueError(f"ChannelBatchNormalization: expected an (N, C, H, W) batch, got shape {_shape(x)}")
        xp = namespace_of(x, self.gamma)
        N, C, H, W = (int(d) for d in x.shape)
        if int(self.gamma.shape[0]) != C:
            raise ValueError(f"ChannelBatchNormalization: expected {int(self.gamma.shape[0])} channels, got input of shape {_shape(x)}")
        rows = xp.reshape(xp.permute_dims(x, (0, 2, 3, 1)), (N * H * W, C))
        out = super().forward(rows, train_flg)
        return xp.permute_dims(xp.reshape(out, (N, H, W, C)), (0, 3, 1, 2))

    def backward(self, dout: Array) -> Array:
        xp = namespace_of(dout)
        N, C, H, W = (int(d) for d in dout.shape)
        dx = super().backward(xp.reshape(xp.permute_dims(dout, (0, 2, 3, 1)), (N * H * W, C)))
        return xp.permute_dims(xp.reshape(dx, (N, H, W, C)), (0, 3, 1, 2))

    def describe(self) -> str:
        return f"ChannelBatchNormalization({int(self.gamma.shape[0])} channels)"


class SoftmaxWithLoss:
    """Softmax followed by mean cross-entropy (computed through log-softmax). Labels:
    class indices (N,) or (N, 1), or one-hot (N, K). ``forward`` returns the loss as a 0-d array of the input's namespace
    (``float(loss)`` reads it).

    ``check_labels`` says when class indices are range-checked (a ValueError naming
    the range): ``True`` (default, for direct calls) always -- on a device array that
    reads device memory, a sync; ``"host"`` (what the models use) only when the labels
    arrive as host NumPy arrays, which costs no device read -- labels already on a
    device are not read inside the step (the Trainer checks its data once, where it
    enters), and one out of range makes the loss and its gradient row NaN; ``False``
    never.  Ops: :func:`xpconv.ops.softmax_cross_entropy_forward`/``_backward`` (one
    fused kernel each way on CuPy)."""

    def __init__(self, *, check_labels: bool | str = True, impl: ops.Impl = None):
        if check_labels not in (True, False, "host"):
            raise ValueError(f"SoftmaxWithLoss: check_labels must be True, False or 'host', got {check_labels!r}")
        self.check_labels = check_labels
        self.impl = impl
        self.loss = None
        self.y = None
        self.t = None
        self._cache: ops.Cache | None = None

    def forward(self, x, t):
        xp = namespace_of(x)
        if len(x.shape) != 2:
            raise ValueError(f"SoftmaxWithLoss: expected scores of shape (N, K), got {_shape(x)}")
        if int(x.shape[0]) == 0:
            raise ValueError("SoftmaxWithLoss: expected a batch of at least one sample, got N=0 (an empty batch has no mean loss)")
        on_host = _is_host(t)
        t = label_indices(_labels_in(xp, t, x))
        if int(t.shape[0]) != int(x.shape[0]):
            raise ValueError(f"SoftmaxWithLoss: expected {int(x.shape[0])} labels (one per row of scores), got {int(t.shape[0])}")
        K = int(x.shape[1])
        ops.check_label_shape(t, K)
        if len(t.shape) == 1 and (self.check_labels is True or (self.check_labels == "host" and on_host)):
            ops.check_label_range(t, K)
        self.t = t
        if len(t.shape) == 2:
            t = xp.astype(t, x.dtype)
        self._cache = None
        # through log-softmax: the exact loss whose gradient backward() returns (the book
        # takes -log(y + 1e-7), smaller by about 1e-7 / y of the true class)
        self.loss, self.y, self._cache = ops.softmax_cross_entropy_forward(x, t, impl=self.impl)
        return self.loss

    def backward(self, dout=1):
        if self._cache is None:
            raise RuntimeError("SoftmaxWithLoss: backward() called before forward()")
        return ops.softmax_cross_entropy_backward(dout, self._cache)


def _is_host(t) -> bool:
    """Labels that live in host memory (NumPy arrays, lists): reading them costs no device sync."""
    try:
        return is_numpy_namespace(namespace_of(t))
    except TypeError:
        return True


class ConvBlock(LayerBase):
    """Convolution -> Relu [-> Pooling] of a :class:`~xpconv.models.Sequential` run as
    one fused op (:func:`xpconv.ops.conv2d_forward` with ``relu=True``, or
    :func:`xpconv.ops.conv2d_relu_max_pool2d_forward`): the same numbers as the
    three layers one after the other, with fewer passes over memory.  Gradients land
    on the Convolution's ``.dW``/``.db``; the Relu and Pooling layers keep no state.
    The block runs with the Convolution's ``impl``."""

    can_skip_dx = True

    def __init__(self, conv: Convolution, relu: Relu, pool: Pooling | None = None):
        self.conv, self.relu, self.pool = conv, relu, pool
        self._cache: ops.Cache | None = None

    def forward(self, x: Array, train_flg: bool = True) -> Array:
        """The block's output; the state for :meth:`backward` is kept only when
        ``train_flg`` (an inference pass holds no memory after it returns)."""
        c, p = self.conv, self.pool
        x = c._checked(x)
        self._cache = None  # the last pass's state goes before this one's is built
        cache: ops.Cache | None
        if p is None:
            out, cache = ops.conv2d_forward(x, c.W, c.b, c.stride, c.pad, relu=True, impl=c.impl)
        else:
            out, cache = ops.conv2d_relu_max_pool2d_forward(
                x, c.W, c.b, c.stride, c.pad, p.pool_h, p.pool_w, p.stride, p.pad, training=train_flg, impl=c.impl
            )
        if train_flg:
            self._cache = cache
        return out

    def backward(self, dout: Array, need_dx: bool = True) -> Array | None:
        if self._cache is None:
            raise RuntimeError("ConvBlock: backward() called before a training forward()")
        back = ops.conv2d_backward if self.pool is None else ops.conv2d_relu_max_pool2d_backward
        dx, self.conv.dW, self.conv.db = back(dout, self._cache, need_dx=need_dx)
        return dx

    def describe(self) -> str:
        parts = [self.conv.describe(), self.relu.describe()] + ([self.pool.describe()] if self.pool is not None else [])
        return "ConvBlock(" + " -> ".join(parts) + ")"


def fuse(layers: list[Any]) -> list[Any]:
    """The steps that run ``layers``: each Convolution followed by Relu (and a max
    Pooling) becomes one :class:`ConvBlock`; every other layer stands alone.
    :class:`~xpconv.models.Sequential` calls it once, when the model is built."""
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
