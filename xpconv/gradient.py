"""Numerical gradients under the book's names (``common.gradient``): central
differences with h = 1e-4 of a function ``f(x)`` of an array, for arrays of any
namespace.

``x`` is perturbed in place, one element at a time, and restored; ``f`` is called
with ``x`` and its result read as a float.  The gradient comes back as an array of
x's namespace, dtype and device.  (:mod:`xpconv.gradcheck` is the library's checker:
chosen positions, h = 1e-5, a relative error.)
"""

from __future__ import annotations

import numpy as np

from .backend import asarray_in, device_of, namespace_of

__all__ = ["numerical_gradient", "numerical_gradient_2d"]

_H = 1e-4


def _central_differences(f, x, arg) -> np.ndarray:
    """Host float64 (f(x + h e_i) - f(x - h e_i)) / 2h for every element i of ``x``;
    ``f`` is called with ``arg`` (x itself, or the array that x is a row of)."""
    shape = tuple(int(s) for s in x.shape)
    out = np.zeros(shape, dtype=np.float64)
    for pos in np.ndindex(*shape):
        old = float(x[pos])  # a Python float: a 0-d element of some libraries is a view
        x[pos] = old + _H
        up = float(f(arg))
        x[pos] = old - _H
        down = float(f(arg))
        x[pos] = old
        out[pos] = (up - down) / (2 * _H)
    return out


def _like(host, x):
    xp = namespace_of(x)
    return asarray_in(host, xp, dtype=x.dtype, device=device_of(x))


def numerical_gradient(f, x):
    """df/dx by central differences (h = 1e-4), an array shaped like ``x``."""
    return _like(_central_differences(f, x, x), x)


def numerical_gradient_2d(f, X):
    """The book's row-by-row variant: for a 2-D X each row is perturbed on its own and
    ``f`` is called with that row; a 1-D X is handled as one row."""
    if len(X.shape) == 1:
        return numerical_gradient(f, X)
    rows = [_central_differences(f, X[i], X[i]) for i in range(int(X.shape[0]))]
    return _like(np.stack(rows) if rows else np.zeros(tuple(int(s) for s in X.shape)), X)
