"""Models: a ``Sequential`` container and the book's nets built from it.

Every model takes ``xp=`` (a namespace module or name; default NumPy),
``device=`` and ``dtype=`` (float32 unless asked), draws its initial weights on
the host from ``seed`` (one seed, the same weights on every backend), and exposes
the book's interface: ``params`` (``W1``, ``b1``, ...), ``predict``, ``loss``,
``accuracy``, ``gradient``, ``save_params``/``load_params``, plus ``to()``.
"""

from __future__ import annotations

import html
import itertools
import math
import warnings
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from . import _fileformat, bookpickle, kernels
from . import functions as _functions
from . import layers as L
from ._geometry import conv_output_size, pair
from ._typing import Layer
from .backend import (
    Generator,
    asarray_in,
    device_of,
    dtype_name,
    get_namespace,
    library_device,
    namespace_name,
    namespace_of,
    resolve_device,
    resolve_dtype,
    to_numpy,
    zeros,
)
from .gradient import numerical_gradient as _numerical_gradient

__all__ = [
    "MODELS",
    "DeepConvNet",
    "LayerList",
    "MultiLayerNet",
    "MultiLayerNetExtend",
    "Sequential",
    "SigmoidTwoLayerNet",
    "SimpleConvNet",
    "TwoLayerNet",
    "build_model",
    "model_from_checkpoint",
    "model_meta",
]

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


def _param_slots(layers: list[Layer]) -> dict[str, tuple[Any, str]]:
    """Book names -> (layer, attribute): ``<name><k>`` for the k-th layer whose
    ``param_names()`` start with the same name (W1, b1, ..., gamma1, beta1, ...)."""
    slots: dict[str, tuple[Any, str]] = {}
    count: dict[str, int] = {}
    for layer in layers:
        names = layer.param_names() if hasattr(layer, "param_names") else ()  # a user's own layer may have none
        if names:
            k = count[names[0]] = count.get(names[0], 0) + 1
            for attr in names:
                slots[f"{attr}{k}"] = (layer, attr)
    return slots


#: the book's layer names: its prefix for each layer type (numbered per type: Conv1, Relu1, Pool1, ...)
_BOOK_PREFIX = {
    "Convolution": "Conv",
    "Pooling": "Pool",
    "AvgPooling": "AvgPool",
    "BatchNormalization": "BatchNorm",
}


def book_names(layers) -> list[str]:
    """Names for ``layers`` as the book gives them: the type's prefix (``Conv``,
    ``Pool``, ``Affine``, ``Relu``, ``BatchNorm``, ...) and a count per type."""
    counts: dict[str, int] = {}
    names = []
    for layer in layers:
        kind = type(layer).__name__
        prefix = _BOOK_PREFIX.get(kind, kind)
        counts[prefix] = counts.get(prefix, 0) + 1
        names.append(f"{prefix}{counts[prefix]}")
    return names


class LayerList(list):
    """``model.layers``: the layers in running order (a list: iterating yields layers,
    ``layers[0]`` is the first, as in the book's DeepConvNet) that also reads as the
    book's ordered dict: ``layers['Conv1']``, ``.keys()``, ``.values()``, ``.items()``."""

    def __init__(self, layers=(), names=None):
        super().__init__(layers)
        names = book_names(self) if names is None else [str(n) for n in names]
        if len(names) != len(self) or len(set(names)) != len(names):
            raise ValueError(f"LayerList: expected {len(self)} distinct layer names, got {names}")
        self._names = names

    def __getitem__(self, key):
        if isinstance(key, str):
            try:
                return list.__getitem__(self, self._names.index(key))
            except ValueError:
                raise KeyError(f"no layer named {key!r}; the layers are {self._names}") from None
        return list.__getitem__(self, key)

    def __setitem__(self, key, value):
        raise TypeError("model.layers cannot be reassigned item by item: build a new model (its parameters are bound to the layers)")

    def __contains__(self, item) -> bool:
        return item in self._names if isinstance(item, str) else list.__contains__(self, item)

    def keys(self) -> list[str]:
        return list(self._names)

    def values(self) -> list:
        return list(self)

    def items(self) -> list[tuple[str, Any]]:
        return list(zip(self._names, self))

    def get(self, key, default=None):
        return self[key] if key in self._names else default


