"""The training step is shaped for a GPU: nothing in it reads device memory back to
the host, labels are checked where data enters, Dropout masks come from a
counter-based hash equal on every backend, and the launch count of one step has a
budget (see tests/cuda_host.py's counting stand-in)."""

from __future__ import annotations

import contextlib
import functools

import array_api_strict
import numpy as np
import pytest

from xpconv import backend, models, ops
from xpconv import layers as L
from xpconv.optim import Adam, Momentum

# ====================================================================== no host reads


@contextlib.contextmanager
def no_host_reads():
    """array-api-strict arrays refuse every conversion to a Python scalar (what a
    device -> host read looks like: bool(), float(), int(), operator.index())."""
    Array = array_api_strict._array_object.Array

    def refuse(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"host read inside a training step: Array.{name}")

        return method

    with pytest.MonkeyPatch.context() as mp:
        for name in ("__bool__", "__float__", "__int__", "__index__"):
            mp.setattr(Array, name, refuse(name))
        yield


def test_no_host_reads_refuses_reads():
    a = backend.asarray_in(np.arange(3), array_api_strict)
    with no_host_reads():
        for read in (bool, float, int):
            with pytest.raises(AssertionError, match="host read"):
                read(a[0])


@pytest.mark.parametrize("model", ["SimpleConvNet", "DeepConvNet"])
@pytest.mark.parametrize("optimizer", [Adam, Momentum])
def test_a_training_step_reads_nothing_back_from_the_device(model, optimizer):
    kwargs = {"input_dim": (1, 12, 12)} if model == "SimpleConvNet" else {"input_dim": (1, 16, 16)}
    net = getattr(models, model)(seed=0, xp="array_api_strict", **kwargs)
    rng = np.random.default_rng(0)
    x = backend.asarray_in(rng.random((4, *kwargs["input_dim"])).astype("float32"), array_api_strict)
    t = backend.asarray_in(rng.integers(0, 10, 4), array_api_strict)
    opt = optimizer(lr=0.01)
    opt.update(net.params, net.gradient(x, t))  # warm-up: slots allocated
    before = {k: backend.to_numpy(v).copy() for k, v in net.params.items()}
    with no_host_reads():
        for _ in range(2):
            grads = net.gradient(x, t)
            opt.update(net.params, grads)
    after = {k: backend.to_numpy(v) for k, v in net.params.items()}
    assert all(not np.array_equal(before[k], after[k]) for k in before), "the step changed every parameter"
    assert np.isfinite(float(net.last_layer.loss))


# ====================================================================== labels


def test_device_labels_out_of_range_poison_the_loss_instead_of_a_read():
    xp = array_api_strict
    x = backend.asarray_in(np.zeros((3, 4), "float64"), xp)
    t = backend.asarray_in(np.array([0, 4, 1]), xp)
    layer = L.SoftmaxWithLoss(check_labels="host")
    with no_host_reads():
        loss = layer.forward(x, t)
        dx = layer.backward(1.0)
    assert np.isnan(float(loss))
    dx = backend.to_numpy(dx)
    assert np.isnan(dx[1]).all() and np.isfinite(dx[[0, 2]]).all()


@pytest.mark.parametrize("labels", [[0, 4, 1], [0, -1, 1]])
def test_host_labels_out_of_range_are_a_clear_error(labels):
    net = models.TwoLayerNet(4, 3, 4, seed=0, xp="array_api_strict")
    x = np.zeros((3, 4), "float32")
    with pytest.raises(ValueError, match=r"^SoftmaxWithLoss: labels out of range: expected 0 <= t < 4"):
        net.loss(x, np.array(labels))
    # direct calls on device labels still check (a read, outside any step)
    with pytest.raises(ValueError, match="labels out of range"):
        L.SoftmaxWithLoss().forward(backend.asarray_in(x, array_api_strict), backend.asarray_in(np.array(labels), array_api_strict))


def test_trainer_checks_labels_once_where_data_enters():
    from xpconv.training import Trainer

    net = models.TwoLayerNet(4, 3, 4, seed=0)
    x = np.zeros((8, 4), "float32")
    good, bad = np.arange(8) % 4, np.arange(8) % 5
    with pytest.raises(ValueError, match=r"^Trainer t_train: labels out of range: expected 0 <= t < 4, got min 0, max 4"):
        Trainer(net, x, bad, x, good, epochs=1, mini_batch_size=4, verbose=False)
    with pytest.raises(ValueError, match=r"^Trainer t_test: labels out of range"):
        Trainer(net, x, good, x, bad - 1, epochs=1, mini_batch_size=4, verbose=False)


# ====================================================================== step kernels through the host build

from . import cuda_host
from .test_cupy_kernels import _host_impl, needs_cxx


