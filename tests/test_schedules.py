"""Learning-rate schedules (xpconv.schedules): the formulas, the rate the updates really
use (the fused kernels' per-step scalars included), and exact resume mid-schedule."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from xpconv import backend
from xpconv.backend import to_numpy
from xpconv.checkpoint import load_checkpoint
from xpconv.datasets import load_digits
from xpconv.models import DeepConvNet
from xpconv.optim import SGD, Adam, Momentum
from xpconv.schedules import (
    ConstantSchedule,
    CosineSchedule,
    StepSchedule,
    make_schedule,
    schedule_from_state,
)
from xpconv.training import Run, Trainer


def test_cosine_lr_per_epoch_is_the_formula():
    opt = SGD(lr=0.2)
    s = CosineSchedule(opt, epochs=10, min_lr=0.01)
    got = [s.step() for _ in range(10)]
    want = [0.01 + (0.2 - 0.01) * (1 + math.cos(math.pi * (e - 1) / 10)) / 2 for e in range(1, 11)]
    assert got == pytest.approx(want, rel=1e-15, abs=0)
    assert got[0] == 0.2 and opt.lr == got[-1] and s.last_epoch == 10


def test_warmup_then_cosine_step_and_constant():
    opt = SGD(lr=0.1)
    s = CosineSchedule(opt, epochs=8, warmup_epochs=3)
    rates = [s.lr_at(e) for e in range(1, 9)]
    assert rates[:3] == pytest.approx([0.025, 0.05, 0.075])  # base * e / (W + 1)
    T = 8 - 3
    assert rates[3:] == pytest.approx([0.05 * (1 + math.cos(math.pi * t / T)) for t in range(T)])
    step = StepSchedule(opt, epochs=9, gamma=0.5)  # step_size: a third of 9 epochs
    assert step.step_size == 3
    assert [step.lr_at(e) for e in range(1, 10)] == pytest.approx([0.1] * 3 + [0.05] * 3 + [0.025] * 3)
    step = StepSchedule(opt, epochs=10, warmup_epochs=1, step_size=4)
    assert [step.lr_at(e) for e in (1, 2, 5, 6, 10)] == pytest.approx([0.05, 0.1, 0.1, 0.01, 0.001])
    const = ConstantSchedule(opt, epochs=4, warmup_epochs=1, base_lr=0.3)
    assert [const.lr_at(e) for e in range(1, 5)] == pytest.approx([0.15, 0.3, 0.3, 0.3])


def test_state_round_trip_and_refusals():
    s = make_schedule("step", Adam(lr=0.01), 12, warmup_epochs=2, step_size=5, gamma=0.3)
    s.set_epoch(7)
    state = json.loads(json.dumps(s.state_dict()))  # JSON-able: it lives in a checkpoint's metadata
    t = schedule_from_state(SGD(lr=1.0), state)
    assert type(t) is StepSchedule and t.state_dict() == s.state_dict()
    assert [t.lr_at(e) for e in range(1, 13)] == [s.lr_at(e) for e in range(1, 13)]
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'linear'; expected one of constant, step, cosine"):
        make_schedule("linear", SGD(), 3)
    with pytest.raises(ValueError, match="state is for 'step', not 'cosine'"):
        CosineSchedule(SGD(), 3).load_state_dict(state)
    with pytest.raises(ValueError, match="warmup_epochs must be an integer >= 0, got -1"):
        CosineSchedule(SGD(), 3, warmup_epochs=-1)
    with pytest.raises(ValueError, match="epoch must be an integer >= 1, got 0"):
        CosineSchedule(SGD(), 3).lr_at(0)
    with pytest.raises(ValueError, match="min_lr must be below base_lr"):
        CosineSchedule(SGD(lr=0.1), 3, min_lr=0.1)


def test_the_update_uses_the_scheduled_rate(xp):
    """SGD and Momentum steps after set_epoch move the parameters by the scheduled rate (the
    registered fused kernel of the namespace when there is one)."""
    p0 = backend.asarray_in(np.ones(5), xp, dtype=xp.float64)
    g = backend.asarray_in(np.full(5, 2.0), xp, dtype=xp.float64)
    for cls in (SGD, Momentum):
        opt = cls(lr=0.5)
        s = CosineSchedule(opt, epochs=4, warmup_epochs=1)
        params = {"W": p0 * 1.0}
        s.set_epoch(3)
        opt.update(params, {"W": g})
        np.testing.assert_allclose(to_numpy(params["W"]), 1.0 - 2.0 * s.lr_at(3), rtol=1e-15)


# ----------------------------------------------------------------------------- in the trainer


@pytest.fixture(scope="module")
def digits():
    (x_train, t_train), (x_test, t_test) = load_digits(normalize=True, flatten=False)
    return x_train[:300], t_train[:300], x_test[:100], t_test[:100]


def _deep():
    return DeepConvNet(input_dim=(1, 8, 8), hidden_size=16, xp="numpy", seed=3)


def _run(data, epochs, out, **kw):
    tr = Trainer(_deep(), *data, epochs=epochs, mini_batch_size=50, optimizer="adam", optimizer_param={"lr": 0.003},
                 verbose=False, seed=7, run=Run(out_dir=out), **kw)
    tr.train()
    return tr


def test_records_hold_each_epochs_rate(digits):
    tr = _run(digits, 4, None, lr_schedule="cosine", warmup_epochs=1)
    sched = CosineSchedule(Adam(lr=0.003), epochs=4, warmup_epochs=1)
    assert [r["lr"] for r in tr.history] == [sched.lr_at(e) for e in range(1, 5)]
    assert [r["lr"] for r in _run(digits, 2, None).history] == [0.003, 0.003]  # no schedule: lr left alone


OPTIONS = {"lr_schedule": "cosine", "warmup_epochs": 1, "val_split": 0.2, "augment": 1}


def test_resume_mid_schedule_repeats_an_uninterrupted_run(digits, tmp_path):
    """4 epochs in one go == a run of 4 stopped after 3, then a restart from last.safetensors for the 4th, with a
    warm-up + cosine schedule, a validation split and augmentation: same weights, optimizer
    state, rates and records."""
    full = _run(digits, 4, tmp_path / "full", **OPTIONS)
    _run(digits, 4, tmp_path / "half", callbacks=[lambda tr, r: setattr(tr, "stop_training", r["epoch"] == 3)], **OPTIONS)
    c = load_checkpoint(tmp_path / "half" / "last.safetensors")
    assert c.epoch == 3 and c.extra["lr_schedule"]["last_epoch"] == 3 and c.extra["lr_schedule"]["base_lr"] == 0.003
    resumed = Trainer(c.model, *digits, epochs=4, mini_batch_size=50, optimizer=c.optimizer, verbose=False, seed=7,
                      run=Run.resume(c, out_dir=tmp_path / "half"), **OPTIONS)
    # the optimizer comes back with epoch 3's rate; the schedule keeps the base rate of its state
    assert resumed.lr_schedule.base_lr == 0.003 and c.optimizer.lr == full.history[2]["lr"] < 0.003
    resumed.train()
    a, b = full.network.params, resumed.network.params
    for k in a:
        np.testing.assert_array_equal(to_numpy(a[k]), to_numpy(b[k]), err_msg=k)
    strip = lambda hist: [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")} for r in hist]  # noqa: E731
    assert strip(full.history) == strip(resumed.history)
    assert len({r["lr"] for r in full.history}) == 4  # the rate changed every epoch


def test_cli_resume_after_ctrl_c_mid_schedule_equals_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    """``xpconv train`` with warm-up + cosine, augmentation and weight decay: a run stopped by
    Ctrl-C at the start of epoch 3 and resumed with --resume ends as the run that was never
    stopped (weights, records, rates)."""
    from xpconv.cli import main

    monkeypatch.chdir(tmp_path)
    opts = ["--model", "deep", "--batch-size", "100", "--epochs", "3", "--lr-schedule", "cosine", "--warmup-epochs", "1",
            "--augment", "--weight-decay", "0.0005", "--no-plots", "-q"]
    assert main(["train", *opts, "--out", str(tmp_path / "full")]) == 0
    real = Trainer.train_epoch

    def ctrl_c_at_epoch_3(self, epoch):
        if epoch == 3:
            raise KeyboardInterrupt
        return real(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", ctrl_c_at_epoch_3)
    assert main(["train", *opts, "--out", str(tmp_path / "part")]) == 130
    monkeypatch.setattr(Trainer, "train_epoch", real)
    assert load_checkpoint(tmp_path / "part" / "last.safetensors").epoch == 2
    assert main(["train", "--resume", str(tmp_path / "part" / "last.safetensors"), "--no-plots", "-q"]) == 0
    a, b = load_checkpoint(tmp_path / "full" / "last.safetensors"), load_checkpoint(tmp_path / "part" / "last.safetensors")
    assert a.epoch == b.epoch == 3
    for k in a.model.params:
        np.testing.assert_array_equal(to_numpy(a.model.params[k]), to_numpy(b.model.params[k]), err_msg=k)
    strip = lambda hist: [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")} for r in hist]  # noqa: E731
    assert strip(a.metrics) == strip(b.metrics)
    cfg = json.loads((tmp_path / "part" / "metrics.json").read_text())["config"]
    assert (cfg["lr_schedule"], cfg["warmup_epochs"], cfg["augment"], cfg["weight_decay"], cfg["val_split"]) == ("cosine", 1, 1, 0.0005, 0.1)
    assert a.optimizer.weight_decay == b.optimizer.weight_decay == 0.0005
    # deep's recipe: adam 0.001; 1 warm-up epoch at half of it, then cosine over 2 epochs
    assert [r["lr"] for r in a.metrics] == pytest.approx([0.0005, 0.001, 0.0005])