class Sequential:
    """A list of layers followed by a loss layer (``SoftmaxWithLoss`` by default).

    Parameters are named in order as in the book: the k-th layer with weights
    (Convolution or Affine) owns ``Wk``/``bk``; the k-th BatchNormalization owns
    ``gammak``/``betak`` (each layer lists its own in ``param_names()``).
    ``layers`` is a :class:`LayerList` named by ``names`` (default: the book's
    ``Conv1``, ``Relu1``, ``Pool1``, ``Affine1``, ...); the loss layer is
    ``last_layer`` (also ``lastLayer``, the book's TwoLayerNet name).

    The steps that run are decided once, here: each Convolution -> Relu [-> max
    Pooling] becomes one fused :class:`~xpconv.layers.ConvBlock` (:func:`xpconv.layers.fuse`),
    kept in ``steps``; build a new Sequential rather than editing ``layers``.
    """

    name = "sequential"

    def __init__(self, layers: list[Layer], loss_layer: Any = None, *, names: Any = None, eval_batch_size: int = EVAL_BATCH_SIZE):
        self.layers = LayerList(layers, names)
        self.steps: list[Layer] = L.fuse(list(self.layers))  # what runs: the layers, with fused blocks
        # labels are range-checked where they enter on the host, never read on a device inside a step
        self.last_layer = loss_layer if loss_layer is not None else L.SoftmaxWithLoss(check_labels="host")
        self.eval_batch_size = int(eval_batch_size)
        self.config: dict[str, Any] = {}
        self._slots = slots = _param_slots(self.layers)
        self.params = ParamDict(slots)
        first = next(iter(slots.values()), None)
        ref = getattr(*first) if first else None
        self.xp = namespace_of(ref) if ref is not None else get_namespace("numpy")
        self.dtype = ref.dtype if ref is not None else self.xp.float32
        self.device = device_of(ref) if ref is not None else None

    # ------------------------------------------------------------------ inputs

    def _input(self, x):
        """x in the model's namespace, device and dtype."""
        if str(getattr(x, "dtype", "")).rsplit(".", 1)[-1] == "uint8":
            warnings.warn(
                f"{type(self).__name__}: got a uint8 image batch (values 0..255); the model expects floats in [0, 1]: "
                "divide by 255 first (load_mnist(normalize=True) does)",
                UserWarning,
                stacklevel=3,
            )
        self._check_layout(x)
        try:
            same = namespace_of(x) is self.xp
        except TypeError:
            same = False
        if not same:
            return asarray_in(x, self.xp, dtype=self.dtype, device=self.device)
        if x.dtype != self.dtype:
            return self.xp.astype(x, self.dtype)
        return x

    def _check_layout(self, x) -> None:
        """A channels-last batch (N, H, W, C) into a model whose first layer is a
        convolution over C channels is named for what it is, with the transpose that fixes it."""
        first = self.layers[0] if len(self.layers) else None
        W = getattr(first, "W", None)
        shape = tuple(int(d) for d in getattr(x, "shape", ()))
        if W is None or len(W.shape) != 4 or len(shape) != 4:
            return
        C = int(W.shape[1])
        if shape[1] != C and shape[3] == C:
            raise ValueError(
                f"{type(self).__name__}: got a batch of shape {shape}, channels last (N, H, W, C); the model takes "
                f"channels first (N, C, H, W) with C={C}: pass x.transpose(0, 3, 1, 2) (NumPy), "
                f"x.permute(0, 3, 1, 2) (PyTorch), or the namespace's permute_dims(x, (0, 3, 1, 2))"
            )

    def _array(self, x, where: str):
        """x itself when it is an array; a (nested) list or tuple converted to the model's
        namespace; anything else a TypeError naming ``where``."""
        if hasattr(x, "shape"):
            return x
        if isinstance(x, (list, tuple)):
            return asarray_in(x, self.xp, device=self.device)
        raise TypeError(f"{where}: expected an array of shape (N, ...) or a nested list, got {type(x).__name__}")

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
        x = self._array(x, "predict")
        n = int(x.shape[0])
        with self._scope():
            if not train_flg and n > self.eval_batch_size:
                outs = [self._forward(self._input(x[i : min(i + self.eval_batch_size, n), ...]), False) for i in range(0, n, self.eval_batch_size)]
                return self.xp.concat(outs, axis=0)
            return self._forward(self._input(x), train_flg)

    def _scope(self):
        """What the kernels of the model's namespace want around a pass
        (:func:`xpconv.kernels.step_scope`; e.g. the Numba kernels' thread setting)."""
        return kernels.step_scope(namespace_name(self.xp))

    def _forward(self, x, train_flg: bool):
        for step in self.steps:
            x = step.forward(x, train_flg)
        return x

    def loss(self, x, t, train_flg: bool = True):
        """Mean loss (a 0-d array; ``float()`` reads it)."""
        with self._scope():
            y = self._forward(self._input(x), train_flg)
        # SoftmaxWithLoss moves labels itself, after checking host ones (no device read)
        return self.last_layer.forward(y, t if isinstance(self.last_layer, L.SoftmaxWithLoss) else self._labels(t))

    def accuracy(self, x, t, batch_size: int = 100) -> float:
        """Fraction of samples classified correctly; runs in chunks of batch_size."""
        x, t = self._array(x, "accuracy"), self._array(t, "accuracy labels")
        n = int(x.shape[0])
        if n == 0:
            raise ValueError("accuracy: got no samples")
        if int(t.shape[0]) != n:
            raise ValueError(f"accuracy: got {n} samples but {int(t.shape[0])} labels")
        batch_size = max(1, int(batch_size))
        correct = 0
        xp = self.xp
        for i in range(0, n, batch_size):
            with self._scope():
                y = self._forward(self._input(x[i : min(i + batch_size, n), ...]), False)
            tt = L.label_indices(self._labels(t[i : min(i + batch_size, n), ...]))
            if len(tt.shape) != 1:
                tt = xp.argmax(tt, axis=1)
            elif bool(xp.any((tt < 0) | (tt >= int(y.shape[1])))):
                raise ValueError(f"accuracy: expected labels 0 <= t < {int(y.shape[1])}, got min {int(xp.min(tt))}, max {int(xp.max(tt))}")
            correct += int(xp.sum(xp.astype(xp.argmax(y, axis=1) == tt, xp.int64)))
        return correct / n

    def evaluate(self, x, t, batch_size: int | None = None) -> dict[str, float]:
        """``{"loss": ..., "accuracy": ..., "samples": N}`` over all of ``x`` in inference mode
        (Dropout off, BatchNorm's running statistics used and left unchanged), in chunks of
        ``batch_size`` samples (default ``eval_batch_size``), so memory stays bounded. The
        loss is the sample-weighted mean of the model's ``loss(x, t, train_flg=False)``.

        The book's ``loss(x, t)`` keeps the book's default (for most models training mode,
        as the gradient needs it); use ``evaluate`` to score a model."""
        x, t = self._array(x, "evaluate"), self._array(t, "evaluate labels")
        n = int(x.shape[0])
        if n == 0:
            raise ValueError("evaluate: got no samples")
        if int(t.shape[0]) != n:
            raise ValueError(f"evaluate: got {n} samples but {int(t.shape[0])} labels")
        batch_size = max(1, int(batch_size if batch_size is not None else self.eval_batch_size))
        total = 0.0
        for i in range(0, n, batch_size):
            xb, tb = x[i : min(i + batch_size, n), ...], t[i : min(i + batch_size, n), ...]
            total += float(self.loss(xb, tb, train_flg=False)) * int(xb.shape[0])
        return {"loss": total / n, "accuracy": self.accuracy(x, t, batch_size=batch_size), "samples": n}

    def gradient(self, x, t) -> dict:
        """Gradients of the loss by backpropagation: a dict with the keys of ``params``."""
        with self._scope():
            self._backprop_loss(x, t)
            dout = self.last_layer.backward(1.0)
            steps = self.steps
            for i in range(len(steps) - 1, -1, -1):
                if i == 0 and getattr(steps[0], "can_skip_dx", False):
                    steps[0].backward(dout, need_dx=False)  # type: ignore[call-arg]  # can_skip_dx: it takes need_dx; nobody needs dL/d(input)
                else:
                    dout = steps[i].backward(dout)
        grads = {}
        for key, (layer, attr) in self._slots.items():
            grads[key] = getattr(layer, "d" + attr)
        return grads

    def _backprop_loss(self, x, t):
        """The forward pass that ``gradient`` differentiates: ``loss`` in training mode,
        through ``last_layer`` (whose ``backward`` starts backpropagation)."""
        return self.loss(x, t, train_flg=True)

    @property
    def lastLayer(self):  # the book's TwoLayerNet spells it so
        return self.last_layer

    @lastLayer.setter
    def lastLayer(self, layer):
        self.last_layer = layer

    def numerical_gradient(self, x, t) -> dict:
        """Gradients of the loss by central differences (h = 1e-4, the book's
        ``numerical_gradient``), a dict with the keys of ``params``.  Slow: two
        forward passes per parameter element; for checking ``gradient`` on tiny nets
        in float64."""
        x, t = self._input(x), self._labels(t)

        def f(_):
            return self.loss(x, t, train_flg=True)

        return {key: _numerical_gradient(f, self.params[key]) for key in self.params}

    # ------------------------------------------------------------------ placement

    def to(self, target, device=None) -> Sequential:
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

    def expected_arrays(self) -> dict[str, tuple[tuple[int, ...], bool]]:
        """name -> (shape, required) of what :meth:`load_state_arrays` takes: the
        parameters (required) and BatchNorm running statistics (optional)."""
        out = {k: (tuple(int(d) for d in v.shape), True) for k, v in self.params.items()}
        bn = 0
        for layer in self.layers:
            if isinstance(layer, L.BatchNormalization):
                bn += 1
                shape = tuple(int(d) for d in layer.gamma.shape)
                out[f"running_mean{bn}"] = out[f"running_var{bn}"] = (shape, False)
        return out

    def load_state_arrays(self, arrays: Mapping[str, Any]) -> None:
        """Set parameters from a dict of arrays of any namespace. All or nothing: every
        parameter must be present with this model's shape and a floating dtype (another
        float kind is converted, said once in a warning; an integer array is refused),
        else ValueError naming the array, and the model is left as it was."""
        plan = check_arrays(self.expected_arrays(), {k: (dtype_name(a.dtype), tuple(int(d) for d in a.shape)) for k, a in arrays.items()})
        converted = {k: asarray_in(arrays[k], self.xp, dtype=self.dtype, device=self.device) for k in plan}
        _say_conversion({k: dtype_name(arrays[k].dtype) for k in plan}, dtype_name(self.dtype))
        for key in self._slots:
            self.params[key] = converted[key]
        bn = 0
        for layer in self.layers:
            if isinstance(layer, L.BatchNormalization):
                bn += 1
                if f"running_mean{bn}" in converted:
                    layer.running_mean = converted[f"running_mean{bn}"]
                    layer.running_var = converted[f"running_var{bn}"]

    def save_params(self, path="params.pkl") -> Path:
        """Write the parameters (host copies, BatchNorm statistics included) and the
        model's name and config to ``path`` in xpconv's safetensors format, whatever the
        name says (the default is the book's): no code runs when it is loaded. Returns the path."""
        arrays = self.state_arrays()
        return _fileformat.write_file(
            path,
            {_fileformat.MODEL_PREFIX + k: v for k, v in arrays.items()},
            {"kind": "params", "model": model_meta(self)},
        )

    def load_params(self, path_or_dict="params.pkl") -> None:
        """Load parameters from a file written by ``save_params`` or ``save_checkpoint``
        (or a plain safetensors file of named arrays), or from a dict of arrays of any
        namespace. Files are recognised by their bytes, not their names: the book's
        pickled ``save_params`` files load through :mod:`xpconv.bookpickle` (an allow-list
        unpickler that lets nothing in them run). A safetensors file's header is checked against this model's shapes before any
        tensor is read; loading is all or nothing. A file that is not safetensors (a
        pickle) or does not fit raises CheckpointError."""
        if isinstance(path_or_dict, Mapping):
            self.load_state_arrays(path_or_dict)
            return
        if bookpickle.file_kind(path_or_dict) == "pickle":
            self.load_state_arrays(bookpickle.load_params(path_or_dict))
            return
        stored = _fileformat.open_file(path_or_dict)
        index = stored_model_index(stored)
        try:
            keys = check_arrays(self.expected_arrays(), index)
            arrays = stored.read(stored_keys(stored, keys))
            self.load_state_arrays(model_part(stored, arrays))
        except ValueError as exc:
            raise _fileformat.CheckpointError(f"{stored.path}: {exc}") from None

    def summary(self) -> str:
        lines = [f"{type(self).__name__} on {self.backend_name} ({dtype_name(self.dtype)})"]
        for layer in self.layers:
            lines.append("  " + (layer.describe() if hasattr(layer, "describe") else type(layer).__name__ + "()"))
        n = sum(math.prod(int(s) for s in v.shape) for v in self.params.values())
        lines.append(f"  {n:,} parameters")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    def _repr_html_(self) -> str:
        """The summary as Jupyter shows a model that ends a cell (monospaced, escaped)."""
        return "<pre>" + html.escape(self.summary()) + "</pre>"