def _lowbias32(x: int) -> int:
    """The hash as plain Python integers (the spec both implementations follow)."""
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_keep_mask_is_the_documented_hash():
    keys, ratio = (0xDEADBEEF, 12345), 0.3
    mask = backend.keep_mask((7, 9), ratio, keys, xp="numpy", dtype="float64").ravel()
    want = [float((_lowbias32(_lowbias32(i ^ keys[0]) ^ keys[1]) >> 8) >= round(ratio * 2**24)) for i in range(63)]
    np.testing.assert_array_equal(mask, want)


def _namespaces():
    names = ["numpy", "array_api_strict"]
    try:
        import torch  # noqa: F401

        names.append("torch")
    except ImportError:
        pass
    return names


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.9])
def test_dropout_masks_are_equal_on_every_backend(ratio):
    want = backend.Generator([4, 2, 1]).dropout_mask((33, 17), ratio, xp="numpy", dtype="float32")
    assert want.dtype == np.float32
    if ratio == 0.0:
        assert want.all()
    else:
        assert abs(1 - want.mean() - ratio) < 0.05
    for name in _namespaces():
        got = backend.Generator([4, 2, 1]).dropout_mask((33, 17), ratio, xp=name, dtype="float32")
        np.testing.assert_array_equal(backend.to_numpy(got), want, err_msg=name)


@needs_cxx
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dropout_mask_kernel_equals_the_generic_hash(dtype):
    kernel = _host_impl().ops.kernels["dropout_mask"]
    for shape, ratio, keys in [((5, 7), 0.5, (1, 2)), ((3, 4, 5), 0.1, (2**32 - 1, 2**31)), ((1000,), 0.7, (99, 7))]:
        threshold = backend.dropout_threshold(ratio)
        got = kernel.forward(shape, *keys, threshold, np.dtype(dtype))
        want = backend.keep_mask(shape, ratio, keys, xp="numpy", dtype=dtype)
        assert got.dtype == np.dtype(dtype) and got.shape == shape
        np.testing.assert_array_equal(got, want)


@needs_cxx
@pytest.mark.filterwarnings("ignore:invalid value encountered")  # -inf * 0 is NaN, as the book's x * mask gives it
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_relu_kernel_equals_generic(dtype):
    k = _host_impl().ops.kernels["relu"]
    x = np.random.default_rng(0).standard_normal((5, 6, 7)).astype(dtype)
    x.flat[:4] = [0.0, -0.0, np.nan, -np.inf]
    out, cache = ops.relu_forward(x, impl=k)
    assert cache.kernel is k
    want, gcache = ops.relu_forward(x, impl=ops.GENERIC)
    np.testing.assert_array_equal(out, want)
    dout = np.random.default_rng(1).standard_normal(x.shape).astype(dtype)
    np.testing.assert_array_equal(ops.relu_backward(dout, cache), ops.relu_backward(dout, gcache))


@needs_cxx
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_cross_entropy_kernel_equals_generic(dtype):
    k = _host_impl().ops.kernels["softmax_cross_entropy"]
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((9, 10)) * 5).astype(dtype)
    tol = 1e-6 if dtype == "float32" else 1e-13
    for t in (rng.integers(0, 10, 9), rng.integers(0, 10, 9).astype("int32"), np.array([0, 1, 2, 3, 10, 5, -1, 7, 8])):
        loss, y, cache = ops.softmax_cross_entropy_forward(x, t, impl=k)
        assert cache.kernel is k
        wloss, wy, wcache = ops.softmax_cross_entropy_forward(x, t, impl=ops.GENERIC)
        np.testing.assert_allclose(float(loss), float(wloss), rtol=tol, equal_nan=True)
        np.testing.assert_allclose(y, wy, rtol=tol, atol=tol)
        for dout in (1.0, 0.5, np.asarray(2.0, dtype=dtype)):
            np.testing.assert_allclose(ops.softmax_cross_entropy_backward(dout, cache), ops.softmax_cross_entropy_backward(dout, wcache), rtol=tol, atol=tol, equal_nan=True)
    bad = np.isnan(ops.softmax_cross_entropy_backward(1.0, cache))
    assert bad[[4, 6]].all() and not bad[[0, 1, 2, 3, 5, 7, 8]].any()


