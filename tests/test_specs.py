"""Models from layer specs (xpconv.specs): inferred shapes, seeded weights on every namespace,
the per-channel batch norm (against central differences and torch's BatchNorm2d), summary(),
and checkpoints that carry the architecture as JSON and rebuild it (Python and CLI)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from xpconv import cli
from xpconv.backend import asarray_in, to_numpy
from xpconv.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from xpconv.datasets import load_digits
from xpconv.layers import BatchNormalization, ChannelBatchNormalization
from xpconv.specs import (
    AvgPool,
    BatchNorm,
    BatchNorm2d,
    Conv,
    Dense,
    Dropout,
    Flatten,
    MaxPool,
    ReLU,
    SpecNet,
    build,
    from_json,
)

LAYERS = [Conv(8, 3, pad=1), BatchNorm2d(), ReLU(), MaxPool(2), Conv(6, (3, 2)), ReLU(), AvgPool(1),
          Flatten(), Dense(20), BatchNorm(), ReLU(), Dropout(0.25), Dense(10)]


def test_shapes_are_inferred_and_the_summary_shows_them():
    net = build(LAYERS, input_dim=(1, 12, 12), seed=0)
    shapes = {k: tuple(v.shape) for k, v in net.params.items()}
    # 12x12 -conv3 pad1-> 12x12 -pool2-> 6x6 -conv(3,2)-> 4x5 -> flatten 6*4*5 = 120
    assert shapes == {"W1": (8, 1, 3, 3), "b1": (8,), "gamma1": (8,), "beta1": (8,), "W2": (6, 8, 3, 2), "b2": (6,),
                      "W3": (120, 20), "b3": (20,), "gamma2": (20,), "beta2": (20,), "W4": (20, 10), "b4": (10,)}
    text = net.summary()
    for row in ("(None, 8, 12, 12)", "(None, 8, 6, 6)", "(None, 6, 4, 5)", "(None, 120)", "(None, 10)"):
        assert row in text
    total = sum(int(np.prod(v.shape)) for v in net.params.values())
    assert f"{total:,} parameters" in text
    assert "2,420" in text  # Dense(20) after Flatten: 120*20 + 20
    assert isinstance(net.layers[1], ChannelBatchNormalization)
    assert type(net.layers[-4]) is BatchNormalization
    assert net.predict(np.zeros((3, 1, 12, 12), np.float32)).shape == (3, 10)


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ([Conv(4, 5), Dense(10)], "filter larger than the padded input|OH|too small|< 1"),
        ([Dense(10), Conv(4, 3)], "expected \\(C, H, W\\) images"),
        ([Conv(4, 3, pad=1)], "end with Dense"),
    ],
)
def test_impossible_stacks_are_refused_before_anything_is_built(layers, message):
    with pytest.raises(ValueError, match=message):
        build(layers, input_dim=(1, 3, 3))


def test_spec_values_and_json_are_checked():
    with pytest.raises(ValueError, match="Conv filters: expected an integer"):
        Conv(0)
    with pytest.raises(ValueError, match="Dropout ratio"):
        Dropout(1.5)
    specs = [s.to_json() for s in LAYERS]
    assert from_json(json.loads(json.dumps(specs))) == LAYERS
    with pytest.raises(ValueError, match="layers\\[0\\]: expected an object with a type among"):
        from_json([{"type": "os.system", "command": "true"}])
    with pytest.raises(ValueError, match="unknown fields evil"):
        from_json([{"type": "Dense", "units": 3, "evil": 1}])
    with pytest.raises(ValueError, match="Dense units"):
        from_json([{"type": "Dense", "units": "10"}])


def test_one_seed_gives_the_same_weights_on_every_namespace(xp):
    ref = build(LAYERS, input_dim=(1, 12, 12), seed=7)
    net = build(LAYERS, input_dim=(1, 12, 12), seed=7, xp=xp)
    assert net.xp is xp or xp.__name__.endswith(net.backend_name) or net.backend_name
    for k, v in ref.params.items():
        np.testing.assert_allclose(to_numpy(net.params[k]), to_numpy(v), rtol=1e-6)
    other = build(LAYERS, input_dim=(1, 12, 12), seed=8)
    assert not np.array_equal(to_numpy(other.params["W1"]), to_numpy(ref.params["W1"]))
    x = np.random.default_rng(0).random((4, 1, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(to_numpy(net.predict(asarray_in(x, xp))), to_numpy(ref.predict(x)), rtol=1e-4, atol=1e-5)


def test_gradients_match_central_differences():
    (x, t), _ = load_digits()
    net = build([Conv(3, 3, pad=1), BatchNorm2d(), ReLU(), MaxPool(2), Flatten(), Dense(5), BatchNorm(), ReLU(), Dense(10)],
                input_dim=(1, 8, 8), seed=1, dtype="float64")
    xb, tb = x[:6].astype(np.float64), t[:6]
    analytic = net.gradient(xb, tb)
    numeric = net.numerical_gradient(xb, tb)
    for k in analytic:
        np.testing.assert_allclose(to_numpy(analytic[k]), to_numpy(numeric[k]), rtol=1e-4, atol=1e-6, err_msg=k)


def test_channel_batch_norm_is_torch_batchnorm2d():
    torch = pytest.importorskip("torch")
    from xpconv.interop import to_torch

    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3, 4, 4)).astype(np.float64) * 2 + 1
    layer = ChannelBatchNormalization(rng.random(3) + 0.5, rng.random(3), momentum=0.9)
    ref = torch.nn.BatchNorm2d(3, eps=1e-6, momentum=0.1, dtype=torch.float64)
    ref.weight.data, ref.bias.data = torch.tensor(layer.gamma), torch.tensor(layer.beta)
    ref.running_mean.zero_()
    ref.running_var.zero_()
    xt = torch.tensor(x, requires_grad=True)
    out = ref(xt)
    np.testing.assert_allclose(layer.forward(x, True), out.detach().numpy(), rtol=1e-10, atol=1e-10)
    dout = rng.normal(size=x.shape)
    out.backward(torch.tensor(dout))
    np.testing.assert_allclose(layer.backward(dout), xt.grad.numpy(), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(layer.dgamma, ref.weight.grad.numpy(), rtol=1e-8)
    # running statistics: torch keeps the unbiased variance, the book's layer the biased one
    np.testing.assert_allclose(layer.running_mean, ref.running_mean.numpy(), rtol=1e-10)
    ref.eval()
    layer.running_var = ref.running_var.numpy().copy()
    np.testing.assert_allclose(layer.forward(x, False), ref(torch.tensor(x)).detach().numpy(), rtol=1e-10, atol=1e-10)
    # a whole spec model maps to torch.nn (BatchNorm2d where the spec says so) and computes the same
    net = build([Conv(4, 3, pad=1), BatchNorm2d(), ReLU(), MaxPool(2), Flatten(), Dense(10)], input_dim=(1, 8, 8), seed=0)
    (xd, _), _ = load_digits()
    net.loss(xd[:20], np.zeros(20, dtype=np.int64))  # running statistics away from their start
    module = to_torch(net)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())
    module.eval()
    np.testing.assert_allclose(module(torch.tensor(xd[:7])).detach().numpy(), net.predict(xd[:7]), rtol=1e-4, atol=1e-5)


def test_checkpoints_carry_the_architecture(tmp_path):
    net = build(LAYERS, input_dim=(1, 12, 12), seed=3)
    x = np.random.default_rng(1).random((8, 1, 12, 12)).astype(np.float32)
    net.loss(x, np.arange(8) % 10)  # running statistics of both norms move
    path = save_checkpoint(tmp_path / "m.safetensors", net)
    ckpt = load_checkpoint(path)
    assert isinstance(ckpt.model, SpecNet) and ckpt.model.specs == LAYERS
    assert ckpt.model.config == net.config
    np.testing.assert_array_equal(ckpt.model.predict(x), net.predict(x))
    # the stored specs are data: a file naming another type is refused, naming the entry
    from xpconv import _fileformat

    meta = _fileformat.open_file(path).meta
    assert meta["model"]["config"]["layers"][0] == {"type": "Conv", "filters": 8, "size": 3, "stride": 1, "pad": 1, "init_std": None}


def test_a_checkpoint_with_bad_specs_is_refused(tmp_path, monkeypatch):
    net = build([Conv(2, 3, pad=1), ReLU(), Flatten(), Dense(10)], input_dim=(1, 8, 8), seed=0)
    net.config["layers"][0] = {"type": "Conv", "filters": 2, "size": 3, "pad": 1, "stride": 1, "code": "print(1)"}
    path = save_checkpoint(tmp_path / "bad.safetensors", net)
    with pytest.raises(CheckpointError, match="unknown fields code"):
        load_checkpoint(path)
    net.config["layers"][0] = {"type": "Conv", "filters": 3, "size": 3, "pad": 1, "stride": 1}
    path = save_checkpoint(tmp_path / "bad.safetensors", net)
    with pytest.raises(CheckpointError, match="W1"):
        load_checkpoint(path)


def test_cli_eval_and_predict_rebuild_a_spec_model(tmp_path, capsys):
    from xpconv.training import Run, Trainer

    (x, t), (xt, tt) = load_digits()
    net = build([Conv(8, 3, pad=1), BatchNorm2d(), ReLU(), MaxPool(2), Flatten(), Dense(10)], input_dim=(1, 8, 8), seed=0)
    Trainer(net, x, t, xt, tt, epochs=2, mini_batch_size=50, optimizer="adam", optimizer_param={"lr": 0.01},
            verbose=False, run=Run(out_dir=tmp_path / "run", config={"dataset": "digits", "class_names": list("0123456789")})).train()
    code = cli.main(["eval", str(tmp_path / "run" / "last.safetensors")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "SpecNet" in out and "digits test set: accuracy" in out
    acc = float(out.split("accuracy ")[1].split()[0])
    assert acc == pytest.approx(net.accuracy(xt, tt), abs=1e-4) and acc > 0.8
    np.save(tmp_path / "one.npy", xt[0])
    code = cli.main(["predict", str(tmp_path / "run" / "last.safetensors"), str(tmp_path / "one.npy")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "class " in out
