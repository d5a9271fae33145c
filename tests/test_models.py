"""Models: gradient() against central differences, cross-namespace agreement,
placement, persistence and bounded-memory prediction."""

from __future__ import annotations

import numpy as np
import pytest

from xpconv import layers as L
from xpconv.backend import Generator, asarray_in, get_namespace, namespace_name, namespace_of, to_numpy
from xpconv.models import DeepConvNet, Sequential, SigmoidTwoLayerNet, SimpleConvNet, TwoLayerNet
from xpconv.optim import Adam

from .gradcheck import check
from .tolerance import assert_close


def _sample(n_per_key, arr, r):
    size = int(np.prod(tuple(arr.shape)))
    return r.choice(size, size=min(size, n_per_key), replace=False)


def _gradcheck_model(net, x, t, n_per_key=8, reseed=None):
    r = np.random.default_rng(0)

    def f():
        if reseed:
            reseed()
        return float(net.loss(x, t))

    if reseed:
        reseed()
    grads = net.gradient(x, t)
    assert set(grads) == set(net.params)
    for key in net.params:
        check(f, net.params[key], grads[key], f"{type(net).__name__} {key}", indices=_sample(n_per_key, net.params[key], r),
              replace=lambda a, key=key: net.params.__setitem__(key, a))


def test_simple_convnet_gradient(xp, rng):
    net = SimpleConvNet(
        input_dim=(2, 9, 8),
        conv_param={"filter_num": 3, "filter_size": 3, "pad": 1, "stride": 1},
        hidden_size=6,
        output_size=4,
        weight_init_std=0.3,
        xp=xp,
        dtype="float64",
        seed=1,
    )
    x = rng.standard_normal((3, 2, 9, 8))
    t = np.array([0, 3, 1])
    _gradcheck_model(net, x, t)


def test_two_layer_net_gradient(xp, rng):
    net = TwoLayerNet(7, 5, 3, weight_init_std=0.5, xp=xp, dtype="float64", seed=2)
    _gradcheck_model(net, rng.standard_normal((4, 7)), np.eye(3)[[0, 2, 1, 2]], n_per_key=50)


def test_deep_convnet_gradient_with_dropout(xp, rng):
    net = DeepConvNet(input_dim=(1, 12, 12), hidden_size=8, output_size=3, xp=xp, dtype="float64", seed=3)
    drops = [layer for layer in net.layers if isinstance(layer, L.Dropout)]
    assert len(drops) == 2

    def reseed():  # the same dropout masks in every evaluation
        for i, d in enumerate(drops):
            d.rng = Generator(100 + i)

    _gradcheck_model(net, rng.standard_normal((2, 1, 12, 12)), np.array([1, 2]), n_per_key=4, reseed=reseed)


def test_sequential_with_batchnorm_gradient(xp, rng):
    g = Generator(4)
    f64 = dict(xp=xp, dtype="float64")
    layers = [
        L.Convolution(g.normal((2, 1, 3, 3), scale=0.5, **f64), g.normal((2,), **f64), 1, 1),
        L.BatchNormalization(g.normal((2 * 5 * 5,), **f64), g.normal((2 * 5 * 5,), **f64)),
        L.Relu(),
        L.AvgPooling(2, 2, 1),
        L.Affine(g.normal((2 * 4 * 4, 3), scale=0.3, **f64), g.normal((3,), **f64)),
    ]
    net = Sequential(layers)
    assert list(net.params) == ["W1", "b1", "gamma1", "beta1", "W2", "b2"]
    _gradcheck_model(net, rng.standard_normal((4, 1, 5, 5)), np.array([0, 1, 2, 1]))


def test_book_parameter_keys_and_shapes():
    net = SimpleConvNet()
    shapes = {k: tuple(v.shape) for k, v in net.params.items()}
    assert shapes == {"W1": (30, 1, 5, 5), "b1": (30,), "W2": (4320, 100), "b2": (100,), "W3": (100, 10), "b3": (10,)}
    deep = DeepConvNet()
    assert [tuple(deep.params[f"W{i}"].shape) for i in range(1, 9)] == [
        (16, 1, 3, 3), (16, 16, 3, 3), (32, 16, 3, 3), (32, 32, 3, 3),
        (64, 32, 3, 3), (64, 64, 3, 3), (64 * 4 * 4, 50), (50, 10),
    ]
    # He initialization: std of W1 close to sqrt(2 / (1*3*3))
    assert np.std(to_numpy(deep.params["W6"])) == pytest.approx(np.sqrt(2 / (64 * 9)), rel=0.05)
    assert net.params["W1"].dtype == np.float32


