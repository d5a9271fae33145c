"""Trainer: the book's interface, per-epoch lines and progress, NaN/inf stops, exact
resume (optimizer state and Dropout generators), chunked evaluation, other namespaces."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from xpconv.backend import Generator, namespace_name, to_numpy
from xpconv.checkpoint import load_checkpoint
from xpconv.datasets import load_digits
from xpconv.models import DeepConvNet, SimpleConvNet
from xpconv.training import (
    Callback,
    Checkpoints,
    LocalCommunicator,
    Metrics,
    ProgressBar,
    Run,
    Trainer,
    TrainingDiverged,
    format_seconds,
    seed_dropout,
    write_metrics,
)

CONV = {"filter_num": 8, "filter_size": 3, "pad": 1, "stride": 1}


@pytest.fixture(scope="module")
def digits():
    (x_train, t_train), (x_test, t_test) = load_digits(normalize=True, flatten=False)
    return x_train[:600], t_train[:600], x_test[:200], t_test[:200]


def _net(xp="numpy", seed=0, **kw):
    return SimpleConvNet(input_dim=(1, 8, 8), conv_param=CONV, hidden_size=32, weight_init_std=0.1, xp=xp, seed=seed, **kw)


def _params(net):
    return {k: to_numpy(v).copy() for k, v in net.params.items()}


# ----------------------------------------------------------------------------- book interface


def test_book_interface(digits, capsys):
    net = _net()
    trainer = Trainer(net, *digits, epochs=3, mini_batch_size=50, optimizer="AdaGrad", optimizer_param={"lr": 0.05},
                      evaluate_sample_num_per_epoch=None, verbose=True)
    history = trainer.train()
    iters = 600 // 50
    assert len(trainer.train_loss_list) == 3 * iters
    assert all(math.isfinite(v) and v > 0 for v in trainer.train_loss_list)
    assert len(trainer.train_acc_list) == len(trainer.test_acc_list) == 3
    assert [r["epoch"] for r in history] == [1, 2, 3]
    # it learns: loss falls, accuracy well above chance (10%)
    assert np.mean(trainer.train_loss_list[-iters:]) < 0.5 * np.mean(trainer.train_loss_list[:iters])
    assert trainer.test_acc_list[-1] > 0.8
    assert trainer.test_acc_list[-1] == pytest.approx(net.accuracy(digits[2], digits[3]))

    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4
    for k, line in enumerate(out[:3], 1):
        m = re.fullmatch(
            rf"epoch {k}/3  train loss (\d\.\d{{4}})  train acc (\d\.\d{{4}})  test acc (\d\.\d{{4}})  (\d+ ms|\d+\.\d\d s)  \([\d,]+ samples/s\)",
            line,
        )
        assert m, line
        r = history[k - 1]
        assert float(m.group(1)) == pytest.approx(r["train_loss"], abs=6e-5)
        assert float(m.group(3)) == pytest.approx(r["test_acc"], abs=6e-5)
    assert re.fullmatch(r"test acc \d\.\d{4} after 3 epochs \(.+\)", out[3])


def test_defaults_are_the_books(digits):
    t = Trainer(_net(), *digits, verbose=False)
    assert t.epochs == 20 and t.batch_size == 100
    assert type(t.optimizer).__name__ == "SGD" and t.optimizer.lr == 0.01
    assert t.evaluate_sample_num_per_epoch is None


def test_evaluate_sample_num_per_epoch(digits, monkeypatch):
    net = _net()
    seen = []
    real = net.accuracy

    def spy(x, t, batch_size=100):
        seen.append(int(x.shape[0]))
        return real(x, t, batch_size=batch_size)

    monkeypatch.setattr(net, "accuracy", spy)
    Trainer(net, *digits, epochs=2, mini_batch_size=100, evaluate_sample_num_per_epoch=70, verbose=False).train()
    assert seen == [70, 70, 70, 70]  # train and test, each epoch


def test_evaluation_runs_in_bounded_chunks(digits, monkeypatch):
    net = _net()
    sizes = []
    real = net._forward

    def spy(x, train_flg):
        sizes.append((int(x.shape[0]), train_flg))
        return real(x, train_flg)

    monkeypatch.setattr(net, "_forward", spy)
    trainer = Trainer(net, *digits, epochs=1, mini_batch_size=100, eval_batch_size=64, verbose=False)
    trainer.train()
    evals = [n for n, train in sizes if not train]
    assert sum(evals) == 600 + 200
    assert max(evals) == 64
    assert max(n for n, train in sizes if train) == 100


def test_progress_bar_shows_rate_and_loss(digits, capsys, monkeypatch):
    import tqdm.auto

    class Eager(tqdm.auto.tqdm):  # redraw at every update, however fast
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "mininterval": 0})

    monkeypatch.setattr(tqdm.auto, "tqdm", Eager)
    t = Trainer(_net(), *digits, epochs=1, mini_batch_size=50, verbose=False, callbacks=[ProgressBar(True)], log_every=2)
    t.train()
    err = capsys.readouterr().err
    assert "epoch 1/1" in err
    assert "img/s" in err
    shown = re.findall(r"loss=(\d\.\d{4})", err)
    assert len(shown) >= 2
    assert float(shown[-1]) == pytest.approx(t.history[0]["train_loss"], abs=6e-5)  # the running mean ends at the epoch's
    assert "600/600" in err


def test_callbacks_and_stop(digits):
    seen = []

    def cb(trainer, record):
        seen.append(record["epoch"])
        if record["epoch"] == 2:
            trainer.stop_training = True

    trainer = Trainer(_net(), *digits, epochs=5, mini_batch_size=100, verbose=False, callbacks=[cb])
    trainer.train()
    assert seen == [1, 2]
    assert trainer.current_epoch == 2 and len(trainer.test_acc_list) == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mini_batch_size": 0}, "mini_batch_size must be >= 1"),
        ({"mini_batch_size": 601}, "mini_batch_size 601 is larger than the 600 training samples"),
        ({"epochs": -1}, "epochs must be >= 0"),
        ({"optimizer": "adamw"}, "unknown optimizer 'adamw'"),
    ],
)
def test_bad_arguments(digits, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Trainer(_net(), *digits, verbose=False, **kwargs)


def test_mismatched_data(digits):
    x, t, xt, tt = digits
    with pytest.raises(ValueError, match="600 training samples but 599 labels"):
        Trainer(_net(), x, t[:-1], xt, tt, verbose=False)
    with pytest.raises(ValueError, match="200 test samples but 10 labels"):
        Trainer(_net(), x, t, xt, tt[:10], verbose=False)


def test_format_seconds():
    assert format_seconds(0.0123) == "12 ms"
    assert format_seconds(0.384) == "0.38 s"
    assert format_seconds(9.994) == "9.99 s"
    assert format_seconds(12.34) == "12.3 s"
    assert format_seconds(185) == "3 min 05 s"


# ----------------------------------------------------------------------------- files, failure, resume


def test_out_dir_files_and_metrics(digits, tmp_path):
    trainer = Trainer(_net(), *digits, epochs=2, mini_batch_size=100, verbose=False, run=Run(out_dir=tmp_path, config={"what": "test"}))
    trainer.train()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors", "last.safetensors", "metrics.json", "metrics.jsonl"]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["epoch"] for r in m["epochs"]] == [1, 2]
    assert set(m["epochs"][0]) >= {"epoch", "train_loss", "train_acc", "test_acc", "seconds"}
    assert m["final"]["test_acc"] == m["epochs"][-1]["test_acc"] == trainer.test_acc_list[-1]
    assert m["config"] == {"what": "test"}
    c = load_checkpoint(tmp_path / "last.safetensors")
    assert c.epoch == 2 and c.metrics == m["epochs"] and c.extra["config"] == {"what": "test"}
    best = load_checkpoint(tmp_path / "best.safetensors")
    assert best.epoch == max(m["epochs"], key=lambda r: r["test_acc"])["epoch"]


def test_write_metrics_keeps_json_valid(tmp_path):
    p = write_metrics(tmp_path / "m.json", {"epochs": [{"train_loss": float("nan"), "x": float("inf")}], "final": {}})
    assert json.loads(p.read_text()) == {"epochs": [{"train_loss": None, "x": None}], "final": {}}


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("bad, log_every", [(float("nan"), 1), (float("inf"), 10)])
def test_nan_or_inf_loss_stops_training(digits, tmp_path, bad, log_every):
    """A non-finite loss at epoch 2, iteration 4 stops training with a message naming
    them; last.safetensors from epoch 1 stays, with finite weights."""
    net = _net()
    trainer = Trainer(net, *digits, epochs=3, mini_batch_size=50, verbose=False, run=Run(out_dir=tmp_path), log_every=log_every)
    real = trainer.train_step

    def poisoned(xb, tb):
        if trainer.position == {"epoch": 2, "iteration": 4}:
            net.params["W2"] = net.params["W2"] * bad  # what an exploding update does
        return real(xb, tb)

    trainer.train_step = poisoned
    with pytest.raises(TrainingDiverged) as info:
        trainer.train()
    err = info.value
    assert (err.epoch, err.iteration) == (2, 4)
    msg = str(err)
    assert "epoch 2, iteration 4 of 12" in msg
    assert str(tmp_path / "last.safetensors") in msg
    assert "nan" in msg.lower() or "inf" in msg.lower()
    c = load_checkpoint(tmp_path / "last.safetensors")
    assert c.epoch == 1
    assert all(np.isfinite(to_numpy(v)).all() for v in c.model.params.values())
    assert len(json.loads((tmp_path / "metrics.json").read_text())["epochs"]) == 1


def test_divergence_before_any_checkpoint_says_so(digits):
    net = _net()
    net.params["W1"] = net.params["W1"] * float("nan")
    with pytest.raises(TrainingDiverged, match=r"epoch 1, iteration 1 of 6; no checkpoint was written"):
        Trainer(net, *digits, epochs=1, mini_batch_size=100, verbose=False).train()


def test_interrupt_saves_a_checkpoint(digits, tmp_path):
    net = _net()
    trainer = Trainer(net, *digits, epochs=3, mini_batch_size=100, verbose=False, run=Run(out_dir=tmp_path))
    real = trainer.train_step

    def interrupted(xb, tb):
        if trainer.position == {"epoch": 2, "iteration": 3}:
            raise KeyboardInterrupt
        return real(xb, tb)

    trainer.train_step = interrupted
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    path = trainer.save_interrupted()
    assert path == tmp_path / "interrupted.safetensors"
    c = load_checkpoint(path)
    assert c.epoch == 1  # epochs completed
    assert c.extra["interrupted_at"] == {"epoch": 2, "iteration": 3}
    for k, v in _params(net).items():
        np.testing.assert_array_equal(to_numpy(c.model.params[k]), v)
    assert json.loads((tmp_path / "metrics.json").read_text())["interrupted_at"] == {"epoch": 2, "iteration": 3}


def test_interrupt_between_epochs_points_at_the_next(digits, tmp_path):
    """Ctrl-C after an epoch is complete (e.g. while its line is printed) is reported as
    before the next epoch, and the checkpoint counts the finished epoch."""

    def stop_after_first(trainer, record):
        raise KeyboardInterrupt

    trainer = Trainer(_net(), *digits, epochs=3, mini_batch_size=100, verbose=False, run=Run(out_dir=tmp_path), callbacks=[stop_after_first])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer.position == {"epoch": 2, "iteration": 0}
    c = load_checkpoint(trainer.save_interrupted())
    assert c.epoch == 1 == load_checkpoint(tmp_path / "last.safetensors").epoch


def _run(net, data, epochs, out_dir, **kw):
    t = Trainer(net, *data, epochs=epochs, mini_batch_size=50, optimizer="Adam", optimizer_param={"lr": 0.002},
                verbose=False, run=Run(out_dir=out_dir), seed=7, **kw)
    t.train()
    return t


def test_resume_repeats_an_uninterrupted_run(digits, tmp_path):
    """4 epochs in one go == 2 epochs, then a fresh process-like restart from the
    checkpoint for 2 more: same weights, same optimizer state, same metrics (DeepConvNet,
    so Dropout masks must repeat too)."""
    data = digits[0][:300], digits[1][:300], digits[2][:100], digits[3][:100]

    def deep():
        return DeepConvNet(input_dim=(1, 8, 8), hidden_size=16, xp="numpy", seed=3)

    full = _run(deep(), data, 4, tmp_path / "full")
    _run(deep(), data, 2, tmp_path / "half")
    c = load_checkpoint(tmp_path / "half" / "last.safetensors")
    assert c.epoch == 2
    resumed = Trainer(c.model, *data, epochs=4, mini_batch_size=50, optimizer=c.optimizer, verbose=False,
                      run=Run.resume(c, out_dir=tmp_path / "half"), seed=7)
    resumed.train()

    a, b = _params(full.network), _params(resumed.network)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    strip = lambda hist: [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")} for r in hist]  # noqa: E731
    assert strip(full.history) == strip(resumed.history)
    assert resumed.test_acc_list == full.test_acc_list
    assert resumed.optimizer.iter == full.optimizer.iter
    sa, sb = full.optimizer.state_dict()["slots"], resumed.optimizer.state_dict()["slots"]
    for slot in sa:
        for k in sa[slot]:
            np.testing.assert_array_equal(to_numpy(sa[slot][k]), to_numpy(sb[slot][k]))
    ma = json.loads((tmp_path / "full" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "half" / "metrics.json").read_text())
    assert strip(ma["epochs"]) == strip(mb["epochs"])


def test_dropout_masks_come_from_seed_and_step(digits):
    """Dropout masks depend on the trainer's seed and the global step only (not on the
    layers' own generators): what makes resume exact and one process equal a
    data-parallel run. The same weights with other layer generators train identically;
    another trainer seed does not."""
    data = digits[0][:200], digits[1][:200], digits[2][:100], digits[3][:100]

    def run(model_seed, trainer_seed):
        net = DeepConvNet(input_dim=(1, 8, 8), hidden_size=16, xp="numpy", seed=3)
        for layer in net.layers:
            if hasattr(layer, "dropout_ratio"):
                layer.rng = Generator(model_seed)
        t = Trainer(net, *data, epochs=1, mini_batch_size=50, optimizer="Adam", optimizer_param={"lr": 0.002},
                    verbose=False, seed=trainer_seed)
        t.train()
        return _params(net)

    a, b, c = run(1, 7), run(2, 7), run(1, 8)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_seed_dropout_matches_layer_generators():
    net = DeepConvNet(input_dim=(1, 8, 8), hidden_size=16, xp="numpy", seed=3)
    seed_dropout(net, 5, 11)
    drops = [layer for layer in net.layers if hasattr(layer, "dropout_ratio")]
    assert len(drops) == 2
    for i, layer in enumerate(drops):
        want = Generator([5, 11, i]).dropout_mask((4, 16), 0.5, xp="numpy", dtype="float32")
        np.testing.assert_array_equal(layer.rng.dropout_mask((4, 16), 0.5, xp="numpy", dtype="float32"), want)


# ----------------------------------------------------------------------------- other namespaces


def test_trains_in_every_namespace(xp, digits):
    """Host data, model in any namespace: batches move one at a time; results agree with
    NumPy's closely (float32 rounding differs between libraries)."""
    ref = Trainer(_net(), *digits, epochs=1, mini_batch_size=100, verbose=False)
    ref.train()
    net = _net(xp=xp)
    t = Trainer(net, *digits, epochs=1, mini_batch_size=100, verbose=False)
    t.train()
    assert t.resident is False
    assert namespace_name(net.xp) == namespace_name(xp)
    np.testing.assert_allclose(t.train_loss_list, ref.train_loss_list, rtol=2e-3)
    assert abs(t.test_acc_list[0] - ref.test_acc_list[0]) <= 0.02


