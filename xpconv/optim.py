"""Optimizers with the book's interface: ``update(params, grads)`` updates a dict of
arrays, in whatever namespace the arrays live.

Each step is written with augmented assignments (``p -= lr * g``).  On writeable
arrays (NumPy, CuPy, torch, array-api-strict) they update in place, the fast path;
on immutable ones (JAX) Python rebinds the name to a new array, and ``update`` puts
that array into ``params`` (``params[key] = new``) and into the optimizer's slots.
So on JAX ``params`` must take item assignment: a dict or a model's ``params``.

Each optimizer's state (step count and per-parameter slots such as Adam's m and v)
is returned by ``state_dict()`` and restored by ``load_state_dict()``, so a run
resumed from a checkpoint continues exactly where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping
from typing import Any

from . import kernels
from .backend import asarray_in, device_of, get_namespace, namespace_name, namespace_of

__all__ = ["SGD", "Momentum", "Nesterov", "AdaGrad", "RMSprop", "Adam", "OPTIMIZERS", "get_optimizer"]


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class Optimizer:
    """Base class. Subclasses list their per-parameter slots in ``_slots`` and
    implement ``_step(key, p, g, slots) -> p``: it updates ``p`` and the arrays of
    the ``slots`` dict with augmented assignments, stores each slot it changed back
    into ``slots`` and returns ``p`` (the same object when it was written in place)."""

    _slots: tuple[str, ...] = ()

    def __init__(self, lr: float = 0.01, *, weight_decay: float = 0.0):
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"{type(self).__name__}: lr must be a positive number, got {lr!r}")
        if not (weight_decay >= 0 and math.isfinite(weight_decay)):
            raise ValueError(f"{type(self).__name__}: weight_decay must be a finite number >= 0, got {weight_decay!r}")
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.iter = 0
        self.state: dict[str, dict[str, Any]] = {name: {} for name in self._slots}

    def __getattr__(self, name: str):
        # the book's per-parameter dicts (Momentum.v, AdaGrad.h, Adam.m / .v) read the slots
        state = self.__dict__.get("state")
        if state is not None and name in state:
            return state[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- hyper-parameters shown in checkpoints and summaries
    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr, "weight_decay": self.weight_decay}

    def update(self, params: MutableMapping[str, Any], grads: Mapping[str, Any]) -> None:
        missing = [k for k in params if k not in grads]
        if missing:
            raise KeyError(f"{type(self).__name__}.update: no gradient for parameter(s) {missing}")
        self._begin_update()
        xp = fast = None  # the namespace and its fused update kernel, resolved once per call
        for key in params:
            p = params[key]
            g = grads[key]
            scalar = _is_number(p)
            if scalar:  # the book's toy problems keep parameters as Python floats
                host = get_namespace("numpy")
                p, g = host.asarray(float(p)), host.asarray(float(g))
            if tuple(g.shape) != tuple(p.shape):
                raise ValueError(
                    f"{type(self).__name__}.update: gradient {key!r} has shape {tuple(g.shape)}, "
                    f"parameter has {tuple(p.shape)}"
                )
            if xp is None:
                xp = namespace_of(p)
                fast = self._fast_kernel(xp)
            slots = {}
            for name in self._slots:
                s = self.state[name].get(key)
                if s is None or (type(s) is not type(p) and namespace_of(s) is not xp):
                    s = xp.zeros_like(p) if s is None else asarray_in(s, xp, dtype=p.dtype, device=device_of(p))
                    self.state[name][key] = s
                slots[name] = s
            if fast is not None and not scalar and fast.accepts(p, g, *slots.values()):
                fast.step(p, g, slots, self.weight_decay, **self._kernel_scalars())
                continue
            if self.weight_decay:
                g = g + self.weight_decay * p
            new = self._step(key, p, g, slots)
            if scalar:
                params[key] = float(new)
                for name in self._slots:
                    self.state[name][key] = slots[name]
                continue
            if new is not p:  # immutable arrays: the step made new ones
                params[key] = new
                for name in self._slots:
                    self.state[name][key] = slots[name]

    def _begin_update(self) -> None:
        """The host half of an update: count it (Adam also sets this update's step size)."""
        self.iter += 1

    #: op of the fused update kernel registered per namespace in :mod:`xpconv.kernels`
    #: (e.g. "adam_update" on CuPy: one launch per parameter); only the class that
    #: names it uses it -- a subclass with its own ``_step`` runs its ``_step``
    _kernel_op = ""

    def _fast_kernel(self, xp):
        """The registered update kernel for namespace ``xp``, or None (then ``_step`` runs)."""
        if "_kernel_op" not in type(self).__dict__ or "_step" not in type(self).__dict__:
            return None
        return kernels.find(namespace_name(xp), self._kernel_op)

    def _kernel_scalars(self) -> dict[str, float]:
        """The host scalars the update kernel takes (keyword arguments of its ``step``)."""
        return {"lr": self.lr}

    def _step(self, key, p, g, slots):  # pragma: no cover - abstract
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """{'type', 'hyper', 'iter', 'slots': {slot: {param key: array}}}."""
        return {
            "type": type(self).__name__,
            "hyper": self.hyperparameters(),
            "iter": self.iter,
            "slots": {name: dict(values) for name, values in self.state.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        kind = state.get("type", type(self).__name__)
        if kind != type(self).__name__:
            raise ValueError(f"optimizer state is for {kind}, not {type(self).__name__}")
        self.iter = int(state.get("iter", 0))
        slots = state.get("slots", {})
        unknown = set(slots) - set(self._slots)
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown optimizer slot(s) {sorted(unknown)}")
        self.state = {name: dict(slots.get(name, {})) for name in self._slots}

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v:g}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({hp})"


class SGD(Optimizer):
    """p -= lr * g"""

    _kernel_op = "sgd_update"

    def _step(self, key, p, g, slots):
        p -= self.lr * g
        return p


class Momentum(Optimizer):
    """v = momentum*v - lr*g; p += v"""

    _slots = ("v",)

    def __init__(self, lr=0.01, momentum=0.9, *, weight_decay=0.0):
        super().__init__(lr, weight_decay=weight_decay)
        if not 0.0 <= momentum < 1.0:  # also refuses nan
            raise ValueError(f"{type(self).__name__}: momentum must be in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)

    def hyperparameters(self):
        return {**super().hyperparameters(), "momentum": self.momentum}

    _kernel_op = "momentum_update"

    def _kernel_scalars(self):
        return {"lr": self.lr, "momentum": self.momentum}

    def _step(self, key, p, g, slots):
        v = slots["v"]
        v *= self.momentum
        v -= self.lr * g
        p += v
        slots["v"] = v
        return p


class Nesterov(Momentum):
    """Nesterov's accelerated gradient in the book's form and order: the parameters
    move with the velocity of the previous step, then the velocity is updated.
    p += momentum**2 * v - (1 + momentum)*lr*g; v = momentum*v - lr*g"""

    _kernel_op = "nesterov_update"

    def _step(self, key, p, g, slots):
        v = slots["v"]
        m = self.momentum
        p += (m * m) * v
        p -= ((1.0 + m) * self.lr) * g
        v *= m
        v -= self.lr * g
        slots["v"] = v
        return p


class AdaGrad(Optimizer):
    """h += g*g; p -= lr*g/(sqrt(h) + 1e-7)"""

    _slots = ("h",)
    _kernel_op = "adagrad_update"

    def _step(self, key, p, g, slots):
        xp = namespace_of(p)
        h = slots["h"]
        h += g * g
        p -= self.lr * g / (xp.sqrt(h) + 1e-7)
        slots["h"] = h
        return p


class RMSprop(Optimizer):
    """h = decay*h + (1-decay)*g*g; p -= lr*g/(sqrt(h) + 1e-7)"""

    _slots = ("h",)

    def __init__(self, lr=0.01, decay_rate=0.99, *, weight_decay=0.0):
        super().__init__(lr, weight_decay=weight_decay)
        if not 0.0 <= decay_rate < 1.0:  # also refuses nan
            raise ValueError(f"RMSprop: decay_rate must be in [0, 1), got {decay_rate!r}")
        self.decay_rate = float(decay_rate)

    def hyperparameters(self):
        return {**super().hyperparameters(), "decay_rate": self.decay_rate}

    _kernel_op = "rmsprop_update"

    def _kernel_scalars(self):
        return {"lr": self.lr, "decay_rate": self.decay_rate}

    def _step(self, key, p, g, slots):
        xp = namespace_of(p)
        h = slots["h"]
        h *= self.decay_rate
        h += (1.0 - self.decay_rate) * g * g
        p -= self.lr * g / (xp.sqrt(h) + 1e-7)
        slots["h"] = h
        return p


class Adam(Optimizer):
    """Adam (Kingma & Ba, 2015) in the book's bias-corrected form."""

    _slots = ("m", "v")

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999, *, weight_decay=0.0):
        super().__init__(lr, weight_decay=weight_decay)
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"Adam: beta1 and beta2 must be in [0, 1), got {beta1!r}, {beta2!r}")
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)

    def hyperparameters(self):
        return {**super().hyperparameters(), "beta1": self.beta1, "beta2": self.beta2}

    _kernel_op = "adam_update"

    def _kernel_scalars(self):
        return {"lr_t": self._lr_t, "beta1": self.beta1, "beta2": self.beta2}

    def _begin_update(self):
        t = self.iter + 1
        self._lr_t = self.lr * math.sqrt(1.0 - self.beta2**t) / (1.0 - self.beta1**t)
        super()._begin_update()

    def _step(self, key, p, g, slots):
        xp = namespace_of(p)
        m, v = slots["m"], slots["v"]
        m += (1.0 - self.beta1) * (g - m)
        v += (1.0 - self.beta2) * (g * g - v)
        p -= self._lr_t * m / (xp.sqrt(v) + 1e-7)
        slots["m"], slots["v"] = m, v
        return p


OPTIMIZERS = {
    "sgd": SGD,
    "momentum": Momentum,
    "nesterov": Nesterov,
    "adagrad": AdaGrad,
    "rmsprop": RMSprop,
    "adam": Adam,
}


def get_optimizer(name_or_optimizer, **kwargs) -> Optimizer:
    """An optimizer from its (case-insensitive) name and keyword arguments, or the
    optimizer itself."""
    if isinstance(name_or_optimizer, Optimizer):
        return name_or_optimizer
    key = str(name_or_optimizer).lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name_or_optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[key](**kwargs)