# ---------------------------------------------------------------------- named nets


_DEVICE_CHOICES = ("auto", "cpu", "cuda", "gpu")


def _setup(xp, device, dtype, seed):
    """(namespace, dtype object, dtype name, Generator, device) for a constructor.

    ``device`` alone ('auto', 'cpu', 'cuda') picks the namespace; with ``xp`` given it
    becomes that library's device (``backend.library_device``: torch's 'cuda:0', a
    JAX device)."""
    choice = device.lower() if isinstance(device, str) else None
    if xp is None and choice in _DEVICE_CHOICES:
        ns, device = resolve_device(choice), None
    else:
        ns = get_namespace(xp)
        device = library_device(ns, device)
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


#: (filter_num, pad) of the book's six DeepConvNet convolutions (3x3, stride 1)
DEEP_CONV_DEFAULTS = ((16, 1), (16, 1), (32, 1), (32, 2), (64, 1), (64, 1))


class DeepConvNet(Sequential):
    """The book's DeepConvNet: six 3x3 convolutions (16-16-32-32-64-64, pads
    1,1,1,2,1,1) with ReLU, a 2x2 max-pool after every second one, affine(50) -
    relu - dropout - affine(10) - dropout; He initialization.

    ``conv_param_1`` ... ``conv_param_6`` are the book's dicts (filter_num,
    filter_size, pad, stride); keyword-only, xpconv adds ``conv_params`` (the six as
    one list, used instead when given), ``dropout_ratio`` (the book: 0.5), ``xp``,
    ``device``, ``dtype`` and ``seed``."""

    name = "deep"

    def __init__(
        self,
        input_dim=(1, 28, 28),
        conv_param_1=None,
        conv_param_2=None,
        conv_param_3=None,
        conv_param_4=None,
        conv_param_5=None,
        conv_param_6=None,
        hidden_size=50,
        output_size=10,
        *,
        conv_params=None,
        dropout_ratio=0.5,
        xp=None,
        device=None,
        dtype="float32",
        seed=None,
    ):
        given = (conv_param_1, conv_param_2, conv_param_3, conv_param_4, conv_param_5, conv_param_6)
        if conv_params is not None and any(cp is not None for cp in given):
            raise ValueError("DeepConvNet: expected conv_param_1..conv_param_6 or conv_params, got both")
        default = [{"filter_num": f, "filter_size": 3, "pad": p, "stride": 1} for f, p in DEEP_CONV_DEFAULTS]
        if conv_params is None:
            conv_params = [default[i] if cp is None else cp for i, cp in enumerate(given)]
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


