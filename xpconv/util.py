"""Helpers under the book's names (``common.util``): loss-curve smoothing, dataset
shuffling, output sizes, and im2col/col2im (the ones in :mod:`xpconv.ops`).

``smooth_curve`` is a plotting helper: it reads its input to the host and returns a
NumPy array.  ``shuffle_dataset`` keeps the arrays in their own namespace.
"""

from __future__ import annotations

import numpy as np

from .backend import Generator, asarray_in, device_of, namespace_of, to_numpy
from .ops import col2im, im2col

__all__ = ["col2im", "conv_output_size", "im2col", "shuffle_dataset", "smooth_curve"]

_WINDOW = 11  # taps of the Kaiser window (beta 2) that smooth_curve averages with


def smooth_curve(x):
    """A loss curve (sequence or 1-D array of any namespace) smoothed by a normalised
    11-tap Kaiser window (beta 2), its ends mirrored so the result keeps len(x)
    samples; a host float64 NumPy array.  The curve needs at least 11 values (the
    window's length): the book's formula returns fewer values than it was given for a
    shorter one (none for 1-8, 6 for 9, 9 for 10), which cannot be plotted against the
    curve's own x-axis, so a shorter curve raises ValueError."""
    try:
        v = np.asarray(to_numpy(x) if not isinstance(x, (list, tuple)) else x, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise TypeError(f"smooth_curve: expected a sequence or 1-D array of numbers, got {type(x).__name__}") from None
    if len(v) < _WINDOW:
        raise ValueError(f"smooth_curve: expected a curve of at least {_WINDOW} values (the smoothing window's length), "
                         f"got {len(v)}")
    half = _WINDOW - 1
    left = v[1:_WINDOW][::-1]  # mirror without the first sample
    right = v[len(v) - half:][::-1]  # mirror with the last one
    padded = np.concatenate([left, v, right])
    taps = np.kaiser(_WINDOW, 2)
    y = np.convolve(taps / taps.sum(), padded, mode="valid")
    return y[5 : len(y) - 5]


def shuffle_dataset(x, t, *, seed=None):
    """(x, t) with their samples (axis 0) in one random order, in their own namespace.

    ``x`` and ``t`` are arrays (NumPy or any Array-API library) with a sample axis, as in
    the book; anything else (a list, a 0-d array) raises TypeError/ValueError.
    Without ``seed`` the order comes from NumPy's global random state, as in the book
    (``np.random.seed`` makes it repeatable); ``seed`` (an int or an
    :class:`xpconv.backend.Generator`) draws it from xpconv's own generator instead."""
    for name, a in (("x", x), ("t", t)):
        try:
            namespace_of(a)
        except TypeError:
            raise TypeError(f"shuffle_dataset: expected {name} to be an array (NumPy or an Array-API library) with "
                            f"samples along axis 0, got {type(a).__name__}") from None
        if len(a.shape) == 0:
            raise ValueError(f"shuffle_dataset: expected {name} to have a sample axis, got a 0-d array")
    n = int(x.shape[0])
    if int(t.shape[0]) != n:
        raise ValueError(f"shuffle_dataset: expected as many labels as samples ({n}), got {int(t.shape[0])}")
    order = np.random.permutation(n) if seed is None else Generator(seed).permutation(n)
    return _take(x, order), _take(t, order)


def _take(a, order):
    xp = namespace_of(a)
    return xp.take(a, asarray_in(order, xp, device=device_of(a)), axis=0)


def conv_output_size(input_size, filter_size, stride=1, pad=0):
    """(input_size + 2*pad - filter_size) / stride + 1, a float as in the book (an
    integer value means the filter tiles the padded input exactly)."""
    return (input_size + 2 * pad - filter_size) / stride + 1
