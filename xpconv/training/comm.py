"""The communicator interface of data-parallel training, and its one-process member.

The trainer talks to "the ranks of this job" through one interface, whether the job is
one plain process (:class:`LocalCommunicator`, size 1: every collective is the identity)
or K MPI/NCCL ranks (``xpconv.distributed.Communicator``).  So the training loop has no
single-process branch, and one process runs the very code path of a K-rank job.

Both share :class:`Sharding` (which rows of a global batch and which Dropout rows belong
to this rank), built on :mod:`xpconv.training.schedule`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, Protocol, runtime_checkable

from . import schedule

__all__ = ["Communicator", "LocalCommunicator", "Sharding"]


@runtime_checkable
class Communicator(Protocol):
    """What the trainer (and a hand-written data-parallel loop) needs from a job's ranks."""

    rank: int
    size: int

    @property
    def is_root(self) -> bool: ...  # rank 0: the one that prints and writes files

    def allreduce_mean(self, grads: MutableMapping[str, Any]) -> MutableMapping[str, Any]: ...
    def allreduce_sum(self, values: Sequence[float]) -> list[float]: ...
    def broadcast_params(self, params: MutableMapping[str, Any], root: int = 0) -> MutableMapping[str, Any]: ...
    def barrier(self) -> None: ...
    def local_batch_size(self, global_batch_size: int) -> int: ...
    def shard(self, batch: Any) -> Any: ...
    def shard_range(self, n: int) -> tuple[int, int]: ...
    def seed_dropout(self, model: Any, seed: int, step: int) -> None: ...
    def evaluate(self, model: Any, x: Any, t: Any, batch_size: int = 100) -> float: ...


class Sharding:
    """This rank's part of the schedule (needs ``self.rank`` and ``self.size``)."""

    rank: int
    size: int

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def local_batch_size(self, global_batch_size: int) -> int:
        """B/K, or ValueError naming both numbers when K does not divide B."""
        return schedule.local_batch_size(global_batch_size, self.size)

    def shard(self, batch):
        """This rank's rows of a global batch (an array or index array of B rows):
        rows [rank*B/K, (rank+1)*B/K)."""
        return schedule.shard(batch, self.rank, self.size)

    def shard_range(self, n: int) -> tuple[int, int]:
        """(start, stop) of this rank's part of n samples for evaluation (parts differ
        by at most one sample; n need not be divisible by K)."""
        return schedule.shard_range(n, self.rank, self.size)

    def seed_dropout(self, model, seed: int, step: int) -> None:
        """Seed every Dropout layer of ``model`` for global step ``step``: the mask of
        layer i comes from (seed, step, i), drawn for the whole global batch, and this
        rank keeps its shard's rows.  Call before the step's forward pass, on every
        rank (1 process included, to reproduce a K-rank run)."""
        schedule.seed_dropout(model, seed, step, rank=self.rank, size=self.size)


class LocalCommunicator(Sharding):
    """A job of one process: rank 0 of 1.  Collectives return their input (means and
    sums over one rank), broadcasts keep the parameters, evaluation is the model's own
    chunked ``accuracy``.  What ``Trainer(comm=None)`` uses."""

    backend = "local"

    def __init__(self, device: str | None = None):
        self.rank = 0
        self.size = 1
        self.local_rank = 0
        self.local_size = 1
        self.device = device

    def __repr__(self) -> str:
        return "LocalCommunicator(rank=0, size=1)"

    def allreduce_mean(self, grads: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        return grads

    def allreduce_sum(self, values) -> list[float]:
        return [float(v) for v in values]

    def broadcast_params(self, params: MutableMapping[str, Any], root: int = 0) -> MutableMapping[str, Any]:
        if int(root) != 0:
            raise ValueError(f"broadcast_params: root must be a rank of this job (0), got {root}")
        return params

    def barrier(self) -> None:
        return None

    def params_in_sync(self, params: Mapping[str, Any]) -> bool:
        return True

    def evaluate(self, model, x, t, batch_size: int = 100) -> float:
        """``model.accuracy(x, t)`` in chunks of ``batch_size``."""
        return float(model.accuracy(x, t, batch_size=batch_size))

    def print(self, *args, **kwargs) -> None:
        print(*args, **kwargs, flush=True)

    def abort(self, code: int = 1, message: str | None = None) -> None:
        """End this (only) process with ``code``, after writing ``message`` to stderr."""
        if message:
            sys.stderr.write(f"xpconv: rank 0 failed: {message}\n")
            sys.stderr.flush()
        raise SystemExit(int(code))