def _two_layers(net: Sequential, activation, input_size, hidden_size, output_size, weight_init_std, xp, device, dtype, seed) -> None:
    """Build ``net`` as affine - ``activation`` - affine: weights ``weight_init_std`` times
    standard normal draws of the seeded host generator, biases zero (chapters 4 and 5)."""
    ns, _, dn, rng, device = _setup(xp, device, dtype, seed)
    std = float(weight_init_std)
    Sequential.__init__(net, [
        L.Affine(rng.normal((input_size, hidden_size), xp=ns, dtype=dn, device=device, scale=std),
                 zeros((hidden_size,), xp=ns, dtype=dn, device=device)),
        activation,
        L.Affine(rng.normal((hidden_size, output_size), xp=ns, dtype=dn, device=device, scale=std),
                 zeros((output_size,), xp=ns, dtype=dn, device=device)),
    ])
    net.config = {
        "input_size": int(input_size),
        "hidden_size": int(hidden_size),
        "output_size": int(output_size),
        "weight_init_std": std,
    }


class TwoLayerNet(Sequential):
    """affine - relu - affine - softmax (inputs of any shape are flattened)."""

    name = "mlp"

    def __init__(self, input_size, hidden_size, output_size, weight_init_std=0.01, *, xp=None, device=None, dtype="float32", seed=None):
        _two_layers(self, L.Relu(), input_size, hidden_size, output_size, weight_init_std, xp, device, dtype, seed)


