"""The book's ``Trainer``: mini-batch training with exact resume, data-parallel ranks and callbacks.

    >>> trainer = Trainer(net, x_train, t_train, x_test, t_test, epochs=20,
    ...                   mini_batch_size=100, optimizer="Adam", optimizer_param={"lr": 0.001})
    >>> trainer.train()
    >>> trainer.test_acc_list[-1]

Data may be host NumPy arrays (the usual case) or arrays of the model's namespace.
Host data is indexed on the host with each batch's indices and moved to the model's
namespace one batch at a time; when the model runs on an accelerator and the whole set
fits in a quarter of its free memory, the set is moved there once and stays resident.

The order of the samples and the Dropout masks come from :mod:`xpconv.training.schedule`
and depend on the seed only, so resuming from the checkpoint of epoch k repeats an
uninterrupted run and one process repeats a data-parallel one.  One process is a job of
one rank (:class:`~xpconv.training.comm.LocalCommunicator`): the loop is the same.

The host does not wait for the device at each step: losses stay arrays and are read
every ``log_every`` steps (for callbacks and the NaN/inf check) and at the end of the
epoch.  Accuracy is computed in chunks, so memory stays bounded.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import backend
from .._io import remove_stale_temp_files
from ..augment import default_max_shift, translate
from ..backend import asarray_in, namespace_of, to_numpy
from ..ops import check_label_range
from ..optim import get_optimizer
from ..schedules import LRSchedule, make_schedule, schedule_from_state
from .callbacks import Checkpoints, EpochLine, Metrics, OnEpochEnd, ProgressBar
from .comm import LocalCommunicator
from .console import LOGGER
from .runs import RunLock, metrics_document, stop_signals
from .schedule import Schedule, validation_split
from .stopping import EarlyStopping

__all__ = ["RESIDENT_FRACTION", "Run", "Trainer", "TrainingDiverged"]

#: the data set is kept on the accelerator when it needs at most this fraction of free memory
RESIDENT_FRACTION = 0.25

log = logging.getLogger(LOGGER + ".training")


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite (the message names epoch and iteration)."""

    def __init__(self, message: str, *, epoch: int, iteration: int):
        super().__init__(message)
        self.epoch = epoch
        self.iteration = iteration


@dataclass
class Run:
    """Where a training run writes, and where it starts.

    * ``out_dir``: folder for ``last.safetensors`` (every epoch), ``best.safetensors``
      (best test accuracy so far), ``metrics.json`` and ``metrics.jsonl``, all written by
      rank 0 (the :class:`~xpconv.training.callbacks.Checkpoints` and
      :class:`~xpconv.training.callbacks.Metrics` callbacks); None writes nothing;
    * ``config``: a JSON-able dict of the run's settings (kept in metrics.json and checkpoints);
    * resuming: ``start_epoch`` (epochs already done), ``history`` (their per-epoch
      records), ``optimizer_state`` (a ``state_dict()``; or pass the restored optimizer
      itself as the trainer's ``optimizer``), ``lr_schedule`` (the learning-rate
      schedule's ``state_dict()``, so it goes on where it stopped).  :meth:`resume`
      fills them from a checkpoint.
    """

    out_dir: str | Path | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    start_epoch: int = 0
    history: list = field(default_factory=list)
    optimizer_state: Mapping[str, Any] | None = None
    lr_schedule: Mapping[str, Any] | None = None
    #: a folder that already holds a run is refused (as ``xpconv train --out`` does) unless
    #: ``overwrite`` (its run files are removed) or ``continues`` (this run continues the
    #: folder's run: implied by ``start_epoch`` > 0 and set by :meth:`resume`)
    overwrite: bool = False
    continues: bool = False

    @classmethod
    def resume(cls, checkpoint, *, out_dir=None, config: Mapping[str, Any] | None = None) -> Run:
        """The run continued from a loaded training checkpoint (``load_checkpoint(...)``):
        its epoch, its records and its run configuration (or ``config``).  Pass
        ``checkpoint.optimizer`` as the trainer's optimizer (it carries its state)."""
        extra = getattr(checkpoint, "extra", None) or {}
        return cls(
            out_dir=out_dir,
            config=dict(config if config is not None else extra.get("config") or {}),
            start_epoch=int(checkpoint.epoch or 0),
            history=list(checkpoint.metrics or []),
            lr_schedule=extra.get("lr_schedule") if isinstance(extra.get("lr_schedule"), Mapping) else None,
            continues=True,
        )


