"""The training step is shaped for a GPU: nothing in it reads device memory back to
the host, labels are checked where data enters, Dropout masks come from a
counter-based hash equal on every backend, and the launch count of one step has a
budget (see tests/cuda_host.py's counting stand-in)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import array_api_strict

from xpconv import backend, layers as L, models, ops
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
