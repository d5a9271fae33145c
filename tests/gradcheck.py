"""Central-difference gradient checking in float64, shared by the layer and model tests."""

from __future__ import annotations

import numpy as np

from xpconv.backend import is_writeable, to_numpy
from xpconv.gradcheck import numerical_gradient, relative_error

RTOL = 1e-6
#: the largest central-difference value accepted for a gradient that is exactly zero
ZERO_NOISE = 1e-9
IMMUTABLE_SAMPLE = 12


def check(f, arr, analytic, name: str, indices=None, rtol: float = RTOL, replace=None) -> float:
    """``replace`` installs a perturbed copy of ``arr`` where ``f`` reads it (needed for
    immutable arrays, JAX's; see xpconv.gradcheck.numerical_gradient).  There, with no
    ``indices``, a fixed sample of IMMUTABLE_SAMPLE positions is probed: each probe runs
    the whole loss op by op, and JAX's eager dispatch makes that slow."""
    if indices is None and not is_writeable(arr):
        size = int(np.prod(tuple(arr.shape)))
        indices = np.random.default_rng(0).choice(size, size=min(size, IMMUTABLE_SAMPLE), replace=False)
    idx, num = numerical_gradient(f, arr, indices, replace=replace)
    a = to_numpy(analytic).ravel()[idx]
    err = relative_error(a, num)
    if float(np.max(np.abs(a), initial=0.0)) < 1e-12:
        # a gradient that is zero in exact arithmetic (a bias followed by batch
        # normalization): central differences give rounding noise ~ eps*|loss|/h
        err = float(np.max(np.abs(num), initial=0.0)) / ZERO_NOISE * rtol
    assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:g} (analytic {a[:4]}, numeric {num[:4]})"
    return err


def check_input(loss_at, x, analytic, name: str, **kw) -> float:
    """Check dL/dx where ``loss_at(x)`` evaluates the loss at input ``x``; perturbed copies
    of an immutable ``x`` (JAX) are passed in instead of writing into it."""
    box = [x]
    return check(lambda: loss_at(box[0]), x, analytic, name, replace=lambda a: box.__setitem__(0, a), **kw)


def check_attr(f, owner, attr: str, analytic, name: str, **kw) -> float:
    """Check the gradient of ``f()`` by ``owner.<attr>`` (a layer's W, b, gamma...)."""
    return check(f, getattr(owner, attr), analytic, name, replace=lambda a: setattr(owner, attr, a), **kw)