#: the keywords of the old 21-parameter signature, and where each one went
_MOVED = {
    "out_dir": "run=Run(out_dir=...)",
    "config": "run=Run(config=...)",
    "start_epoch": "run=Run(start_epoch=...)",
    "history": "run=Run(history=...)",
    "optimizer_state": "run=Run(optimizer_state=...)",
    "on_epoch_end": "callbacks=[...]",
    "progress": "callbacks=[ProgressBar(enabled)]",
    "summary": "callbacks=[EpochLine(summary=...)]",
}


class Trainer:
    """Trains a network with mini-batches (the book's ``Trainer``, extended).

    Book arguments: ``network`` (anything with ``params``, ``gradient(x, t)``, ``loss``,
    ``accuracy``), the data, ``epochs``, ``mini_batch_size``, ``optimizer`` (a name such
    as 'SGD', 'Adam' -- any case -- or an ``xpconv.optim`` optimizer), ``optimizer_param``,
    ``evaluate_sample_num_per_epoch`` (score only the first n samples each epoch),
    ``verbose`` (a progress bar and one line per epoch: the callbacks
    ``ProgressBar()`` and ``EpochLine()``).

    Keyword-only:

    * ``seed``: seeds the per-epoch order of the samples and the Dropout masks of each step;
    * ``callbacks``: callbacks (see :mod:`xpconv.training.callbacks`) or functions
      ``f(trainer, record)`` called after each epoch; they run after the defaults
      (``verbose``'s, then ``Checkpoints`` and ``Metrics`` when ``run.out_dir`` is set).
      ``trainer.callbacks`` is the whole list, editable before ``train()``;
    * ``run``: a :class:`Run` -- output folder, config, and where a resumed run starts;
    * ``comm``: the job's ranks (``xpconv.distributed.setup()``); None is one process.
      Each rank trains on its shard of every global batch, gradients are averaged
      over ranks, and only rank 0 shows and writes anything;
    * ``eval_batch_size``: chunk size of the accuracy passes;
    * ``log_every``: read the losses every this many steps (callbacks, NaN check);
    * ``resident``: True/False forces keeping the data on the model's device or not;
    * ``val_split``: hold out this fraction of the training set (drawn by ``seed``, the
      same on every rank; :func:`~xpconv.training.schedule.validation_split`) for
      validation: each epoch's record gains ``val_loss`` and ``val_acc``, and
      ``best.safetensors`` and ``metrics()["final"]`` follow the best validation accuracy.
      0 (the default) trains on the whole set, as the book does;
    * ``lr_schedule``: None (the optimizer's ``lr`` is left alone), a name of
      :data:`xpconv.schedules.SCHEDULES` (``constant``, ``step``, ``cosine``; built for
      ``epochs`` with the optimizer's ``lr`` as its peak) or an
      :class:`xpconv.schedules.LRSchedule`; it sets ``lr`` at each epoch's start, and each
      record holds the epoch's ``lr``.  ``warmup_epochs``: linear warm-up epochs of a named
      schedule;
    * ``augment``: translate each training batch by up to this many pixels (True: the
      default for the image size, :func:`xpconv.augment.default_max_shift`), on the
      model's namespace, with offsets seeded by (``seed``, global step);
    * ``early_stop``: stop after this many epochs without a better validation accuracy
      (needs ``val_split``; :class:`~xpconv.training.stopping.EarlyStopping`).
    """

    def __init__(
        self,
        network,
        x_train,
        t_train,
        x_test,
        t_test,
        epochs: int = 20,
        mini_batch_size: int = 100,
        optimizer: Any = "SGD",
        optimizer_param: Mapping[str, Any] | None = None,
        evaluate_sample_num_per_epoch: int | None = None,
        verbose: bool = True,
        *,
        seed: int = 0,
        callbacks: Iterable[Any] | None = None,
        run: Run | None = None,
        comm=None,
        eval_batch_size: int = 500,
        log_every: int = 10,
        resident: bool | None = None,
        val_split: float = 0.0,
        lr_schedule: str | LRSchedule | None = None,
        warmup_epochs: int = 0,
        augment: int | bool | None = None,
        early_stop: int | None = None,
        **deprecated: Any,
    ):
        run, callbacks, progress, summary = _upgrade(run, callbacks, deprecated)
        run = run if run is not None else Run()
        self.network = network
        self.epochs = int(epochs)
        self.batch_size = int(mini_batch_size)
        if self.batch_size < 1:
            raise ValueError(f"Trainer: mini_batch_size must be >= 1, got {mini_batch_size!r}")
        if self.epochs < 0:
            raise ValueError(f"Trainer: epochs must be >= 0, got {epochs!r}")
        _check_given(x_train=x_train, t_train=t_train, x_test=x_test, t_test=t_test)
        n, nt = int(x_train.shape[0]), int(t_train.shape[0])
        if n != nt:
            raise ValueError(f"Trainer: {n} training samples but {nt} labels")
        if int(x_test.shape[0]) != int(t_test.shape[0]):
            raise ValueError(f"Trainer: {int(x_test.shape[0])} test samples but {int(t_test.shape[0])} labels")
        self.val_split = float(val_split)
        x_val = t_val = None
        if self.val_split:
            train_rows, val_rows = validation_split(n, self.val_split, seed=int(seed))
            x_val, t_val = _rows(x_train, val_rows), _rows(t_train, val_rows)
            x_train, t_train = _rows(x_train, train_rows), _rows(t_train, train_rows)
            n = int(train_rows.shape[0])
        if n < self.batch_size:
            held = f" (after holding out {int(x_val.shape[0])} for validation)" if x_val is not None else ""
            raise ValueError(f"Trainer: mini_batch_size {self.batch_size} is larger than the {n} training samples{held}")
        self.augment = self._augment_shift(augment, x_train)
        if early_stop is not None and (isinstance(early_stop, bool) or not isinstance(early_stop, int) or early_stop < 1):
            raise ValueError(f"Trainer: early_stop must be a positive number of epochs, got {early_stop!r}")
        if early_stop is not None and x_val is None:
            raise ValueError("Trainer: early_stop needs a validation set to watch; pass val_split > 0")
        self.train_size = n
        self.evaluate_sample_num_per_epoch = evaluate_sample_num_per_epoch
        self.verbose = bool(verbose)
        self.seed = int(seed)
        self.log_every = max(1, int(log_every))
        self.eval_batch_size = max(1, int(eval_batch_size))
        self.comm = comm if comm is not None else LocalCommunicator()
        self.is_root = bool(self.comm.is_root)
        self.schedule = Schedule(n, self.batch_size, self.seed, rank=self.comm.rank, size=self.comm.size)

        self.run = run
        self.out_dir = Path(run.out_dir) if run.out_dir is not None else None
        self.config = dict(run.config or {})
        self.callbacks: list = []
        if self.verbose:
            self.callbacks += [ProgressBar(progress), EpochLine(summary)]
        elif progress:
            self.callbacks.append(ProgressBar(True))
        self.early_stop = early_stop
        self.stop_reason: dict | None = None  # set by a callback that ends training early (EarlyStopping)
        if early_stop is not None:  # before the files: they record why the run stopped
            self.callbacks.append(EarlyStopping(early_stop))
        if self.out_dir is not None:
            self.callbacks += [Checkpoints(self.out_dir), Metrics(self.out_dir)]
        self.callbacks += [OnEpochEnd(cb) if _is_plain_function(cb) else cb for cb in callbacks]

        self.optimizer = get_optimizer(optimizer, **dict({"lr": 0.01} if optimizer_param is None else optimizer_param)) \
            if isinstance(optimizer, str) else get_optimizer(optimizer)
        if run.optimizer_state is not None:
            self.optimizer.load_state_dict(run.optimizer_state)
        self.lr_schedule = self._make_lr_schedule(lr_schedule, warmup_epochs, run.lr_schedule)
        self.start_epoch = int(run.start_epoch)
        self.current_epoch = self.start_epoch
        self.history: list[dict] = [dict(r) for r in (run.history or [])][: self.start_epoch]

        # book-compatible lists: per-iteration losses (this session), per-epoch accuracies
        self.train_loss_list: list[float] = []
        self.train_acc_list: list[float] = [r["train_acc"] for r in self.history]
        self.test_acc_list: list[float] = [r["test_acc"] for r in self.history]
        self.stop_training = False
        self.last_checkpoint: Path | None = None  # set by the Checkpoints callback
        self.seconds = 0.0
        self.position = {"epoch": self.start_epoch, "iteration": 0}  # where training is (for Ctrl-C)

        self._xp = getattr(network, "xp", None) or namespace_of(next(iter(network.params.values())))
        self._device = getattr(network, "device", None)
        self._dtype = getattr(network, "dtype", None)
        _check_labels(network, t_train, "Trainer t_train")
        _check_labels(network, t_test, "Trainer t_test")
        if t_val is not None:
            _check_labels(network, t_val, "Trainer validation labels")
        self._place_data(x_train, t_train, x_test, t_test, resident, x_val, t_val)
        self.comm.broadcast_params(network.params)
        log.debug(
            f"{self.schedule.steps_per_epoch} steps per epoch of {self.batch_size} samples "
            f"({self.schedule.local_batch_size} on each of {self.comm.size} rank{'s' if self.comm.size != 1 else ''}), "
            f"data {'resident in' if self.resident else 'moved per batch to'} {backend.namespace_name(self._xp)}"
        )

    # ------------------------------------------------------------------ data placement

    def _place_data(self, x_train, t_train, x_test, t_test, resident, x_val=None, t_val=None):
        """Keep each array on the host (NumPy) or resident in the model's namespace."""
        xp = self._xp
        arrays = (x_train, t_train, x_test, t_test) + ((x_val, t_val) if x_val is not None else ())
        on_model = [self._in_model_namespace(a) for a in arrays]
        if resident is None:
            resident = False
            if all(on_model):
                resident = True
            elif not backend.is_numpy_namespace(xp):
                free = backend.free_device_memory(xp, self._device)
                nbytes = sum(_nbytes(a) for a in arrays)
                resident = free is not None and nbytes <= RESIDENT_FRACTION * free
        self.resident = bool(resident) and not backend.is_numpy_namespace(xp)
        if self.resident:
            self.x_train = self._to_model(x_train, self._dtype)
            self.t_train = self._to_model(t_train)
            self.x_test = self._to_model(x_test, self._dtype)
            self.t_test = self._to_model(t_test)
            self.x_val = self._to_model(x_val, self._dtype) if x_val is not None else None
            self.t_val = self._to_model(t_val) if t_val is not None else None
        else:
            # host NumPy arrays, indexed with host index arrays (data of the model's own
            # namespace when it is NumPy stays as it is)
            self.x_train, self.t_train, self.x_test, self.t_test = (to_numpy(a) for a in arrays[:4])
            self.x_val = to_numpy(x_val) if x_val is not None else None
            self.t_val = to_numpy(t_val) if t_val is not None else None

    def _in_model_namespace(self, a) -> bool:
        try:
            return namespace_of(a) is self._xp
        except TypeError:
            return False

    def _to_model(self, a, dtype=None):
        """``a`` in the model's namespace and device (floating data in ``dtype``)."""
        floating = backend.dtype_name(a.dtype).startswith("float")
        return asarray_in(a, self._xp, dtype=dtype if floating else None, device=self._device)

    def _batch(self, idx_host, idx_dev):
        if self.resident:
            xp = self._xp
            return xp.take(self.x_train, idx_dev, axis=0), xp.take(self.t_train, idx_dev, axis=0)
        xb, tb = self.x_train[idx_host], self.t_train[idx_host]
        if backend.is_numpy_namespace(self._xp):
            return xb, tb
        return self._to_model(xb, self._dtype), self._to_model(tb)

    # ------------------------------------------------------------------ schedule, augmentation, validation

    def _make_lr_schedule(self, lr_schedule, warmup_epochs, state) -> LRSchedule | None:
        """The learning-rate schedule: an object as given, a name built for this run (a
        resumed run's saved state, when it is of that type, keeps its base rate), or a
        resumed run's saved schedule when none is named."""
        opt = getattr(self.optimizer, "optimizer", self.optimizer)
        if isinstance(lr_schedule, LRSchedule):
            return lr_schedule
        if lr_schedule is None:
            return schedule_from_state(self.optimizer, state) if state is not None else None
        base_lr = None
        if state is not None and state.get("type") == str(lr_schedule).lower():
            base_lr = state.get("base_lr")
        return make_schedule(str(lr_schedule), self.optimizer, max(1, self.epochs), warmup_epochs=warmup_epochs,
                             base_lr=float(opt.lr) if base_lr is None else base_lr)

    def _augment_shift(self, augment, x_train) -> int:
        """The largest translation of the training batches, 0 for none."""
        if augment is None or augment is False or augment == 0:
            return 0
        if len(x_train.shape) != 4:
            raise ValueError(f"Trainer: augment needs image data (N, C, H, W), got training data of shape {tuple(x_train.shape)}")
        if augment is True:
            return default_max_shift(int(x_train.shape[2]), int(x_train.shape[3]))
        if not isinstance(augment, int) or augment < 0:
            raise ValueError(f"Trainer: augment must be True, False or a number of pixels >= 0, got {augment!r}")
        return int(augment)

    def _augmented(self, xb, step: int):
        """The training batch translated by the offsets of global ``step`` (this rank's rows)."""
        dy, dx = self.schedule.translation_offsets(step, self.augment)
        if backend.is_numpy_namespace(self._xp) or self._in_model_namespace(xb):
            return translate(xb, dy, dx, self.augment)
        return translate(self._to_model(xb, self._dtype), dy, dx, self.augment)

    def _val_scores(self) -> tuple[float, float]:
        """(mean loss, accuracy) on the validation set, in chunks, each rank scoring its part."""
        x, t = self.x_val, self.t_val
        n = int(x.shape[0])
        start, stop = self.comm.shard_range(n) if hasattr(self.comm, "shard_range") else (0, n)
        total = 0.0
        for i in range(start, stop, self.eval_batch_size):
            j = min(stop, i + self.eval_batch_size)
            xc, tc = x[i:j], t[i:j]
            if not self.resident and not backend.is_numpy_namespace(self._xp):
                xc, tc = self._to_model(xc, self._dtype), self._to_model(tc)
            total += float(self.network.loss(xc, tc, train_flg=False)) * (j - i)
        loss_sum, count = self.comm.allreduce_sum([total, stop - start])
        return (loss_sum / count if count else float("nan")), self._accuracy(x, t)

    # ------------------------------------------------------------------ training

    def epoch_order(self, epoch: int) -> list:
        """Host indices of the global batches of ``epoch`` (1-based), seeded by (seed, epoch)."""
        return self.schedule.batches(epoch)

    def train_step(self, x_batch, t_batch):
        """One optimizer step (gradients averaged over the ranks); returns the batch loss
        as an array (no host sync)."""
        net = self.network
        grads = self.comm.allreduce_mean(net.gradient(x_batch, t_batch))
        self.optimizer.update(net.params, grads)
        last = getattr(net, "last_layer", None)
        loss = getattr(last, "loss", None)
        return loss if loss is not None else net.loss(x_batch, t_batch)

    def train_epoch(self, epoch: int) -> dict:
        """Run one epoch (1-based number) and evaluate it; returns the epoch's record."""
        net, sched = self.network, self.schedule
        t0 = time.perf_counter()
        n_iter, b = sched.steps_per_epoch, sched.local_batch_size
        order = sched.local_order(epoch)  # this rank's indices, step after step
        # resident data: the epoch's order goes to the device in one copy and each step
        # slices it there, so a step makes no host-to-device transfer of its own
        order_dev = asarray_in(order, self._xp, device=self._device) if self.resident else None
        if self.lr_schedule is not None:
            self.lr_schedule.set_epoch(epoch)
        lr = float(self.optimizer.lr)
        pending: list = []  # loss arrays not read yet
        losses: list[float] = []
        for it in range(1, n_iter + 1):
            self.position = {"epoch": epoch, "iteration": it}
            sched.seed_dropout(net, sched.global_step(epoch, it))
            lo, hi = (it - 1) * b, it * b
            xb, tb = self._batch(order[lo:hi], order_dev[lo:hi] if order_dev is not None else None)
            if self.augment:
                xb = self._augmented(xb, sched.global_step(epoch, it))
            pending.append(self.train_step(xb, tb))
            if len(pending) >= self.log_every or it == n_iter:
                read = self._read_losses(pending, epoch, it, n_iter)
                losses += read
                pending = []
                self._call("on_losses", read)
        self.train_loss_list += losses
        # every rank's shard losses, as one process would see them
        total, count = self.comm.allreduce_sum([sum(losses), len(losses)])
        train_loss = total / count if count else float("nan")

        x_tr, t_tr, x_te, t_te = self.x_train, self.t_train, self.x_test, self.t_test
        n_eval = self.evaluate_sample_num_per_epoch
        if n_eval is not None:
            x_tr, t_tr, x_te, t_te = x_tr[:n_eval], t_tr[:n_eval], x_te[:n_eval], t_te[:n_eval]
        train_acc = self._accuracy(x_tr, t_tr)
        test_acc = self._accuracy(x_te, t_te)
        val = {}
        if self.x_val is not None:
            val_loss, val_acc = self._val_scores()
            val = {"val_loss": val_loss, "val_acc": val_acc}
        seconds = time.perf_counter() - t0
        samples = n_iter * self.batch_size
        return {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_acc": train_acc,
            **val,
            "test_acc": test_acc,
            "lr": lr,
            "seconds": round(seconds, 4),
            "samples_per_s": round(samples / seconds, 1) if seconds > 0 else None,
        }

    def _read_losses(self, pending: list, epoch: int, it: int, n_iter: int) -> list[float]:
        """Host floats of the pending loss arrays (one transfer); raise on NaN/inf."""
        xp = self._xp
        values = to_numpy(xp.stack([xp.reshape(v, ()) for v in pending])).tolist() if len(pending) > 1 else [float(pending[0])]
        for j, v in enumerate(values):
            if not math.isfinite(v):
                bad_it = it - len(values) + j + 1
                where = f"epoch {epoch}, iteration {bad_it} of {n_iter}"
                keep = (
                    f"; the last good checkpoint is {self.last_checkpoint}"
                    if self.last_checkpoint is not None
                    else "; no checkpoint was written"
                )
                hint = " (try a smaller --lr)"
                raise TrainingDiverged(f"training diverged: the loss is {v} at {where}{keep}{hint}", epoch=epoch, iteration=bad_it)
        return values

    def _accuracy(self, x, t) -> float:
        if int(x.shape[0]) == 0:
            return float("nan")
        return float(self.comm.evaluate(self.network, x, t, self.eval_batch_size))

    def _call(self, hook: str, *args) -> list:
        """Call ``hook`` of every callback that has it; returns their results."""
        results = []
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                results.append(fn(self, *args))
        return results

    def _claim_out_dir(self) -> RunLock:
        return _claim_out_dir_of(self)

    def train(self) -> list[dict]:
        """Train from ``start_epoch + 1`` to ``epochs``; returns the per-epoch records
        (all of them, including those of a resumed run's earlier epochs).

        SIGTERM and SIGHUP (when left at their default action) raise
        :class:`~xpconv.training.runs.Terminated`, a ``KeyboardInterrupt``, as Ctrl-C
        does: catch it and call :meth:`save_interrupted`.  With ``run.out_dir`` the
        folder's lock is held while training (a second run into it is refused, see
        :class:`~xpconv.training.runs.RunLock`) and temp files a killed write left there
        are removed first."""
        self.callbacks = _checked_callbacks(self.callbacks)
        lock = None
        if self.out_dir is not None and self.is_root:
            lock = self._claim_out_dir()
        try:
            with stop_signals():
                return self._train()
        finally:
            if lock is not None:
                lock.release()

    def _train(self) -> list[dict]:
        t0 = time.perf_counter()
        self.stop_training = False
        error: BaseException | None = None
        self._call("on_train_begin")
        try:
            for epoch in range(self.start_epoch + 1, self.epochs + 1):
                self._call("on_epoch_begin", epoch)
                record = self.train_epoch(epoch)
                self.history.append(record)
                self.train_acc_list.append(record["train_acc"])
                self.test_acc_list.append(record["test_acc"])
                self.current_epoch = epoch
                self.position = {"epoch": epoch + 1, "iteration": 0}  # epoch done: a Ctrl-C now is before the next one
                self.seconds = time.perf_counter() - t0
                self._call("on_epoch_end", record)
                if self.stop_training:
                    break
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.seconds = time.perf_counter() - t0
            self._call("on_train_end", error)
        return self.history

    # ------------------------------------------------------------------ files

    def metrics(self) -> dict:
        """The metrics.json document (the completed epochs)."""
        return metrics_document(self._done(), self.config, stopped=self.stop_reason)

    def _done(self) -> list[dict]:
        """The records of the completed epochs (a signal can land between an epoch's
        record being kept and the epoch counting as done)."""
        return [r for r in self.history if r["epoch"] <= self.current_epoch]

    def checkpoint(self, path, *, extra: Mapping[str, Any] | None = None) -> Path:
        """Write a checkpoint of the current state (model, optimizer, epoch, metrics)."""
        from ..checkpoint import save_checkpoint

        opt = getattr(self.optimizer, "optimizer", self.optimizer)  # unwrap a DistributedOptimizer
        return save_checkpoint(
            path,
            self.network,
            opt,
            epoch=self.current_epoch,
            metrics=self._done(),
            extra={"config": self.config, "seed": self.seed,
                   **({"lr_schedule": self.lr_schedule.state_dict()} if self.lr_schedule is not None else {}),
                   **dict(extra or {})},
        )

    def save_interrupted(self) -> Path | None:
        """After Ctrl-C (or SIGTERM/SIGHUP): the callbacks' ``on_interrupt`` (``Checkpoints`` writes
        ``interrupted.safetensors`` -- the weights as they are, mid-epoch, ``epoch`` = the
        completed epochs -- and ``Metrics`` writes metrics.json with ``interrupted_at``).
        Returns the checkpoint's path, or None when nothing was saved."""
        saved = [p for p in self._call("on_interrupt") if p is not None]
        return saved[0] if saved else None