def test_resident_data_gives_the_same_run(digits):
    """Data kept in the model's namespace (as on a GPU) trains exactly like host data
    moved a batch at a time."""
    torch = pytest.importorskip("torch")
    runs = []
    for resident in (False, True):
        t = Trainer(_net(xp="torch"), *digits, epochs=2, mini_batch_size=100, verbose=False, resident=resident)
        assert t.resident is resident
        if resident:
            assert isinstance(t.x_train, torch.Tensor)
        t.train()
        runs.append((t.train_loss_list, t.test_acc_list, _params(t.network)))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    for k in runs[0][2]:
        np.testing.assert_array_equal(runs[0][2][k], runs[1][2][k])


def test_ctrl_c_between_an_epoch_and_its_checkpoint_saves_that_epoch(digits, tmp_path, monkeypatch):
    """A Ctrl-C that lands after epoch 2 ended but before last.safetensors was written:
    the interrupted save writes epoch 2 to last.safetensors first, so the two agree."""
    trainer = Trainer(_net(), *digits, epochs=3, mini_batch_size=100, verbose=False, run=Run(out_dir=tmp_path))
    real_save = Checkpoints.save_epoch

    def save(self, trainer, record):
        if record["epoch"] == 2 and self.saved_epoch < 2:
            raise KeyboardInterrupt  # as if the signal came just before the write
        real_save(self, trainer, record)

    monkeypatch.setattr(Checkpoints, "save_epoch", save)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert load_checkpoint(tmp_path / "last.safetensors").epoch == 1  # what the crash would leave
    monkeypatch.setattr(Checkpoints, "save_epoch", real_save)
    trainer.save_interrupted()
    last = load_checkpoint(tmp_path / "last.safetensors")
    stopped = load_checkpoint(tmp_path / "interrupted.safetensors")
    assert last.epoch == stopped.epoch == 2
    assert stopped.extra["interrupted_at"] == {"epoch": 3, "iteration": 0}
    for k, v in last.model.params.items():
        np.testing.assert_array_equal(to_numpy(v), to_numpy(stopped.model.params[k]))


