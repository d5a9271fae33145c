"""Training: the loop, its schedule, its callbacks and the one-process communicator.

* :mod:`~xpconv.training.loop` -- :class:`Trainer` (the book's signature) and :class:`Run`;
* :mod:`~xpconv.training.schedule` -- epoch permutation, per-rank shards and Dropout seeds,
  one schedule for one process and K ranks;
* :mod:`~xpconv.training.callbacks` -- progress bar, per-epoch line, checkpoints, metrics;
* :mod:`~xpconv.training.comm` -- the communicator interface and :class:`LocalCommunicator`;
* :mod:`~xpconv.training.console` -- the console handler of the ``xpconv`` logger;
* :mod:`~xpconv.training.runs` -- the run folder: its lock, stop signals, repair after a kill;
* :mod:`~xpconv.training.stopping` -- early stopping by validation accuracy.
"""

from __future__ import annotations

from .callbacks import (
    Callback,
    Checkpoints,
    EpochLine,
    Metrics,
    ProgressBar,
    append_jsonl,
    format_seconds,
    write_metrics,
)
from .comm import Communicator, LocalCommunicator
from .loop import Run, Trainer, TrainingDiverged
from .runs import (
    RunFolderError,
    RunLock,
    Terminated,
    claim_run_folder,
    reconcile_run,
    stop_signals,
)
from .schedule import Schedule, global_batches, seed_dropout, validation_split
from .stopping import EarlyStopping

__all__ = [
    "Callback",
    "Checkpoints",
    "Communicator",
    "EarlyStopping",
    "EpochLine",
    "LocalCommunicator",
    "Metrics",
    "ProgressBar",
    "Run",
    "RunFolderError",
    "RunLock",
    "Schedule",
    "Terminated",
    "Trainer",
    "TrainingDiverged",
    "append_jsonl",
    "claim_run_folder",
    "format_seconds",
    "global_batches",
    "reconcile_run",
    "seed_dropout",
    "stop_signals",
    "validation_split",
    "write_metrics",
]
