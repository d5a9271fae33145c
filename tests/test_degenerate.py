"""Empty and degenerate inputs to the book's helpers say so.

Where the book's code gives a meaningful result the port keeps it (checked against the
book's formula here, and against the book's code in test_book_conformance.py); where the
book's result is meaningless (a loss of -0.0 for labels outside the classes, a "smoothed"
curve shorter than the curve, an AttributeError) xpconv raises a ValueError/TypeError
that says what was expected and what came.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from xpconv.datasets import load_digits
from xpconv.functions import cross_entropy_error, softmax, softmax_loss
from xpconv.util import shuffle_dataset, smooth_curve

Y = softmax(np.array([[1.0, 2.0, 3.0], [3.0, 1.0, 0.5]]))


# --------------------------------------------------------------------------- cross_entropy_error


@pytest.mark.parametrize("t, pattern", [
    ([3, 3], r"expected class indices 0 <= t < 3 \(y has 3 classes\), got min 3, max 3"),  # -0.0 before
    ([0, -1], r"expected class indices 0 <= t < 3 .* got min -1, max 0"),  # the book wraps -1 to the last class
    ([[0], [7]], r"got min 0, max 7"),
])
def test_cross_entropy_refuses_labels_outside_the_classes(t, pattern):
    with pytest.raises(ValueError, match=pattern):
        cross_entropy_error(Y, np.array(t))
    with pytest.raises(ValueError, match=pattern):
        softmax_loss(np.log(Y), np.array(t))


def test_cross_entropy_refuses_non_integer_index_labels():
    with pytest.raises(TypeError, match=r"expected integer class indices or one-hot labels of shape \(2, 3\), got float64 labels of shape \(2,\)"):
        cross_entropy_error(Y, np.array([0.0, 2.0]))


def test_cross_entropy_refuses_an_empty_batch():
    with pytest.raises(ValueError, match=r"got no samples \(y of shape \(0, 3\)\)"):  # nan and a RuntimeWarning before
        cross_entropy_error(np.zeros((0, 3)), np.zeros(0, dtype=np.int64))


def test_cross_entropy_keeps_the_books_numbers_for_valid_labels():
    t = np.array([2, 0])
    expected = -np.mean(np.log(Y[np.arange(2), t] + 1e-7))
    assert float(cross_entropy_error(Y, t)) == pytest.approx(expected, rel=1e-12)
    assert float(cross_entropy_error(Y, np.eye(3)[t])) == pytest.approx(expected, rel=1e-12)
    assert float(cross_entropy_error(Y[0], np.array(2))) == pytest.approx(-math.log(Y[0, 2] + 1e-7), rel=1e-12)


def test_cross_entropy_checks_labels_on_other_namespaces():
    xps = pytest.importorskip("array_api_strict")
    y = xps.asarray(Y)
    with pytest.raises(ValueError, match="got min 3, max 3"):
        cross_entropy_error(y, xps.asarray([3, 3]))
    assert float(cross_entropy_error(y, xps.asarray([2, 0]))) == pytest.approx(float(cross_entropy_error(Y, np.array([2, 0]))))


# --------------------------------------------------------------------------- smooth_curve


def _book_smooth(x):
    """The book's formula (common/util.py), restated: mirror 10 samples at each end,
    convolve with the normalised Kaiser(11, 2) window, drop 5 at each end."""
    x = np.asarray(x, dtype=np.float64)
    s = np.concatenate([x[10:0:-1], x, x[-1:-11:-1]])
    w = np.kaiser(11, 2)
    y = np.convolve(w / w.sum(), s, mode="valid")
    return y[5 : len(y) - 5]


@pytest.mark.parametrize("n", [1, 2, 5, 9, 10])
def test_smooth_curve_refuses_a_curve_shorter_than_its_window(n):
    # the book's formula returns 0 values for 1-8 samples, 6 for 9 and 9 for 10
    assert len(_book_smooth(np.arange(n, dtype=float))) < n
    with pytest.raises(ValueError, match=rf"expected a curve of at least 11 values .*, got {n}"):
        smooth_curve(list(np.arange(n, dtype=float)))


def test_smooth_curve_refuses_an_empty_curve_and_non_numbers():
    with pytest.raises(ValueError, match="at least 11 values .*, got 0"):
        smooth_curve([])
    with pytest.raises(TypeError, match="expected a sequence or 1-D array of numbers, got dict"):
        smooth_curve({"a": 1})
    with pytest.raises(TypeError, match="expected a sequence or 1-D array of numbers, got list"):
        smooth_curve(["a"] * 20)


@pytest.mark.parametrize("n", [11, 12, 30])
def test_smooth_curve_keeps_the_books_result_where_it_keeps_the_length(n):
    curve = np.cumsum(np.random.default_rng(n).standard_normal(n))
    got = smooth_curve(list(curve))
    assert got.shape == (n,)
    np.testing.assert_allclose(got, _book_smooth(curve), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- shuffle_dataset


def test_shuffle_dataset_refuses_lists_by_name():
    with pytest.raises(TypeError, match=r"expected x to be an array .* got list"):  # AttributeError before
        shuffle_dataset([1, 2], [3, 4])
    with pytest.raises(TypeError, match=r"expected t to be an array .* got tuple"):
        shuffle_dataset(np.array([1, 2]), (3, 4))


def test_shuffle_dataset_refuses_0d_arrays_and_mismatched_lengths():
    with pytest.raises(ValueError, match="expected x to have a sample axis, got a 0-d array"):
        shuffle_dataset(np.array(1.0), np.array([1]))
    with pytest.raises(ValueError, match=r"expected as many labels as samples \(3\), got 2"):
        shuffle_dataset(np.zeros((3, 2)), np.zeros(2))


def test_shuffle_dataset_of_an_empty_set_is_empty_as_in_the_book():
    x, t = shuffle_dataset(np.zeros((0, 4)), np.zeros(0, dtype=np.int64), seed=0)
    assert x.shape == (0, 4) and t.shape == (0,)


# --------------------------------------------------------------------------- load_digits


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 0, 1, -0.5, 2.0])
def test_load_digits_refuses_a_test_size_that_is_not_a_fraction(value):
    with pytest.raises(ValueError, match=r"load_digits: test_size must be a fraction strictly between 0 and 1, got "):
        load_digits(test_size=value)


@pytest.mark.parametrize("value", ["0.2", None, True, [0.2]])
def test_load_digits_refuses_a_test_size_that_is_not_a_number(value):
    with pytest.raises(TypeError, match=rf"load_digits: test_size must be a number between 0 and 1, got {type(value).__name__}"):
        load_digits(test_size=value)


def test_load_digits_takes_numpy_fractions():
    (x, _), (xt, _) = load_digits(test_size=np.float32(0.25))
    assert len(xt) == round(0.25 * 1797) and len(x) + len(xt) == 1797