@needs_cxx
@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_fused_optimizer_updates_equal_the_generic_steps(name, dtype, weight_decay, monkeypatch):
    from xpconv import kernels, optim

    rng = np.random.default_rng(3)
    params = {"W": rng.standard_normal((4, 5)).astype(dtype), "b": rng.standard_normal(5).astype(dtype)}
    grads = [{k: rng.standard_normal(v.shape).astype(dtype) for k, v in params.items()} for _ in range(4)]
    generic = {k: v.copy() for k, v in params.items()}
    opt = optim.get_optimizer(name, lr=0.05, weight_decay=weight_decay)
    assert opt._fast_kernel(backend.get_namespace("numpy")) is None or kernels.find("numpy", opt._kernel_op) is not None
    for g in grads:
        opt.update(generic, g)
    kernel = _host_impl().ops.kernels[opt._kernel_op]
    monkeypatch.setitem(kernels.REGISTRY, ("numpy", opt._kernel_op), kernel)
    launches = len(cuda_host.HostModule.launches)
    fused = {k: v.copy() for k, v in params.items()}
    fopt = optim.get_optimizer(name, lr=0.05, weight_decay=weight_decay)
    for g in grads:
        fopt.update(fused, g)
    assert len(cuda_host.HostModule.launches) - launches == 4 * len(params), "one launch per parameter and step"
    tol = 2e-6 if dtype == "float32" else 1e-14
    for k in params:
        np.testing.assert_allclose(fused[k], generic[k], rtol=tol, atol=tol)
        for slot in opt.state:
            np.testing.assert_allclose(fopt.state[slot][k], opt.state[slot][k], rtol=tol, atol=tol)


# ====================================================================== launches per step

#: launches of one training step (gradient() + Adam update), as CuPy would make them
#: (tests/cuda_host.py: LaunchCount), per (model, batch, im2col slice budget in MiB; None:
#: the budget chosen from the free memory of the stand-in's 80 GB device, 128 MiB).  A
#: regression above fails here.  At batch 100 with 8 MiB DeepConvNet's convolutions run in
#: slices (its second layer in 6): 159 launches; with 128 MiB every layer is one piece: 89.
#: At batch 1000 the budget matters most: 1000 launches at 8 MiB (its second layer in 54
#: slices), 131 at 128 MiB (4 slices).
LAUNCH_BUDGET = {("SimpleConvNet", 100, 8): 32, ("SimpleConvNet", 100, None): 32, ("DeepConvNet", 100, 8): 165,
                 ("DeepConvNet", 100, None): 95, ("SimpleConvNet", 1000, None): 32, ("DeepConvNet", 1000, None): 135}


@functools.cache
def _counting_kernels() -> dict:
    """op -> kernel of a private cupy_ops bound to the counting stand-in cupy."""
    from .test_cupy_kernels import _fresh, _kernel_classes, _load_cupy_ops_with

    src = _fresh("cuda_source", "xpconv.kernels._counting_cuda_source")
    src.module = functools.lru_cache(maxsize=None)(lambda name: cuda_host.HostModule(src.read_source(name), src.OPTIONS))
    mod = _load_cupy_ops_with(cuda_host.counting_cupy())
    mod.cuda_source = src
    return {op: cls() for op, cls in _kernel_classes(mod).items()}


def _as_cupy_would_run(monkeypatch, net):
    """``net``'s arrays as Counted stand-ins and every op routed to cupy_ops' kernels
    (registered for "numpy", the stand-in's namespace).  Labels are on the "device",
    so the model does not check them (check_labels="host" with device labels)."""
    from xpconv import kernels

    kernels.find("numpy", "conv2d")
    for key in [k for k in kernels.REGISTRY if k[0] == "numpy"]:
        monkeypatch.delitem(kernels.REGISTRY, key)
    for op, kernel in _counting_kernels().items():
        monkeypatch.setitem(kernels.REGISTRY, ("numpy", op), kernel)
    for key in list(net.params):
        net.params[key] = cuda_host.counted(net.params[key])
    monkeypatch.setattr(net.last_layer, "check_labels", False)


@needs_cxx
@pytest.mark.parametrize(("model", "batch", "col_mib"), sorted(LAUNCH_BUDGET, key=str))
def test_launches_per_training_step_stay_within_budget(model, batch, col_mib, monkeypatch):
    cls = getattr(models, model)
    rng = np.random.default_rng(0)
    x = cuda_host.counted(rng.random((batch, 1, 28, 28)).astype("float32"))
    t = cuda_host.counted(rng.integers(0, 10, batch))
    net = cls(seed=0)
    _as_cupy_would_run(monkeypatch, net)
    monkeypatch.setattr(cuda_host.FakeRuntime, "free", 79 << 30)
    type(_counting_kernels()["conv2d"]).forward.__globals__["_COL_BUDGETS"].clear()
    conv = _counting_kernels()["conv2d"]
    if col_mib is not None:  # else the budget the stand-in's 80 GB device (79 GiB free) gets
        monkeypatch.setitem(type(conv).forward.__globals__, "_col_budget", lambda: col_mib << 20)  # the counting cupy_ops' budget
    opt = Adam(lr=0.001)
    opt.update(net.params, net.gradient(x[:4], t[:4]))  # warm-up: optimizer slots (the batch does not matter)
    # batch 1000 is counted without running the kernels (their emulation would take minutes)
    monkeypatch.setattr(cuda_host.HostModule, "count_only", batch > 100)
    with cuda_host.LaunchCount() as count:
        opt.update(net.params, net.gradient(x, t))
    print(f"{model} b{batch} {col_mib} MiB: {count.total} launches ({count.kernels} xpconv kernels, {count.elementwise} other): {count.names}")
    params = len(net.params)
    assert sum(n.startswith("xpc_adam") for n in count.names) == params, "one fused update per parameter"
    assert "xpc_softmax_xent_fwd_f32" in count.names and "xpc_softmax_xent_bwd_f32" in count.names
    dropouts = sum(type(layer).__name__ == "Dropout" for layer in net.layers.values())
    assert count.names.count("xpc_dropout_mask_f32") == dropouts
    budget = LAUNCH_BUDGET[model, batch, col_mib]
    assert count.total <= budget, f"{model} ({col_mib} MiB slices): {count.total} launches per step, budget {budget}: {count.names}"
    if not cuda_host.HostModule.count_only:
        assert np.isfinite(float(net.last_layer.loss))