class SigmoidTwoLayerNet(Sequential):
    """The book's chapter 4 ``TwoLayerNet``: affine - sigmoid - affine - softmax, for
    ``from two_layer_net import TwoLayerNet`` in ``ch04`` (chapter 5's ReLU net of the
    same name is :class:`TwoLayerNet`).  As in chapter 4, ``predict`` returns the softmax
    probabilities (not scores) and ``loss`` is ``cross_entropy_error(predict(x), t)``
    with the book's ``-log(y + 1e-7)`` (:func:`xpconv.functions.cross_entropy_error`);
    ``numerical_gradient`` differentiates that loss by central differences and
    ``gradient`` backpropagates ``(y - t) / N`` through the sigmoid, chapter 4's analytic
    formula.  Labels may be one-hot (the book's) or class indices.  Keyword-only, xpconv
    adds ``xp``, ``device``, ``dtype`` (float32 unless asked) and ``seed``; weights are
    ``weight_init_std`` times standard normal draws, biases zero."""

    name = "sigmoid_two_layer"

    def __init__(self, input_size, hidden_size, output_size, weight_init_std=0.01, *, xp=None, device=None, dtype="float32", seed=None):
        _two_layers(self, L.Sigmoid(), input_size, hidden_size, output_size, weight_init_std, xp, device, dtype, seed)

    def predict(self, x, train_flg: bool = False):
        """Softmax probabilities (N, K) for inputs x (chapter 4's predict)."""
        return _functions.softmax(super().predict(x, train_flg))

    def loss(self, x, t, train_flg: bool = False):
        """``cross_entropy_error(predict(x), t)``, the book's formula (a 0-d array)."""
        return _functions.cross_entropy_error(self.predict(x, train_flg), self._labels(t))

    def _backprop_loss(self, x, t):
        # the scores go through SoftmaxWithLoss, whose backward is chapter 4's (y - t) / N
        return Sequential.loss(self, x, t, train_flg=True)


def _init_scale(weight_init_std, fan_in: int) -> float:
    """The book's weight_init_std: 'relu'/'he' -> sqrt(2/fan_in), 'sigmoid'/'xavier' ->
    sqrt(1/fan_in), a number -> itself."""
    kind = str(weight_init_std).lower()
    if kind in ("relu", "he"):
        return math.sqrt(2.0 / fan_in)
    if kind in ("sigmoid", "xavier"):
        return math.sqrt(1.0 / fan_in)
    try:
        return float(weight_init_std)
    except (TypeError, ValueError):
        raise ValueError(f"weight_init_std: expected a number or 'relu'/'he'/'sigmoid'/'xavier', got {weight_init_std!r}") from None


class MultiLayerNet(Sequential):
    """The book's fully connected net: (affine - activation) per hidden size in
    ``hidden_size_list``, then affine - softmax.  ``activation`` is 'relu' or 'sigmoid';
    ``weight_init_std`` a number or 'relu'/'he' (He) or 'sigmoid'/'xavier' (Xavier);
    ``weight_decay_lambda`` adds 0.5*lambda*sum(W**2) over every affine W to the loss
    (and lambda*W to its gradient).  Layers are named Affine1, Activation_function1, ...
    Keyword-only, xpconv adds ``xp``, ``device``, ``dtype`` and ``seed``."""

    name = "multi_layer"

    def __init__(self, input_size, hidden_size_list, output_size, activation="relu", weight_init_std="relu",
                 weight_decay_lambda=0, *, xp=None, device=None, dtype="float32", seed=None):
        self._build(input_size, hidden_size_list, output_size, activation, weight_init_std, weight_decay_lambda,
                    False, 0.5, False, xp, device, dtype, seed)

    def _build(self, input_size, hidden_size_list, output_size, activation, weight_init_std, weight_decay_lambda,
               use_dropout, dropout_ration, use_batchnorm, xp, device, dtype, seed):
        kinds = {"relu": L.Relu, "sigmoid": L.Sigmoid}
        if activation not in kinds:
            raise ValueError(f"{type(self).__name__}: activation must be 'relu' or 'sigmoid', got {activation!r}")
        ns, _, dn, rng, device = _setup(xp, device, dtype, seed)
        hidden = [int(h) for h in hidden_size_list]
        sizes = [int(input_size)] + hidden + [int(output_size)]
        affines = []
        for fan_in, fan_out in itertools.pairwise(sizes):
            W = rng.normal((fan_in, fan_out), xp=ns, dtype=dn, device=device, scale=_init_scale(weight_init_std, fan_in))
            affines.append(L.Affine(W, zeros((fan_out,), xp=ns, dtype=dn, device=device)))
        layers, names = [], []
        for k, size in enumerate(hidden, start=1):
            layers.append(affines[k - 1])
            names.append(f"Affine{k}")
            if use_batchnorm:
                gamma = zeros((size,), xp=ns, dtype=dn, device=device) + 1
                layers.append(L.BatchNormalization(gamma, zeros((size,), xp=ns, dtype=dn, device=device)))
                names.append(f"BatchNorm{k}")
            layers.append(kinds[activation]())
            names.append(f"Activation_function{k}")
            if use_dropout:
                layers.append(L.Dropout(dropout_ration, rng=rng))
                names.append(f"Dropout{k}")
        layers.append(affines[-1])
        names.append(f"Affine{len(hidden) + 1}")
        super().__init__(layers, names=names)
        self.input_size, self.output_size = int(input_size), int(output_size)
        self.hidden_size_list = hidden
        self.hidden_layer_num = len(hidden)
        self.weight_decay_lambda = weight_decay_lambda
        self.config = {
            "input_size": int(input_size),
            "hidden_size_list": hidden,
            "output_size": int(output_size),
            "activation": activation,
            "weight_init_std": weight_init_std,
            "weight_decay_lambda": float(weight_decay_lambda),
        }

    def _weight_keys(self) -> list[str]:
        return [f"W{k}" for k in range(1, self.hidden_layer_num + 2)]

    def loss(self, x, t, train_flg: bool = True):
        """Mean cross-entropy plus 0.5*weight_decay_lambda*sum(W**2) over the affine weights."""
        out = super().loss(x, t, train_flg)
        lam = self.weight_decay_lambda
        if lam:
            xp = self.xp
            decay = 0
            for key in self._weight_keys():
                decay = decay + 0.5 * lam * xp.sum(self.params[key] ** 2)
            out = out + decay
        return out

    def gradient(self, x, t) -> dict:
        grads = super().gradient(x, t)
        lam = self.weight_decay_lambda
        if lam:
            for key in self._weight_keys():
                grads[key] = grads[key] + lam * self.params[key]
        return grads


