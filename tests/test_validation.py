"""The validation split: rows apart from the training rows, the same on every rank; the best
checkpoint is the argmax of validation accuracy and its test accuracy is what is reported;
early stopping stops where it should and says why."""

from __future__ import annotations

import json

import numpy as np
import pytest

from xpconv.backend import to_numpy
from xpconv.checkpoint import load_checkpoint
from xpconv.cli import main
from xpconv.datasets import load_digits
from xpconv.models import SimpleConvNet
from xpconv.training import LocalCommunicator, Run, Trainer
from xpconv.training.schedule import validation_split
from xpconv.training.stopping import EarlyStopping


@pytest.fixture(scope="module")
def digits():
    (x_train, t_train), (x_test, t_test) = load_digits(normalize=True, flatten=False)
    return x_train[:300], t_train[:300], x_test[:100], t_test[:100]


def _net(seed=0):
    return SimpleConvNet(input_dim=(1, 8, 8), conv_param={"filter_num": 4, "filter_size": 3, "pad": 1, "stride": 1},
                         hidden_size=16, weight_init_std=0.1, seed=seed)


def _trainer(data, **kw):
    kw = {"epochs": 3, "mini_batch_size": 50, "optimizer": "adagrad", "optimizer_param": {"lr": 0.05}, "verbose": False,
          "seed": 4, **kw}
    return Trainer(_net(), *data, **kw)


@pytest.mark.parametrize(("n", "fraction", "n_val"), [(300, 0.1, 30), (1438, 0.1, 144), (7, 0.5, 4), (10, 0.0, 0)])
def test_validation_rows_and_training_rows_part_the_set(n, fraction, n_val):
    train, val = validation_split(n, fraction, seed=3)
    assert len(val) == n_val and len(train) == n - n_val
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(n))
    assert list(val) == sorted(val)
    again = validation_split(n, fraction, seed=3)
    np.testing.assert_array_equal(again[1], val)  # a function of (n, fraction, seed) only
    if n_val:
        assert not np.array_equal(validation_split(n, fraction, seed=4)[1], val)


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match=r"expected a fraction in \[0, 1\), got 1.0"):
        validation_split(10, 1.0, seed=0)
    with pytest.raises(ValueError, match="a fraction of 0.01 of 10 samples leaves no validation sample"):
        validation_split(10, 0.01, seed=0)


def test_the_trainer_never_trains_on_validation_rows(digits):
    """Rows tagged with their index: the validation set holds the split's rows, and every
    batch of every epoch holds only training rows (on each of 2 ranks too)."""
    x, t = digits[0].copy(), digits[1]
    x[:, 0, 0, 0] = np.arange(len(x))  # the row's own number, carried through every batch
    train_rows, val_rows = validation_split(len(x), 0.2, seed=4)

    class Recording(Trainer):
        def train_step(self, xb, tb):
            self.seen += np.asarray(xb)[:, 0, 0, 0].astype(int).tolist()
            return super().train_step(xb, tb)

    for rank, size in [(0, 1), (0, 2), (1, 2)]:
        comm = LocalCommunicator()
        comm.rank, comm.size = rank, size
        tr = Recording(_net(), x, t, *digits[2:], epochs=2, mini_batch_size=50, verbose=False, seed=4, val_split=0.2, comm=comm)
        tr.seen = []
        tr.train()
        np.testing.assert_array_equal(tr.x_val[:, 0, 0, 0].astype(int), val_rows)  # the same rows on every rank
        np.testing.assert_array_equal(tr.t_val, t[val_rows])
        assert tr.seen and set(tr.seen) <= set(train_rows.tolist())
        assert not set(tr.seen) & set(val_rows.tolist())
        assert tr.train_size == len(train_rows) == 240


def test_records_hold_the_validation_loss_and_accuracy(digits):
    tr = _trainer(digits, val_split=0.2)
    tr.train()
    _, val_rows = validation_split(300, 0.2, seed=4)
    xv, tv = digits[0][val_rows], digits[1][val_rows]
    last = tr.history[-1]
    assert last["val_acc"] == tr.network.accuracy(xv, tv)
    assert last["val_loss"] == pytest.approx(float(tr.network.loss(xv, tv, train_flg=False)), rel=1e-6)
    assert all({"val_loss", "val_acc", "test_acc", "lr"} <= set(r) for r in tr.history)


