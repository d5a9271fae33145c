"""The optional CUDA graph of a whole training step (xpconv/kernels/cuda_graph.py).

Without a GPU, through tests/cuda_host.py: cupy_ops' real launch code on the host-built
.cu sources, with a stand-in ``cupy`` whose stream capture records every kernel launch
and array operation (arrays and scalars as a CUDA graph keeps them) and whose
``Graph.launch()`` replays that recording; nothing is run at capture.  So a per-step
scalar passed by value is the capture's forever here as on a GPU, and the equality tests
below fail when one is (the ``*_baked_*`` tests prove it by baking them on purpose).

With a GPU (marked ``gpu``): graph replays equal eager steps on real CuPy.
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings

import numpy as np
import pytest

from xpconv import backend, kernels, models
from xpconv.kernels import cuda_graph
from xpconv.optim import SGD, Adam, Momentum
from xpconv.training import loop
from xpconv.training.schedule import seed_dropout

from . import cuda_host
from .test_cupy_kernels import HAS_CUPY_SPEC, _fresh, _kernel_classes, _load_cupy_ops_with, needs_cxx

STEPS = 6
#: float32: the replay runs the same kernels and operations on the same values as the
#: eager step, so results agree to rounding of the last bits at most
TOL = {"float64": 1e-12, "float32": 1e-6}


@functools.cache
def _graph_fake():
    """(stand-in cupy with a faked capture, op -> kernel of a cupy_ops bound to it)."""
    fake = cuda_host.graph_cupy()
    src = _fresh("cuda_source", "xpconv.kernels._graph_cuda_source")
    src.module = functools.lru_cache(maxsize=None)(lambda name: cuda_host.HostModule(src.read_source(name), src.OPTIONS))
    mod = _load_cupy_ops_with(fake)
    mod.cuda_source = src
    return fake, {op: cls() for op, cls in _kernel_classes(mod).items()}


@pytest.fixture
def fake(monkeypatch):
    """The stand-in installed as ``cupy`` and its cupy_ops kernels as the "numpy" ones (the
    stand-in's arrays are NumPy arrays); returns the stand-in module."""
    module, ks = _graph_fake()
    monkeypatch.setitem(sys.modules, "cupy", module)
    kernels.find("numpy", "conv2d")
    for key in [k for k in kernels.REGISTRY if k[0] == "numpy"]:
        monkeypatch.delitem(kernels.REGISTRY, key)
    for op, kernel in ks.items():
        monkeypatch.setitem(kernels.REGISTRY, ("numpy", op), kernel)
    yield module
    assert cuda_host.Capture.active is None and cuda_graph.recording() is None


def _model(name, dtype, seed=3):
    if name == "SimpleConvNet":
        net = models.SimpleConvNet(input_dim=(1, 10, 10), conv_param={"filter_num": 4, "filter_size": 3, "pad": 0, "stride": 1},
                                   hidden_size=12, output_size=10, seed=seed, dtype=dtype)
    else:
        net = models.DeepConvNet(seed=seed, dtype=dtype)
    for key in list(net.params):  # "device" arrays: every operation on them is seen
        net.params[key] = cuda_host.counted(net.params[key])
    net.last_layer.check_labels = False  # as on CuPy: labels are checked where they enter, on the host
    return net


def _dropouts(net):
    return [layer for layer in net.layers if type(layer).__name__ == "Dropout"]


def _batches(name, dtype, n, N=8, seed=0):
    rng = np.random.default_rng(seed)
    shape = (N, 1, 10, 10) if name == "SimpleConvNet" else (N, 1, 28, 28)
    return [(cuda_host.counted(rng.random(shape).astype(dtype)), cuda_host.counted(rng.integers(0, 10, N))) for _ in range(n)]


def _eager_step(net, opt):
    def step(x, t):
        opt.update(net.params, net.gradient(x, t))
        return net.last_layer.loss

    return step


def _graph_step(net, opt):
    return cuda_graph.CudaGraphStep(_eager_step(net, opt), optimizer=opt, dropouts=_dropouts(net), n_params=len(net.params))


def _run(step, net, batches, seed=11):
    losses = []
    for i, (x, t) in enumerate(batches, 1):
        seed_dropout(net, seed, i)
        losses.append(np.array(backend.to_numpy(step(x, t))))
    return losses


def _assert_same(got_net, want_net, got_losses, want_losses, dtype, what):
    tol = TOL[dtype]
    for key in want_net.params:
        np.testing.assert_allclose(got_net.params[key], want_net.params[key], rtol=tol, atol=tol, err_msg=f"{what}: {key}")
    np.testing.assert_allclose(got_losses, want_losses, rtol=tol, atol=tol, err_msg=f"{what}: losses")


def _optimizer(name):
    return Adam(lr=0.01) if name == "Adam" else Momentum(lr=0.05, momentum=0.9)


# ====================================================================== graph == eager


#: every (optimizer, dtype) on SimpleConvNet; DeepConvNet (Dropout: per-step keys) with
#: Adam in float32 and Momentum in float64 (its host-built run is the slow one)
EQUALITY_CASES = [("SimpleConvNet", o, d) for o in ("Adam", "Momentum") for d in ("float64", "float32")] + [
    ("DeepConvNet", "Adam", "float32"),
    ("DeepConvNet", "Momentum", "float64"),
]


@needs_cxx
@pytest.mark.parametrize(("model", "opt_name", "dtype"), EQUALITY_CASES)
def test_graph_replays_equal_eager_steps(fake, model, opt_name, dtype):
    batches = _batches(model, dtype, STEPS if model == "SimpleConvNet" else 4, N=8 if model == "SimpleConvNet" else 4)
    want_net, want_opt = _model(model, dtype), _optimizer(opt_name)
    want = _run(_eager_step(want_net, want_opt), want_net, batches)
    net, opt = _model(model, dtype), _optimizer(opt_name)
    step = _graph_step(net, opt)
    got = _run(step, net, batches)
    # step 1 warms up, step 2 is captured and replayed, the rest are replays
    assert step.counts == {"warmup": 1, "capture": 1, "replay": len(batches) - 1, "eager": 0}
    assert step.graph.launches == len(batches) - 1
    assert opt.iter == want_opt.iter == len(batches)
    names = step.graph.capture.names
    sfx = "f32" if dtype == "float32" else "f64"
    update = "xpc_adam_dev_" if opt_name == "Adam" else "xpc_momentum_dev_"
    assert names.count(update + sfx) == len(net.params), "every parameter's update reads its scalars from the buffer"
    assert names.count("xpc_dropout_mask_dev_" + sfx) == len(_dropouts(net))
    assert not any(n.startswith(("xpc_adam_" + sfx, "xpc_momentum_" + sfx, "xpc_dropout_mask_" + sfx)) for n in names)
    assert "matmul" in names and "copyto" not in names[:1]  # array operations are recorded too
    _assert_same(net, want_net, got, want, dtype, f"{model}/{opt_name}/{dtype}")


@needs_cxx
def test_replay_copies_the_scalars_to_the_device_once_per_step(fake):
    net, opt = _model("SimpleConvNet", "float64"), Adam(lr=0.01)
    step = _graph_step(net, opt)
    batches = _batches("SimpleConvNet", "float64", 4)
    _run(step, net, batches[:2])
    before = cuda_host.HostToDevice.copies
    _run(step, net, batches[2:])
    assert cuda_host.HostToDevice.copies - before == 2
    # the graph's scalar buffer holds this step's Adam scalars: wd, lr_t, 1 - beta1, 1 - beta2
    slot = [s for s in step._scalars.slots if s["kind"] == "update"][0]
    o = slot["offset"]
    got = step._scalars.device[o : o + 32].view(np.float64)
    t = opt.iter
    lr_t = 0.01 * np.sqrt(1.0 - 0.999**t) / (1.0 - 0.9**t)
    np.testing.assert_array_equal(got, np.array([0.0, lr_t, 1.0 - 0.9, 1.0 - 0.999]))


# ====================================================================== the checks can fail


def _bake_update_scalars(monkeypatch, ks):
    """Under capture, Adam's update launches its eager kernel: lr_t by value."""
    monkeypatch.setattr(type(ks["adam_update"]), "_graph_scalars", lambda self, p, tail: None)


def _bake_dropout_keys(monkeypatch, ks):
    """Under capture, the Dropout mask launches its eager kernel: keys by value."""
    cls = type(ks["dropout_mask"])
    forward = cls.forward

    def eager_forward(self, *args):
        saved, cuda_graph._RECORDING = cuda_graph._RECORDING, None
        try:
            return forward(self, *args)
        finally:
            cuda_graph._RECORDING = saved

    monkeypatch.setattr(cls, "forward", eager_forward)


@needs_cxx
@pytest.mark.parametrize("bake", ["update", "dropout"])
def test_a_baked_per_step_scalar_makes_replays_differ(fake, monkeypatch, bake):
    # the equality above is a check that can fail: the same run with one kind of scalar
    # passed by value (and the capture's own check of that switched off) gives other weights
    _, ks = _graph_fake()
    model, opt_name = ("SimpleConvNet", "Adam") if bake == "update" else ("DeepConvNet", "Momentum")
    dtype = "float64" if bake == "update" else "float32"
    batches = _batches(model, dtype, 4, N=8 if model == "SimpleConvNet" else 4)
    want_net, want_opt = _model(model, dtype), _optimizer(opt_name)
    want = _run(_eager_step(want_net, want_opt), want_net, batches)
    (_bake_update_scalars if bake == "update" else _bake_dropout_keys)(monkeypatch, ks)
    monkeypatch.setattr(cuda_graph.CudaGraphStep, "_check", lambda self, scalars: None)
    net, opt = _model(model, dtype), _optimizer(opt_name)
    # baked keys: the host need not draw them (the schedule seeds each layer every step anyway)
    dropouts = _dropouts(net) if bake == "update" else []
    step = cuda_graph.CudaGraphStep(_eager_step(net, opt), optimizer=opt, dropouts=dropouts, n_params=len(net.params))
    got = _run(step, net, batches)
    assert step.counts["replay"] == len(batches) - 1
    with pytest.raises(AssertionError):
        _assert_same(net, want_net, got, want, dtype, f"baked {bake}")


@needs_cxx
@pytest.mark.parametrize("bake", ["update", "dropout"])
def test_a_capture_that_would_bake_a_scalar_is_refused_and_runs_eagerly(fake, monkeypatch, bake):
    _, ks = _graph_fake()
    (_bake_update_scalars if bake == "update" else _bake_dropout_keys)(monkeypatch, ks)
    model, dtype = ("SimpleConvNet", "float64") if bake == "update" else ("DeepConvNet", "float32")
    batches = _batches(model, dtype, 3, N=8 if model == "SimpleConvNet" else 4)
    want_net, want_opt = _model(model, dtype), Adam(lr=0.01)
    want = _run(_eager_step(want_net, want_opt), want_net, batches)
    net, opt = _model(model, dtype), Adam(lr=0.01)
    step = _graph_step(net, opt)
    with pytest.warns(RuntimeWarning, match="could not be captured.*running it eagerly") as record:
        got = _run(step, net, batches)
    assert len(record) == 1
    assert step.disabled and step.graph is None
    assert step.counts == {"warmup": 1, "capture": 0, "replay": 0, "eager": 2}
    _assert_same(net, want_net, got, want, dtype, "fallback")


@needs_cxx
def test_an_optimizer_without_a_fused_update_is_refused(fake):
    class Plain(SGD):  # its own _step: no fused kernel, lr would be kept by value
        def _step(self, key, p, g, slots):
            p -= self.lr * g
            return p

    net, opt = _model("SimpleConvNet", "float64"), Plain(lr=0.1)
    want_net, want_opt = _model("SimpleConvNet", "float64"), Plain(lr=0.1)
    batches = _batches("SimpleConvNet", "float64", 3)
    want = _run(_eager_step(want_net, want_opt), want_net, batches)
    step = _graph_step(net, opt)
    with pytest.warns(RuntimeWarning, match="fused kernel"):
        got = _run(step, net, batches)
    assert step.disabled
    _assert_same(net, want_net, got, want, "float64", "generic optimizer")


@needs_cxx
def test_a_host_read_inside_the_step_fails_the_capture_and_the_host_state_is_kept(fake):
    net, opt = _model("SimpleConvNet", "float64"), Adam(lr=0.01)
    want_net, want_opt = _model("SimpleConvNet", "float64"), Adam(lr=0.01)

    def reading(step):
        def run(x, t):
            loss = step(x, t)
            assert float(loss) > 0  # a device-to-host read: CUDA refuses it under capture
            return loss

        return run

    batches = _batches("SimpleConvNet", "float64", 3)
    want = _run(reading(_eager_step(want_net, want_opt)), want_net, batches)
    step = cuda_graph.CudaGraphStep(reading(_eager_step(net, opt)), optimizer=opt, dropouts=[], n_params=len(net.params))
    with pytest.warns(RuntimeWarning, match="reads an array on the host"):
        got = _run(step, net, batches)
    assert opt.iter == want_opt.iter == 3  # the capture's count was given back
    _assert_same(net, want_net, got, want, "float64", "host read")


# ====================================================================== other shapes


@needs_cxx
def test_a_batch_of_another_shape_runs_eagerly_and_the_graph_stays(fake):
    full = _batches("SimpleConvNet", "float64", 5, N=8)
    partial = _batches("SimpleConvNet", "float64", 1, N=5, seed=9)
    order = full[:3] + partial + full[3:]
    want_net, want_opt = _model("SimpleConvNet", "float64"), Adam(lr=0.01)
    want = _run(_eager_step(want_net, want_opt), want_net, order)
    net, opt = _model("SimpleConvNet", "float64"), Adam(lr=0.01)
    step = _graph_step(net, opt)
    got = _run(step, net, order)
    assert step.counts == {"warmup": 1, "capture": 1, "replay": 4, "eager": 1}
    _assert_same(net, want_net, got, want, "float64", "partial batch")


# ====================================================================== the trainer and the CLI


def test_cuda_graph_is_off_by_default():
    assert inspect.signature(loop.Trainer).parameters["cuda_graph"].default is False
    from xpconv import cli

    args = cli.build_parser().parse_args(["train"])
    assert args.cuda_graph is False


def _tiny_data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 1, 10, 10)).astype("float32"), rng.integers(0, 10, n)


