"""What a training run visits, and in which order: one schedule for one process and K ranks.

Everything here depends on the run's ``seed`` and on position numbers only, never on
the number of ranks or on where a run was resumed:

* epoch ``e`` visits the samples in the order ``backend.Generator([seed, e]).permutation(n)``,
  cut into global batches of ``B`` samples (a last batch smaller than ``B`` is left out);
* rank ``r`` of ``K`` takes rows ``[r*B/K, (r+1)*B/K)`` of every global batch;
* the Dropout mask of layer ``i`` at global step ``s`` comes from
  ``backend.Generator([seed, s, i])``, drawn for the whole global batch; each rank keeps
  the rows of its shard;
* with a validation split of fraction F, the validation rows are the first round(F*n)
  of ``backend.Generator([seed, 0, VALIDATION_STREAM]).permutation(n)`` (in increasing
  order) and the training rows the rest; the epochs then permute the training rows;
* with augmentation, the translation offsets of global step ``s`` come from
  ``backend.Generator([seed, s, AUGMENT_STREAM])``, drawn for the whole global batch;
  each rank keeps the rows of its shard.

So one process draws exactly what K ranks draw together (a data-parallel run differs from
one process only by floating-point summation order), and a run resumed after epoch k draws
what an uninterrupted run drew.  The trainer (``xpconv.training.Trainer``) and
``xpconv.distributed`` both use this module; a hand-written data-parallel loop calls
:func:`global_batches` and a communicator's ``shard`` / ``seed_dropout``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..augment import translation_offsets
from ..backend import Generator
from ..layers import Dropout

__all__ = [
    "Schedule",
    "ShardMaskGenerator",
    "global_batches",
    "local_batch_size",
    "seed_dropout",
    "shard",
    "shard_range",
    "translation_offsets_of_step",
    "validation_split",
]

#: the third seed word of the validation split's stream ("val"; Dropout's layer numbers stay far below)
VALIDATION_STREAM = 0x76616C
#: the third seed word of the augmentation offsets' stream ("aug")
AUGMENT_STREAM = 0x617567


def epoch_permutation(n_samples: int, *, seed: int, epoch: int):
    """Host permutation of ``range(n_samples)`` for ``epoch``, seeded by (seed, epoch)."""
    return Generator([int(seed), int(epoch)]).permutation(int(n_samples))


def global_batches(n_samples: int, global_batch_size: int, *, seed: int, epoch: int, drop_last: bool = True) -> Iterator[Any]:
    """Host index arrays of one epoch's global batches, in an order seeded by
    (seed, epoch): the same on every rank, whatever the number of ranks.  Pass each
    one through ``comm.shard`` to get this rank's indices."""
    order = epoch_permutation(n_samples, seed=seed, epoch=epoch)
    B = int(global_batch_size)
    stop = len(order) - len(order) % B if drop_last else len(order)
    for i in range(0, stop, B):
        yield order[i : i + B]


def validation_split(n_samples: int, fraction: float, *, seed: int):
    """Host index arrays (train_rows, val_rows) of a split of ``n_samples`` rows: ``val_rows``
    holds round(fraction * n) rows drawn by ``seed``, ``train_rows`` the others, both in
    increasing order.  They depend on (n, fraction, seed) only: every rank draws the same."""
    n, f = int(n_samples), float(fraction)
    if not 0.0 <= f < 1.0:
        raise ValueError(f"validation split: expected a fraction in [0, 1), got {fraction!r}")
    n_val = int(round(f * n))
    if f > 0 and n_val == 0:
        raise ValueError(f"validation split: a fraction of {f:g} of {n} samples leaves no validation sample")
    order = Generator([int(seed), 0, VALIDATION_STREAM]).permutation(n)
    return _sorted(order[n_val:]), _sorted(order[:n_val])


def _sorted(rows):
    rows = rows.copy()
    rows.sort()
    return rows


def translation_offsets_of_step(seed: int, step: int, global_batch_size: int, max_shift: int, *, rank: int = 0, size: int = 1):
    """Host integer arrays (dy, dx) of this rank's samples at global step ``step``: drawn
    for the whole global batch from ``Generator([seed, step, AUGMENT_STREAM])`` (see
    :func:`xpconv.augment.translation_offsets`), rows [rank*B/K, (rank+1)*B/K) kept."""
    dy, dx = translation_offsets(Generator([int(seed), int(step), AUGMENT_STREAM]), int(global_batch_size), max_shift)
    return shard(dy, rank, size), shard(dx, rank, size)