def test_sigmoid_two_layer_net_on_every_namespace(xp, rng):
    """Chapter 4's net: the model's namespace follows from xp, and predict (probabilities),
    loss, accuracy and gradient equal the NumPy float64 net's; ch04/train_neuralnet.py's
    update ``params[key] -= lr * grad[key]`` works on each namespace (JAX's included)."""
    ref = SigmoidTwoLayerNet(7, 5, 3, weight_init_std=0.5, dtype="float64", seed=3)
    net = SigmoidTwoLayerNet(7, 5, 3, weight_init_std=0.5, xp=xp, dtype="float64", seed=3)
    assert namespace_name(net.xp) == namespace_name(xp)
    assert all(namespace_name(namespace_of(v)) == namespace_name(xp) for v in net.params.values())
    x, t = rng.standard_normal((4, 7)), np.eye(3)[[0, 2, 1, 2]]
    y = net.predict(x)
    assert namespace_name(namespace_of(y)) == namespace_name(xp)
    assert_close(to_numpy(y), to_numpy(ref.predict(x)), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(y).sum(axis=1), 1.0, rtol=1e-12)
    assert float(net.loss(x, t)) == pytest.approx(float(ref.loss(x, t)), rel=1e-12)
    assert float(net.loss(x, np.array([0, 2, 1, 2]))) == pytest.approx(float(ref.loss(x, t)), rel=1e-12)  # indices too
    assert net.accuracy(x, t) == ref.accuracy(x, t)
    grads, ref_grads = net.gradient(x, t), ref.gradient(x, t)
    for key in ("W1", "b1", "W2", "b2"):
        assert_close(to_numpy(grads[key]), to_numpy(ref_grads[key]), rtol=1e-12)
        net.params[key] -= 0.1 * grads[key]
        ref.params[key] -= 0.1 * ref_grads[key]
    assert float(net.loss(x, t)) == pytest.approx(float(ref.loss(x, t)), rel=1e-12)
    assert float(net.loss(x, t)) < float(SigmoidTwoLayerNet(7, 5, 3, weight_init_std=0.5, dtype="float64", seed=3).loss(x, t))


def test_sigmoid_two_layer_net_gradient(rng):
    # the loss carries the book's 1e-7 inside the log, the analytic gradient is the exact
    # cross-entropy's: they agree to about 1e-7 / y, hence rtol 1e-5
    net = SigmoidTwoLayerNet(7, 5, 3, weight_init_std=0.5, dtype="float64", seed=2)
    x, t = rng.standard_normal((4, 7)), np.eye(3)[[0, 2, 1, 2]]
    grads = net.gradient(x, t)
    for key in net.params:
        check(lambda: float(net.loss(x, t)), net.params[key], grads[key], key, rtol=1e-5)


def test_same_seed_same_weights_on_every_namespace(xp):
    ref = SimpleConvNet(xp="numpy", seed=42)
    net = SimpleConvNet(xp=xp, seed=42)
    assert namespace_name(net.xp) == namespace_name(xp)
    for k in ref.params:
        np.testing.assert_array_equal(to_numpy(net.params[k]), to_numpy(ref.params[k]))
    other = SimpleConvNet(xp=xp, seed=43)
    assert not np.array_equal(to_numpy(other.params["W1"]), to_numpy(ref.params["W1"]))


def _adam_losses(ns, x, t, steps=10):
    net = SimpleConvNet(input_dim=(1, 12, 12), conv_param={"filter_num": 8, "filter_size": 3}, hidden_size=20, xp=ns, seed=5)
    opt = Adam(lr=0.01)
    losses = []
    for _ in range(steps):
        grads = net.gradient(x, t)
        losses.append(float(net.last_layer.loss))
        opt.update(net.params, grads)
    return np.array(losses)


def test_ten_adam_steps_agree_across_namespaces(xp):
    r = np.random.default_rng(9)
    x = r.random((16, 1, 12, 12), dtype=np.float32)
    t = r.integers(0, 10, 16)
    ref = _adam_losses("numpy", x, t)
    got = _adam_losses(xp, x, t)
    assert ref[-1] < ref[0]  # it learns
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_float32_model_run_stays_float32(xp):
    net = SimpleConvNet(input_dim=(1, 10, 10), conv_param={"filter_num": 4, "filter_size": 3}, hidden_size=8, xp=xp, seed=0)
    x64 = np.random.default_rng(0).random((4, 1, 10, 10))  # float64 host data
    t = np.array([1, 2, 3, 4])
    grads = net.gradient(x64, t)
    assert all(g.dtype == net.xp.float32 for g in grads.values())
    assert net.last_layer.loss.dtype == net.xp.float32
    assert net.predict(x64).dtype == net.xp.float32
    opt = Adam()
    opt.update(net.params, grads)
    assert all(p.dtype == net.xp.float32 for p in net.params.values())
    assert all(s.dtype == net.xp.float32 for slot in opt.state.values() for s in slot.values())


def test_float64_end_to_end(xp):
    net = TwoLayerNet(5, 4, 3, xp=xp, dtype="float64", seed=0)
    grads = net.gradient(np.ones((2, 5), np.float32), np.array([0, 1]))
    assert all(g.dtype == net.xp.float64 for g in grads.values())


