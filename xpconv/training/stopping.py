"""Early stopping: end training when the validation accuracy stops improving.

``Trainer(..., val_split=0.1, early_stop=N)`` adds an :class:`EarlyStopping` callback
before the ones that write files, so the epoch that ends the run is written with the
reason: ``trainer.stop_reason`` goes into ``metrics.json`` as ``"stopped"``.
"""

from __future__ import annotations

import logging

from .callbacks import Callback, selection_value
from .console import LOGGER

__all__ = ["EarlyStopping", "best_validation_record"]

log = logging.getLogger(LOGGER + ".training")


def best_validation_record(history: list[dict]) -> dict | None:
    """The first record of the best validation epoch: highest ``val_acc``, ties broken by
    the lower ``val_loss`` (:func:`~xpconv.training.callbacks.selection_value`)."""
    best, best_value = None, None
    for r in history:
        v = selection_value(r) if r.get("val_acc") is not None else None
        if v is not None and (best_value is None or v > best_value):
            best, best_value = r, v
    return best


class EarlyStopping(Callback):
    """Stop after ``patience`` epochs in a row without a better validation epoch than the
    best so far -- a higher validation accuracy, or the same with a lower validation loss,
    as best.safetensors is chosen -- (epochs of a resumed run's history count).  The epoch records must hold
    ``val_acc`` (a trainer with ``val_split > 0``).  Sets ``trainer.stop_training`` and
    ``trainer.stop_reason`` = {"reason": "early_stop", "patience", "epoch", "best_epoch",
    "best_val_acc", "message"}."""

    def __init__(self, patience: int):
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"EarlyStopping: patience must be a positive number of epochs, got {patience!r}")
        self.patience = int(patience)

    def on_epoch_end(self, trainer, record):
        if record.get("val_acc") is None:
            raise ValueError("EarlyStopping: the epoch records hold no val_acc; train with val_split > 0")
        best = best_validation_record(trainer.history)
        if best is None:
            return
        waited = int(record["epoch"]) - int(best["epoch"])
        if waited >= self.patience and int(record["epoch"]) < trainer.epochs:
            message = (f"stopped early after epoch {record['epoch']}: no better validation epoch in {waited} epochs "
                       f"(best {best['val_acc']:.4f} at epoch {best['epoch']})")
            trainer.stop_training = True
            trainer.stop_reason = {"reason": "early_stop", "patience": self.patience, "epoch": int(record["epoch"]),
                                   "best_epoch": int(best["epoch"]), "best_val_acc": best["val_acc"], "message": message}
            if trainer.comm.is_root:
                log.info(message)