class MultiLayerNetExtend(MultiLayerNet):
    """:class:`MultiLayerNet` with the book's options: ``use_batchnorm`` puts a
    BatchNormalization (parameters gamma1, beta1, ...) after each hidden affine,
    ``use_dropout`` a Dropout of ratio ``dropout_ration`` (the book's spelling) after
    each activation.  As in the book, ``predict`` and ``loss`` run in test mode unless
    ``train_flg=True``; ``gradient`` and ``numerical_gradient`` in training mode."""

    name = "multi_layer_extend"

    def __init__(self, input_size, hidden_size_list, output_size, activation="relu", weight_init_std="relu",
                 weight_decay_lambda=0, use_dropout=False, dropout_ration=0.5, use_batchnorm=False, *,
                 xp=None, device=None, dtype="float32", seed=None):
        self._build(input_size, hidden_size_list, output_size, activation, weight_init_std, weight_decay_lambda,
                    bool(use_dropout), dropout_ration, bool(use_batchnorm), xp, device, dtype, seed)
        self.use_dropout, self.use_batchnorm = bool(use_dropout), bool(use_batchnorm)
        self.config.update(use_dropout=self.use_dropout, dropout_ration=float(dropout_ration), use_batchnorm=self.use_batchnorm)

    def loss(self, x, t, train_flg: bool = False):
        return super().loss(x, t, train_flg)


MODELS = {
    "simple": SimpleConvNet,
    "deep": DeepConvNet,
    "mlp": TwoLayerNet,
    "multi_layer": MultiLayerNet,
    "multi_layer_extend": MultiLayerNetExtend,
}


#: name -> its param_shapes rule, for models registered from other modules (xpconv.specs: "spec")
SHAPE_RULES: dict[str, Any] = {}


def build_model(name: str, config: Mapping[str, Any] | None = None, **kwargs) -> Sequential:
    """A named model (a key of ``MODELS``: 'simple', 'deep', 'mlp', 'multi_layer',
    'multi_layer_extend') from its constructor config."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return MODELS[name](**dict(config or {}), **kwargs)


def model_meta(model: Sequential) -> dict[str, Any]:
    """What a checkpoint stores about ``model`` besides its arrays: the name and
    constructor config that :func:`build_model` takes, class, dtype, namespace and the
    parameter names."""
    return {
        "name": getattr(model, "name", type(model).__name__.lower()),
        "class": type(model).__name__,
        "config": dict(getattr(model, "config", {}) or {}),
        "dtype": dtype_name(model.dtype),
        "backend": namespace_name(model.xp),
        "params": list(model.params),
    }


def stored_model_index(stored) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name (W1, b1, ...) -> (dtype, shape) of the model arrays a checked file holds."""
    if not stored.meta:
        return dict(stored.index)
    n = len(_fileformat.MODEL_PREFIX)
    return {k[n:]: v for k, v in stored.index.items() if k.startswith(_fileformat.MODEL_PREFIX)}


def stored_keys(stored, names) -> list[str]:
    """The file's tensor names of the model arrays ``names``."""
    prefix = _fileformat.MODEL_PREFIX if stored.meta else ""
    return [prefix + k for k in names]


def model_part(stored, arrays: Mapping[str, Any]) -> dict[str, Any]:
    """``arrays`` read from ``stored`` keyed W1, b1, ..."""
    n = len(_fileformat.MODEL_PREFIX) if stored.meta else 0
    return {k[n:]: v for k, v in arrays.items()}


