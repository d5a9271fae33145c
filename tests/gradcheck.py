"""Central-difference gradient checking in float64, shared by the layer and model tests."""

from __future__ import annotations

from xpconv.backend import to_numpy
from xpconv.gradcheck import numerical_gradient, relative_error

RTOL = 1e-6


def check(f, arr, analytic, name: str, indices=None, rtol: float = RTOL) -> float:
    idx, num = numerical_gradient(f, arr, indices)
    a = to_numpy(analytic).ravel()[idx]
    err = relative_error(a, num)
    assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:g} (analytic {a[:4]}, numeric {num[:4]})"
    return err
