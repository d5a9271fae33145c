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


# --------------------------------------------------------------------------- what from_torch refuses
# Each module or state dict below computes something the xpconv model cannot (or holds no
# usable numbers): from_torch names the module or key and the setting in one line, and the
# model keeps its weights.


def _small_convnet(seed=0, pad=1):
    return SimpleConvNet(input_dim=(1, 10, 10), conv_param={"filter_num": 4, "filter_size": 3, "pad": pad, "stride": 1},
                         hidden_size=6, output_size=3, weight_init_std=0.3, seed=seed)


def _refused(source, net, exc, pattern):
    before = {k: to_numpy(v).copy() for k, v in net.params.items()}
    with pytest.raises(exc, match=pattern) as info:
        from_torch(source, net)
    assert "\n" not in str(info.value), str(info.value)
    for k, v in net.params.items():
        np.testing.assert_array_equal(to_numpy(v), before[k], err_msg=k)
    return str(info.value)


def _replace(module, index, new):
    module[index] = new
    return module


@pytest.mark.parametrize("conv, key", [
    (dict(padding=2, dilation=2), r"dilation=\(2, 2\)"),  # same output size as pad 1: copied silently before
    (dict(padding=1, stride=2), r"stride=\(2, 2\)"),
    (dict(padding=0), r"padding=\(0, 0\)"),
    (dict(padding="valid"), r"padding=\(0, 0\)"),
    (dict(padding=1, padding_mode="reflect"), r"padding_mode='reflect'"),
    (dict(padding=1, groups=1, bias=False), r"bias=None"),
])
def test_from_torch_refuses_a_conv2d_that_computes_something_else(conv, key):
    net = _small_convnet()
    module = _replace(to_torch(_small_convnet(1)), 0, torch.nn.Conv2d(1, 4, 3, **conv))
    msg = _refused(module, net, ValueError, key)
    assert "module '0' (Conv2d)" in msg and "Convolution" in msg


def test_from_torch_refuses_grouped_convolutions():
    net = SimpleConvNet(input_dim=(2, 10, 10), conv_param={"filter_num": 4, "filter_size": 3, "pad": 1, "stride": 1},
                        hidden_size=6, output_size=3, seed=0)
    module = to_torch(net)
    module[0] = torch.nn.Conv2d(2, 4, 3, padding=1, groups=2)  # weight (4, 1, 3, 3)
    _refused(module, net, ValueError, r"module '0' \(Conv2d\) has groups=2")


def test_from_torch_accepts_same_padding_where_it_is_symmetric():
    net = _small_convnet()
    src = _small_convnet(1)
    module = to_torch(src).eval()
    same = torch.nn.Conv2d(1, 4, 3, padding="same")
    with torch.no_grad():
        same.weight.copy_(module[0].weight)
        same.bias.copy_(module[0].bias)
    module[0] = same
    from_torch(module, net)
    x = _images(2, (1, 10, 10))
    assert_close(to_numpy(net.predict(x)), to_numpy(src.predict(x)), rtol=1e-5)
    module[0] = torch.nn.Conv2d(1, 4, 3, padding="same", dilation=1)
    with pytest.raises(ValueError, match=r"padding=\(0, 0\)"):
        from_torch(module, _small_convnet(pad=0))


def test_from_torch_refuses_linear_without_bias():
    net = TwoLayerNet(6, 5, 3, seed=0)
    module = to_torch(net)
    module[1] = torch.nn.Linear(6, 5, bias=False)  # AttributeError before
    _refused(module, net, ValueError, r"module '1' \(Linear\) has bias=None .*Affine adds a bias b of shape \(5,\)")


@pytest.mark.parametrize("pool, key", [
    (lambda: torch.nn.MaxPool2d(2, stride=2, ceil_mode=True), "ceil_mode=True"),
    (lambda: torch.nn.MaxPool2d(2, stride=2, return_indices=True), "return_indices=True"),
    (lambda: torch.nn.MaxPool2d(2, stride=2, dilation=2), r"dilation=\(2, 2\)"),
    (lambda: torch.nn.MaxPool2d(3, stride=2), r"kernel_size=\(3, 3\)"),
    (lambda: torch.nn.MaxPool2d(2, stride=1), r"stride=\(1, 1\)"),
    (lambda: torch.nn.AvgPool2d(2, stride=2), "is a AvgPool2d; expected a MaxPool2d"),
    (lambda: torch.nn.AdaptiveMaxPool2d(5), "is a AdaptiveMaxPool2d; expected a MaxPool2d"),
])
def test_from_torch_refuses_pooling_that_computes_something_else(pool, key):
    net = _small_convnet()
    module = to_torch(_small_convnet(1))
    assert isinstance(module[2], torch.nn.MaxPool2d)
    module[2] = pool()
    _refused(module, net, ValueError, rf"module '2'.*{key}")


def test_from_torch_refuses_a_module_without_the_models_pooling():
    net = _small_convnet()
    module = to_torch(_small_convnet(1))
    module[2] = torch.nn.Identity()
    _refused(module, net, ValueError, r"1 pooling layers \(Pooling\), the torch module 0")