def test_the_slice_budget_comes_from_each_devices_free_memory(monkeypatch):
    from xpconv import kernels

    mod = type(_counting_kernels()["conv2d"]).forward.__globals__
    budgets = mod["_COL_BUDGETS"]
    monkeypatch.setattr(cuda_host.FakeRuntime, "device", 0)
    monkeypatch.setattr(cuda_host.FakeRuntime, "free", 79 << 30)
    budgets.clear()
    try:
        assert mod["_col_budget"]() == kernels.COL_BYTES_MAX == 128 << 20  # an H100 with 79 GiB free
        monkeypatch.setattr(cuda_host.FakeRuntime, "device", 1)
        monkeypatch.setattr(cuda_host.FakeRuntime, "free", 2 << 30)  # device 1: 2 GiB free -> 1/64 of it
        assert mod["_col_budget"]() == 32 << 20
        monkeypatch.setattr(cuda_host.FakeRuntime, "free", 100 << 30)
        assert mod["_col_budget"]() == 32 << 20  # chosen once per device, at its first convolution
        monkeypatch.setattr(cuda_host.FakeRuntime, "device", 0)
        assert mod["_col_budget"]() == 128 << 20
    finally:
        budgets.clear()
    assert kernels.col_bytes_for(100 << 20) == kernels.COL_BYTES == 8 << 20  # never below the floor
    assert kernels.col_bytes_for(None) == kernels.COL_BYTES
    monkeypatch.setattr(kernels, "COL_BYTES_FIXED", True)  # XPCONV_COL_MIB fixes it
    assert kernels.col_bytes_for(79 << 30) == kernels.COL_BYTES


def test_launch_counter_counts_what_cupy_would_launch():
    a = cuda_host.counted(np.ones((3, 4), "float32"))
    with cuda_host.LaunchCount() as count:
        b = a * 2 + 1  # two elementwise kernels
        b.reshape(4, 3)  # a view
        b.sum(axis=0)  # one reduction
        b @ b.T  # one product
        b -= a  # in place: one
        b.astype("float64")  # a conversion
        b.astype("float32", copy=False)  # none
    assert count.names == ["multiply", "add", "add.reduce", "matmul", "subtract", "astype"]


# ====================================================================== namespace lookups


@pytest.mark.parametrize("model", ["SimpleConvNet", "DeepConvNet"])
@pytest.mark.parametrize("xp_name", ["numpy", "array_api_strict"])
def test_a_training_step_resolves_no_namespace_after_the_first(model, xp_name, monkeypatch):
    # namespace_of answers from the arrays' types: after a warm-up step, a step's
    # ~50 layer, op and optimizer calls are dict lookups, none a walk over the libraries
    net = getattr(models, model)(seed=0, xp=xp_name)
    xp = backend.get_namespace(xp_name)
    rng = np.random.default_rng(0)
    x = xp.asarray(rng.random((4, 1, 28, 28)).astype("float32"))
    t = xp.asarray(rng.integers(0, 10, 4))
    opt = Adam(lr=0.001)
    opt.update(net.params, net.gradient(x, t))  # warm-up
    walks = []
    real = backend.array_api_compat.array_namespace
    monkeypatch.setattr(backend.array_api_compat, "array_namespace", lambda *a, **k: walks.append(a) or real(*a, **k))
    opt.update(net.params, net.gradient(x, t))
    assert walks == []
    monkeypatch.setattr(backend, "_NAMESPACES", {})  # and the lookup is what a walk gives
    assert backend.namespace_of(x, net.params["W1"]) is real(x)
    assert len(walks) == 1
    with pytest.raises(TypeError, match="expected arrays of one array library"):
        backend.namespace_of(x, np.ones(2) if xp_name != "numpy" else array_api_strict.ones(2))
