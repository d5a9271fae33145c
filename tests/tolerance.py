"""Comparisons whose tolerance follows the magnitudes being compared.

Two correct float32 computations of the same scores may sum in different orders (another
BLAS kernel, another instruction set, another library's convolution). The difference is then
bounded by the rounding of the largest terms, not of the result: an untrained BatchNorm net
gives logits near 1e6, and an element that cancels to 8e3 can differ by 0.1 between two
correct orders. An elementwise ``rtol`` alone would call that a failure, so the absolute
tolerance here is ``rtol`` times the largest magnitude in the reference array.
"""

from __future__ import annotations

import numpy as np


def assert_close(got, want, *, rtol: float = 1e-5, err_msg: str = "") -> None:
    """``got`` equals ``want`` to ``rtol`` elementwise, or to ``rtol * max|want|`` absolutely."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{err_msg}: shape {got.shape}, expected {want.shape}"
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(scale, np.finfo(np.float32).tiny), err_msg=err_msg)
