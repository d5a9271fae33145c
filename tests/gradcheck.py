"""Central-difference gradient checking in float64, shared by the layer and model tests."""

from __future__ import annotations

import numpy as np

from xpconv.backend import to_numpy
from xpconv.gradcheck import numerical_gradient, relative_error

RTOL = 1e-6
#: the largest central-difference value accepted for a gradient that is exactly zero
ZERO_NOISE = 1e-9


def check(f, arr, analytic, name: str, indices=None, rtol: float = RTOL) -> float:
    idx, num = numerical_gradient(f, arr, indices)
    a = to_numpy(analytic).ravel()[idx]
    err = relative_error(a, num)
    if float(np.max(np.abs(a), initial=0.0)) < 1e-12:
        # a gradient that is zero in exact arithmetic (a bias followed by batch
        # normalization): central differences give rounding noise ~ eps*|loss|/h
        err = float(np.max(np.abs(num), initial=0.0)) / ZERO_NOISE * rtol
    assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:g} (analytic {a[:4]}, numeric {num[:4]})"
    return err
