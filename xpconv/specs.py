"""Models from layer specs: shapes inferred from the input, weights made by the library.

    >>> from xpconv.specs import Conv, ReLU, MaxPool, Flatten, Dense, build
    >>> net = build([Conv(16, 3, pad=1), ReLU(), MaxPool(2), Flatten(), Dense(10)], input_dim=(1, 28, 28), seed=0)
    >>> print(net.summary())  # doctest: +SKIP

A spec is data: ``spec.to_json()`` is ``{"type": "Conv", "filters": 16, ...}`` and
:func:`from_json` reads it back (only the types listed in :data:`SPECS`; nothing is
imported or executed), which is how a checkpoint carries the architecture of a model built
here (``model.config["layers"]``). Weights: He-normal for Conv and Dense (``std =
sqrt(2 / fan_in)``, or ``init_std``), zero biases, drawn from the host generator seeded by
``seed``, so one seed gives the same weights on every namespace.

Two batch normalizations: :class:`BatchNorm` is the book's, one gamma/beta per activation
(C*H*W after a convolution, D after Dense); :class:`BatchNorm2d` is per channel (PyTorch's
``BatchNorm2d``; ``to_torch`` maps it there) and belongs after a convolution.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from . import layers as L
from . import models
from ._fileformat import short
from ._geometry import conv_output_size, pair
from .backend import zeros
from .models import Sequential, _setup

__all__ = ["SPECS", "AvgPool", "BatchNorm", "BatchNorm2d", "Conv", "Dense", "Dropout", "Flatten", "MaxPool",
           "ReLU", "Sigmoid", "SpecNet", "build", "from_json", "param_shapes"]

#: the most layers a spec list may hold (a checkpoint's list is checked against it)
MAX_LAYERS = 1000
_MAX_UNITS = 1 << 20


def _count(value: Any, what: str, low: int = 1, high: int = _MAX_UNITS) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what}: expected an integer from {low} to {high}, got {short(value)}")
    return int(value)


def _pair_spec(value: Any, what: str, low: int) -> int | list[int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{what}: expected an integer or a pair (h, w), got {short(value)}")
        return [_count(v, what, low) for v in value]
    return _count(value, what, low)


@dataclass(frozen=True)
class _Spec:
    """A layer spec: what to build, not the weights."""

    def to_json(self) -> dict[str, Any]:
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
        return {"type": type(self).__name__, **d}

    def check(self) -> None:  # pragma: no cover - each spec checks its own fields
        pass

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def params(self, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of the trainable arrays, in the layer's ``param_names`` order."""
        return []

    def make(self, shape, init, zero) -> Any:
        raise NotImplementedError

    def __post_init__(self):
        for f in fields(self):  # (h, w) pairs are kept as tuples: specs compare and hash by value
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))
        self.check()


