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


def _channel_batch_norm(layer: L.ChannelBatchNormalization, cx: _Context) -> list:
    C = int(layer.gamma.shape[0])
    m = cx.nn.BatchNorm2d(C, eps=L.BN_EPS, momentum=1.0 - layer.momentum)
    m.weight, m.bias = cx.param(layer.gamma), cx.param(layer.beta)
    if layer.running_mean is not None:
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
    L.ChannelBatchNormalization: _channel_batch_norm,
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


def _pair(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _tensor_problem(t: Any, torch: Any) -> str | None:
    """Why the tensor ``t`` cannot become an xpconv weight, or None when it can: it must
    be a dense tensor of a real floating dtype holding values (not on the meta device)."""
    if t is None:
        return "is None"
    if isinstance(t, torch.nn.parameter.UninitializedParameter):
        return "is uninitialised (a lazy module before its first forward)"
    if not isinstance(t, torch.Tensor):
        return f"is a {type(t).__name__}; expected a torch.Tensor"
    if t.layout != torch.strided:
        return f"is a {t.layout} tensor; expected a dense (strided) one"
    if t.is_meta:
        return "is on the meta device and holds no values; load or materialise the weights first"
    if t.is_complex() or not t.dtype.is_floating_point:
        return f"has dtype {t.dtype}; expected a real floating dtype"
    return None


def _copy(name: str, src: Any, like: Any, *, transpose: bool = False) -> Any:
    """A torch tensor as an array of ``like``'s namespace, dtype and device (checked first:
    dense, real floating, with values; then its shape)."""
    import torch

    from .backend import asarray_in, device_of, namespace_of

    problem = _tensor_problem(src, torch)
    if problem:
        raise ValueError(f"from_torch: {name!r} {problem}")
    t = src.detach()
    if t.dtype not in (torch.float16, torch.float32, torch.float64):  # bfloat16, float8: no NumPy dtype
        t = t.to(torch.float64)
    a = t.cpu().numpy()
    if transpose:
        a = a.T
    if tuple(a.shape) != tuple(like.shape):
        raise ValueError(f"from_torch: {name!r}: expected shape {tuple(like.shape)}, got {tuple(a.shape)}")
    return asarray_in(a.copy(), namespace_of(like), dtype=like.dtype, device=device_of(like))


def _mismatch(name: str, m: Any, key: str, got: Any, layer: Any, want: Any) -> ValueError:
    return ValueError(f"from_torch: module {name!r} ({type(m).__name__}) has {key}={got!r}; the model's "
                      f"{type(layer).__name__} computes {key}={want!r}, so these weights would compute something else")


def _check_settings(layer: Any, m: Any, name: str, settings: dict[str, tuple[Any, Any]]) -> None:
    """``settings``: key -> (the module's value, the value the xpconv layer computes with)."""
    for key, (got, want) in settings.items():
        if got != want:
            raise _mismatch(name, m, key, got, layer, want)


def _conv_padding(m: Any) -> Any:
    """Conv2d's padding as an (h, w) pair; 'valid' is 0, 'same' the symmetric pad it
    stands for (an even kernel's 'same' pads one side more: returned as the string)."""
    if m.padding == "valid":
        return (0, 0)
    if m.padding == "same":
        extra = [d * (k - 1) for d, k in zip(_pair(m.dilation), _pair(m.kernel_size))]
        return tuple(e // 2 for e in extra) if all(e % 2 == 0 for e in extra) else "same"
    return _pair(m.padding)


def _from_convolution(layer: L.Convolution, m: Any, name: str) -> dict:
    if m.bias is None:
        raise ValueError(f"from_torch: module {name!r} (Conv2d) has bias=None (built with bias=False); "
                         f"the model's Convolution adds a bias b of shape {tuple(layer.b.shape)}")
    _check_settings(layer, m, name, {
        "dilation": (_pair(m.dilation), (1, 1)),
        "stride": (_pair(m.stride), tuple(layer.stride)),
        "padding": (_conv_padding(m), tuple(layer.pad)),
        "groups": (m.groups, 1),
        "padding_mode": (m.padding_mode, "zeros"),
    })
    return {"W": _copy(f"{name}.weight", m.weight, layer.W), "b": _copy(f"{name}.bias", m.bias, layer.b)}


def _from_affine(layer: L.Affine, m: Any, name: str) -> dict:
    if m.bias is None:
        raise ValueError(f"from_torch: module {name!r} (Linear) has bias=None (built with bias=False); "
                         f"the model's Affine adds a bias b of shape {tuple(layer.b.shape)}")
    return {"W": _copy(f"{name}.weight", m.weight, layer.W, transpose=True), "b": _copy(f"{name}.bias", m.bias, layer.b)}


def _from_batch_norm(layer: L.BatchNormalization, m: Any, name: str) -> dict:
    for key, value, why in (("weight", m.weight, "affine=False"), ("running_mean", m.running_mean, "track_running_stats=False")):
        if value is None:
            raise ValueError(f"from_torch: module {name!r} (BatchNorm1d) has {key}=None (built with {why}); the "
                             f"model's BatchNormalization has gamma, beta and running statistics")
    _check_settings(layer, m, name, {"eps": (float(m.eps), L.BN_EPS)})
    out = {"gamma": _copy(f"{name}.weight", m.weight, layer.gamma), "beta": _copy(f"{name}.bias", m.bias, layer.beta)}
    out["running_mean"] = _copy(f"{name}.running_mean", m.running_mean, layer.gamma)
    out["running_var"] = _copy(f"{name}.running_var", m.running_var, layer.gamma)
    return out


def _check_pooling(layer: L._PoolingBase, m: Any, name: str) -> None:
    settings = {
        "kernel_size": (_pair(m.kernel_size), (layer.pool_h, layer.pool_w)),
        "stride": (_pair(m.stride if m.stride is not None else m.kernel_size), tuple(layer.stride)),
        "padding": (_pair(m.padding), tuple(layer.pad)),
        "ceil_mode": (bool(m.ceil_mode), False),
    }
    if isinstance(layer, L.AvgPooling):
        settings.update(count_include_pad=(bool(m.count_include_pad), True), divisor_override=(m.divisor_override, None))
    else:
        settings.update(dilation=(_pair(m.dilation), (1, 1)), return_indices=(bool(m.return_indices), False))
    _check_settings(layer, m, name, settings)


#: xpconv layer type -> ``(layer, torch module, module name) -> {attribute: new array}``;
#: layers without weights (pooling, activations, Dropout) have no entry.  Each converter
#: first checks that the module computes what the layer computes (stride, padding,
#: dilation, groups, bias, ...) and refuses it, naming the module and setting, if not.
FROM_TORCH: dict[type, Callable[[Any, Any, str], dict]] = {
    L.Convolution: _from_convolution,
    L.Affine: _from_affine,
    L.BatchNormalization: _from_batch_norm,
}

_FROM_NAMES = {L.Convolution: "Conv2d", L.Affine: "Linear", L.BatchNormalization: "BatchNorm1d"}
_POOL_NAMES = {L.Pooling: "MaxPool2d", L.AvgPooling: "AvgPool2d"}


def _leaves(module: Any) -> list[tuple[str, Any]]:
    return [(n, m) for n, m in module.named_modules() if not list(m.children())]


def _weighted(module: Any) -> list[tuple[str, Any]]:
    """The (name, module) pairs of ``module``'s leaves that hold parameters, or are of a
    type that holds weights (a BatchNorm1d(affine=False) has none: it is refused by name),
    in order."""
    return [(n, m) for n, m in _leaves(module)
            if any(True for _ in m.parameters(recurse=False)) or type(m).__name__ in _FROM_NAMES.values()]


def _pooling(module: Any) -> list[tuple[str, Any]]:
    return [(n, m) for n, m in _leaves(module) if "Pool" in type(m).__name__]


def _check_state_dict(source: Any, reference: Any, model_name: str, torch: Any) -> None:
    """Every key of ``reference.state_dict()`` present in ``source`` and nothing else,
    each value a dense real floating tensor of the same shape (BatchNorm's
    ``num_batches_tracked`` an integer count); else one ValueError naming the key."""
    expected = reference.state_dict()
    try:
        keys = list(source.keys())
    except Exception as exc:
        raise TypeError(f"from_torch: expected a state dict (a mapping of name -> tensor), got {type(source).__name__} "
                        f"whose keys() failed: {type(exc).__name__}") from None
    unexpected = [k for k in keys if k not in expected]
    missing = [k for k in expected if k not in keys]
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(repr(k) for k in missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            shown = ", ".join(repr(k)[:60] for k in unexpected[:5])
            parts.append(f"unexpected {shown}{' ...' if len(unexpected) > 5 else ''}")
        raise ValueError(f"from_torch: the state dict does not fit {model_name}: {'; '.join(parts)} "
                         f"(expected the keys {', '.join(expected)})")
    for key, want in expected.items():
        value = source[key]
        if key.endswith("num_batches_tracked"):
            if not isinstance(value, torch.Tensor) or value.is_floating_point() or value.is_complex() or value.numel() != 1:
                raise ValueError(f"from_torch: the state dict does not fit {model_name}: {key!r} must be an integer "
                                 f"count tensor, got {type(value).__name__}")
            continue
        problem = _tensor_problem(value, torch)
        if problem:
            raise ValueError(f"from_torch: the state dict does not fit {model_name}: {key!r} {problem}")
        if tuple(value.shape) != tuple(want.shape):
            raise ValueError(f"from_torch: the state dict does not fit {model_name}: {key!r}: expected shape "
                             f"{tuple(want.shape)}, got {tuple(value.shape)}")


def from_torch(source: Any, model: Any):
    """Copy weights from PyTorch into ``model`` (an xpconv model of the same
    architecture) and return it.

    ``source``: a ``torch.nn.Module`` whose parameter-holding leaves are, in order, the
    Conv2d / Linear / BatchNorm1d counterparts of the model's Convolution / Affine /
    BatchNormalization layers, and whose pooling leaves the MaxPool2d / AvgPool2d
    counterparts of its Pooling / AvgPooling layers (what :func:`to_torch` builds), or
    the ``state_dict()`` of such a module.  Only what the xpconv layers compute is
    accepted: a module whose settings differ (stride, padding, dilation, groups,
    padding_mode, a missing bias, BatchNorm's eps or statistics, pooling's window,
    ceil_mode, return_indices, ...) or a tensor that is not a dense real floating one
    with values (integer, complex, sparse, meta) is refused with one ValueError naming
    the module or key and the setting.  Every tensor is converted and checked before
    anything is assigned: on an error the model is unchanged."""
    if not hasattr(model, "layers"):
        raise TypeError(f"from_torch: expected an xpconv model with .layers (e.g. SimpleConvNet), got {type(model).__name__}")
    import torch

    model_name = type(model).__name__
    if isinstance(source, torch.nn.Module):
        module = source
    elif hasattr(source, "keys") and hasattr(source, "__getitem__"):
        module = to_torch(model)  # the same architecture: its state dict says which keys and shapes fit
        _check_state_dict(source, module, model_name, torch)
        try:
            with torch.no_grad():
                module.load_state_dict(dict(source.items()), strict=True)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(f"from_torch: the state dict does not fit {model_name}: "
                             f"{' '.join(str(exc).split())[:300]}") from None
    else:
        raise TypeError(f"from_torch: expected a torch.nn.Module or a state dict, got {type(source).__name__}")
    wanted = [layer for layer in model.layers if type(layer) in FROM_TORCH]
    found = _weighted(module)
    if len(found) != len(wanted):
        raise ValueError(f"from_torch: {model_name} has {len(wanted)} layers with weights "
                         f"({', '.join(type(x).__name__ for x in wanted)}), the torch module {len(found)} "
                         f"({', '.join(type(m).__name__ for _, m in found)})")
    pools = [layer for layer in model.layers if type(layer) in _POOL_NAMES]
    found_pools = _pooling(module)
    if len(found_pools) != len(pools):
        raise ValueError(f"from_torch: {model_name} has {len(pools)} pooling layers "
                         f"({', '.join(type(x).__name__ for x in pools) or 'none'}), the torch module {len(found_pools)} "
                         f"({', '.join(f'{n!r} {type(m).__name__}' for n, m in found_pools) or 'none'})")
    for layer, (name, m) in zip(pools, found_pools):
        if type(m).__name__ != _POOL_NAMES[type(layer)]:
            raise ValueError(f"from_torch: module {name!r} is a {type(m).__name__}; expected a "
                             f"{_POOL_NAMES[type(layer)]} for the model's {type(layer).__name__}")
        _check_pooling(layer, m, name)
    updates = []
    with torch.no_grad():
        for layer, (name, m) in zip(wanted, found):
            if type(m).__name__ != _FROM_NAMES[type(layer)]:
                raise ValueError(f"from_torch: module {name!r} is a {type(m).__name__}; expected a "
                                 f"{_FROM_NAMES[type(layer)]} for the model's {type(layer).__name__}")
            updates.append((layer, FROM_TORCH[type(layer)](layer, m, name)))
    for layer, new in updates:  # all converted: assign
        for attr, value in new.items():
            setattr(layer, attr, value)
    return model