def test_inputs_from_another_namespace_are_moved(xp):
    net = TwoLayerNet(6, 5, 3, xp=xp, seed=0)
    host = np.random.default_rng(1).random((4, 6), dtype=np.float32)
    strict = asarray_in(host, get_namespace("array_api_strict"))
    a = to_numpy(net.predict(host))
    b = to_numpy(net.predict(strict))
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert float(net.loss(strict, asarray_in(np.array([0, 1, 2, 0]), get_namespace("array_api_strict")))) > 0


def test_to_moves_parameters_between_namespaces(xp):
    net = SimpleConvNet(input_dim=(1, 8, 8), conv_param={"filter_num": 2, "filter_size": 3}, hidden_size=4, seed=0)
    x = np.random.default_rng(2).random((3, 1, 8, 8), dtype=np.float32)
    before = to_numpy(net.predict(x))
    assert net.to(xp) is net
    assert all(namespace_name(namespace_of(p)) == namespace_name(xp) for p in net.params.values())
    assert_close(to_numpy(net.predict(x)), before, rtol=1e-5)
    net.to("numpy")
    assert_close(to_numpy(net.predict(x)), before, rtol=1e-5)


def test_chunked_predict_and_accuracy_equal_unchunked(xp):
    net = SimpleConvNet(input_dim=(1, 8, 8), conv_param={"filter_num": 3, "filter_size": 3}, hidden_size=6, xp=xp, seed=0)
    x = np.random.default_rng(3).random((37, 1, 8, 8), dtype=np.float32)
    t = np.random.default_rng(4).integers(0, 10, 37)
    whole = to_numpy(net.predict(x))
    net.eval_batch_size = 5
    assert_close(to_numpy(net.predict(x)), whole, rtol=1e-5)
    y = whole.argmax(axis=1)
    expected = float(np.mean(y == t))
    assert net.accuracy(x, t, batch_size=7) == pytest.approx(expected)
    assert net.accuracy(x, np.eye(10)[t], batch_size=100) == pytest.approx(expected)


def test_save_and_load_params_round_trip(xp, tmp_path):
    net = SimpleConvNet(input_dim=(1, 8, 8), conv_param={"filter_num": 3, "filter_size": 3}, hidden_size=6, xp=xp, seed=0)
    path = tmp_path / "params.bin"
    net.save_params(path)
    other = SimpleConvNet(input_dim=(1, 8, 8), conv_param={"filter_num": 3, "filter_size": 3}, hidden_size=6, xp=xp, seed=1)
    other.load_params(path)
    for k in net.params:
        np.testing.assert_array_equal(to_numpy(other.params[k]), to_numpy(net.params[k]))
    # a dict of arrays from another namespace works too
    third = SimpleConvNet(input_dim=(1, 8, 8), conv_param={"filter_num": 3, "filter_size": 3}, hidden_size=6, seed=2)
    third.load_params(dict(net.params))
    np.testing.assert_array_equal(to_numpy(third.params["W2"]), to_numpy(net.params["W2"]))


def test_load_params_rejects_wrong_shapes_and_missing_keys():
    net = TwoLayerNet(4, 3, 2, seed=0)
    good = {k: to_numpy(v) for k, v in net.params.items()}
    with pytest.raises(KeyError, match="parameters missing"):
        net.load_params({k: v for k, v in good.items() if k != "b2"})
    bad = dict(good, W1=np.zeros((5, 3), np.float32))
    with pytest.raises(ValueError, match=r"parameter 'W1': expected shape \(4, 3\), got \(5, 3\)"):
        net.load_params(bad)


def test_params_view_supports_assignment_and_in_place_updates():
    net = TwoLayerNet(4, 3, 2, seed=0)
    conv = net.layers[0]
    net.params["W1"] = np.ones((4, 3), np.float32)
    assert np.all(conv.W == 1)  # assignment reaches the layer
    net.params["W1"] -= 0.5  # in-place update too
    assert np.all(conv.W == 0.5)
    with pytest.raises(KeyError, match="unknown parameter 'W9'"):
        net.params["W9"] = np.ones(1)


def test_summary_names_layers_and_backend():
    s = SimpleConvNet(seed=0).summary()
    assert "Convolution(1->30, 5x5" in s and "numpy" in s and "parameters" in s


def test_device_choice_picks_the_namespace(monkeypatch):
    from xpconv import backend

    monkeypatch.setattr(backend, "cuda_status", lambda: (False, "CuPy is not installed"))
    net = TwoLayerNet(4, 3, 2, device="auto", seed=0)
    assert net.backend_name == "numpy"
    assert TwoLayerNet(4, 3, 2, device="cpu", seed=0).backend_name == "numpy"
    with pytest.raises(backend.BackendUnavailable, match="CUDA is not usable"):
        TwoLayerNet(4, 3, 2, device="cuda", seed=0)
    with pytest.raises(ValueError, match="device 'cuda' does not fit xp='numpy'"):
        TwoLayerNet(4, 3, 2, xp="numpy", device="cuda", seed=0)
