"""xpconv models as PyTorch modules.

    from xpconv.models import SimpleConvNet
    from xpconv.interop import to_torch

    net = SimpleConvNet(seed=0)
    module = to_torch(net).eval()            # torch.nn.Sequential, the same weights
    scores = module(torch.from_numpy(x))     # == net.predict(x) up to rounding

:func:`to_torch` walks a :class:`~xpconv.models.Sequential`'s ``layers`` and builds the
``torch.nn`` module of each one with copies of its parameters (the loss layer is left
out: the module returns scores, as ``predict`` does).  torch is imported only when a
function here is called; xpconv does not depend on it.

=================================  ==================================================
xpconv layer                       torch.nn
=================================  ==================================================
``Convolution(W (FN, C, FH, FW))``  ``Conv2d(C, FN, (FH, FW), stride, padding)``
``Pooling`` / ``AvgPooling``        ``MaxPool2d`` / ``AvgPool2d`` (same window, stride, pad)
``Relu`` / ``Sigmoid``              ``ReLU`` / ``Sigmoid``
``Affine(W (D, M))``                ``Flatten`` (before the first one) + ``Linear(D, M)``
                                    with ``weight = W.T``
``Dropout(ratio)``                  ``dropout="exact"``: :func:`book_dropout` (masks
                                    without scaling, scales by 1 - ratio in eval mode,
                                    as the book); ``dropout="inverted"``: ``nn.Dropout``
``BatchNormalization(gamma (D,))``  ``BatchNorm1d(D, eps=BN_EPS, momentum=1 - momentum)``
                                    with the running statistics; for (N, D) inputs
=================================  ==================================================

In evaluation mode (``module.eval()``) the module computes what ``net.predict(x)``
computes.  In training mode the forward differs only in the random draws (Dropout) and,
for BatchNorm, in how torch updates the running variance (unbiased).

The table is :data:`TO_TORCH`, one converter per layer type; a new layer type gets a
converter there (and the reverse direction gets its own table next to it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import layers as L
from .backend import to_numpy

__all__ = ["TO_TORCH", "book_dropout", "to_torch"]

DROPOUT_MODES = ("exact", "inverted")


class _Context:
    """What the converters share while one model is converted."""

    def __init__(self, torch: Any, device: Any, dtype: Any, dropout: str):
        self.torch, self.nn = torch, torch.nn
        self.device, self.dtype, self.dropout = device, dtype, dropout
        self.flat = False  # a Flatten has been placed (every later input is (N, D))
        self.previous: Any = None  # the xpconv layer converted before this one

    def param(self, array) -> Any:
        """An nn.Parameter holding a copy of an xpconv array (any namespace)."""
        t = self.torch.from_numpy(to_numpy(array).copy())
        return self.nn.Parameter(t.to(device=self.device, dtype=self.dtype or t.dtype))

    def buffer(self, array) -> Any:
        t = self.torch.from_numpy(to_numpy(array).copy())
        return t.to(device=self.device, dtype=self.dtype or t.dtype)


def _convolution(layer: L.Convolution, cx: _Context) -> list:
    FN, C, FH, FW = (int(s) for s in layer.W.shape)
    m = cx.nn.Conv2d(C, FN, (FH, FW), stride=tuple(layer.stride), padding=tuple(layer.pad))
    m.weight, m.bias = cx.param(layer.W), cx.param(layer.b)
    return [m]


def _max_pooling(layer: L.Pooling, cx: _Context) -> list:
    return [cx.nn.MaxPool2d((layer.pool_h, layer.pool_w), stride=tuple(layer.stride), padding=tuple(layer.pad))]


def _avg_pooling(layer: L.AvgPooling, cx: _Context) -> list:
    # the book's average pooling divides by the whole window, padding included
    return [cx.nn.AvgPool2d((layer.pool_h, layer.pool_w), stride=tuple(layer.stride), padding=tuple(layer.pad),
                            count_include_pad=True)]


def _relu(layer: L.Relu, cx: _Context) -> list:
    return [cx.nn.ReLU()]


def _sigmoid(layer: L.Sigmoid, cx: _Context) -> list:
    return [cx.nn.Sigmoid()]


def _affine(layer: L.Affine, cx: _Context) -> list:
    D, M = (int(s) for s in layer.W.shape)
    out = []
    if not cx.flat:  # Affine flattens (N, C, H, W) to (N, C*H*W); later inputs are (N, D) already
        out.append(cx.nn.Flatten())
        cx.flat = True
    m = cx.nn.Linear(D, M)
    m.weight, m.bias = cx.param(to_numpy(layer.W).T), cx.param(layer.b)
    return out + [m]


def _dropout(layer: L.Dropout, cx: _Context) -> list:
    if cx.dropout == "inverted":
        return [cx.nn.Dropout(layer.dropout_ratio)]
    return [book_dropout(layer.dropout_ratio)]


def _batch_norm(layer: L.BatchNormalization, cx: _Context) -> list:
    if isinstance(cx.previous, (L.Convolution, L._PoolingBase)):
        raise ValueError("to_torch: BatchNormalization after a convolution or pooling layer (a per-feature norm of "
                         "(N, C, H, W) data) has no torch.nn counterpart; expected it after Affine, on (N, D) data")
    D = int(layer.gamma.shape[0])
    m = cx.nn.BatchNorm1d(D, eps=L.BN_EPS, momentum=1.0 - layer.momentum)
    m.weight, m.bias = cx.param(layer.gamma), cx.param(layer.beta)
    if layer.running_mean is not None:  # an untrained book layer starts both statistics at zero
        m.running_mean, m.running_var = cx.buffer(layer.running_mean), cx.buffer(layer.running_var)
    else:
        m.running_var.zero_()
    return [m.to(device=cx.device, dtype=cx.dtype or m.weight.dtype)]


#: xpconv layer type -> converter ``(layer, context) -> [torch.nn.Module, ...]``
TO_TORCH: dict[type, Callable[[Any, _Context], list]] = {
    L.Convolution: _convolution,
    L.Pooling: _max_pooling,
    L.AvgPooling: _avg_pooling,
    L.Relu: _relu,
    L.Sigmoid: _sigmoid,
    L.Affine: _affine,
    L.Dropout: _dropout,
    L.BatchNormalization: _batch_norm,
}


def _converter(layer) -> Callable[[Any, _Context], list]:
    for cls in type(layer).__mro__:
        if cls in TO_TORCH:
            return TO_TORCH[cls]
    raise ValueError(f"to_torch: no torch.nn counterpart for layer {type(layer).__name__}; "
                     f"expected one of {', '.join(c.__name__ for c in TO_TORCH)}")


def to_torch(model, *, device: Any = "cpu", dtype: Any = None, dropout: str = "exact"):
    """A ``torch.nn.Sequential`` computing ``model``'s scores, with copies of its weights.

    ``model``: an xpconv :class:`~xpconv.models.Sequential` (TwoLayerNet, SimpleConvNet,
    DeepConvNet, ...) on any namespace.  ``device``: torch device of the module
    (default "cpu").  ``dtype``: torch dtype of the parameters (default: the model's).
    ``dropout``: "exact" keeps the book's Dropout (the module's eval output equals
    ``model.predict``); "inverted" uses ``nn.Dropout`` (scaled at training time, what a
    PyTorch user writes; eval scores differ by a factor (1 - ratio) per Dropout layer).
    The module is returned in training mode, as torch builds it; call ``.eval()`` to
    predict."""
    if dropout not in DROPOUT_MODES:
        raise ValueError(f"to_torch: dropout must be one of {DROPOUT_MODES}, got {dropout!r}")
    if not hasattr(model, "layers"):
        raise TypeError(f"to_torch: expected an xpconv model with .layers (e.g. SimpleConvNet), got {type(model).__name__}")
    import torch

    cx = _Context(torch, device, dtype, dropout)
    modules = []
    for layer in model.layers:
        modules += _converter(layer)(layer, cx)
        cx.previous = layer
    return torch.nn.Sequential(*modules).to(device)


_BOOK_DROPOUT: Any = None


def book_dropout(ratio: float):
    """A torch module with the book's Dropout: in training, ``x * mask`` (each unit kept
    with probability 1 - ratio, no rescaling); in eval mode, ``x * (1 - ratio)``."""
    global _BOOK_DROPOUT
    if _BOOK_DROPOUT is None:
        import torch

        class BookDropout(torch.nn.Dropout):
            """nn.Dropout scaled by (1 - p): the book's Dropout in both modes."""

            def forward(self, x):
                return super().forward(x) * (1.0 - self.p)

        _BOOK_DROPOUT = BookDropout
    return _BOOK_DROPOUT(float(ratio))