def local_batch_size(global_batch_size: int, size: int) -> int:
    """B/K, or ValueError naming both numbers when K does not divide B."""
    B, K = int(global_batch_size), int(size)
    if B < K or B % K:
        lo, hi = max(K, B // K * K), (B // K + 1) * K
        hint = f"{lo} or {hi}" if lo != hi else f"{hi}"
        raise ValueError(
            f"global batch size {B} is not divisible by {K} ranks: every rank takes an equal shard "
            f"of each global batch; use a multiple of {K} (e.g. {hint})"
        )
    return B // K


def shard(batch, rank: int, size: int):
    """Rank ``rank``'s rows of a global batch (an array or index array of B rows):
    rows [rank*B/K, (rank+1)*B/K)."""
    b = local_batch_size(int(batch.shape[0]), size)
    return batch[int(rank) * b : (int(rank) + 1) * b]


def shard_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """(start, stop) of rank ``rank``'s part of n samples for evaluation (parts differ
    by at most one sample; n need not be divisible by K)."""
    n, rank, size = int(n), int(rank), int(size)
    return rank * n // size, (rank + 1) * n // size


class ShardMaskGenerator(Generator):
    """Dropout masks of one training step for one rank.

    Seeded by ``key`` = (seed, step, layer); the rank draws the mask of the *global*
    batch (K x its own rows) from that stream and keeps the rows of its shard, so the
    union over ranks is the mask one process draws for the whole batch.  The global
    mask is small (batch x features of a dropout layer).  With K = 1 it is exactly
    ``Generator(key)``."""

    def __init__(self, key, rank: int = 0, size: int = 1):
        super().__init__([int(k) for k in key])
        self.rank, self.size = int(rank), int(size)

    def dropout_mask(self, shape, ratio, *, xp, dtype, device=None):
        if self.size == 1:
            return super().dropout_mask(shape, ratio, xp=xp, dtype=dtype, device=device)
        n = int(shape[0])
        full = super().dropout_mask((n * self.size, *shape[1:]), ratio, xp=xp, dtype=dtype, device=device)
        return full[self.rank * n : (self.rank + 1) * n, ...]


def seed_dropout(model, seed: int, step: int, *, rank: int = 0, size: int = 1) -> None:
    """Give each Dropout layer of ``model`` the generator of global step ``step``: layer
    i draws its mask from ``backend.Generator([seed, step, i])`` (for the global batch,
    keeping rank ``rank``'s rows of ``size``).  Call before the step's forward pass."""
    i = 0
    for layer in getattr(model, "layers", ()):
        if isinstance(layer, Dropout):
            layer.rng = ShardMaskGenerator((seed, step, i), rank, size)
            i += 1


@dataclass(frozen=True)
class Schedule:
    """The schedule of one rank (``rank`` of ``size``; one process is rank 0 of 1) in a
    run of ``n_samples`` samples, global batches of ``batch_size`` and ``seed``.

    Epochs and steps are counted from 1, as the trainer does: epoch e's iteration i
    (1-based) is global step ``(e - 1) * steps_per_epoch + i``."""

    n_samples: int
    batch_size: int
    seed: int = 0
    rank: int = 0
    size: int = 1

    def __post_init__(self):
        local_batch_size(self.batch_size, self.size)  # fails early, naming the numbers

    @property
    def steps_per_epoch(self) -> int:
        return int(self.n_samples) // int(self.batch_size)

    @property
    def local_batch_size(self) -> int:
        return int(self.batch_size) // int(self.size)

    def permutation(self, epoch: int):
        """The epoch's host permutation, cut to whole global batches."""
        order = epoch_permutation(self.n_samples, seed=self.seed, epoch=epoch)
        return order[: self.steps_per_epoch * int(self.batch_size)]

    def batches(self, epoch: int) -> list:
        """Host index arrays of the epoch's global batches."""
        order, B = self.permutation(epoch), int(self.batch_size)
        return [order[i : i + B] for i in range(0, len(order), B)]

    def local_order(self, epoch: int):
        """This rank's indices of the whole epoch, step after step (``local_batch_size``
        per step): one host array, so it can go to a device in one copy."""
        order = self.permutation(epoch)
        if self.size == 1:
            return order
        rows = order.reshape(self.steps_per_epoch, int(self.batch_size))
        b = self.local_batch_size
        return rows[:, self.rank * b : (self.rank + 1) * b].reshape(-1)

    def global_step(self, epoch: int, iteration: int) -> int:
        return (int(epoch) - 1) * self.steps_per_epoch + int(iteration)

    def seed_dropout(self, model, step: int) -> None:
        """:func:`seed_dropout` for this rank at global step ``step``."""
        seed_dropout(model, self.seed, step, rank=self.rank, size=self.size)

    def translation_offsets(self, step: int, max_shift: int):
        """:func:`translation_offsets_of_step` for this rank at global step ``step``."""
        return translation_offsets_of_step(self.seed, step, self.batch_size, max_shift, rank=self.rank, size=self.size)
