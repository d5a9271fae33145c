"""xpconv.interop.to_torch: the torch module computes the xpconv model's scores (eval mode),
with copies of its weights, for every model of the book and every layer in the table."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from xpconv import layers as L
from xpconv.backend import to_numpy
from xpconv.interop import TO_TORCH, book_dropout, from_torch, to_torch
from xpconv.models import DeepConvNet, MultiLayerNetExtend, Sequential, SimpleConvNet, TwoLayerNet

from .tolerance import assert_close


def _scores(module, x):
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def _images(n, shape=(1, 28, 28), seed=0):
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


@pytest.mark.parametrize("make, shape", [
    (lambda: TwoLayerNet(784, 50, 10, weight_init_std=0.1, seed=0), (784,)),
    (lambda: TwoLayerNet(784, 50, 10, weight_init_std=0.1, seed=0), (1, 28, 28)),  # Affine flattens images
    (lambda: SimpleConvNet(seed=0), (1, 28, 28)),
    (lambda: SimpleConvNet(input_dim=(3, 12, 10), conv_param={"filter_num": 4, "filter_size": 3, "pad": 1, "stride": 1},
                           hidden_size=20, output_size=5, weight_init_std=0.3, seed=1), (3, 12, 10)),
    (lambda: DeepConvNet(seed=0), (1, 28, 28)),
    (lambda: MultiLayerNetExtend(784, [40, 30], 10, use_batchnorm=True, use_dropout=True, dropout_ration=0.2, seed=0), (784,)),
])
def test_eval_scores_match_the_model(make, shape):
    net = make()
    x = _images(4, shape)
    module = to_torch(net).eval()
    assert not module.training and isinstance(module, torch.nn.Sequential)
    assert_close(_scores(module, x), to_numpy(net.predict(x)), rtol=1e-5)


def test_float64_models_give_float64_modules_that_agree_to_rounding():
    net = SimpleConvNet(input_dim=(1, 10, 10), conv_param={"filter_num": 3, "filter_size": 3, "pad": 0, "stride": 1},
                        hidden_size=8, weight_init_std=0.5, dtype="float64", seed=3)
    x = np.random.default_rng(0).random((3, 1, 10, 10))
    module = to_torch(net).eval()
    assert all(p.dtype == torch.float64 for p in module.parameters())
    np.testing.assert_allclose(_scores(module, x), to_numpy(net.predict(x)), rtol=1e-12, atol=1e-12)


def test_weights_are_copies():
    net = TwoLayerNet(6, 4, 3, seed=0)
    module = to_torch(net)
    linear = [m for m in module if isinstance(m, torch.nn.Linear)]
    np.testing.assert_array_equal(linear[0].weight.detach().numpy(), to_numpy(net.params["W1"]).T)
    with torch.no_grad():
        linear[0].weight.add_(1.0)
    assert not np.allclose(linear[0].weight.detach().numpy(), to_numpy(net.params["W1"]).T)


def test_a_model_on_another_namespace_converts():
    xps = pytest.importorskip("array_api_strict")
    net = TwoLayerNet(12, 5, 3, weight_init_std=0.5, xp=xps, seed=0)
    x = _images(2, (12,))
    assert_close(_scores(to_torch(net).eval(), x), to_numpy(net.predict(xps.asarray(x))), rtol=1e-5)


def test_book_dropout_masks_without_scaling_and_scales_in_eval():
    m = book_dropout(0.25)
    x = torch.ones(2000)
    out = m.train()(x)
    assert set(torch.unique(out).tolist()) <= {0.0, 1.0}
    assert 0.65 < float(out.mean()) < 0.85  # about 1 - ratio kept
    np.testing.assert_allclose(m.eval()(x).numpy(), 0.75)


def test_inverted_dropout_differs_by_the_keep_ratio_per_dropout_layer():
    net = DeepConvNet(seed=0)
    x = _images(2)
    got = _scores(to_torch(net, dropout="inverted").eval(), x)
    assert_close(got * 0.5 * 0.5, to_numpy(net.predict(x)), rtol=1e-5)


def test_batchnorm_sigmoid_and_avg_pooling():
    rng = np.random.default_rng(0)
    f32 = np.float32
    layers = [
        L.Convolution(rng.normal(size=(2, 1, 3, 3)).astype(f32), np.zeros(2, f32), pad=1),
        L.AvgPooling(2, 2, stride=2),
        L.Affine(rng.normal(size=(2 * 4 * 4, 6)).astype(f32), np.zeros(6, f32)),
        L.BatchNormalization(rng.random(6).astype(f32) + 0.5, rng.normal(size=6).astype(f32)),
        L.Sigmoid(),
        L.Affine(rng.normal(size=(6, 3)).astype(f32), np.zeros(3, f32)),
    ]
    net = Sequential(layers)
    x = _images(8, (1, 8, 8))
    net.predict(x, train_flg=True)  # running statistics away from their start
    module = to_torch(net).eval()
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in module)
    assert_close(_scores(module, x), to_numpy(net.predict(x)), rtol=1e-5)


def test_unknown_layers_and_options_are_refused_by_name():
    class Odd:
        pass

    with pytest.raises(ValueError, match="no torch.nn counterpart for layer Odd"):
        to_torch(Sequential([Odd()]))
    with pytest.raises(ValueError, match="dropout must be one of"):
        to_torch(TwoLayerNet(4, 3, 2), dropout="scaled")
    with pytest.raises(TypeError, match="expected an xpconv model"):
        to_torch(object())
    bn = L.BatchNormalization(np.ones(2 * 3 * 3, np.float32), np.zeros(2 * 3 * 3, np.float32))
    conv = L.Convolution(np.ones((2, 1, 1, 1), np.float32), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="BatchNormalization after a convolution"):
        to_torch(Sequential([conv, bn]))
    assert {L.Convolution, L.Affine, L.Dropout, L.Pooling} <= set(TO_TORCH)


def _trained_bn_net(seed):
    """A MultiLayerNetExtend whose BatchNorm running statistics have moved off zero."""
    net = MultiLayerNetExtend(20, [16, 12], 4, use_batchnorm=True, use_dropout=True, dropout_ration=0.3, seed=seed)
    rng = np.random.default_rng(seed)
    for _ in range(3):
        net.gradient(rng.random((8, 20), dtype=np.float32), rng.integers(0, 4, 8))  # training-mode forward
    return net


@pytest.mark.parametrize("make, shape", [
    (lambda s: TwoLayerNet(784, 50, 10, weight_init_std=0.1, seed=s), (784,)),
    (lambda s: SimpleConvNet(seed=s), (1, 28, 28)),
    (lambda s: DeepConvNet(seed=s), (1, 28, 28)),
    (_trained_bn_net, (20,)),
])
@pytest.mark.parametrize("via", ["module", "state_dict"])
def test_from_torch_brings_the_weights_back(make, shape, via):
    # torch -> xpconv: a module built from one model (seed 0), loaded into a model with
    # other initial weights (seed 1), gives seed 0's logits within 1e-5 in eval mode
    src, dst = make(0), make(1)
    x = _images(4, shape)
    module = to_torch(src).eval()
    got = from_torch(module if via == "module" else module.state_dict(), dst)
    assert got is dst
    assert_close(to_numpy(dst.predict(x)), _scores(module, x), rtol=1e-5)
    assert_close(to_numpy(dst.predict(x)), to_numpy(src.predict(x)), rtol=1e-5)


def test_from_torch_changes_a_torch_trained_weight_and_keeps_dtypes():
    net = TwoLayerNet(6, 5, 3, weight_init_std=0.1, seed=0)
    module = to_torch(net)
    with torch.no_grad():
        module[1].weight.mul_(2.0)  # Linear(6, 5): weight is W1.T
    from_torch(module, net)
    np.testing.assert_allclose(to_numpy(net.params["W1"]), module[1].weight.detach().numpy().T, rtol=0, atol=0)
    assert net.params["W1"].dtype == np.float32


def test_from_torch_refuses_a_mismatch_and_leaves_the_model_as_it_was():
    net = SimpleConvNet(seed=0)
    before = {k: to_numpy(v).copy() for k, v in net.params.items()}
    other = to_torch(SimpleConvNet(input_dim=(1, 28, 28), hidden_size=60, seed=1))
    with pytest.raises(ValueError, match="expected shape"):
        from_torch(other, net)
    with pytest.raises(ValueError, match="does not fit SimpleConvNet"):
        from_torch({"0.weight": torch.zeros(1)}, net)
    with pytest.raises(ValueError, match="layers with weights"):
        from_torch(to_torch(TwoLayerNet(784, 50, 10, seed=0)), net)
    with pytest.raises(TypeError, match="torch.nn.Module or a state dict"):
        from_torch(42, net)
    for k, v in net.params.items():
        np.testing.assert_array_equal(to_numpy(v), before[k])
