"""Models: a ``Sequential`` container and the book's nets built from it.

Every model takes ``xp=`` (a namespace module or name; default NumPy),
``device=`` and ``dtype=`` (float32 unless asked), draws its initial weights on
the host from ``seed`` (one seed, the same weights on every backend), and exposes
the book's interface: ``params`` (``W1``, ``b1``, ...), ``predict``, ``loss``,
``accuracy``, ``gradient``, ``save_params``/``load_params``, plus ``to()``.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from typing import Any, Iterator, Mapping

from . import layers as L
from .backend import (
    Generator,
    asarray_in,
    zeros,
    device_of,
    dtype_name,
    get_namespace,
    namespace_name,
    resolve_device,
    namespace_of,
    resolve_dtype,
    to_numpy,
)
from .ops import conv_output_size

__all__ = ["Sequential", "SimpleConvNet", "DeepConvNet", "TwoLayerNet", "MODELS", "build_model"]

#: default number of samples per chunk when predicting or evaluating many samples
EVAL_BATCH_SIZE = 500


class ParamDict(MutableMapping):
    """``model.params``: a dict-like view whose entries *are* the layers' arrays.

    Reading ``params['W1']`` returns the first layer's W; assigning to it replaces
    that array in the layer, so optimizers that update in place and ones that
    assign new arrays both work.
    """

    def __init__(self, slots: dict[str, tuple[Any, str]]):
        self._slots = slots

    def __getitem__(self, key):
        layer, attr = self._slots[key]
        return getattr(layer, attr)

    def __setitem__(self, key, value):
        if key not in self._slots:
            raise KeyError(f"unknown parameter {key!r}; this model has {list(self._slots)}")
        layer, attr = self._slots[key]
        old = getattr(layer, attr)
        if tuple(value.shape) != tuple(old.shape):
            raise ValueError(f"parameter {key!r}: expected shape {tuple(old.shape)}, got {tuple(value.shape)}")
        setattr(layer, attr, value)

    def __delitem__(self, key):
        raise TypeError("model parameters cannot be deleted")

    def __iter__(self) -> Iterator[str]:
        return iter(self._slots)

    def __len__(self) -> int:
        return len(self._slots)

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{k!r}: shape {tuple(self[k].shape)}" for k in self) + "}"


class Sequential:
    """A list of layers followed by a loss layer (``SoftmaxWithLoss`` by default).

    Parameters are named in order as in the book: the k-th layer with weights
    (Convolution or Affine) owns ``Wk``/``bk``; the k-th BatchNormalization owns
    ``gammak``/``betak``.
    """

    name = "sequential"

    def __init__(self, layers: list, loss_layer=None, *, eval_batch_size: int = EVAL_BATCH_SIZE):
        self.layers = list(layers)
        self._steps: list = []  # what _forward ran: the layers, with fused blocks
        self.last_layer = loss_layer if loss_layer is not None else L.SoftmaxWithLoss()
        self.eval_batch_size = int(eval_batch_size)
        self.config: dict[str, Any] = {}
        slots: dict[str, tuple[Any, str]] = {}
        k = bn = 0
        for layer in self.layers:
            if isinstance(layer, (L.Convolution, L.Affine)):
                k += 1
                slots[f"W{k}"] = (layer, "W")
                slots[f"b{k}"] = (layer, "b")
            elif isinstance(layer, L.BatchNormalization):
                bn += 1
                slots[f"gamma{bn}"] = (layer, "gamma")
                slots[f"beta{bn}"] = (layer, "beta")
        self._slots = slots
        self.params = ParamDict(slots)
        first = next(iter(slots.values()), None)
        ref = getattr(*first) if first else None
        self.xp = namespace_of(ref) if ref is not None else get_namespace("numpy")
        self.dtype = ref.dtype if ref is not None else self.xp.float32
        self.device = device_of(ref) if ref is not None else None

    # ------------------------------------------------------------------ inputs

    def _input(self, x):
        """x in the model's namespace, device and dtype."""
        try:
            same = namespace_of(x) is self.xp
        except TypeError:
            same = False
        if not same:
            return asarray_in(x, self.xp, dtype=self.dtype, device=self.device)
        if x.dtype != self.dtype:
            return self.xp.astype(x, self.dtype)
        return x

    def _labels(self, t):
        try:
            same = namespace_of(t) is self.xp
        except TypeError:
            same = False
        return t if same else asarray_in(t, self.xp, device=self.device)

    # ------------------------------------------------------------------ book interface

    def predict(self, x, train_flg: bool = False):
        """Scores (N, K) for inputs x. In evaluation mode large inputs stream through
        chunks of ``eval_batch_size`` samples, so memory stays bounded."""
        n = int(x.shape[0])
        if not train_flg and n > self.eval_batch_size:
            outs = [self._forward(self._input(x[i : i + self.eval_batch_size]), False) for i in range(0, n, self.eval_batch_size)]
            return self.xp.concat(outs, axis=0)
        return self._forward(self._input(x), train_flg)

    def _forward(self, x, train_flg: bool):
        # Convolution -> Relu [-> Pooling] runs as one fused step (layers.fuse); the
        # steps are kept for gradient()
        self._steps = L.fuse(self.layers)
        for layer in self._steps:
            if isinstance(layer, (L.Dropout, L.BatchNormalization, L.ConvBlock)):
                x = layer.forward(x, train_flg)
            else:
                x = layer.forward(x)
        return x

    def loss(self, x, t, train_flg: bool = True):
        """Mean loss (a 0-d array; ``float()`` reads it)."""
        y = self._forward(self._input(x), train_flg)
        return self.last_layer.forward(y, self._labels(t))

    def accuracy(self, x, t, batch_size: int = 100) -> float:
        """Fraction of samples classified correctly; runs in chunks of batch_size."""
        n = int(x.shape[0])
        if n == 0:
            raise ValueError("accuracy: got no samples")
        if int(t.shape[0]) != n:
            raise ValueError(f"accuracy: got {n} samples but {int(t.shape[0])} labels")
        batch_size = max(1, int(batch_size))
        correct = 0
        xp = self.xp
        for i in range(0, n, batch_size):
            y = self._forward(self._input(x[i : i + batch_size]), False)
            tt = self._labels(t[i : i + batch_size])
            if len(tt.shape) != 1:
                tt = xp.argmax(tt, axis=1)
            correct += int(xp.sum(xp.astype(xp.argmax(y, axis=1) == tt, xp.int64)))
        return correct / n

    def gradient(self, x, t) -> dict:
        """Gradients of the loss by backpropagation: a dict with the keys of ``params``."""
        self.loss(x, t)
        dout = self.last_layer.backward(1.0)
        steps = self._steps
        for i in range(len(steps) - 1, -1, -1):
            if i == 0 and type(steps[0]) in (L.Convolution, L.ConvBlock):
                steps[0].backward(dout, need_dx=False)  # nobody needs dL/d(input)
            else:
                dout = steps[i].backward(dout)
        grads = {}
        for key, (layer, attr) in self._slots.items():
            grads[key] = getattr(layer, "d" + attr)
        return grads

    # ------------------------------------------------------------------ placement

    def to(self, target, device=None) -> "Sequential":
        """Move every parameter (and BatchNorm statistics) to a namespace
        (module or name) or a device choice ('cpu', 'cuda', 'auto'). Returns self."""
        xp = get_namespace(target)
        dt = resolve_dtype(xp, self.dtype)
        for layer, attr in self._slots.values():
            setattr(layer, attr, asarray_in(getattr(layer, attr), xp, dtype=dt, device=device))
        for layer in self.layers:
            if isinstance(layer, L.BatchNormalization) and layer.running_mean is not None:
                layer.running_mean = asarray_in(layer.running_mean, xp, dtype=dt, device=device)
                layer.running_var = asarray_in(layer.running_var, xp, dtype=dt, device=device)
        first = next(iter(self._slots.values()))
        ref = getattr(*first)
        self.xp, self.dtype, self.device = xp, ref.dtype, device_of(ref)
        return self

    @property
    def backend_name(self) -> str:
        return namespace_name(self.xp)

    # ------------------------------------------------------------------ persistence

    def state_arrays(self) -> dict:
        """Host NumPy copies of the parameters and BatchNorm running statistics."""
        out = {k: to_numpy(v) for k, v in self.params.items()}
        bn = 0
        for layer in self.layers:
            if isinstance(layer, L.BatchNormalization):
                bn += 1
                if layer.running_mean is not None:
                    out[f"running_mean{bn}"] = to_numpy(layer.running_mean)
                    out[f"running_var{bn}"] = to_numpy(layer.running_var)
        return out

    def load_state_arrays(self, arrays: Mapping[str, Any]) -> None:
        """Set parameters from a dict of arrays of any namespace (checked: every key
        present, shapes equal); converted to this model's namespace and dtype."""
        missing = [k for k in self._slots if k not in arrays]
        if missing:
            raise KeyError(f"parameters missing: {missing} (got {sorted(arrays)})")
        for key in self._slots:
            self.params[key] = asarray_in(arrays[key], self.xp, dtype=self.dtype, device=self.device)
        bn = 0
        for layer in self.layers:
            if isinstance(layer, L.BatchNormalization):
                bn += 1
                if f"running_mean{bn}" in arrays:
                    layer.running_mean = asarray_in(arrays[f"running_mean{bn}"], self.xp, dtype=self.dtype, device=self.device)
                    layer.running_var = asarray_in(arrays[f"running_var{bn}"], self.xp, dtype=self.dtype, device=self.device)

    def save_params(self, path="params.pkl") -> None:
        """Write the parameters to ``path`` in xpconv's safe format (safetensors + JSON
        metadata: no code runs on load), whatever the name says; the default is the book's."""
        from .checkpoint import save_params

        save_params(self, path)

    def load_params(self, path_or_dict="params.pkl") -> None:
        """Load parameters from a dict of arrays of any namespace, or from a file
        recognised by its bytes, not its name: xpconv's safetensors files, or the book's
        pickled ``save_params`` files (read by :mod:`xpconv.bookpickle`, whose allow-list
        lets nothing in them run)."""
        if isinstance(path_or_dict, Mapping):
            self.load_state_arrays(path_or_dict)
            return
        from . import bookpickle

        if bookpickle.file_kind(path_or_dict) == "pickle":
            self.load_state_arrays(bookpickle.load_params(path_or_dict))
            return
        from .checkpoint import load_params

        self.load_state_arrays(load_params(path_or_dict))

    def summary(self) -> str:
        lines = [f"{type(self).__name__} on {self.backend_name} ({dtype_name(self.dtype)})"]
        for layer in self.layers:
            lines.append("  " + L.describe(layer))
        n = sum(math.prod(int(s) for s in v.shape) for v in self.params.values())
        lines.append(f"  {n:,} parameters")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