def _image(spec: _Spec, shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ValueError(f"{spec!r}: expected (C, H, W) images from the layer before, got {shape} (a Flatten or Dense came first?)")
    return shape


@dataclass(frozen=True)
class Conv(_Spec):
    """A convolution of ``filters`` filters of ``size`` (an int or (FH, FW))."""

    filters: int
    size: int | tuple[int, int] = 3
    stride: int | tuple[int, int] = 1
    pad: int | tuple[int, int] = 0
    init_std: float | None = None

    def check(self) -> None:
        _count(self.filters, "Conv filters")
        _pair_spec(self.size, "Conv size", 1)
        _pair_spec(self.stride, "Conv stride", 1)
        _pair_spec(self.pad, "Conv pad", 0)
        _check_std(self.init_std, "Conv")

    def out_shape(self, shape):
        C, H, W = _image(self, shape)
        FH, FW = pair(self.size)
        OH, OW = conv_output_size(H, W, FH, FW, self.stride, self.pad, where=repr(self))
        return (self.filters, OH, OW)

    def params(self, shape):
        C = _image(self, shape)[0]
        FH, FW = pair(self.size)
        return [("W", (self.filters, C, FH, FW)), ("b", (self.filters,))]

    def make(self, shape, init, zero):
        (_, w), (_, b) = self.params(shape)
        std = self.init_std if self.init_std is not None else math.sqrt(2.0 / math.prod(w[1:]))
        return L.Convolution(init(w, std), zero(b[0]), self.stride, self.pad)


@dataclass(frozen=True)
class Dense(_Spec):
    """A fully connected layer of ``units`` outputs (the book's Affine; it flattens its input)."""

    units: int
    init_std: float | None = None

    def check(self) -> None:
        _count(self.units, "Dense units")
        _check_std(self.init_std, "Dense")

    def out_shape(self, shape):
        return (self.units,)

    def params(self, shape):
        return [("W", (math.prod(shape), self.units)), ("b", (self.units,))]

    def make(self, shape, init, zero):
        fan_in = math.prod(shape)
        std = self.init_std if self.init_std is not None else math.sqrt(2.0 / fan_in)
        return L.Affine(init((fan_in, self.units), std), zero(self.units))


@dataclass(frozen=True)
class _Pool(_Spec):
    size: int | tuple[int, int] = 2
    stride: int | tuple[int, int] | None = None
    pad: int | tuple[int, int] = 0

    def check(self) -> None:
        _pair_spec(self.size, f"{type(self).__name__} size", 1)
        if self.stride is not None:
            _pair_spec(self.stride, f"{type(self).__name__} stride", 1)
        _pair_spec(self.pad, f"{type(self).__name__} pad", 0)

    def _stride(self):
        return self.size if self.stride is None else self.stride

    def out_shape(self, shape):
        C, H, W = _image(self, shape)
        PH, PW = pair(self.size)
        OH, OW = conv_output_size(H, W, PH, PW, self._stride(), self.pad, where=repr(self))
        return (C, OH, OW)


@dataclass(frozen=True)
class MaxPool(_Pool):
    """Max pooling over ``size`` windows (stride: the size unless given)."""

    def make(self, shape, init, zero):
        PH, PW = pair(self.size)
        return L.Pooling(PH, PW, self._stride(), self.pad)


@dataclass(frozen=True)
class AvgPool(_Pool):
    """Average pooling over ``size`` windows (stride: the size unless given)."""

    def make(self, shape, init, zero):
        PH, PW = pair(self.size)
        return L.AvgPooling(PH, PW, self._stride(), self.pad)


@dataclass(frozen=True)
class ReLU(_Spec):
    """max(0, x)."""

    def make(self, shape, init, zero):
        return L.Relu()


@dataclass(frozen=True)
class Sigmoid(_Spec):
    """1 / (1 + exp(-x))."""

    def make(self, shape, init, zero):
        return L.Sigmoid()


@dataclass(frozen=True)
class Flatten(_Spec):
    """(C, H, W) -> (C*H*W,): no layer of its own (Dense flattens), a row in the summary."""

    def out_shape(self, shape):
        return (math.prod(shape),)

    def make(self, shape, init, zero):
        return None


@dataclass(frozen=True)
class Dropout(_Spec):
    """The book's dropout: units dropped with probability ``ratio`` in training."""

    ratio: float = 0.5

    def check(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"Dropout ratio: expected a number in [0, 1), got {short(self.ratio)}")

    def make(self, shape, init, zero):
        return L.Dropout(self.ratio)


@dataclass(frozen=True)
class BatchNorm(_Spec):
    """The book's batch normalization: one gamma and beta per activation (C*H*W after a
    convolution); after a convolution you usually want :class:`BatchNorm2d`."""

    momentum: float = 0.9

    def check(self) -> None:
        _check_momentum(self.momentum)

    def params(self, shape):
        D = math.prod(shape)
        return [("gamma", (D,)), ("beta", (D,))]

    def make(self, shape, init, zero):
        D = math.prod(shape)
        return L.BatchNormalization(zero(D) + 1.0, zero(D), momentum=self.momentum)


@dataclass(frozen=True)
class BatchNorm2d(_Spec):
    """Per-channel batch normalization after a convolution: one gamma and beta per channel
    (PyTorch's ``BatchNorm2d``)."""

    momentum: float = 0.9

    def check(self) -> None:
        _check_momentum(self.momentum)

    def params(self, shape):
        C = _image(self, shape)[0]
        return [("gamma", (C,)), ("beta", (C,))]

    def make(self, shape, init, zero):
        C = _image(self, shape)[0]
        return L.ChannelBatchNormalization(zero(C) + 1.0, zero(C), momentum=self.momentum)


def _check_std(v: Any, where: str) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < math.inf):
        raise ValueError(f"{where} init_std: expected a positive number or None, got {short(v)}")


def _check_momentum(v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
        raise ValueError(f"BatchNorm momentum: expected a number in [0, 1), got {short(v)}")


#: the spec types a JSON list may name
SPECS: dict[str, type[_Spec]] = {c.__name__: c for c in (Conv, Dense, MaxPool, AvgPool, ReLU, Sigmoid, Flatten, Dropout, BatchNorm, BatchNorm2d)}


def from_json(items: Any) -> list[_Spec]:
    """Specs from their JSON form (a list of ``{"type": ..., field: value}``); unknown types
    or fields and values of the wrong kind are refused by name (ValueError)."""
    if not isinstance(items, list) or not 0 < len(items) <= MAX_LAYERS:
        raise ValueError(f"layers: expected a list of 1 to {MAX_LAYERS} layer specs, got {short(items)}")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or item.get("type") not in SPECS:
            raise ValueError(f"layers[{i}]: expected an object with a type among {', '.join(SPECS)}, got {short(item)}")
        cls = SPECS[item["type"]]
        names = {f.name for f in fields(cls)}
        extra = sorted(set(item) - names - {"type"})
        if extra:
            raise ValueError(f"layers[{i}] ({item['type']}): unknown fields {', '.join(extra)}; expected {', '.join(sorted(names)) or 'none'}")
        try:
            out.append(cls(**{k: v for k, v in item.items() if k != "type"}))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"layers[{i}] ({item['type']}): {exc}") from None
    return out