def _claim_out_dir_of(trainer) -> RunLock:
    """The run folder's lock for ``train()``: a folder this process already holds (the
    command line claimed it, or this trainer trains again) is used as it is; any other is
    claimed as ``xpconv train`` claims ``--out``: a folder holding a run is refused unless
    the Run says ``overwrite`` or ``resume``."""
    from .runs import RunFolderError, claim_run_folder

    probe = RunLock(trainer.out_dir)
    owner = probe._read()
    if (owner and probe._is_mine(owner)) or getattr(trainer, "_claimed", False):
        lock = probe.acquire()
        for path in remove_stale_temp_files(trainer.out_dir):
            log.info(f"removed {path.name}, left by a write that was killed")
        return lock
    run = trainer.run
    resume = trainer.out_dir / "last.safetensors" if (run.continues or trainer.start_epoch > 0) else None
    try:
        lock = claim_run_folder(trainer.out_dir, resume=resume, overwrite=run.overwrite)
    except RunFolderError as exc:
        text = str(exc).replace("pass --resume", "pass Run.resume(checkpoint, out_dir=...) or Run(..., continues=True) for")
        text = text.replace("--overwrite", "Run(..., overwrite=True)").replace("choose another --out", "choose another out_dir")
        raise RunFolderError(text) from None
    trainer._claimed = True  # training again with this trainer continues its own run
    return lock


