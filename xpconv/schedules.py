"""Learning-rate schedules: objects that set ``optimizer.lr`` once per epoch, in the manner
of ``torch.optim.lr_scheduler``.

    >>> opt = Adam(lr=0.001)
    >>> schedule = CosineSchedule(opt, epochs=20, warmup_epochs=2)
    >>> for epoch in range(1, 21):
    ...     schedule.step()            # opt.lr is now epoch's learning rate
    ...     train_one_epoch(opt)

The learning rate of epoch ``e`` (counted from 1) is a function of ``e`` and the
schedule's settings only, so a run resumed after epoch k sets the same rates an
uninterrupted run sets (:meth:`LRSchedule.state_dict` keeps the settings, including
the base rate, in a checkpoint).  With ``W`` warm-up epochs, ``T = epochs - W`` and
``t = e - W - 1`` (0 for the first epoch after the warm-up):

* warm-up (any schedule), ``e <= W``: ``lr = base_lr * e / (W + 1)``, rising linearly
  towards ``base_lr``;
* ``constant``: ``lr = base_lr``;
* ``step``: ``lr = base_lr * gamma ** (t // step_size)``;
* ``cosine``: ``lr = min_lr + (base_lr - min_lr) * (1 + cos(pi * t / T)) / 2`` -- the
  formula of ``torch.optim.lr_scheduler.CosineAnnealingLR`` with ``T_max = T``.

The optimizers read ``lr`` at every update (their fused update kernels take it as a
per-step scalar), so a rate set here is the rate the next update uses, on every namespace.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["SCHEDULES", "ConstantSchedule", "CosineSchedule", "LRSchedule", "StepSchedule", "make_schedule", "schedule_from_state"]


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"learning-rate schedule: {name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_rate(name: str, value: Any, *, zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (value >= 0 if zero else value > 0)
    if not ok:
        raise ValueError(f"learning-rate schedule: {name} must be a finite number {'>= 0' if zero else '> 0'}, got {value!r}")
    return float(value)


class LRSchedule:
    """Base class: the constant rate after an optional linear warm-up.

    ``optimizer``: anything with an ``lr`` attribute (an :mod:`xpconv.optim` optimizer,
    a ``DistributedOptimizer``); ``epochs``: the run's number of epochs; ``warmup_epochs``:
    epochs of linear warm-up before the schedule proper; ``base_lr``: the peak rate
    (default: the optimizer's ``lr`` now).  ``last_epoch`` is the epoch whose rate was
    set last (0 before the first)."""

    name = "constant"

    def __init__(self, optimizer, epochs: int, *, warmup_epochs: int = 0, base_lr: float | None = None):
        self.optimizer = optimizer
        self.epochs = _check_int("epochs", epochs, 1)
        self.warmup_epochs = _check_int("warmup_epochs", warmup_epochs, 0)
        self.base_lr = _check_rate("base_lr", float(optimizer.lr) if base_lr is None else base_lr)
        self.last_epoch = 0

    # -- the formula
    def lr_at(self, epoch: int) -> float:
        """The learning rate of ``epoch`` (counted from 1)."""
        e = _check_int("epoch", epoch, 1)
        W = self.warmup_epochs
        if e <= W:
            return self.base_lr * e / (W + 1)
        return self._after_warmup(e - W - 1, max(1, self.epochs - W))

    def _after_warmup(self, t: int, T: int) -> float:
        return self.base_lr

    # -- driving the optimizer
    def set_epoch(self, epoch: int) -> float:
        """Set the optimizer's ``lr`` to that of ``epoch``; returns it."""
        lr = self.lr_at(epoch)
        self.optimizer.lr = lr
        self.last_epoch = int(epoch)
        return lr

    def step(self) -> float:
        """Advance to the next epoch and set its rate (call before the epoch's updates)."""
        return self.set_epoch(self.last_epoch + 1)

    # -- checkpoints
    def _settings(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The schedule as JSON-able data (type, settings, base rate, last epoch)."""
        return {"type": self.name, "epochs": self.epochs, "warmup_epochs": self.warmup_epochs,
                "base_lr": self.base_lr, "last_epoch": self.last_epoch, **self._settings()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take the settings and position of :meth:`state_dict` (of the same type)."""
        if not isinstance(state, Mapping):
            raise ValueError(f"learning-rate schedule state: expected a mapping, got {type(state).__name__}")
        kind = state.get("type")
        if kind != self.name:
            raise ValueError(f"learning-rate schedule state is for {kind!r}, not {self.name!r}")
        self.epochs = _check_int("epochs", state.get("epochs"), 1)
        self.warmup_epochs = _check_int("warmup_epochs", state.get("warmup_epochs"), 0)
        self.base_lr = _check_rate("base_lr", state.get("base_lr"))
        self.last_epoch = _check_int("last_epoch", state.get("last_epoch"), 0)
        self._load_settings(state)

    def _load_settings(self, state: Mapping[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self._settings().items())
        return f"{type(self).__name__}(epochs={self.epochs}, warmup_epochs={self.warmup_epochs}, base_lr={self.base_lr:g}{extra})"


class ConstantSchedule(LRSchedule):
    """``base_lr`` every epoch (after the warm-up, if any)."""


class StepSchedule(LRSchedule):
    """The rate times ``gamma`` every ``step_size`` epochs after the warm-up
    (default ``step_size``: a third of those epochs, rounded up; ``gamma`` 0.1)."""

    name = "step"

    def __init__(self, optimizer, epochs: int, *, warmup_epochs: int = 0, base_lr: float | None = None,
                 step_size: int | None = None, gamma: float = 0.1):
        super().__init__(optimizer, epochs, warmup_epochs=warmup_epochs, base_lr=base_lr)
        T = max(1, self.epochs - self.warmup_epochs)
        self.step_size = _check_int("step_size", -(-T // 3) if step_size is None else step_size, 1)
        self.gamma = _check_rate("gamma", gamma)

    def _after_warmup(self, t, T):
        return self.base_lr * self.gamma ** (t // self.step_size)

    def _settings(self):
        return {"step_size": self.step_size, "gamma": self.gamma}

    def _load_settings(self, state):
        self.step_size = _check_int("step_size", state.get("step_size"), 1)
        self.gamma = _check_rate("gamma", state.get("gamma"))


class CosineSchedule(LRSchedule):
    """Half a cosine from ``base_lr`` down towards ``min_lr`` over the epochs after the
    warm-up (``CosineAnnealingLR`` with ``T_max`` = those epochs; the last epoch's
    rate stays above ``min_lr``)."""

    name = "cosine"

    def __init__(self, optimizer, epochs: int, *, warmup_epochs: int = 0, base_lr: float | None = None, min_lr: float = 0.0):
        super().__init__(optimizer, epochs, warmup_epochs=warmup_epochs, base_lr=base_lr)
        self.min_lr = _check_rate("min_lr", min_lr, zero=True)
        if self.min_lr >= self.base_lr:
            raise ValueError(f"learning-rate schedule: min_lr must be below base_lr {self.base_lr:g}, got {min_lr!r}")

    def _after_warmup(self, t, T):
        return self.min_lr + (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * t / T)) / 2.0

    def _settings(self):
        return {"min_lr": self.min_lr}

    def _load_settings(self, state):
        self.min_lr = _check_rate("min_lr", state.get("min_lr"), zero=True)


SCHEDULES: dict[str, type[LRSchedule]] = {"constant": ConstantSchedule, "step": StepSchedule, "cosine": CosineSchedule}


def make_schedule(name: str, optimizer, epochs: int, *, warmup_epochs: int = 0, base_lr: float | None = None,
                  **settings: Any) -> LRSchedule:
    """The schedule called ``name`` (``constant``, ``step`` or ``cosine``) for ``optimizer``."""
    cls = SCHEDULES.get(str(name).lower())
    if cls is None:
        raise ValueError(f"unknown learning-rate schedule {name!r}; expected one of {', '.join(SCHEDULES)}")
    return cls(optimizer, epochs, warmup_epochs=warmup_epochs, base_lr=base_lr, **settings)


def schedule_from_state(optimizer, state: Mapping[str, Any]) -> LRSchedule:
    """The schedule a :meth:`LRSchedule.state_dict` describes, driving ``optimizer``."""
    if not isinstance(state, Mapping) or state.get("type") not in SCHEDULES:
        got = state.get("type") if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"learning-rate schedule state: expected a type of {', '.join(SCHEDULES)}, got {got!r}")
    base_lr = _check_rate("base_lr", state.get("base_lr"))
    schedule = SCHEDULES[str(state["type"])](optimizer, _check_int("epochs", state.get("epochs"), 1), base_lr=base_lr)
    schedule.load_state_dict(state)
    return schedule
