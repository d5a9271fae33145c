"""Layers: gradient checks in float64 on every namespace, bad input, dtype discipline."""

from __future__ import annotations

import numpy as np
import pytest

from xpconv import layers as L
from xpconv import ops
from xpconv.backend import Generator, asarray_in, to_numpy

from .gradcheck import check_attr, check_input


def f64(xp, a):
    return asarray_in(np.asarray(a, dtype=np.float64), xp)


def linear_loss(layer, R, **kw):
    """f(x) = <layer.forward(x), R>, so dL/dout = R."""

    def f(x):
        return float(np_sum(layer.forward(x, **kw) * R))

    return f


def np_sum(a):
    from xpconv.backend import namespace_of

    return namespace_of(a).sum(a)


CONV_CASES = [
    # N, C, H, W, FN, FH, FW, stride, pad
    (2, 3, 6, 5, 2, 3, 3, 1, 0),
    (2, 2, 7, 6, 3, 3, 2, 2, 1),
    (2, 2, 7, 7, 2, 2, 3, 3, 2),
    (3, 1, 5, 6, 2, 2, 1, (1, 2), (2, 1)),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_convolution_gradients(xp, rng, case):
    N, C, H, Wd, FN, FH, FW, stride, pad = case
    x = f64(xp, rng.standard_normal((N, C, H, Wd)))
    layer = L.Convolution(f64(xp, rng.standard_normal((FN, C, FH, FW))), f64(xp, rng.standard_normal(FN)), stride, pad)
    out = layer.forward(x)
    R = f64(xp, rng.standard_normal(tuple(out.shape)))
    dx = layer.backward(R)
    loss_at = linear_loss(layer, R)
    check_input(loss_at, x, dx, "Convolution dx")
    check_attr(lambda: loss_at(x), layer, "W", layer.dW, "Convolution dW")
    check_attr(lambda: loss_at(x), layer, "b", layer.db, "Convolution db")


@pytest.mark.parametrize("cls", [L.Pooling, L.AvgPooling])
@pytest.mark.parametrize("pool, stride, pad", [((2, 2), 2, 0), ((3, 2), 1, 1), ((2, 3), 3, (1, 0)), ((3, 3), 2, 2)])
def test_pooling_gradients(xp, rng, cls, pool, stride, pad):
    x = f64(xp, rng.standard_normal((2, 3, 7, 7)))
    layer = cls(pool[0], pool[1], stride, pad)
    out = layer.forward(x)
    R = f64(xp, rng.standard_normal(tuple(out.shape)))
    check_input(linear_loss(layer, R), x, layer.backward(R), f"{cls.__name__} dx")


def test_affine_gradients_and_4d_input(xp, rng):
    x = f64(xp, rng.standard_normal((3, 2, 3, 2)))
    layer = L.Affine(f64(xp, rng.standard_normal((12, 5))), f64(xp, rng.standard_normal(5)))
    out = layer.forward(x)
    assert tuple(out.shape) == (3, 5)
    R = f64(xp, rng.standard_normal((3, 5)))
    dx = layer.backward(R)
    assert tuple(dx.shape) == (3, 2, 3, 2)  # backward restores the input's shape
    loss_at = linear_loss(layer, R)
    check_input(loss_at, x, dx, "Affine dx")
    check_attr(lambda: loss_at(x), layer, "W", layer.dW, "Affine dW")
    check_attr(lambda: loss_at(x), layer, "b", layer.db, "Affine db")


@pytest.mark.parametrize("cls", [L.Relu, L.Sigmoid])
def test_activation_gradients(xp, rng, cls):
    a = rng.standard_normal((4, 7))
    a[np.abs(a) < 1e-3] = 0.5  # stay away from ReLU's kink
    x = f64(xp, a)
    layer = cls()
    out = layer.forward(x)
    R = f64(xp, rng.standard_normal(tuple(out.shape)))
    check_input(linear_loss(layer, R), x, layer.backward(R), f"{cls.__name__} dx")


def test_dropout_gradient_with_fixed_mask(xp, rng):
    x = f64(xp, rng.standard_normal((4, 10)))
    layer = L.Dropout(0.3, rng=7)
    out = layer.forward(x, train_flg=True)
    R = f64(xp, rng.standard_normal(tuple(out.shape)))
    dx = layer.backward(R)

    def loss_at(x):
        layer.rng = Generator(7)
        return float(np_sum(layer.forward(x, train_flg=True) * R))

    check_input(loss_at, x, dx, "Dropout dx")
    mask = to_numpy(layer.mask)
    assert set(np.unique(mask)) <= {0.0, 1.0} and 0 < mask.mean() < 1
    # test mode scales by the keep probability (the book's convention)
    np.testing.assert_allclose(to_numpy(layer.forward(x, train_flg=False)), to_numpy(x) * 0.7)


def test_batchnorm_gradients(xp, rng):
    x = f64(xp, rng.standard_normal((5, 2, 2, 2)))
    layer = L.BatchNormalization(f64(xp, rng.standard_normal(8) + 1.0), f64(xp, rng.standard_normal(8)))
    out = layer.forward(x, train_flg=True)
    R = f64(xp, rng.standard_normal(tuple(out.shape)))
    dx = layer.backward(R)
    loss_at = linear_loss(layer, R, train_flg=True)
    check_input(loss_at, x, dx, "BatchNormalization dx")
    check_attr(lambda: loss_at(x), layer, "gamma", layer.dgamma, "BatchNormalization dgamma")
    check_attr(lambda: loss_at(x), layer, "beta", layer.dbeta, "BatchNormalization dbeta")
    y = to_numpy(layer.forward(x, train_flg=True)).reshape(5, -1)
    g, b = to_numpy(layer.gamma), to_numpy(layer.beta)
    np.testing.assert_allclose(((y - b) / g).mean(axis=0), 0, atol=1e-7)


@pytest.mark.parametrize("one_hot", [False, True])
def test_softmax_with_loss_gradient(xp, rng, one_hot):
    x = f64(xp, rng.standard_normal((6, 4)) * 3)
    t = np.array([0, 1, 2, 3, 1, 0])
    t = asarray_in(np.eye(4)[t] if one_hot else t, xp)
    layer = L.SoftmaxWithLoss()
    layer.forward(x, t)
    dx = layer.backward(1.0)
    check_input(lambda x: float(layer.forward(x, t)), x, dx, "SoftmaxWithLoss dx")


# ------------------------------------------------------------------ bad input


def _conv(xp, FN=2, C=3, FH=3, FW=3):
    return L.Convolution(f64(xp, np.zeros((FN, C, FH, FW))), f64(xp, np.zeros(FN)))


BAD = [
    ("wrong rank", lambda xp: _conv(xp).forward(f64(xp, np.zeros((3, 5, 5)))), r"Convolution: expected a 4-D input"),
    ("channel mismatch", lambda xp: _conv(xp).forward(f64(xp, np.zeros((1, 2, 5, 5)))), r"Convolution: expected input with C=3"),
    ("W/b mismatch", lambda xp: L.Convolution(f64(xp, np.zeros((2, 3, 3, 3))), f64(xp, np.zeros(3))), r"Convolution: expected b of shape \(FN,\) = \(2,\), got \(3,\)"),
    ("W rank", lambda xp: L.Convolution(f64(xp, np.zeros((2, 3, 3))), f64(xp, np.zeros(2))), r"Convolution: expected W of shape \(FN, C, FH, FW\)"),
    ("filter larger than padded input", lambda xp: _conv(xp, FH=7).forward(f64(xp, np.zeros((1, 3, 4, 4)))), r"Convolution: filter larger than the padded input"),
    ("pool larger than input", lambda xp: L.Pooling(5, 5).forward(f64(xp, np.zeros((1, 1, 3, 3)))), r"Pooling: filter larger than the padded input"),
    ("pool rank", lambda xp: L.AvgPooling(2, 2).forward(f64(xp, np.zeros((3, 3)))), r"AvgPooling: expected a 4-D input"),
    ("affine features", lambda xp: L.Affine(f64(xp, np.zeros((12, 4))), f64(xp, np.zeros(4))).forward(f64(xp, np.zeros((2, 10)))), r"Affine: expected 12 features per sample"),
    ("affine W/b", lambda xp: L.Affine(f64(xp, np.zeros((12, 4))), f64(xp, np.zeros(5))), r"Affine: expected b of shape \(M,\) = \(4,\), got \(5,\)"),
    ("labels out of range", lambda xp: L.SoftmaxWithLoss().forward(f64(xp, np.zeros((3, 4))), asarray_in(np.array([0, 4, 1]), xp)), r"SoftmaxWithLoss: labels out of range: expected 0 <= t < 4, got min 0, max 4"),
    ("negative labels", lambda xp: L.SoftmaxWithLoss().forward(f64(xp, np.zeros((3, 4))), asarray_in(np.array([0, -1, 1]), xp)), r"SoftmaxWithLoss: labels out of range"),
    ("label count", lambda xp: L.SoftmaxWithLoss().forward(f64(xp, np.zeros((3, 4))), asarray_in(np.array([0, 1]), xp)), r"SoftmaxWithLoss: expected 3 labels"),
    ("one-hot width", lambda xp: L.SoftmaxWithLoss().forward(f64(xp, np.zeros((3, 4))), f64(xp, np.eye(5)[:3])), r"SoftmaxWithLoss: one-hot labels must have 4 columns"),
]


@pytest.mark.parametrize("what, call, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_value_error_naming_layer(xp, what, call, message):
    with pytest.raises(ValueError, match=message):
        call(xp)


def test_float_labels_are_a_type_error(xp):
    with pytest.raises(TypeError, match="SoftmaxWithLoss: class-index labels must be integers"):
        L.SoftmaxWithLoss().forward(f64(xp, np.zeros((2, 3))), f64(xp, np.array([0.0, 1.0])))


def test_stride_and_pool_size_validated():
    with pytest.raises(ValueError, match="stride must be >= 1"):
        L.Pooling(2, 2, stride=0)
    with pytest.raises(ValueError, match="pool size must be >= 1"):
        L.AvgPooling(0, 2)
    with pytest.raises(ValueError, match="pad must be non-negative"):
        L.Convolution(np.zeros((1, 1, 2, 2)), np.zeros(1), pad=-1)


# ------------------------------------------------------------------ dtype discipline


def test_float32_layers_never_compute_in_float64(xp, rng):
    f32 = lambda a: asarray_in(np.asarray(a, dtype=np.float32), xp)  # noqa: E731
    x64 = f64(xp, rng.standard_normal((2, 3, 8, 8)))  # float64 input into float32 layers
    conv = L.Convolution(f32(rng.standard_normal((4, 3, 3, 3))), f32(np.zeros(4)), 1, 1)
    stack = [conv, L.Relu(), L.Pooling(2, 2, 2), L.AvgPooling(2, 2, 2), L.Sigmoid(), L.Dropout(0.2, rng=1)]
    aff = L.Affine(f32(rng.standard_normal((16, 5))), f32(np.zeros(5)))
    h = x64
    for layer in stack:
        h = layer.forward(h) if not isinstance(layer, L.Dropout) else layer.forward(h, True)
        assert h.dtype == xp.float32, type(layer).__name__
    out = aff.forward(h)
    assert out.dtype == xp.float32
    loss_layer = L.SoftmaxWithLoss()
    loss = loss_layer.forward(out, asarray_in(np.array([1, 2]), xp))
    assert loss.dtype == xp.float32
    d = aff.backward(loss_layer.backward(1.0))
    assert d.dtype == xp.float32 and aff.dW.dtype == xp.float32
    for layer in reversed(stack):
        d = layer.backward(d)
        assert d.dtype == xp.float32, type(layer).__name__
    assert conv.dW.dtype == xp.float32 and conv.db.dtype == xp.float32


@pytest.mark.parametrize("impl", [None, ops.GENERIC], ids=["kernels", "generic"])
def test_float32_ops_stay_float32_on_both_paths(xp, rng, impl):
    x = asarray_in(rng.standard_normal((2, 2, 6, 6)).astype(np.float32), xp)
    W = asarray_in(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), xp)
    b = asarray_in(np.zeros(3, np.float32), xp)
    out, cache = ops.conv2d_forward(x, W, b, 1, 1, impl=impl)
    grads = ops.conv2d_backward(out, cache)
    p, pc = ops.max_pool2d_forward(out, 2, 2, 2, 0, impl=impl)
    dp = ops.max_pool2d_backward(p, pc)
    a, ac = ops.avg_pool2d_forward(out, 2, 2, 2, 0, impl=impl)
    da = ops.avg_pool2d_backward(a, ac)
    for arr in (out, *grads, p, dp, a, da):
        assert arr.dtype == xp.float32
