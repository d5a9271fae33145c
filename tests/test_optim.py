"""Optimizers: the book's update rules on every namespace, in place (new arrays put
into the params dict on immutable JAX), with state
that can be saved and restored."""

from __future__ import annotations

import numpy as np
import pytest

from xpconv import optim
from xpconv.backend import asarray_in, is_writeable, to_numpy


def reference_steps(name, p, grads, **hp):
    """Plain NumPy float64 transcription of each update rule."""
    p = p.copy()
    lr = hp.get("lr", 0.01)
    wd = hp.get("weight_decay", 0.0)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for it, g in enumerate(grads, start=1):
        g = g + wd * p
        if name == "sgd":
            p -= lr * g
        elif name == "momentum":
            m = 0.9 * m - lr * g
            p += m
        elif name == "nesterov":  # the book's order: parameters first, then velocity
            p += 0.81 * m - 1.9 * lr * g
            m = 0.9 * m - lr * g
        elif name == "adagrad":
            v += g * g
            p -= lr * g / (np.sqrt(v) + 1e-7)
        elif name == "rmsprop":
            v = 0.99 * v + 0.01 * g * g
            p -= lr * g / (np.sqrt(v) + 1e-7)
        elif name == "adam":
            lr_t = lr * np.sqrt(1 - 0.999**it) / (1 - 0.9**it)
            m += 0.1 * (g - m)
            v += 0.001 * (g * g - v)
            p -= lr_t * m / (np.sqrt(v) + 1e-7)
    return p


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_update_rules_match_reference(xp, name, wd):
    r = np.random.default_rng(0)
    p0 = r.standard_normal((3, 4))
    grads = [r.standard_normal((3, 4)) for _ in range(5)]
    opt = optim.get_optimizer(name, lr=0.05, weight_decay=wd)
    p = asarray_in(p0.copy(), xp)
    params = {"W": p}
    for g in grads:
        opt.update(params, {"W": asarray_in(g, xp)})
    if is_writeable(p):
        assert params["W"] is p  # updated in place: layers sharing the array see it
    else:
        assert params["W"] is not p  # immutable (JAX): the new array was put into params
        p = params["W"]
    np.testing.assert_allclose(to_numpy(p), reference_steps(name, p0, grads, lr=0.05, weight_decay=wd), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_state_dict_resumes_exactly(xp, name):
    r = np.random.default_rng(1)
    grads = [asarray_in(r.standard_normal(6), xp) for _ in range(6)]
    a = {"b": asarray_in(np.ones(6), xp)}
    opt = optim.get_optimizer(name, lr=0.1)
    for g in grads:
        opt.update(a, {"b": g})
    b = {"b": asarray_in(np.ones(6), xp)}
    first = optim.get_optimizer(name, lr=0.1)
    for g in grads[:3]:
        first.update(b, {"b": g})
    state = first.state_dict()
    # the state goes through host NumPy (as in a checkpoint) and back
    host = {**state, "slots": {s: {k: to_numpy(v).copy() for k, v in d.items()} for s, d in state["slots"].items()}}
    second = optim.get_optimizer(name, lr=0.1)
    second.load_state_dict(host)
    for g in grads[3:]:
        second.update(b, {"b": g})
    np.testing.assert_array_equal(to_numpy(b["b"]), to_numpy(a["b"]))
    assert second.iter == 6


def test_book_defaults():
    assert optim.Adam().lr == 0.001 and optim.Adam().beta1 == 0.9 and optim.Adam().beta2 == 0.999
    assert optim.SGD().lr == 0.01 and optim.Momentum().momentum == 0.9
    assert optim.RMSprop().decay_rate == 0.99 and optim.AdaGrad().lr == 0.01


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown optimizer 'adamw'"):
        optim.get_optimizer("adamw")
    with pytest.raises(ValueError, match="lr must be a positive number"):
        optim.SGD(lr=-1)
    with pytest.raises(KeyError, match=r"no gradient for parameter\(s\) \['b'\]"):
        optim.SGD().update({"W": np.ones(2), "b": np.ones(2)}, {"W": np.ones(2)})
    with pytest.raises(ValueError, match=r"gradient 'W' has shape \(3,\), parameter has \(2,\)"):
        optim.SGD().update({"W": np.ones(2)}, {"W": np.ones(3)})
    with pytest.raises(ValueError, match="optimizer state is for Adam, not SGD"):
        optim.SGD().load_state_dict(optim.Adam().state_dict())
