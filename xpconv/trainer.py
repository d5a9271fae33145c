"""The book's ``Trainer``, with progress, metrics, safe checkpoints and exact resume.

    >>> trainer = Trainer(net, x_train, t_train, x_test, t_test, epochs=20,
    ...                   mini_batch_size=100, optimizer="Adam", optimizer_param={"lr": 0.001})
    >>> trainer.train()
    >>> trainer.test_acc_list[-1]

Data may be host NumPy arrays (the usual case) or arrays of the model's namespace.
Host data is indexed on the host with each batch's indices and moved to the model's
namespace one batch at a time; when the model runs on an accelerator and the whole set
fits in a quarter of its free memory, the set is moved there once and stays resident.

Each epoch visits the training samples in an order drawn from
``backend.Generator([seed, epoch])`` in batches of ``mini_batch_size`` (a last batch
smaller than that is left out, as in the data-parallel trainer), and Dropout masks of
global step s come from ``backend.Generator([seed, s, layer])``, so the run depends
only on the seed: resuming from the checkpoint of epoch k (which stores the optimizer
state) repeats an uninterrupted run, and one process repeats a data-parallel one.

The host does not wait for the device at each step: losses stay arrays and are read
every ``log_every`` steps (for the progress bar and the NaN/inf check) and at the end
of the epoch.  Accuracy is computed in chunks, so memory stays bounded.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from . import backend
from .backend import asarray_in, namespace_of, to_numpy
from .optim import get_optimizer

__all__ = ["Trainer", "TrainingDiverged", "format_seconds", "seed_dropout", "write_metrics"]

#: the data set is kept on the accelerator when it needs at most this fraction of free memory
RESIDENT_FRACTION = 0.25


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite (the message names epoch and iteration)."""

    def __init__(self, message: str, *, epoch: int, iteration: int):
        super().__init__(message)
        self.epoch = epoch
        self.iteration = iteration


