"""What the dataset readers share (a leaf): their error and warning types and the seeded
train/test split. :mod:`xpconv.datasets` re-exports them."""

from __future__ import annotations

import numpy as np

__all__ = ["DatasetError", "DatasetWarning"]


class DatasetError(ValueError):
    """A dataset file is missing, malformed or fails its checksum (the message names it)."""


class DatasetWarning(UserWarning):
    """The data actually used differs from what was asked for (e.g. a split test set)."""


def _split_indices(n: int, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) index arrays: ``p = np.random.default_rng(seed).permutation(n)``,
    ``k = round(test_size * n)``; test is ``p[:k]``, train ``p[k:]`` (both in shuffled order)."""
    k = int(round(test_size * n))
    if not 0 < k < n:
        raise ValueError(f"test_size={test_size} leaves no train or no test samples out of {n}")
    p = np.random.default_rng(seed).permutation(n)
    return p[k:], p[:k]
