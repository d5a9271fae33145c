"""Extensions of the training loop (after Chainer's trainer extensions): the loop trains and
evaluates; whatever is shown or written about it is a callback.

A callback is any object with some of these methods (all optional; :class:`Callback` has
them all, doing nothing).  The trainer calls them on every rank, in list order:

``on_train_begin(trainer)``
    before the first epoch of this call to ``train()``;
``on_epoch_begin(trainer, epoch)``
    before the epoch's first step (``epoch`` counts from 1);
``on_losses(trainer, losses)``
    each time the losses of the latest steps were read to the host (every
    ``log_every`` steps and at the epoch's end): a list of floats, one per step;
``on_epoch_end(trainer, record)``
    after the epoch was evaluated and appended to ``trainer.history``; setting
    ``trainer.stop_training = True`` ends training after it;
``on_train_end(trainer, error)``
    when ``train()`` ends: ``error`` is None, or the exception that is ending it
    (re-raised afterwards);
``on_interrupt(trainer)``
    from ``trainer.save_interrupted()`` after a Ctrl-C (or SIGTERM/SIGHUP, see
    :mod:`~xpconv.training.runs`); may return the path it saved.

A plain function ``f(trainer, record)`` in the list is an ``on_epoch_end``.  The callbacks
below act on rank 0 only (``trainer.comm.is_root``), so a data-parallel job shows and
writes everything once.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write
from .console import LOGGER, console_logging

__all__ = [
    "Callback",
    "Checkpoints",
    "EpochLine",
    "Metrics",
    "ProgressBar",
    "append_jsonl",
    "format_seconds",
    "in_notebook",
    "selection_value",
    "write_metrics",
]

log = logging.getLogger(LOGGER + ".training")


class Callback:
    """The callback protocol with every method doing nothing (subclass and override)."""

    def on_train_begin(self, trainer) -> None:
        pass

    def on_epoch_begin(self, trainer, epoch: int) -> None:
        pass

    def on_losses(self, trainer, losses: list[float]) -> None:
        pass

    def on_epoch_end(self, trainer, record: dict) -> None:
        pass

    def on_train_end(self, trainer, error: BaseException | None) -> None:
        pass

    def on_interrupt(self, trainer) -> Path | None:
        return None


class OnEpochEnd(Callback):
    """A function ``f(trainer, record)`` as a callback."""

    def __init__(self, fn):
        self.fn = fn

    def on_epoch_end(self, trainer, record):
        self.fn(trainer, record)

    def __repr__(self) -> str:
        return f"OnEpochEnd({self.fn!r})"


# --------------------------------------------------------------------------- progress bar


def in_notebook() -> bool:
    """True inside a Jupyter kernel (the test ``tqdm.autonotebook`` makes; IPython is not
    imported for it)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    get_ipython = getattr(ipython, "get_ipython", None)
    shell = get_ipython() if callable(get_ipython) else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class ProgressBar(Callback):
    """A ``tqdm.auto`` bar per epoch: samples done, images/s and the epoch's running mean
    loss.  ``enabled=None``: on in a Jupyter notebook (a widget bar) and, in a terminal,
    when stderr is one; True/False force it."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = enabled
        self.active = False
        self.bar = None
        self._losses: list[float] = []

    def wanted(self) -> bool:
        if self.enabled is not None:
            return bool(self.enabled)
        return in_notebook() or _isatty(sys.stderr)

    def on_train_begin(self, trainer):
        self.active = trainer.comm.is_root and self.wanted()

    def on_epoch_begin(self, trainer, epoch):
        if not self.active:
            return
        from tqdm.auto import tqdm

        samples = trainer.schedule.steps_per_epoch * trainer.batch_size
        self._losses = []
        self.bar = tqdm(total=samples, desc=f"epoch {epoch}/{trainer.epochs}", unit="img", leave=False,
                        dynamic_ncols=True, file=sys.stderr)

    def on_losses(self, trainer, losses):
        if self.bar is None:
            return
        self._losses += losses
        # the running mean of the epoch; set before update(), whose redraw shows it
        self.bar.set_postfix(loss=f"{sum(self._losses) / len(self._losses):.4f}", refresh=False)
        self.bar.update(len(losses) * trainer.batch_size)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_epoch_end(self, trainer, record):
        self._close()

    def on_train_end(self, trainer, error):
        self._close()


# --------------------------------------------------------------------------- the per-epoch line


def format_seconds(seconds: float) -> str:
    """A duration with the precision that means something: '35 ms', '0.38 s', '12.4 s', '3 min 05 s'."""
    s = float(seconds)
    if s < 0.1:
        return f"{s * 1000:.0f} ms"
    if s < 10:
        return f"{s:.2f} s"
    if s < 120:
        return f"{s:.1f} s"
    m, rest = divmod(round(s), 60)
    return f"{m} min {rest:02d} s"


class EpochLine(Callback):
    """Logs one INFO line per epoch to the ``xpconv`` logger (epoch, train loss, train and
    test accuracy, seconds, samples/s) and, with ``summary``, the final test accuracy.

    When nothing would show them -- the ``xpconv`` logger has no handler of its own and
    is not enabled for INFO, as in a plain script -- the lines go to stdout through a
    :class:`~xpconv.training.console.ConsoleHandler` while ``train()`` runs (as the book's
    ``verbose`` prints them).  Configure the ``xpconv`` logger to send them elsewhere."""

    def __init__(self, summary: bool = True):
        self.summary = bool(summary)
        self._console: contextlib.ExitStack | None = None

    @staticmethod
    def format(trainer, r: Mapping[str, Any]) -> str:
        """The per-epoch line."""
        width = len(str(trainer.epochs))
        rate = r.get("samples_per_s")
        return (
            f"epoch {r['epoch']:>{width}}/{trainer.epochs}  train loss {r['train_loss']:.4f}  "
            f"train acc {r['train_acc']:.4f}  "
            + (f"val loss {r['val_loss']:.4f}  val acc {r['val_acc']:.4f}  " if r.get("val_acc") is not None else "")
            + f"test acc {r['test_acc']:.4f}  "
            + (f"lr {r['lr']:.3g}  " if getattr(trainer, "lr_schedule", None) is not None else "")
            + f"{format_seconds(r['seconds'])}"
            + (f"  ({rate:,.0f} samples/s)" if rate else "")
        )

    def on_train_begin(self, trainer):
        root = logging.getLogger(LOGGER)
        if trainer.comm.is_root and not root.handlers and not root.isEnabledFor(logging.INFO):
            self._console = contextlib.ExitStack()
            self._console.enter_context(console_logging(logging.INFO, propagate=False))

    def on_epoch_end(self, trainer, record):
        if trainer.comm.is_root:
            log.info(self.format(trainer, record))

    def on_train_end(self, trainer, error):
        try:
            if error is None and self.summary and trainer.comm.is_root and trainer.test_acc_list:
                n = trainer.current_epoch
                final = trainer.metrics()["final"]
                if "test_acc_of_best" in final:  # a validation split chose the model
                    log.info(f"test acc {final['test_acc_of_best']:.4f} of the best validation epoch {final['best_epoch']} "
                             f"(val acc {final['best_val_acc']:.4f}) after {n} epoch{'s' if n != 1 else ''} "
                             f"({format_seconds(trainer.seconds)})")
                    return
                log.info(f"test acc {trainer.test_acc_list[-1]:.4f} after {n} epoch{'s' if n != 1 else ''} "
                         f"({format_seconds(trainer.seconds)})")
        finally:
            if self._console is not None:
                self._console.close()
                self._console = None


# --------------------------------------------------------------------------- files


def _clean(obj):
    """JSON-able copy with NaN/inf as None (so the file stays valid JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_metrics(path, metrics: Mapping[str, Any]) -> Path:
    """Write metrics.json atomically (NaN is written as null, so it stays valid JSON)."""
    return atomic_write(path, json.dumps(_clean(metrics), indent=2) + "\n")


def append_jsonl(path, record: Mapping[str, Any]) -> Path:
    """Append ``record`` as one JSON line to ``path`` (created when missing), in one
    ``write`` to a file opened for appending: a line is there whole or not at all, and on
    a line of its own (after a newline when the file's last line is unfinished)."""
    path = Path(path)
    data = (json.dumps(_clean(record), separators=(", ", ": ")) + "\n").encode()
    # never through a link: O_NOFOLLOW refuses a symbolic link, the fstat a FIFO, device or
    # a file with other hard links (an append there would change a file outside the run)
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(f"{path}: is a symbolic link; xpconv does not write through links in a run folder") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
            what = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"a file with {st.st_nlink} hard links"
            raise OSError(f"{path}: is {what}; xpconv appends only to a file of its own in a run folder")
        if st.st_size and os.pread(fd, 1, st.st_size - 1) not in (b"\n", b""):
            data = b"\n" + data  # a last line left unfinished (a cut copy, an edit) stays a line of its own
        os.write(fd, data)
    finally:
        os.close(fd)
    return path


def selection_value(record: Mapping[str, Any]) -> tuple[float, ...] | None:
    """How good an epoch's model is, for choosing the best one (greater is better): with a
    validation split (``val_acc`` in the record) the validation accuracy, ties broken by the
    lower validation loss; else the test accuracy, as the book does.  None when the record
    holds no finite number to compare."""
    def finite(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if record.get("val_acc") is not None:
        if not finite(record["val_acc"]):
            return None
        loss = record.get("val_loss")
        return (float(record["val_acc"]), -float(loss) if loss is not None and finite(loss) else -math.inf)
    return (float(record["test_acc"]),) if finite(record.get("test_acc")) else None


class Checkpoints(Callback):
    """``last.safetensors`` after every epoch, ``best.safetensors`` when the epoch is the best
    so far by :func:`selection_value` (validation accuracy, then loss; without a validation
    split the test accuracy),
    ``interrupted.safetensors`` from ``trainer.save_interrupted()``; all in ``out_dir``,
    written atomically, on rank 0."""

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.saved_epoch: int | None = None  # the epoch last.safetensors holds
        self.best_test_acc: float | None = None
        self.best_value: tuple[float, ...] | None = None  # selection_value of the epoch best.safetensors holds

    def _start(self, trainer) -> None:
        if self.saved_epoch is None:
            self.saved_epoch = trainer.start_epoch
            self.best_test_acc = max(trainer.test_acc_list, default=-1.0)
            self.best_value = max((v for v in map(selection_value, trainer.history) if v is not None), default=None)

    def on_train_begin(self, trainer):
        self._start(trainer)
        if trainer.comm.is_root:
            self.out_dir.mkdir(parents=True, exist_ok=True)

    def on_epoch_end(self, trainer, record):
        if trainer.comm.is_root:
            self.save_epoch(trainer, record)

    def save_epoch(self, trainer, record) -> None:
        """Write the epoch just finished (``trainer.current_epoch``): ``last.safetensors``,
        then ``best.safetensors`` when its test accuracy is the best so far (the order
        :func:`~xpconv.training.runs.reconcile_run` relies on).  What is written already
        is not written again, so this can finish an epoch a signal cut short."""
        self._start(trainer)
        if self.saved_epoch is None or self.saved_epoch < trainer.current_epoch:
            trainer.last_checkpoint = trainer.checkpoint(self.out_dir / "last.safetensors")
            self.saved_epoch = trainer.current_epoch
            log.debug(f"wrote {trainer.last_checkpoint} (epoch {trainer.current_epoch})")
        value = selection_value(record)
        if value is not None and (self.best_value is None or value > self.best_value):
            key = "val_acc" if record.get("val_acc") is not None else "test_acc"
            log.debug(f"wrote {trainer.checkpoint(self.out_dir / 'best.safetensors')} (best {key.replace('_', ' ')} {record[key]:.4f})")
            self.best_value = value
            self.best_test_acc = record["test_acc"]  # the test accuracy of the model best.safetensors holds

    def on_interrupt(self, trainer):
        """``interrupted.safetensors``: the weights as they are, mid-epoch; its ``epoch``
        is the number of completed epochs and ``interrupted_at`` says where training was."""
        if not trainer.comm.is_root:
            return None
        self._start(trainer)
        at = dict(trainer.position)
        if at["iteration"] == 0 and trainer.history and trainer.history[-1]["epoch"] == trainer.current_epoch:
            # the signal came after an epoch ended, maybe before (all of) its checkpoints were
            # written: the weights are still that epoch's end, so its files are finished first
            self.save_epoch(trainer, trainer.history[-1])
        return trainer.checkpoint(self.out_dir / "interrupted.safetensors", extra={"interrupted_at": at})


class Metrics(Callback):
    """``metrics.json`` (all epochs, the final numbers and the run's config; rewritten
    atomically every epoch) and ``metrics.jsonl`` (append-only: one JSON line per epoch,
    the epoch's record; a resumed run appends its epochs), in ``out_dir``, on rank 0."""

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.written_epoch: int | None = None  # the last epoch appended to metrics.jsonl

    @property
    def json_path(self) -> Path:
        return self.out_dir / "metrics.json"

    @property
    def jsonl_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    def on_train_begin(self, trainer):
        if self.written_epoch is None:
            self.written_epoch = trainer.start_epoch
        if trainer.comm.is_root:
            self.out_dir.mkdir(parents=True, exist_ok=True)

    def _append_new(self, trainer) -> None:
        done = trainer.start_epoch if self.written_epoch is None else self.written_epoch
        for record in trainer.history:
            if record["epoch"] > done:
                append_jsonl(self.jsonl_path, record)
                done = record["epoch"]
        self.written_epoch = done

    def on_epoch_end(self, trainer, record):
        if trainer.comm.is_root:
            self._append_new(trainer)
            write_metrics(self.json_path, trainer.metrics())

    def on_interrupt(self, trainer):
        if trainer.comm.is_root:
            self._append_new(trainer)
            write_metrics(self.json_path, {**trainer.metrics(), "interrupted_at": dict(trainer.position)})