def _check_given(**arrays) -> None:
    missing = [k for k, v in arrays.items() if v is None]
    if missing:
        raise TypeError(
            f"Trainer: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} None; expected arrays: the trainer "
            "scores held-out data every epoch. Split some off, e.g. "
            "(x_train, t_train), (x_test, t_test) = xpconv.datasets.load_folder(DIR)"
        )
    for k, v in arrays.items():
        if not hasattr(v, "shape"):
            raise TypeError(f"Trainer: {k} should be an array, got {type(v).__name__}")


def _checked_callbacks(callbacks) -> list:
    """``trainer.callbacks`` as ``train()`` runs them: a plain function added at any time
    becomes an on-epoch-end callback; anything neither is refused, named."""
    out = []
    for cb in callbacks:
        if _is_plain_function(cb):
            cb = OnEpochEnd(cb)
        elif not any(hasattr(cb, h) for h in _HOOKS):
            raise TypeError(f"Trainer: callback {cb!r} has none of the hooks {', '.join(_HOOKS)} and is not a function "
                            "f(trainer, record)")
        out.append(cb)
    return out


_HOOKS = ("on_train_begin", "on_epoch_begin", "on_losses", "on_epoch_end", "on_train_end", "on_interrupt")


def _is_plain_function(cb) -> bool:
    return callable(cb) and not any(hasattr(cb, h) for h in ("on_train_begin", "on_epoch_begin", "on_losses", "on_epoch_end",
                                                              "on_train_end", "on_interrupt"))