class ArraysMissing(KeyError, ValueError):
    """Arrays a model needs are not there (a KeyError, as a dict lookup would give, and a
    ValueError, as every other misfit)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def check_arrays(expected: Mapping[str, tuple[tuple[int, ...], bool]], got: Mapping[str, tuple[str, tuple[int, ...]]]) -> list[str]:
    """The names to load when arrays of (dtype name, shape) ``got`` fit ``expected``
    (name -> (shape, required)); else ValueError naming the first array that does not:
    missing, another shape, or not floating point. Nothing is allocated."""
    missing = [k for k, (_, required) in expected.items() if required and k not in got]
    if missing:
        raise ArraysMissing(f"the stored weights do not fit the model: parameters missing: {missing[:8]} (got {sorted(got)[:12]})")
    keys = []
    for key, (shape, _) in expected.items():
        if key not in got:
            continue
        dtype, stored_shape = got[key]
        if tuple(stored_shape) != tuple(shape):
            raise ValueError(f"the stored weights do not fit the model: parameter {key!r}: expected shape {tuple(shape)}, got {tuple(stored_shape)}")
        if dtype not in _fileformat.FLOAT_DTYPES:
            raise ValueError(f"parameter {key!r}: expected a floating-point array ({', '.join(_fileformat.FLOAT_DTYPES)}), got {dtype}")
        keys.append(key)
    for key in keys:
        if key.startswith("running_mean") and "running_var" + key[12:] not in keys:
            raise ValueError(f"the stored BatchNorm statistics are incomplete: {key} without running_var{key[12:]}")
        if key.startswith("running_var") and "running_mean" + key[11:] not in keys:
            raise ValueError(f"the stored BatchNorm statistics are incomplete: {key} without running_mean{key[11:]}")
    return keys


def _say_conversion(dtypes: Mapping[str, str], target: str) -> None:
    """One warning when arrays of another float kind are converted to ``target``."""
    other = sorted({d for d in dtypes.values() if d != target})
    if other:
        n = sum(d != target for d in dtypes.values())
        warnings.warn(f"{n} stored array(s) of {', '.join(other)} converted to the model's {target}", stacklevel=3)


def _count(config: Mapping[str, Any], key: str, default: Any = None, *, low: int = 1, high: int = 1 << 31) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"config.{key} should be an integer from {low} to {high:,}, got {_fileformat.short(value)}")
    return value


def _dims(config: Mapping[str, Any], key: str, default: Any = None) -> tuple[int, int, int]:
    value = config.get(key, default)
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1 << 20 for v in value)):
        raise ValueError(f"config.{key} should be [channels, height, width] of positive integers, got {_fileformat.short(value)}")
    return tuple(value)


def _conv(cp: Any, where: str, defaults: Mapping[str, Any]) -> tuple[int, int, Any, Any]:
    if not isinstance(cp, Mapping):
        raise ValueError(f"config.{where} should be an object (filter_num, filter_size, pad, stride), got {_fileformat.short(cp)}")  # noqa: TRY004 - a bad file's value
    cp = {**defaults, **cp}
    FN = _count(cp, "filter_num", high=1 << 20)
    FS = _count(cp, "filter_size", high=1 << 12)
    for k in ("pad", "stride"):
        v = cp.get(k)
        vs = v if isinstance(v, (list, tuple)) else [v]
        if not (1 <= len(vs) <= 2 and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 1 << 12 for x in vs)):
            raise ValueError(f"config.{where}.{k} should be an integer >= 0 or an (h, w) pair, got {_fileformat.short(v)}")
    return FN, FS, cp["pad"], cp["stride"]


def param_shapes(name: str, config: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], bool]]:
    """name -> (shape, required) of the arrays the named model built from ``config``
    holds, computed by arithmetic alone (nothing is allocated), so a checkpoint's config
    can be compared with its stored tensors before the model is built. Raises ValueError
    naming the config entry of the wrong type or out of range."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    if not isinstance(config, Mapping):
        raise ValueError(f"config should be an object, got {_fileformat.short(config)}")  # noqa: TRY004 - a bad file's value
    if name in SHAPE_RULES:
        return SHAPE_RULES[name](config)
    out: dict[str, tuple[tuple[int, ...], bool]] = {}

    def affine(k: int, fan_in: int, fan_out: int) -> None:
        out[f"W{k}"], out[f"b{k}"] = ((fan_in, fan_out), True), ((fan_out,), True)

    try:
        if name == "simple":
            C, H, W = _dims(config, "input_dim", (1, 28, 28))
            FN, FS, pad, stride = _conv(config.get("conv_param") or {}, "conv_param", {"filter_num": 30, "filter_size": 5, "pad": 0, "stride": 1})
            OH, OW = conv_output_size(H, W, FS, FS, stride, pad, where="SimpleConvNet")
            hidden, classes = _count(config, "hidden_size", 100), _count(config, "output_size", 10)
            out["W1"], out["b1"] = ((FN, C, FS, FS), True), ((FN,), True)
            affine(2, FN * (OH // 2) * (OW // 2), hidden)
            affine(3, hidden, classes)
        elif name == "deep":
            C, H, W = _dims(config, "input_dim", (1, 28, 28))
            cps = config.get("conv_params")
            if cps is None:
                cps = [config.get(f"conv_param_{i}") or {} for i in range(1, 7)]
            if not (isinstance(cps, list) and len(cps) == 6):
                raise ValueError(f"config.conv_params should be a list of 6 objects, got {_fileformat.short(cps)}")
            for i, cp in enumerate(cps):
                f, p = DEEP_CONV_DEFAULTS[i]
                FN, FS, pad, stride = _conv(cp, f"conv_params[{i}]", {"filter_num": f, "filter_size": 3, "pad": p, "stride": 1})
                out[f"W{i + 1}"], out[f"b{i + 1}"] = ((FN, C, FS, FS), True), ((FN,), True)
                H, W = conv_output_size(H, W, FS, FS, stride, pad, where=f"DeepConvNet conv{i + 1}")
                C = FN
                if i % 2 == 1:
                    H, W = conv_output_size(H, W, 2, 2, 2, 0, where=f"DeepConvNet pool{i // 2 + 1}")
            hidden, classes = _count(config, "hidden_size", 50), _count(config, "output_size", 10)
            affine(7, C * H * W, hidden)
            affine(8, hidden, classes)
        elif name == "mlp":
            sizes = [_count(config, "input_size"), _count(config, "hidden_size"), _count(config, "output_size")]
            affine(1, sizes[0], sizes[1])
            affine(2, sizes[1], sizes[2])
        else:
            hidden_list = config.get("hidden_size_list")
            if not (isinstance(hidden_list, list) and len(hidden_list) <= 1000):
                raise ValueError(f"config.hidden_size_list should be a list of positive integers, got {_fileformat.short(hidden_list)}")
            sizes = [_count(config, "input_size")] + [_count({"hidden_size_list[]": h}, "hidden_size_list[]") for h in hidden_list]
            sizes.append(_count(config, "output_size"))
            bn = name == "multi_layer_extend" and config.get("use_batchnorm") is True
            for k, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes), start=1):
                affine(k, fan_in, fan_out)
                if bn and k <= len(hidden_list):
                    out[f"gamma{k}"], out[f"beta{k}"] = ((fan_out,), True), ((fan_out,), True)
                    out[f"running_mean{k}"] = out[f"running_var{k}"] = ((fan_out,), False)
    except (TypeError, KeyError) as exc:
        raise ValueError(f"config: {exc}") from None
    return out