def test_without_a_split_the_records_and_the_book_trainer_are_as_before(digits):
    tr = Trainer(_net(), *digits, epochs=1, mini_batch_size=50, verbose=False)  # the book's signature
    tr.train()
    assert "val_acc" not in tr.history[0] and tr.train_size == 300 and tr.x_val is None
    assert "best_test_acc" in tr.metrics()["final"]


def _scripted(monkeypatch, val_accs, test_accs, val_losses=None):
    """Make epoch e's validation accuracy val_accs[e-1] (loss val_losses[e-1], default 1.0)
    and its test accuracy test_accs[e-1]."""
    def val_scores(self):
        e = self.position["epoch"]
        return (1.0 if val_losses is None else val_losses[e - 1]), val_accs[e - 1]

    real = Trainer.train_epoch

    def train_epoch(self, epoch):
        record = real(self, epoch)
        record["test_acc"] = test_accs[epoch - 1]
        return record

    monkeypatch.setattr(Trainer, "_val_scores", val_scores)
    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)


def test_best_checkpoint_is_the_argmax_of_validation_accuracy(digits, tmp_path, monkeypatch):
    """Validation peaks at epoch 2, test at epoch 3: best.safetensors is epoch 2, and the
    reported test accuracy is epoch 2's, named as the best checkpoint's."""
    _scripted(monkeypatch, [0.5, 0.9, 0.7, 0.9], [0.6, 0.7, 0.95, 0.8])
    tr = _trainer(digits, epochs=4, val_split=0.2, run=Run(out_dir=tmp_path))
    tr.train()
    best = load_checkpoint(tmp_path / "best.safetensors")
    assert best.epoch == 2 and best.metrics[-1]["val_acc"] == 0.9
    final = json.loads((tmp_path / "metrics.json").read_text())["final"]
    assert final["best_epoch"] == 2 and final["best_val_acc"] == 0.9 and final["test_acc_of_best"] == 0.7
    assert "best_test_acc" not in final and final["test_acc"] == 0.8  # the last epoch's, as before


def test_equal_validation_accuracies_are_told_apart_by_the_validation_loss(digits, tmp_path, monkeypatch):
    _scripted(monkeypatch, [0.8, 0.9, 0.9, 0.9], [0.5, 0.6, 0.7, 0.8], val_losses=[0.5, 0.4, 0.3, 0.35])
    tr = _trainer(digits, epochs=4, val_split=0.2, run=Run(out_dir=tmp_path), early_stop=1)
    tr.train()
    assert load_checkpoint(tmp_path / "best.safetensors").epoch == 3
    final = json.loads((tmp_path / "metrics.json").read_text())["final"]
    assert (final["best_epoch"], final["test_acc_of_best"]) == (3, 0.7)
    assert tr.history[-1]["epoch"] == 4 and tr.stop_reason is None  # epoch 3 counted as better: patience 1 not yet spent


def test_best_checkpoint_of_a_real_run_is_the_argmax_of_validation_accuracy(digits, tmp_path):
    tr = _trainer(digits, epochs=4, val_split=0.2, run=Run(out_dir=tmp_path))
    tr.train()
    best = max(tr.history, key=lambda r: (r["val_acc"], -r["val_loss"]))  # max keeps the first of equals
    assert load_checkpoint(tmp_path / "best.safetensors").epoch == best["epoch"]
    assert best["val_acc"] == max(r["val_acc"] for r in tr.history)
    b = load_checkpoint(tmp_path / "best.safetensors")
    assert b.model.accuracy(digits[2], digits[3]) == tr.metrics()["final"]["test_acc_of_best"]  # measured on that checkpoint
    assert to_numpy(b.model.params["W1"]).shape == (4, 1, 3, 3)


