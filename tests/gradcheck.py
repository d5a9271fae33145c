"""Central-difference gradient checking in float64, shared by the layer and model tests."""

from __future__ import annotations

import numpy as np

from xpconv.backend import to_numpy

RTOL = 1e-6


def numerical_gradient(f, arr, indices=None, h=1e-5):
    """Central differences of the scalar f() with respect to the array ``arr``,
    perturbed in place (works on any namespace). ``indices``: flat positions to
    probe (all when None). Returns (flat indices, numerical gradient values)."""
    shape = tuple(int(s) for s in arr.shape)
    size = int(np.prod(shape))
    idx = np.arange(size) if indices is None else np.asarray(indices)
    grads = np.empty(len(idx))
    for k, flat in enumerate(idx):
        pos = tuple(int(i) for i in np.unravel_index(int(flat), shape))
        old = float(arr[pos])
        arr[pos] = old + h
        fp = float(f())
        arr[pos] = old - h
        fm = float(f())
        arr[pos] = old
        grads[k] = (fp - fm) / (2 * h)
    return idx, grads


def relative_error(analytic, numeric) -> float:
    a = np.asarray(analytic, dtype=np.float64).ravel()
    n = np.asarray(numeric, dtype=np.float64).ravel()
    # the floor keeps gradients that are zero in exact arithmetic (a bias followed by
    # batch normalization) from turning rounding noise of 1e-17 into a "relative" error
    denom = max(np.linalg.norm(a) + np.linalg.norm(n), 1e-8)
    return float(np.linalg.norm(a - n) / denom)


def check(f, arr, analytic, name: str, indices=None, rtol: float = RTOL) -> float:
    idx, num = numerical_gradient(f, arr, indices)
    a = to_numpy(analytic).ravel()[idx]
    err = relative_error(a, num)
    assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:g} (analytic {a[:4]}, numeric {num[:4]})"
    return err