def test_cuda_graph_on_numpy_is_refused_in_one_line():
    x, t = _tiny_data()
    net = models.SimpleConvNet(input_dim=(1, 10, 10), seed=0)
    with pytest.raises(ValueError) as err:
        loop.Trainer(net, x, t, x, t, epochs=1, mini_batch_size=8, verbose=False, cuda_graph=True)
    assert str(err.value) == "Trainer: cuda_graph=True needs a model on CuPy, got one on numpy"


def test_trainer_without_cuda_graph_makes_no_graph():
    x, t = _tiny_data()
    net = models.SimpleConvNet(input_dim=(1, 10, 10), seed=0)
    trainer = loop.Trainer(net, x, t, x, t, epochs=1, mini_batch_size=8, verbose=False)
    assert trainer.cuda_graph is False and trainer._graph is None


@needs_cxx
def test_trainer_with_cuda_graph_trains_like_without(fake, monkeypatch):
    # the stand-in's arrays are NumPy's: let the trainer take them for CuPy's
    monkeypatch.setattr(loop, "GRAPH_NAMESPACES", ("cupy", "numpy"))
    x, t = _tiny_data(27)  # 3 steps of 8 per epoch; the trainer drops the 3 left over
    nets = []
    for graph in (False, True):
        net = _model("SimpleConvNet", "float32", seed=1)
        trainer = loop.Trainer(net, x, t, x, t, epochs=2, mini_batch_size=8, optimizer="Adam",
                               optimizer_param={"lr": 0.01}, verbose=False, seed=4, cuda_graph=graph)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fall-back warning
            trainer.train()
        nets.append((net, trainer))
    (want_net, want), (net, got) = nets
    assert got._graph.counts == {"warmup": 1, "capture": 1, "replay": 5, "eager": 0}
    _assert_same(net, want_net, got.train_loss_list, want.train_loss_list, "float32", "trainer")
    assert got.test_acc_list == want.test_acc_list