# ---------------------------------------------------------------------- named nets


_DEVICE_CHOICES = ("auto", "cpu", "cuda", "gpu")


def _setup(xp, device, dtype, seed):
    """(namespace, dtype object, dtype name, Generator, device) for a constructor.

    ``device`` alone ('auto', 'cpu', 'cuda') picks the namespace; with ``xp`` given it
    is passed on as that library's device (e.g. torch's 'cuda:0')."""
    choice = device.lower() if isinstance(device, str) else None
    if xp is None and choice in _DEVICE_CHOICES:
        ns, device = resolve_device(choice), None
    else:
        ns = get_namespace(xp)
        if choice is not None and namespace_name(ns) != "torch":
            expected = {"numpy": ("cpu", "auto"), "array_api_strict": ("cpu", "auto"), "cupy": ("cuda", "gpu", "auto")}
            if choice not in expected.get(namespace_name(ns), (choice,)):
                raise ValueError(f"device {device!r} does not fit xp={namespace_name(ns)!r}")
            device = None
    dt = resolve_dtype(ns, dtype)
    return ns, dt, dtype_name(dt), Generator(seed), device


class SimpleConvNet(Sequential):
    """conv - relu - pool(2x2) - affine - relu - affine - softmax (the book's SimpleConvNet)."""

    name = "simple"

    def __init__(
        self,
        input_dim=(1, 28, 28),
        conv_param=None,
        hidden_size=100,
        output_size=10,
        weight_init_std=0.01,
        *,
        xp=None,
        device=None,
        dtype="float32",
        seed=None,
    ):
        conv_param = dict({"filter_num": 30, "filter_size": 5, "pad": 0, "stride": 1}, **(conv_param or {}))
        C, H, W = (int(v) for v in input_dim)
        FN, FS = int(conv_param["filter_num"]), int(conv_param["filter_size"])
        pad, stride = conv_param["pad"], conv_param["stride"]
        OH, OW = conv_output_size(H, W, FS, FS, stride, pad, where="SimpleConvNet")
        PH, PW = OH // 2, OW // 2
        if PH < 1 or PW < 1:
            raise ValueError(f"SimpleConvNet: convolution output {OH}x{OW} is too small for 2x2 pooling")
        pool_output_size = FN * PH * PW
        ns, dt, dn, rng, device = _setup(xp, device, dtype, seed)

        def init(shape, scale):
            return rng.normal(shape, xp=ns, dtype=dn, device=device, scale=scale)

        def zero(n):
            return zeros((n,), xp=ns, dtype=dn, device=device)

        std = float(weight_init_std)
        layers = [
            L.Convolution(init((FN, C, FS, FS), std), zero(FN), stride, pad),
            L.Relu(),
            L.Pooling(2, 2, stride=2),
            L.Affine(init((pool_output_size, hidden_size), std), zero(hidden_size)),
            L.Relu(),
            L.Affine(init((hidden_size, output_size), std), zero(output_size)),
        ]
        super().__init__(layers)
        self.config = {
            "input_dim": [C, H, W],
            "conv_param": {"filter_num": FN, "filter_size": FS, "pad": pad, "stride": stride},
            "hidden_size": int(hidden_size),
            "output_size": int(output_size),
            "weight_init_std": std,
        }