class Trainer:
    """Trains a network with mini-batches (the book's ``Trainer``, extended).

    Book arguments: ``network`` (anything with ``params``, ``gradient(x, t)``, ``loss``,
    ``accuracy``), the data, ``epochs``, ``mini_batch_size``, ``optimizer`` (a name such
    as 'SGD', 'Adam' -- any case -- or an ``xpconv.optim`` optimizer), ``optimizer_param``,
    ``evaluate_sample_num_per_epoch`` (score only the first n samples each epoch),
    ``verbose`` (print one line per epoch).

    Extra keyword arguments:

    * ``seed``: seeds the per-epoch order of the samples and the Dropout masks of each step;
    * ``progress``: a tqdm bar per epoch (default: when ``verbose`` and stderr is a terminal);
    * ``log_every``: read the loss every this many steps (bar, NaN check);
    * ``eval_batch_size``: chunk size of the accuracy passes;
    * ``on_epoch_end``: a callable or a list of them, called ``f(trainer, record)`` after
      each epoch; setting ``trainer.stop_training = True`` ends training after it;
    * ``out_dir``: folder for ``last.safetensors`` (every epoch), ``best.safetensors`` (best
      test accuracy so far) and ``metrics.json``, all written atomically;
    * ``config``: a JSON-able dict of the run's settings (kept in metrics.json and checkpoints);
    * resume: ``start_epoch`` (epochs already done), ``optimizer_state`` (a
      ``state_dict()``; or pass the restored optimizer itself as ``optimizer``),
      ``history`` (the per-epoch records so far);
    * ``comm``: a data-parallel communicator (see ``xpconv.distributed``): each rank
      trains on its shard of every global batch, gradients are averaged over ranks,
      only rank 0 prints and writes files;
    * ``resident``: True/False forces keeping the data on the model's device or not;
    * ``summary``: with ``verbose``, print the final test accuracy after training.
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
        progress: bool | None = None,
        log_every: int = 10,
        eval_batch_size: int = 500,
        on_epoch_end: Callable | Iterable[Callable] | None = None,
        out_dir=None,
        config: Mapping[str, Any] | None = None,
        start_epoch: int = 0,
        optimizer_state: Mapping[str, Any] | None = None,
        history: list | None = None,
        comm=None,
        resident: bool | None = None,
        summary: bool = True,
    ):
        self.network = network
        self.epochs = int(epochs)
        self.batch_size = int(mini_batch_size)
        if self.batch_size < 1:
            raise ValueError(f"Trainer: mini_batch_size must be >= 1, got {mini_batch_size!r}")
        if self.epochs < 0:
            raise ValueError(f"Trainer: epochs must be >= 0, got {epochs!r}")
        n, nt = int(x_train.shape[0]), int(t_train.shape[0])
        if n != nt:
            raise ValueError(f"Trainer: {n} training samples but {nt} labels")
        if int(x_test.shape[0]) != int(t_test.shape[0]):
            raise ValueError(f"Trainer: {int(x_test.shape[0])} test samples but {int(t_test.shape[0])} labels")
        if n < self.batch_size:
            raise ValueError(f"Trainer: mini_batch_size {self.batch_size} is larger than the {n} training samples")
        self.train_size = n
        self.evaluate_sample_num_per_epoch = evaluate_sample_num_per_epoch
        self.verbose = bool(verbose)
        self.seed = int(seed)
        self.log_every = max(1, int(log_every))
        self.eval_batch_size = max(1, int(eval_batch_size))
        self.comm = comm
        self.summary = bool(summary)
        self.is_root = comm is None or bool(getattr(comm, "is_root", True))
        self.progress = (self.verbose and sys.stderr.isatty()) if progress is None else bool(progress)
        self.progress = self.progress and self.is_root
        if on_epoch_end is None:
            self.callbacks = []
        elif callable(on_epoch_end):
            self.callbacks = [on_epoch_end]
        else:
            self.callbacks = list(on_epoch_end)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.config = dict(config or {})

        self.optimizer = get_optimizer(optimizer, **dict({"lr": 0.01} if optimizer_param is None else optimizer_param)) \
            if isinstance(optimizer, str) else get_optimizer(optimizer)
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
        self.start_epoch = int(start_epoch)
        self.current_epoch = self.start_epoch
        self._saved_epoch = self.start_epoch  # the epoch last.safetensors holds
        self.history: list[dict] = [dict(r) for r in (history or [])][: self.start_epoch]

        # book-compatible lists: per-iteration losses (this session), per-epoch accuracies
        self.train_loss_list: list[float] = []
        self.train_acc_list: list[float] = [r["train_acc"] for r in self.history]
        self.test_acc_list: list[float] = [r["test_acc"] for r in self.history]
        self.stop_training = False
        self.best_test_acc = max(self.test_acc_list, default=-1.0)
        self.last_checkpoint: Path | None = None
        self.seconds = 0.0
        self.position = {"epoch": self.start_epoch, "iteration": 0}  # where training is (for Ctrl-C)

        self._xp = getattr(network, "xp", None) or namespace_of(next(iter(network.params.values())))
        self._device = getattr(network, "device", None)
        self._dtype = getattr(network, "dtype", None)
        self._place_data(x_train, t_train, x_test, t_test, resident)
        if comm is not None:
            comm.broadcast_params(network.params)

    # ------------------------------------------------------------------ data placement

    def _place_data(self, x_train, t_train, x_test, t_test, resident):
        """Keep each array on the host (NumPy) or resident in the model's namespace."""
        xp = self._xp
        arrays = (x_train, t_train, x_test, t_test)
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
        else:
            # host NumPy arrays, indexed with host index arrays (data of the model's own
            # namespace when it is NumPy stays as it is)
            self.x_train, self.t_train, self.x_test, self.t_test = (to_numpy(a) for a in arrays)

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

    # ------------------------------------------------------------------ training

    def epoch_order(self, epoch: int):
        """Host indices of the global batches of ``epoch`` (1-based), seeded by (seed, epoch)."""
        return self._split(self._permutation(epoch))

    def _split(self, order):
        B = self.batch_size
        return [order[i : i + B] for i in range(0, len(order), B)]

    def _permutation(self, epoch: int):
        """The epoch's seeded host permutation, cut to whole batches (slices of it make
        :meth:`epoch_order`)."""
        order = backend.Generator([self.seed, int(epoch)]).permutation(self.train_size)
        return order[: self.train_size - self.train_size % self.batch_size]

    def train_step(self, x_batch, t_batch):
        """One optimizer step; returns the batch loss as an array (no host sync)."""
        net = self.network
        grads = net.gradient(x_batch, t_batch)
        if self.comm is not None:
            grads = self.comm.allreduce_mean(grads)
        self.optimizer.update(net.params, grads)
        last = getattr(net, "last_layer", None)
        loss = getattr(last, "loss", None)
        return loss if loss is not None else net.loss(x_batch, t_batch)

    def train_epoch(self, epoch: int) -> dict:
        """Run one epoch (1-based number), evaluate, save; returns the epoch's record."""
        net, xp = self.network, self._xp
        t0 = time.perf_counter()
        order = self._permutation(epoch)
        batches = self._split(order)
        n_iter = len(batches)
        order_dev = None
        if self.resident and self.comm is None:
            # the whole epoch's order goes to the device in one copy; each step slices it
            # there, so a step makes no host-to-device transfer of its own
            order_dev = asarray_in(order, xp, device=self._device)
        samples = n_iter * self.batch_size
        bar = self._bar(epoch, samples)
        pending: list = []  # loss arrays not read yet
        losses: list[float] = []
        step0 = (epoch - 1) * n_iter
        try:
            for it, idx in enumerate(batches, 1):
                self.position = {"epoch": epoch, "iteration": it}
                if self.comm is not None:
                    idx = self.comm.shard(idx)
                    self.comm.seed_dropout(net, self.seed, step0 + it)
                else:
                    seed_dropout(net, self.seed, step0 + it)
                if order_dev is not None:
                    idx_dev = order_dev[(it - 1) * self.batch_size : it * self.batch_size]
                elif self.resident:
                    idx_dev = asarray_in(idx, xp, device=self._device)
                else:
                    idx_dev = None
                xb, tb = self._batch(idx, idx_dev)
                pending.append(self.train_step(xb, tb))
                if len(pending) >= self.log_every or it == n_iter:
                    read = self._read_losses(pending, epoch, it, n_iter)
                    losses += read
                    pending = []
                    if bar is not None:
                        # running mean of the epoch; set before update(), whose redraw shows it
                        bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}", refresh=False)
                        bar.update(len(read) * self.batch_size)
        finally:
            if bar is not None:
                bar.close()
        self.train_loss_list += losses
        if self.comm is not None:  # every rank's shard losses, as one process would see them
            total, count = self.comm.allreduce_sum([sum(losses), len(losses)])
            train_loss = total / count if count else float("nan")
        else:
            train_loss = sum(losses) / len(losses) if losses else float("nan")

        x_tr, t_tr, x_te, t_te = self.x_train, self.t_train, self.x_test, self.t_test
        n_eval = self.evaluate_sample_num_per_epoch
        if n_eval is not None:
            x_tr, t_tr, x_te, t_te = x_tr[:n_eval], t_tr[:n_eval], x_te[:n_eval], t_te[:n_eval]
        train_acc = self._accuracy(x_tr, t_tr)
        test_acc = self._accuracy(x_te, t_te)
        seconds = time.perf_counter() - t0
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "test_acc": test_acc,
            "seconds": round(seconds, 4),
            "samples_per_s": round(samples / seconds, 1) if seconds > 0 else None,
        }
        return record

    def _bar(self, epoch: int, samples: int):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=samples, desc=f"epoch {epoch}/{self.epochs}", unit="img", leave=False, dynamic_ncols=True, file=sys.stderr)

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
        if self.comm is not None:
            return float(self.comm.evaluate(self.network, x, t, self.eval_batch_size))
        return float(self.network.accuracy(x, t, batch_size=self.eval_batch_size))

    def train(self) -> list[dict]:
        """Train from ``start_epoch + 1`` to ``epochs``; returns the per-epoch records
        (all of them, including those of a resumed run's earlier epochs)."""
        t0 = time.perf_counter()
        for epoch in range(self.start_epoch + 1, self.epochs + 1):
            record = self.train_epoch(epoch)
            self.history.append(record)
            self.train_acc_list.append(record["train_acc"])
            self.test_acc_list.append(record["test_acc"])
            self.current_epoch = epoch
            self.position = {"epoch": epoch + 1, "iteration": 0}  # epoch done: a Ctrl-C now is before the next one
            self.seconds = time.perf_counter() - t0
            if self.is_root:
                self._save(record)
                if self.verbose:
                    print(self.format_record(record), flush=True)
            for cb in self.callbacks:
                cb(self, record)
            if self.stop_training:
                break
        self.seconds = time.perf_counter() - t0
        if self.verbose and self.summary and self.is_root and self.test_acc_list:
            print(f"test acc {self.test_acc_list[-1]:.4f} after {self.current_epoch} epoch{'s' if self.current_epoch != 1 else ''} ({format_seconds(self.seconds)})", flush=True)
        return self.history

    def format_record(self, r: Mapping[str, Any]) -> str:
        """The per-epoch line: epoch, train loss, train/test accuracy, seconds, samples/s."""
        width = len(str(self.epochs))
        rate = r.get("samples_per_s")
        return (
            f"epoch {r['epoch']:>{width}}/{self.epochs}  train loss {r['train_loss']:.4f}  "
            f"train acc {r['train_acc']:.4f}  test acc {r['test_acc']:.4f}  {format_seconds(r['seconds'])}"
            + (f"  ({rate:,.0f} samples/s)" if rate else "")
        )

    # ------------------------------------------------------------------ files

    def metrics(self) -> dict:
        """The metrics.json document."""
        final = {}
        if self.history:
            last = self.history[-1]
            best = max(self.history, key=lambda r: r["test_acc"])
            final = {
                "epoch": last["epoch"],
                "test_acc": last["test_acc"],
                "train_acc": last["train_acc"],
                "train_loss": last["train_loss"],
                "best_test_acc": best["test_acc"],
                "best_epoch": best["epoch"],
            }
        return {"epochs": self.history, "final": final, "config": self.config}

    def checkpoint(self, path, *, extra: Mapping[str, Any] | None = None) -> Path:
        """Write a checkpoint of the current state (model, optimizer, epoch, metrics)."""
        from .checkpoint import save_checkpoint

        opt = getattr(self.optimizer, "optimizer", self.optimizer)  # unwrap a DistributedOptimizer
        return save_checkpoint(
            path,
            self.network,
            opt,
            epoch=self.current_epoch,
            metrics=self.history,
            extra={"config": self.config, "seed": self.seed, **dict(extra or {})},
        )

    def _save(self, record: dict) -> None:
        if self.out_dir is None:
            return
        self.last_checkpoint = self.checkpoint(self.out_dir / "last.safetensors")
        self._saved_epoch = self.current_epoch
        if record["test_acc"] > self.best_test_acc:
            self.best_test_acc = record["test_acc"]
            self.checkpoint(self.out_dir / "best.safetensors")
        write_metrics(self.out_dir / "metrics.json", self.metrics())

    def save_interrupted(self) -> Path | None:
        """After Ctrl-C: write ``interrupted.safetensors`` (the weights as they are, mid-epoch;
        ``epoch`` is the number of completed epochs) and metrics.json. Returns its path."""
        if self.out_dir is None or not self.is_root:
            return None
        at = dict(self.position)
        if at["iteration"] == 0 and self.current_epoch > self._saved_epoch and self.history:
            # Ctrl-C came after an epoch ended but before its checkpoint was written: the
            # weights are still that epoch's end, so last.safetensors gets them first
            self._save(self.history[-1])
        path = self.checkpoint(self.out_dir / "interrupted.safetensors", extra={"interrupted_at": at})
        write_metrics(self.out_dir / "metrics.json", {**self.metrics(), "interrupted_at": at})
        return path


