"""xpconv.gradcheck against gradients known in closed form, on every namespace."""

import numpy as np

from xpconv.backend import to_numpy
from xpconv.gradcheck import numerical_gradient, relative_error


def test_numerical_gradient_of_a_known_function(xp, to_xp):
    a = to_xp(np.array([[1.0, -2.0, 0.5], [3.0, 0.0, -1.5]]), "float64")
    before = to_numpy(a).copy()
    box = [a]  # where loss() reads the array: JAX's cannot be perturbed in place
    idx, num = numerical_gradient(lambda: xp.sum(box[0] ** 3), a, replace=lambda new: box.__setitem__(0, new))
    # d/da sum(a^3) = 3 a^2
    np.testing.assert_allclose(num, 3 * before.ravel() ** 2, rtol=1e-8, atol=1e-8)
    assert idx.tolist() == list(range(6))
    np.testing.assert_array_equal(to_numpy(box[0]), before)  # every probe restored


def test_positions_and_relative_error_tell_right_from_wrong():
    a = np.arange(12.0).reshape(3, 4)
    idx, num = numerical_gradient(lambda: float((a**2).sum()), a, positions=[0, 5, 11])
    assert idx.tolist() == [0, 5, 11]
    right = 2 * a.ravel()[idx]
    assert relative_error(right, num) < 1e-9
    assert relative_error(right * 1.01, num) > 1e-3  # a 1% wrong gradient is caught
    assert relative_error(np.zeros(3), np.zeros(3)) == 0.0  # the floor: no 0/0