class DeepConvNet(Sequential):
    """The book's DeepConvNet: six 3x3 convolutions (16-16-32-32-64-64, pads
    1,1,1,2,1,1) with ReLU, a 2x2 max-pool after every second one, affine(50) -
    relu - dropout - affine(10) - dropout; He initialization."""

    name = "deep"

    def __init__(
        self,
        input_dim=(1, 28, 28),
        conv_params=None,
        hidden_size=50,
        output_size=10,
        dropout_ratio=0.5,
        *,
        xp=None,
        device=None,
        dtype="float32",
        seed=None,
    ):
        default = [(16, 1), (16, 1), (32, 1), (32, 2), (64, 1), (64, 1)]
        conv_params = conv_params or [{"filter_num": f, "filter_size": 3, "pad": p, "stride": 1} for f, p in default]
        if len(conv_params) != 6:
            raise ValueError(f"DeepConvNet: expected 6 conv_params, got {len(conv_params)}")
        ns, dt, dn, rng, device = _setup(xp, device, dtype, seed)
        C, H, W = (int(v) for v in input_dim)
        layers = []
        for i, cp in enumerate(conv_params):
            FN, FS = int(cp["filter_num"]), int(cp["filter_size"])
            pad, stride = cp.get("pad", 1), cp.get("stride", 1)
            scale = math.sqrt(2.0 / (C * FS * FS))  # He initialization
            Wt = rng.normal((FN, C, FS, FS), xp=ns, dtype=dn, device=device, scale=scale)
            b = zeros((FN,), xp=ns, dtype=dn, device=device)
            layers += [L.Convolution(Wt, b, stride, pad), L.Relu()]
            H, W = conv_output_size(H, W, FS, FS, stride, pad, where=f"DeepConvNet conv{i + 1}")
            C = FN
            if i % 2 == 1:
                layers.append(L.Pooling(2, 2, stride=2))
                H, W = conv_output_size(H, W, 2, 2, 2, 0, where=f"DeepConvNet pool{i // 2 + 1}")
        D = C * H * W
        for fan_in, fan_out, last in ((D, hidden_size, False), (hidden_size, output_size, True)):
            Wt = rng.normal((fan_in, fan_out), xp=ns, dtype=dn, device=device, scale=math.sqrt(2.0 / fan_in))
            b = zeros((fan_out,), xp=ns, dtype=dn, device=device)
            layers.append(L.Affine(Wt, b))
            if not last:
                layers.append(L.Relu())
            layers.append(L.Dropout(dropout_ratio, rng=rng))
        super().__init__(layers)
        self.config = {
            "input_dim": list(input_dim),
            "conv_params": [dict(cp) for cp in conv_params],
            "hidden_size": int(hidden_size),
            "output_size": int(output_size),
            "dropout_ratio": float(dropout_ratio),
        }