def seed_dropout(model, seed: int, step: int) -> None:
    """Give each Dropout layer of ``model`` the generator of global step ``step``: layer i
    draws its mask from ``backend.Generator([seed, step, i])``. The masks then depend
    only on (seed, step) -- a resumed run draws what an uninterrupted one drew, and one
    process draws what a data-parallel run of any size draws for the whole batch."""
    from .layers import Dropout

    i = 0
    for layer in getattr(model, "layers", ()):
        if isinstance(layer, Dropout):
            layer.rng = backend.Generator([int(seed), int(step), i])
            i += 1


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


def _nbytes(a) -> int:
    """Bytes of an array of any namespace (without copying it)."""
    n = 1
    for s in a.shape:
        n *= int(s)
    return n * _itemsize(a.dtype)


def _itemsize(dtype) -> int:
    name = backend.dtype_name(dtype)
    digits = "".join(ch for ch in name if ch.isdigit())
    return max(1, int(digits) // 8) if digits else 1


def write_metrics(path, metrics: Mapping[str, Any]) -> Path:
    """Write metrics.json atomically (NaN is written as null, so it stays valid JSON)."""
    import json

    from .checkpoint import atomic_write

    def clean(obj):
        if isinstance(obj, float) and not math.isfinite(obj):
            return None
        if isinstance(obj, Mapping):
            return {str(k): clean(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        return obj

    return atomic_write(path, json.dumps(clean(metrics), indent=2) + "\n")