def _upgrade(run: Run | None, callbacks, old: dict) -> tuple[Run | None, list, bool | None, bool]:
    """Map the keywords of the old signature (deprecated) onto ``run``, ``callbacks`` and
    the default callbacks' settings: (run, callbacks, progress, summary)."""
    callbacks = list(callbacks or ())
    if not old:
        return run, callbacks, None, True
    unknown = sorted(set(old) - set(_MOVED))
    if unknown:
        raise TypeError(f"Trainer() got an unexpected keyword argument {unknown[0]!r}")
    warnings.warn("Trainer(" + ", ".join(f"{k}=" for k in old) + ") is deprecated: use "
                  + ", ".join(dict.fromkeys(_MOVED[k] for k in old)), DeprecationWarning, stacklevel=3)
    if run is None:
        run = Run()
    for key in ("out_dir", "config", "start_epoch", "history", "optimizer_state"):
        if old.get(key) is not None:
            setattr(run, key, old[key])
    fns = old.get("on_epoch_end")
    before = [] if fns is None else [fns] if callable(fns) else list(fns)
    return run, before + callbacks, old.get("progress"), bool(old.get("summary", True))


def _rows(a, rows):
    """Rows ``rows`` (a host index array) of ``a``, an array of any namespace."""
    try:
        xp = namespace_of(a)
    except TypeError:
        return a[rows]
    if backend.is_numpy_namespace(xp):
        return a[rows]
    return xp.take(a, asarray_in(rows, xp, device=backend.device_of(a)), axis=0)


def _nbytes(a) -> int:
    """Bytes of an array of any namespace (without copying it)."""
    n = 1
    for s in a.shape:
        n *= int(s)
    name = backend.dtype_name(a.dtype)
    digits = "".join(ch for ch in name if ch.isdigit())
    return n * (max(1, int(digits) // 8) if digits else 1)


def _num_classes(network) -> int | None:
    """Classes the network scores: the width of its last 2-D weight (the final Affine), or None."""
    layers = getattr(network, "layers", None)
    values = list(layers.values()) if layers is not None and hasattr(layers, "values") else list(layers or ())
    for layer in reversed(values):
        W = getattr(layer, "W", None)
        if W is not None and len(getattr(W, "shape", ())) == 2:
            return int(W.shape[1])
    return None


def _check_labels(network, t, where: str) -> None:
    """Class-index labels range-checked once, where the data enters (on the host: the
    training step itself never reads labels back from a device)."""
    if t is None or not hasattr(t, "shape"):
        return
    host = to_numpy(t)
    if host.ndim == 2 and host.shape[1] == 1:
        host = host.reshape(-1)
    if host.ndim == 1 and host.dtype.kind in "iu":
        check_label_range(host, _num_classes(network), where)