# ----------------------------------------------------------------------------- metrics.jsonl, callbacks, communicator, logging


def test_metrics_jsonl_has_one_line_per_epoch_and_a_resumed_run_appends(digits, tmp_path):
    data = digits[0][:300], digits[1][:300], digits[2][:100], digits[3][:100]
    _run(_net(), data, 2, tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    first = lines[:]
    c = load_checkpoint(tmp_path / "last.safetensors")
    resumed = Trainer(c.model, *data, epochs=4, mini_batch_size=50, optimizer=c.optimizer, verbose=False,
                      run=Run.resume(c, out_dir=tmp_path), seed=7)
    resumed.train()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[:2] == first  # appended, not rewritten
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert records == json.loads((tmp_path / "metrics.json").read_text())["epochs"]  # the same records as metrics.json


def test_metrics_jsonl_gets_an_epoch_missed_by_a_ctrl_c(digits, tmp_path, monkeypatch):
    """Ctrl-C after an epoch ended but before its line was appended: save_interrupted
    appends it, so metrics.jsonl still has one line per completed epoch."""
    trainer = Trainer(_net(), *digits, epochs=3, mini_batch_size=100, verbose=False, run=Run(out_dir=tmp_path))
    real = Metrics.on_epoch_end

    def on_epoch_end(self, trainer, record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt
        real(self, trainer, record)

    monkeypatch.setattr(Metrics, "on_epoch_end", on_epoch_end)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    trainer.save_interrupted()
    assert [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((tmp_path / "metrics.json").read_text())["interrupted_at"] == {"epoch": 3, "iteration": 0}


def test_local_communicator_is_a_job_of_one_rank(digits):
    from xpconv.training import Communicator

    comm = LocalCommunicator()
    assert isinstance(comm, Communicator)
    assert (comm.rank, comm.size, comm.is_root) == (0, 1, True)
    grads = {"W": np.arange(3.0)}
    assert comm.allreduce_mean(grads) is grads and comm.broadcast_params(grads) is grads
    assert comm.allreduce_sum([2, 3.5]) == [2.0, 3.5]
    assert comm.barrier() is None and comm.params_in_sync(grads)
    batch = np.arange(6)
    assert comm.local_batch_size(6) == 6 and comm.shard(batch) is not None and comm.shard(batch).tolist() == batch.tolist()
    assert comm.shard_range(7) == (0, 7)
    net = _net()
    assert comm.evaluate(net, digits[2], digits[3], 64) == net.accuracy(digits[2], digits[3])
    with pytest.raises(ValueError, match="root must be a rank of this job"):
        comm.broadcast_params(grads, root=1)

    default = Trainer(_net(), *digits, epochs=1, mini_batch_size=100, verbose=False)
    assert isinstance(default.comm, LocalCommunicator)
    explicit = Trainer(_net(), *digits, epochs=1, mini_batch_size=100, verbose=False, comm=LocalCommunicator())
    default.train()
    explicit.train()
    assert default.train_loss_list == explicit.train_loss_list
    a, b = _params(default.network), _params(explicit.network)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_local_dropout_seeding_is_the_schedules_for_one_rank():
    net = DeepConvNet(input_dim=(1, 8, 8), hidden_size=16, xp="numpy", seed=3)
    LocalCommunicator().seed_dropout(net, 5, 11)
    drops = [layer for layer in net.layers if hasattr(layer, "dropout_ratio")]
    for i, layer in enumerate(drops):
        want = Generator([5, 11, i]).dropout_mask((4, 16), 0.5, xp="numpy", dtype="float32")
        np.testing.assert_array_equal(layer.rng.dropout_mask((4, 16), 0.5, xp="numpy", dtype="float32"), want)


@pytest.mark.parametrize("K", [2, 3])
def test_the_ranks_local_orders_make_up_the_global_batches(K):
    from xpconv.training import Schedule, global_batches

    one = Schedule(20, 6, seed=4)
    assert [b.tolist() for b in one.batches(2)] == [b.tolist() for b in global_batches(20, 6, seed=4, epoch=2)]
    parts = [Schedule(20, 6, seed=4, rank=r, size=K).local_order(2).reshape(3, 6 // K) for r in range(K)]
    np.testing.assert_array_equal(np.concatenate(parts, axis=1).reshape(-1), one.local_order(2))
    assert one.global_step(2, 1) == 4
    with pytest.raises(ValueError, match="global batch size 6 is not divisible by 4 ranks"):
        Schedule(20, 6, size=4)


class _Bars:
    """Stands in for tqdm.auto.tqdm and records each bar made."""

    made: list = []  # noqa: RUF012 - the record of one test

    def __init__(self, *args, **kwargs):
        _Bars.made.append(kwargs)

    def set_postfix(self, **kwargs):
        pass

    def update(self, n):
        pass

    def close(self):
        pass


class _TTY:
    def __init__(self, real, tty):
        self.real, self.tty = real, tty

    def isatty(self):
        return self.tty

    def write(self, s):
        return self.real.write(s)

    def flush(self):
        self.real.flush()


class _FakeIPython:
    """``sys.modules['IPython']`` inside a Jupyter kernel (or a terminal IPython)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def get_ipython(self):
        return type("Shell", (), {"config": {"IPKernelApp": {}} if self.kernel else {}})()


@pytest.mark.parametrize(
    "notebook, tty, enabled, shown",
    [
        (True, False, None, True),  # Jupyter: on, although stderr is not a terminal
        (False, True, None, True),  # a terminal
        (False, False, None, False),  # a pipe or a file
        ("ipython", False, None, False),  # terminal IPython that writes to a pipe
        (False, False, True, True),  # forced
        (True, True, False, False),
    ],
)
def test_progress_bar_comes_from_tqdm_auto_in_notebooks_and_terminals(digits, monkeypatch, notebook, tty, enabled, shown):
    import sys

    import tqdm.auto

    monkeypatch.setattr(tqdm.auto, "tqdm", _Bars)
    monkeypatch.setattr(sys, "stderr", _TTY(sys.stderr, tty))
    if notebook:
        monkeypatch.setitem(sys.modules, "IPython", _FakeIPython(kernel=notebook is True))
    else:
        monkeypatch.delitem(sys.modules, "IPython", raising=False)
    _Bars.made = []
    Trainer(_net(), *digits, epochs=2, mini_batch_size=100, verbose=False, callbacks=[ProgressBar(enabled)]).train()
    assert len(_Bars.made) == (2 if shown else 0)
    if shown:
        assert _Bars.made[0]["total"] == 600 and _Bars.made[1]["desc"] == "epoch 2/2"


def test_verbose_defaults_and_callback_hooks(digits, tmp_path):
    calls = []

    class Spy(Callback):
        def on_train_begin(self, trainer):
            calls.append("begin")

        def on_epoch_begin(self, trainer, epoch):
            calls.append(f"epoch {epoch}")

        def on_losses(self, trainer, losses):
            calls.append(len(losses))

        def on_train_end(self, trainer, error):
            calls.append(("end", error))

    t = Trainer(_net(), *digits, epochs=1, mini_batch_size=100, run=Run(out_dir=tmp_path), callbacks=[Spy()], log_every=4)
    assert [type(cb).__name__ for cb in t.callbacks] == ["ProgressBar", "EpochLine", "Checkpoints", "Metrics", "Spy"]
    t.train()
    assert calls == ["begin", "epoch 1", 4, 2, ("end", None)]


def test_the_epoch_lines_go_through_the_xpconv_logger(digits, caplog, capsys):
    """With the ``xpconv`` logger configured (here by pytest's caplog), the lines are log
    records and nothing is printed; unconfigured (test_book_interface) they go to stdout."""
    import logging

    caplog.set_level(logging.INFO, logger="xpconv")
    t = Trainer(_net(), *digits, epochs=2, mini_batch_size=100, callbacks=[])
    t.train()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("xpconv")]
    assert [line.split("  ")[0] for line in lines[:2]] == ["epoch 1/2", "epoch 2/2"]
    assert lines[2].startswith("test acc ")
    assert all(r.levelno == logging.INFO for r in caplog.records)
    assert capsys.readouterr().out == ""


def test_old_keywords_still_work_with_a_deprecation_warning(digits, tmp_path):
    seen = []
    with pytest.warns(DeprecationWarning, match=r"use run=Run\(out_dir=...\), callbacks=\[...\]"):
        t = Trainer(_net(), *digits, epochs=1, mini_batch_size=100, verbose=False, out_dir=tmp_path,
                    on_epoch_end=lambda tr, r: seen.append(r["epoch"]), progress=False, summary=False)
    t.train()
    assert seen == [1] and (tmp_path / "last.safetensors").exists()
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        Trainer(_net(), *digits, verbose=False, bogus=1)


def _cli(capsys, *args):
    from xpconv import cli

    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


def test_cli_log_levels(tmp_path, capsys):
    """Default: set-up and per-epoch lines on stdout; -q (before or after the command):
    only the result; -v: also debug lines (checkpoint writes) on stderr."""
    common = ("--epochs", 1, "--no-plots", "--batch-size", 200)
    out, err = _cli(capsys, "train", *common, "--out", tmp_path / "a")
    assert re.search(r"^epoch 1/1  train loss ", out, re.M) and "writing to" in out and "debug" not in err
    for i, args in enumerate((("-q", "train"), ("train", "-q"), ("--quiet", "train"))):
        out, err = _cli(capsys, *args, *common, "--out", tmp_path / f"b{i}")  # a run folder is not reused
        assert [line.split(" ")[0] for line in out.splitlines()] == ["test", "results"] and err == "", args
    for i, args in enumerate((("-v", "train"), ("train", "--verbose"))):
        out, err = _cli(capsys, *args, *common, "--out", tmp_path / f"c{i}")
        assert re.search(r"^epoch 1/1 ", out, re.M)
        assert f"xpconv: debug: wrote {tmp_path / f'c{i}' / 'last.safetensors'} (epoch 1)" in err.splitlines(), err
        assert "xpconv: debug: 6 steps per epoch of 200 samples" in err  # 1,294 samples: 144 held out for validation
    assert logging_untouched()


def logging_untouched() -> bool:
    """The command leaves the xpconv logger as it found it."""
    import logging

    log = logging.getLogger("xpconv")
    return not log.handlers and log.level == logging.NOTSET and log.propagate


def test_the_old_module_is_a_deprecated_alias():
    import importlib
    import sys

    import xpconv.training

    sys.modules.pop("xpconv.trainer", None)
    with pytest.warns(DeprecationWarning, match="import from xpconv.training"):
        old = importlib.import_module("xpconv.trainer")
    assert old.Trainer is xpconv.training.Trainer and old.seed_dropout is xpconv.training.seed_dropout
