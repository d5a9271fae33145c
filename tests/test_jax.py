"""JAX, the immutable namespace: models built on it, moved to it, and trained on it step
for step as on NumPy.  The namespace-parametrized tests run on JAX through the ``xp``
fixture; this file holds what is particular to it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from xpconv import backend
from xpconv.models import DeepConvNet, SimpleConvNet
from xpconv.optim import Adam

from .tolerance import assert_close

jax = pytest.importorskip("jax", reason="jax is not installed (CI installs it with the test extra)")
jnp = pytest.importorskip("jax.numpy")


@pytest.fixture
def x64_off():
    """JAX's default configuration (32-bit), restored to the suite's 64-bit mode after."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


def test_jax_arrays_are_immutable_and_the_others_are_not():
    assert not backend.is_mutable(backend.get_namespace("jax"))
    assert not backend.is_writeable(jnp.zeros(3))
    assert backend.is_mutable(backend.get_namespace("numpy"))
    for name in ("jax", "jnp", "jax.numpy"):
        assert backend.get_namespace(name) is jnp
    assert backend.get_namespace(jax) is jnp and backend.namespace_name(jnp) == "jax"


def test_built_on_jax_with_device_and_numpy_inputs_moved_in():
    net = SimpleConvNet(input_dim=(1, 8, 8), conv_param={"filter_num": 3, "filter_size": 3}, hidden_size=5, xp="jax", device="cpu", seed=0)
    default = jax.devices()[0]
    for p in net.params.values():
        assert isinstance(p, jax.Array) and p.dtype == jnp.float32
        assert p.devices() == {default}  # JAX's default device
    x = np.random.default_rng(0).random((4, 1, 8, 8))  # host NumPy float64
    y = net.predict(x)
    assert isinstance(y, jax.Array) and y.dtype == jnp.float32 and tuple(y.shape) == (4, 10)
    grads = net.gradient(x, np.array([0, 1, 2, 3]))
    assert all(isinstance(g, jax.Array) for g in grads.values())


@pytest.mark.skipif("jax.default_backend() != 'cpu'", reason="this machine's JAX has a GPU")
def test_asking_for_a_gpu_jax_lacks_says_so():
    with pytest.raises(backend.BackendUnavailable, match="JAX has no gpu device"):
        SimpleConvNet(input_dim=(1, 8, 8), xp="jax", device="cuda")


def test_to_jax_and_back_keeps_the_numbers():
    kw = {"input_dim": (1, 8, 8), "conv_param": {"filter_num": 3, "filter_size": 3}, "hidden_size": 5, "seed": 1}
    net = SimpleConvNet(**kw)
    x = np.random.default_rng(1).random((3, 1, 8, 8), dtype=np.float32)
    want = np.asarray(net.predict(x))
    assert net.to("jax") is net and backend.namespace_name(net.xp) == "jax"
    assert all(isinstance(p, jax.Array) for p in net.params.values())
    assert_close(backend.to_numpy(net.predict(x)), want, rtol=1e-5)
    net.to("numpy")
    assert all(isinstance(p, np.ndarray) for p in net.params.values())


def test_float64_without_64_bit_mode_is_refused(x64_off):
    with pytest.raises(ValueError, match="jax_enable_x64"):
        SimpleConvNet(input_dim=(1, 8, 8), xp="jax", dtype="float64")


def _adam_run(model, xp, x, t, batches):
    net = model(xp=xp)
    opt = Adam(lr=0.01)
    losses = []
    for idx in batches:
        grads = net.gradient(x[idx], t[idx])
        losses.append(float(net.last_layer.loss))
        opt.update(net.params, grads)
    return losses, {k: backend.to_numpy(v) for k, v in net.params.items()}


_R = np.random.default_rng(16)
_X = _R.random((40, 1, 12, 12), dtype=np.float32)
_T = _R.integers(0, 10, 40)


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(lambda xp: SimpleConvNet(input_dim=(1, 12, 12), hidden_size=20, weight_init_std=0.1, xp=xp, seed=5), id="simple"),
        pytest.param(lambda xp: DeepConvNet(input_dim=(1, 12, 12), hidden_size=20, xp=xp, seed=5), id="deep"),
    ],
)
def test_ten_adam_steps_equal_numpy_step_for_step(model, x64_off):
    """Same seed, same batches, float32, JAX's default 32-bit mode: the losses of every
    step and the parameters after the tenth agree with NumPy's to 1e-4."""
    order = np.random.default_rng(0).permutation(40)
    batches = [np.sort(order[(i * 8) % 40 : (i * 8) % 40 + 8]) for i in range(10)]
    ref_losses, ref_params = _adam_run(model, "numpy", _X, _T, batches)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no dtype truncation or other complaint from JAX
        got_losses, got_params = _adam_run(model, "jax", _X, _T, batches)
    start = {k: backend.to_numpy(v) for k, v in model("numpy").params.items()}
    assert max(float(np.abs(ref_params[k] - start[k]).max()) for k in start) > 1e-2  # the steps moved it
    np.testing.assert_allclose(got_losses, ref_losses, atol=1e-4, rtol=0)
    for key, want in ref_params.items():
        assert got_params[key].dtype == np.float32
        np.testing.assert_allclose(got_params[key], want, atol=1e-4, rtol=0, err_msg=key)