@pytest.mark.parametrize(("patience", "stop_at", "best"), [(1, 3, 2), (2, 4, 2), (3, 5, 2), (4, 6, 6)])
def test_early_stopping_stops_where_it_should(digits, tmp_path, monkeypatch, patience, stop_at, best):
    """Validation 0.5, 0.7, 0.6, 0.65, 0.7 (not better: equal), 0.9: patience N stops N epochs
    after epoch 2, unless epoch 6 (the last) comes first."""
    _scripted(monkeypatch, [0.5, 0.7, 0.6, 0.65, 0.7, 0.9], [0.5] * 6)
    tr = _trainer(digits, epochs=6, val_split=0.2, early_stop=patience, run=Run(out_dir=tmp_path))
    tr.train()
    assert [r["epoch"] for r in tr.history][-1] == stop_at
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["final"]["best_epoch"] == best
    if stop_at < 6:
        assert doc["stopped"] == {"reason": "early_stop", "patience": patience, "epoch": stop_at, "best_epoch": 2,
                                  "best_val_acc": 0.7, "message": f"stopped early after epoch {stop_at}: no better validation "
                                  f"epoch in {stop_at - 2} epochs (best 0.7000 at epoch 2)"}
    else:
        assert "stopped" not in doc and tr.stop_reason is None
    assert load_checkpoint(tmp_path / "last.safetensors").epoch == stop_at


def test_early_stopping_needs_a_validation_set(digits):
    with pytest.raises(ValueError, match="early_stop needs a validation set to watch; pass val_split > 0"):
        _trainer(digits, early_stop=2)
    with pytest.raises(ValueError, match="patience must be a positive number of epochs, got 0"):
        EarlyStopping(0)


def test_cli_options_and_messages(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--epochs", "1", "--val-split", "0", "--no-plots", "--out", "a"]) == 0
    out = capsys.readouterr().out
    assert "no validation split (--val-split 0): best.safetensors is the best test epoch, as in the book" in out
    assert "(1,438 train / 359 test)" in out and "test accuracy 0." in out and "(best 0." in out
    assert main(["train", "--epochs", "1", "--early-stop", "2", "--val-split", "0", "--out", "b"]) == 2
    assert "early_stop needs a validation set" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        main(["train", "--epochs", "1", "--val-split", "1.5", "--out", "c"])
    assert "argument --val-split: expected a fraction from 0 up to (not including) 1, got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        main(["train", "--epochs", "1", "--weight-decay", "-1", "--out", "c"])
    assert "argument --weight-decay: expected a number >= 0, got -1" in capsys.readouterr().err
    (tmp_path / "r.toml").write_text('val_split = 0.25\nlr_schedule = "step"\naugment = 1\nweight_decay = 0.001\n')
    assert main(["train", "--epochs", "2", "--config", "r.toml", "--no-plots", "-q", "--out", "d"]) == 0
    cfg = json.loads((tmp_path / "d" / "metrics.json").read_text())["config"]
    assert (cfg["val_split"], cfg["lr_schedule"], cfg["augment"], cfg["weight_decay"]) == (0.25, "step", 1, 0.001)
    assert load_checkpoint(tmp_path / "d" / "last.safetensors").optimizer.weight_decay == 0.001
    (tmp_path / "bad.toml").write_text('lr_schedule = "linear"\n')
    assert main(["train", "--config", "bad.toml", "--out", "e"]) == 2
    assert "lr_schedule must be one of constant, step, cosine, got 'linear'" in capsys.readouterr().err


def test_a_checkpoints_bad_training_options_are_refused_on_resume(tmp_path, monkeypatch, capsys):
    from xpconv.checkpoint import save_checkpoint
    from xpconv.optim import AdaGrad

    monkeypatch.chdir(tmp_path)
    config = {"model": "simple", "dataset": "digits", "epochs": 3, "batch_size": 50, "optimizer": "adagrad", "lr": 0.05,
              "seed": 0, "input_dim": [1, 8, 8]}
    for key, value, want in [("lr_schedule", "linear", "config.lr_schedule should be one of constant, step, cosine"),
                             ("val_split", 1.5, "config.val_split should be a number from 0 up to (not including) 1, got 1.5"),
                             ("augment", -2, "config.augment should be a number of pixels from 0 to")]:
        path = tmp_path / f"{key}.safetensors"
        save_checkpoint(path, _net(), AdaGrad(lr=0.05), epoch=1, metrics=[], extra={"config": {**config, key: value}})
        assert main(["train", "--resume", str(path), "--out", str(tmp_path / key)]) == 2
        err = capsys.readouterr().err
        assert f"{path}: bad run configuration: {want}" in err, err