def test_cli_train_passes_the_flag_to_the_trainer(tmp_path, capsys):
    # on the CPU the trainer refuses the flag: its one line proves the flag got there
    from xpconv import cli

    rc = cli.main(["train", "--cuda-graph", "--device", "cpu", "--epochs", "1", "--no-plots", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc != 0
    assert "cuda_graph=True needs a model on CuPy, got one on numpy" in err
    assert len(err.strip().splitlines()) == 1, err


# ====================================================================== on a GPU


needs_cuda = pytest.mark.skipif(not (HAS_CUPY_SPEC and backend.cuda_status()[0]), reason="no usable CUDA device (CuPy)")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("model", ["SimpleConvNet", "DeepConvNet"])
def test_graph_replays_equal_eager_steps_on_a_gpu(model):
    import cupy

    ns = backend.get_namespace("cupy")

    def build():
        net = getattr(models, model)(seed=3, xp=ns)
        net.last_layer.check_labels = False
        return net

    rng = np.random.default_rng(0)
    batches = [(cupy.asarray(rng.random((32, 1, 28, 28)).astype("float32")), cupy.asarray(rng.integers(0, 10, 32))) for _ in range(8)]
    want_net, want_opt = build(), Adam(lr=0.001)
    want = _run(_eager_step(want_net, want_opt), want_net, batches)
    net, opt = build(), Adam(lr=0.001)
    step = _graph_step(net, opt)
    got = _run(step, net, batches)
    assert step.counts["replay"] == len(batches) - 1, step.counts
    for key in net.params:
        np.testing.assert_allclose(cupy.asnumpy(net.params[key]), cupy.asnumpy(want_net.params[key]), rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose([cupy.asnumpy(v) for v in got], [cupy.asnumpy(v) for v in want], rtol=1e-5, atol=1e-6)
