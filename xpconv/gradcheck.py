"""Gradient checking: backpropagation against central differences (the book's
``numerical_gradient``), for arrays of any namespace.

The parameter array is perturbed in place by +-h at chosen flat positions and restored
(immutable arrays are replaced by perturbed copies through a ``replace`` function);
``loss()`` is read back to the host as a float each time, so the check runs in float64 on
the host whatever library holds the array.  Run it on float64 networks: in float32 the
differences drown in rounding.
"""

from __future__ import annotations

import array_api_extra as xpx
import numpy as np

from .backend import is_writeable

__all__ = ["numerical_gradient", "relative_error"]


def numerical_gradient(loss, arr, positions=None, h: float = 1e-5, *, replace=None) -> tuple[np.ndarray, np.ndarray]:
    """Central differences ``(loss(p + h) - loss(p - h)) / 2h`` of the scalar ``loss()``
    with respect to ``arr`` at flat ``positions`` (every position when None).

    ``arr`` is perturbed in place.  An array that cannot be written (JAX's) needs
    ``replace``: a function that installs a new array where ``loss()`` reads it, e.g.
    ``lambda a: net.params.__setitem__("W1", a)``; each probe then installs a copy
    with one entry changed, and the original array is installed again at the end.

    Returns ``(positions, gradient values)`` as host NumPy arrays."""
    shape = tuple(int(s) for s in arr.shape)
    idx = np.arange(int(np.prod(shape))) if positions is None else np.asarray(positions)
    grads = np.empty(len(idx))
    in_place = is_writeable(arr)
    if not in_place and replace is None:
        raise TypeError(
            f"numerical_gradient: expected a writeable array or a replace= function, got a read-only "
            f"{type(arr).__module__}.{type(arr).__name__} and no replace="
        )

    def probe(pos, value):
        if in_place:
            arr[pos] = value
        else:
            replace(xpx.at(arr)[pos].set(value))
        return float(loss())

    try:
        for k, flat in enumerate(idx):
            pos = tuple(int(i) for i in np.unravel_index(int(flat), shape))
            old = float(arr[pos])
            plus = probe(pos, old + h)
            minus = probe(pos, old - h)
            if in_place:
                arr[pos] = old
            grads[k] = (plus - minus) / (2 * h)
    finally:
        if not in_place:
            replace(arr)
    return idx, grads


def relative_error(analytic, numeric) -> float:
    """``|a - n| / (|a| + |n|)`` over the two gradients (host arrays), with a floor of
    1e-8 on the denominator so gradients that are zero in exact arithmetic (a bias
    followed by batch normalization) do not turn rounding noise into a large error."""
    a = np.asarray(analytic, dtype=np.float64).ravel()
    n = np.asarray(numeric, dtype=np.float64).ravel()
    return float(np.linalg.norm(a - n)) / max(float(np.linalg.norm(a) + np.linalg.norm(n)), 1e-8)