def sample_work(name: str, config: Mapping[str, Any]) -> tuple[int, int, str]:
    """(the most values one sample takes in any single array of a forward pass, the
    multiply-adds of that pass, which array is the largest) of the named model built
    from ``config``, by arithmetic alone: a padded input, im2col's columns and each
    layer's output are counted. ``config`` must pass :func:`param_shapes` first."""
    shapes = param_shapes(name, config)
    best: dict[str, Any] = {"values": 0, "where": "the input"}
    macs = 0

    def see(values: int, where: str) -> None:
        if values > best["values"]:
            best["values"], best["where"] = values, where

    def conv(C: int, H: int, W: int, cp: Mapping[str, Any], where: str) -> tuple[int, int, int]:
        nonlocal macs
        FN, FS = int(cp["filter_num"]), int(cp["filter_size"])
        SH, SW = pair(cp["stride"], "stride")
        PH, PW = pair(cp["pad"], "pad")
        OH, OW = conv_output_size(H, W, FS, FS, (SH, SW), (PH, PW), where=where)
        see(C * (H + 2 * PH) * (W + 2 * PW), f"{where}'s padded input")
        see(C * FS * FS * OH * OW, f"{where}'s im2col columns")
        see(FN * OH * OW, f"{where}'s output")
        macs += C * FS * FS * OH * OW * FN
        return FN, OH, OW

    if name in ("simple", "deep"):
        C, H, W = (int(v) for v in config.get("input_dim", (1, 28, 28)))
        see(C * H * W, "the input")
        if name == "simple":
            cp = {"filter_num": 30, "filter_size": 5, "pad": 0, "stride": 1, **(config.get("conv_param") or {})}
            C, H, W = conv(C, H, W, cp, "SimpleConvNet's convolution")
        else:
            cps = config.get("conv_params")
            if cps is None:
                cps = [config.get(f"conv_param_{i}") or {} for i in range(1, 7)]
            for i, cp in enumerate(cps):
                f, p = DEEP_CONV_DEFAULTS[i]
                C, H, W = conv(C, H, W, {"filter_num": f, "filter_size": 3, "pad": p, "stride": 1, **cp}, f"DeepConvNet conv{i + 1}")
                if i % 2 == 1:
                    H, W = H // 2, W // 2
    for key, (shape, _) in shapes.items():
        if key.startswith("W") and len(shape) == 2:
            macs += shape[0] * shape[1]
            see(max(shape), f"affine {key}'s input or output")
    return int(best["values"]), macs, str(best["where"])


def model_from_checkpoint(
    meta: Mapping[str, Any],
    arrays: Mapping[str, Any],
    *,
    xp=None,
    device=None,
    dtype=None,
    model: Sequential | None = None,
) -> Sequential:
    """The model a checkpoint describes, with its weights.

    ``meta`` is the checkpoint's ``model`` entry (see :func:`model_meta`), ``arrays`` its
    arrays keyed W1, b1, ... The model is rebuilt with :func:`build_model` in namespace
    ``xp`` or on ``device`` (NumPy when neither is given), in ``dtype`` or the stored
    one; pass ``model=`` to fill a model built yourself (a custom ``Sequential``).
    Raises ValueError saying what cannot be rebuilt or does not fit.
    """
    if model is None:
        name = meta.get("name")
        if name not in MODELS:
            raise ValueError(
                f"model {_fileformat.short(name)} cannot be rebuilt from its config (known: {', '.join(MODELS)}); build it yourself and pass model=..."
            )
        config = meta.get("config") or {}
        try:
            expected = param_shapes(name, config)
        except ValueError as exc:
            raise ValueError(f"bad stored config of model {name!r}: {exc}") from None
        # the stored arrays are compared with the config's shapes before anything is built
        check_arrays(expected, {k: (dtype_name(a.dtype), tuple(int(d) for d in a.shape)) for k, a in arrays.items()})
        if xp is None and device is None:
            xp = "numpy"
        try:
            model = build_model(name, config, xp=xp, device=device, dtype=dtype or meta.get("dtype", "float32"), seed=0)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"cannot rebuild model {name!r} from the stored config: {exc}") from exc
    model.load_state_arrays(arrays)
    return model