class TwoLayerNet(Sequential):
    """affine - relu - affine - softmax (inputs of any shape are flattened)."""

    name = "mlp"

    def __init__(self, input_size, hidden_size, output_size, weight_init_std=0.01, *, xp=None, device=None, dtype="float32", seed=None):
        ns, dt, dn, rng, device = _setup(xp, device, dtype, seed)
        std = float(weight_init_std)
        layers = [
            L.Affine(rng.normal((input_size, hidden_size), xp=ns, dtype=dn, device=device, scale=std),
                     zeros((hidden_size,), xp=ns, dtype=dn, device=device)),
            L.Relu(),
            L.Affine(rng.normal((hidden_size, output_size), xp=ns, dtype=dn, device=device, scale=std),
                     zeros((output_size,), xp=ns, dtype=dn, device=device)),
        ]
        super().__init__(layers)
        self.config = {
            "input_size": int(input_size),
            "hidden_size": int(hidden_size),
            "output_size": int(output_size),
            "weight_init_std": std,
        }


MODELS = {"simple": SimpleConvNet, "deep": DeepConvNet, "mlp": TwoLayerNet}


def build_model(name: str, config: Mapping[str, Any] | None = None, **kwargs) -> Sequential:
    """A named model ('simple', 'deep', 'mlp') from its constructor config."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return MODELS[name](**dict(config or {}), **kwargs)
