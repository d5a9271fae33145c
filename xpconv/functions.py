"""Activation and loss functions under the book's names (``common.functions``), for
arrays of any namespace.

Each function takes its namespace from its argument and returns an array of that
namespace (the losses a 0-d array; ``float()`` reads it).  Numbers follow the book:
``cross_entropy_error`` adds 1e-7 inside the log, ``relu_grad`` is 1 at x == 0, and
``step_function`` returns integers.  One extension: labels shaped (N, 1) hold class
indices (as in the book's chapter 7 gradient check) for any N.
"""

from __future__ import annotations

from . import ops
from .backend import asarray_in, device_of, namespace_of
from .layers import label_indices

__all__ = [
    "cross_entropy_error",
    "identity_function",
    "relu",
    "relu_grad",
    "sigmoid",
    "sigmoid_grad",
    "softmax",
    "softmax_loss",
    "step_function",
    "sum_squared_error",
]


def identity_function(x):
    """x itself."""
    return x


def step_function(x):
    """1 where x > 0, else 0, as int64."""
    xp = namespace_of(x)
    return xp.astype(x > 0, xp.int64)


def sigmoid(x):
    """1 / (1 + exp(-x))."""
    xp = namespace_of(x)
    return 1 / (1 + xp.exp(-x))


def sigmoid_grad(x):
    """Derivative of the sigmoid at x: (1 - sigmoid(x)) * sigmoid(x)."""
    s = sigmoid(x)
    return (1.0 - s) * s


def relu(x):
    """max(0, x) elementwise (x's dtype)."""
    xp = namespace_of(x)
    return xp.where(x > 0, x, xp.zeros_like(x))


def relu_grad(x):
    """1 where x >= 0, else 0 (x's dtype)."""
    xp = namespace_of(x)
    return xp.astype(x >= 0, x.dtype)


def softmax(x):
    """Softmax over the last axis (a 1-D x is one sample)."""
    return ops.softmax(x)


def sum_squared_error(y, t):
    """0.5 * sum((y - t)**2) over every element."""
    xp = namespace_of(y)
    t = _same_namespace(xp, t, y)
    return 0.5 * xp.sum((y - t) ** 2)


def _same_namespace(xp, t, like):
    try:
        same = namespace_of(t) is xp
    except TypeError:
        same = False
    return t if same else asarray_in(t, xp, device=device_of(like))


def cross_entropy_error(y, t):
    """Mean of -log(y[t] + 1e-7) over the batch.  y: probabilities (N, K) or (K,);
    t: class indices (N,) / (N, 1), or one-hot of y's shape.  An empty batch, index
    labels that are not integers or not in 0..K-1 (the book's indexing would wrap a
    negative one and fail on K) raise ValueError/TypeError."""
    xp = namespace_of(y)
    t = _same_namespace(xp, t, y)
    if len(y.shape) == 1:
        y = xp.reshape(y, (1, -1))
        t = xp.reshape(t, (1, -1)) if tuple(t.shape) == (int(y.shape[1]),) else xp.reshape(t, (-1,))
    t = label_indices(t)
    if len(t.shape) == 2 and tuple(t.shape) == tuple(y.shape):
        t = xp.argmax(t, axis=1)
    N, K = int(y.shape[0]), int(y.shape[1])
    if tuple(t.shape) != (N,):
        raise ValueError(f"cross_entropy_error: expected {N} labels of shape ({N},), ({N}, 1) or ({N}, {K}), got {tuple(t.shape)}")
    if N == 0:
        raise ValueError(f"cross_entropy_error: got no samples (y of shape {tuple(y.shape)}); the mean over a batch needs one")
    if not xp.isdtype(t.dtype, "integral"):
        raise TypeError(f"cross_entropy_error: expected integer class indices or one-hot labels of shape {tuple(y.shape)}, "
                        f"got {t.dtype} labels of shape {tuple(t.shape)}")
    low, high = int(xp.min(t)), int(xp.max(t))
    if low < 0 or high >= K:
        raise ValueError(f"cross_entropy_error: expected class indices 0 <= t < {K} (y has {K} classes), got min {low}, max {high}")
    picked = xp.sum(ops.one_hot(t, K, y.dtype) * xp.log(y + 1e-7), axis=1)
    return -xp.sum(picked) / N


def softmax_loss(X, t):
    """cross_entropy_error(softmax(X), t)."""
    return cross_entropy_error(softmax(X), t)