def test_from_torch_checks_avg_pooling_divisor():
    rng = np.random.default_rng(0)
    f32 = np.float32

    def make():
        return Sequential([L.Convolution(rng.normal(size=(2, 1, 3, 3)).astype(f32), np.zeros(2, f32), pad=1),
                           L.AvgPooling(2, 2, stride=2, pad=1), L.Affine(rng.normal(size=(2 * 5 * 5, 3)).astype(f32), np.zeros(3, f32))])

    net = make()
    module = to_torch(make())
    from_torch(module, net)  # what to_torch builds fits
    module[1] = torch.nn.AvgPool2d(2, stride=2, padding=1, count_include_pad=False)
    _refused(module, net, ValueError, r"module '1' \(AvgPool2d\) has count_include_pad=False")
    module[1] = torch.nn.AvgPool2d(2, stride=2, padding=1, divisor_override=3)
    _refused(module, net, ValueError, r"divisor_override=3")


def test_from_torch_refuses_batchnorm_it_cannot_represent():
    net = _trained_bn_net(0)
    module = to_torch(_trained_bn_net(1))
    index = next(i for i, m in enumerate(module) if isinstance(m, torch.nn.BatchNorm1d))
    module[index] = torch.nn.BatchNorm1d(16, eps=1e-5)
    _refused(module, net, ValueError, rf"module '{index}' \(BatchNorm1d\) has eps=1e-05")
    module[index] = torch.nn.BatchNorm1d(16, eps=L.BN_EPS, affine=False)
    _refused(module, net, ValueError, rf"module '{index}' \(BatchNorm1d\) has weight=None .*affine=False")
    module[index] = torch.nn.BatchNorm1d(16, eps=L.BN_EPS, track_running_stats=False)
    _refused(module, net, ValueError, r"running_mean=None .*track_running_stats=False")


@pytest.mark.parametrize("make, problem", [
    (lambda w: torch.nn.Parameter(w.to(torch.complex64)), "expected a real floating dtype"),
    (lambda w: torch.nn.Parameter(w.to_sparse()), "expected a dense"),
    (lambda w: torch.nn.Parameter(torch.empty(w.shape, device="meta")), "meta device"),
])
def test_from_torch_refuses_weights_that_hold_no_real_dense_values(make, problem):
    net = TwoLayerNet(6, 5, 3, seed=0)
    module = to_torch(TwoLayerNet(6, 5, 3, seed=1))
    module[1].weight = make(module[1].weight.detach())
    _refused(module, net, ValueError, rf"'1.weight' .*{problem}")


def test_from_torch_converts_half_precision_weights():
    src = TwoLayerNet(6, 5, 3, weight_init_std=0.5, seed=1)
    module = to_torch(src, dtype=torch.bfloat16)
    net = from_torch(module, TwoLayerNet(6, 5, 3, seed=0))
    assert net.params["W1"].dtype == np.float32
    np.testing.assert_allclose(to_numpy(net.params["W1"]), to_numpy(src.params["W1"]), rtol=1e-2)


@pytest.mark.parametrize("edit, pattern", [
    (lambda sd: sd.pop("4.weight"), r"does not fit SimpleConvNet: missing '4.weight'"),
    (lambda sd: sd.update({"9.weight": torch.zeros(2)}), r"does not fit SimpleConvNet: unexpected '9.weight'"),
    (lambda sd: sd.update({"4.weight": torch.zeros(6, 99)}), r"'4.weight': expected shape \(6, 100\), got \(6, 99\)"),
    (lambda sd: sd.update({"0.bias": torch.zeros(4, dtype=torch.int64)}), r"'0.bias' has dtype torch.int64; expected a real floating"),
    (lambda sd: sd.update({"0.bias": np.zeros(4)}), r"'0.bias' is a ndarray; expected a torch.Tensor"),
    (lambda sd: sd.update({"6.bias": torch.empty(3, device="meta")}), r"'6.bias' is on the meta device"),
])
def test_from_torch_names_the_state_dict_key_at_fault(edit, pattern):
    net = _small_convnet()
    sd = to_torch(_small_convnet(1)).state_dict()
    edit(sd)
    msg = _refused(sd, net, ValueError, pattern)
    assert "Error(s) in loading" not in msg


def test_from_torch_state_dict_with_batchnorm_counts():
    src, dst = _trained_bn_net(0), _trained_bn_net(1)
    sd = to_torch(src).state_dict()
    assert any(k.endswith("num_batches_tracked") for k in sd)
    from_torch(sd, dst)
    x = _images(3, (20,))
    assert_close(to_numpy(dst.predict(x)), to_numpy(src.predict(x)), rtol=1e-5)
    key = next(k for k in sd if k.endswith("num_batches_tracked"))
    sd[key] = torch.zeros(3)
    _refused(sd, dst, ValueError, rf"'{key}' must be an integer count")
