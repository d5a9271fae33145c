"""Deprecated alias of :mod:`xpconv.training` (the trainer moved into that package).

``from xpconv.trainer import Trainer`` keeps working, with a DeprecationWarning; new
code imports from ``xpconv.training``."""

from __future__ import annotations

import warnings as _warnings

from .training import Run, Trainer, TrainingDiverged, format_seconds, seed_dropout, write_metrics

__all__ = ["Run", "Trainer", "TrainingDiverged", "format_seconds", "seed_dropout", "write_metrics"]

_warnings.warn("xpconv.trainer is deprecated: import from xpconv.training", DeprecationWarning, stacklevel=2)
