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
converter there.  The reverse direction, :func:`from_torch`, copies the weights of such a
module (or of its ``state_dict()``, e.g. after training it in PyTorch) back into an xpconv
model of the same architecture, through :data:`FROM_TORCH`: Linear weights transposed
back to Affine's (D, M), BatchNorm1d's weight/bias/running statistics to gamma/beta and
the layer's running mean/variance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import layers as L
from .backend import to_numpy

__all__ = ["FROM_TORCH", "TO_TORCH", "book_dropout", "from_torch", "to_torch"]

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


# --------------------------------------------------------------------------- torch -> xpconv


def _copy(name: str, src: Any, like: Any, *, transpose: bool = False) -> Any:
    """A torch tensor as an array of ``like``'s namespace, dtype and device (shape checked)."""
    from .backend import asarray_in, device_of, namespace_of

    a = src.detach().cpu().numpy()
    if transpose:
        a = a.T
    if tuple(a.shape) != tuple(like.shape):
        raise ValueError(f"from_torch: {name}: expected shape {tuple(like.shape)}, got {tuple(a.shape)}")
    return asarray_in(a.copy(), namespace_of(like), dtype=like.dtype, device=device_of(like))


def _from_convolution(layer: L.Convolution, m: Any, name: str) -> dict:
    return {"W": _copy(f"{name}.weight", m.weight, layer.W), "b": _copy(f"{name}.bias", m.bias, layer.b)}


def _from_affine(layer: L.Affine, m: Any, name: str) -> dict:
    return {"W": _copy(f"{name}.weight", m.weight, layer.W, transpose=True), "b": _copy(f"{name}.bias", m.bias, layer.b)}


def _from_batch_norm(layer: L.BatchNormalization, m: Any, name: str) -> dict:
    out = {"gamma": _copy(f"{name}.weight", m.weight, layer.gamma), "beta": _copy(f"{name}.bias", m.bias, layer.beta)}
    out["running_mean"] = _copy(f"{name}.running_mean", m.running_mean, layer.gamma)
    out["running_var"] = _copy(f"{name}.running_var", m.running_var, layer.gamma)
    return out


#: xpconv layer type -> ``(layer, torch module, module name) -> {attribute: new array}``;
#: layers without weights (pooling, activations, Dropout) have no entry
FROM_TORCH: dict[type, Callable[[Any, Any, str], dict]] = {
    L.Convolution: _from_convolution,
    L.Affine: _from_affine,
    L.BatchNormalization: _from_batch_norm,
}


def _weighted(module: Any) -> list[tuple[str, Any]]:
    """The (name, module) pairs of ``module``'s leaves that hold parameters, in order."""
    return [(n, m) for n, m in module.named_modules() if not list(m.children()) and any(True for _ in m.parameters(recurse=False))]


def from_torch(source: Any, model: Any):
    """Copy weights from PyTorch into ``model`` (an xpconv model of the same
    architecture) and return it.

    ``source``: a ``torch.nn.Module`` whose parameter-holding leaves are, in order, the
    Conv2d / Linear / BatchNorm1d counterparts of the model's Convolution / Affine /
    BatchNormalization layers (what :func:`to_torch` builds), or the ``state_dict()`` of
    such a module.  Every tensor is converted and shape-checked before anything is
    assigned: on an error the model is unchanged."""
    if not hasattr(model, "layers"):
        raise TypeError(f"from_torch: expected an xpconv model with .layers (e.g. SimpleConvNet), got {type(model).__name__}")
    import torch

    if isinstance(source, torch.nn.Module):
        module = source
    elif hasattr(source, "keys"):
        module = to_torch(model)  # the same architecture, then torch checks the keys and shapes
        try:
            module.load_state_dict(source, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"from_torch: the state dict does not fit {type(model).__name__}: {str(exc).splitlines()[0]}") from None
    else:
        raise TypeError(f"from_torch: expected a torch.nn.Module or a state dict, got {type(source).__name__}")
    wanted = [layer for layer in model.layers if type(layer) in FROM_TORCH]
    found = _weighted(module)
    if len(found) != len(wanted):
        raise ValueError(f"from_torch: {type(model).__name__} has {len(wanted)} layers with weights "
                         f"({', '.join(type(x).__name__ for x in wanted)}), the torch module {len(found)} "
                         f"({', '.join(type(m).__name__ for _, m in found)})")
    expect = {L.Convolution: "Conv2d", L.Affine: "Linear", L.BatchNormalization: "BatchNorm1d"}
    updates = []
    with torch.no_grad():
        for layer, (name, m) in zip(wanted, found):
            if type(m).__name__ != expect[type(layer)]:
                raise ValueError(f"from_torch: module {name!r} is a {type(m).__name__}; expected a "
                                 f"{expect[type(layer)]} for the model's {type(layer).__name__}")
            updates.append((layer, FROM_TORCH[type(layer)](layer, m, name)))
    for layer, new in updates:  # all converted: assign
        for attr, value in new.items():
            setattr(layer, attr, value)
    return model