def _walk(specs: Sequence[_Spec], input_dim: Sequence[int]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(input shape, output shape) of each spec, by arithmetic alone."""
    if not isinstance(input_dim, (list, tuple)):
        raise ValueError(f"input_dim: expected (C, H, W), got {short(input_dim)}")
    shape: tuple[int, ...] = tuple(_count(d, "input_dim", high=1 << 16) for d in input_dim)
    if len(shape) != 3:
        raise ValueError(f"input_dim: expected (C, H, W), got {short(input_dim)}")
    out: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for spec in specs:
        nxt = spec.out_shape(shape)
        out.append((shape, nxt))
        shape = nxt
    if len(shape) != 1:
        raise ValueError(f"the last layer gives {shape} per sample; expected class scores (K,): end with Dense(K)")
    return out


def param_shapes(config: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], bool]]:
    """name -> (shape, required) of a spec model's arrays from its config (``input_dim``,
    ``layers``), by arithmetic alone: what a checkpoint is checked against before a build."""
    specs = from_json(config.get("layers"))
    counts: dict[str, int] = {}
    bn = 0
    out: dict[str, tuple[tuple[int, ...], bool]] = {}
    for spec, (shape, _) in zip(specs, _walk(specs, config.get("input_dim") or ())):
        ps = spec.params(shape)
        if ps:
            k = counts[ps[0][0]] = counts.get(ps[0][0], 0) + 1
            for name, s in ps:
                out[f"{name}{k}"] = (s, True)
        if isinstance(spec, (BatchNorm, BatchNorm2d)):
            bn += 1
            out[f"running_mean{bn}"] = out[f"running_var{bn}"] = (ps[0][1], False)
    return out


class SpecNet(Sequential):
    """A :class:`~xpconv.models.Sequential` built from layer specs (see :func:`build`); its
    ``config`` (``input_dim``, ``layers`` as JSON) rebuilds it, which is what a checkpoint stores."""

    name = "spec"

    def __init__(self, layers, input_dim, *, xp=None, device=None, dtype="float32", seed=0):
        specs = from_json(layers) if layers and isinstance(layers[0], Mapping) else list(layers)
        bad = [s for s in specs if not isinstance(s, _Spec)]
        if bad:
            raise TypeError(f"SpecNet: expected layer specs ({', '.join(SPECS)}), got {short(bad[0])}")
        shapes = _walk(specs, input_dim)
        ns, dt, dn, rng, dev = _setup(xp, device, dtype, seed)

        def init(shape, std):
            return rng.normal(shape, xp=ns, dtype=dn, device=dev, scale=std)

        def zero(n):
            return zeros((n,), xp=ns, dtype=dn, device=dev)

        built = [spec.make(i, init, zero) for spec, (i, _) in zip(specs, shapes)]
        super().__init__([layer for layer in built if layer is not None])
        if ns is not self.xp:  # a model without weights still knows its namespace
            self.xp, self.dtype, self.device = ns, dt, dev
        self.specs = specs
        self._rows = [(spec, i, out) for spec, (i, out) in zip(specs, shapes)]
        self.config = {"input_dim": [int(d) for d in input_dim], "layers": [s.to_json() for s in specs]}

    def summary(self) -> str:
        """A table: each spec, its output shape (per sample; N is the batch) and its
        parameter count; then the total."""
        from .backend import dtype_name

        rows = [("layer", "output shape", "params")]
        counts: dict[str, int] = {}
        total = 0
        C, H, W = self.config["input_dim"]
        rows.append(("input", str((None, C, H, W)), ""))
        for spec, shape, out in self._rows:
            ps = spec.params(shape)
            n = sum(math.prod(s) for _, s in ps)
            total += n
            kind = type(spec).__name__
            counts[kind] = counts.get(kind, 0) + 1
            args = ", ".join(f"{k}={v}" for k, v in spec.to_json().items() if k != "type" and v is not None)
            rows.append((f"{kind}({args})", str((None, *out)), f"{n:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{type(self).__name__} on {self.backend_name} ({dtype_name(self.dtype)})"]
        for k, r in enumerate(rows):
            lines.append(f"  {r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}")
            if k == 0:
                lines.append("  " + "-" * (sum(widths) + 4))
        lines.append(f"  {total:,} parameters")
        return "\n".join(lines)


def build(layers: Sequence[Any], input_dim: Sequence[int], *, xp=None, device=None, dtype="float32", seed=0) -> SpecNet:
    """A model from layer specs (or their JSON form) for (C, H, W) inputs: every shape is
    inferred from ``input_dim``, the weights drawn from ``seed``; ``xp``/``device``/``dtype``
    as for the book's nets. The last spec must give class scores (``Dense(K)``)."""
    return SpecNet(list(layers), input_dim, xp=xp, device=device, dtype=dtype, seed=seed)


# a checkpoint names the model "spec" with this config: rebuilt from the JSON specs alone
models.MODELS["spec"] = SpecNet
models.SHAPE_RULES["spec"] = param_shapes
