"""Pictures of a training run: learning curves, misclassified test images, first-layer filters.

Matplotlib is used through its Agg canvas directly (no pyplot, no global backend
switch), so these functions work on headless machines and leave an interactive
session's backend alone.  Every function returns the matplotlib Figure it drew (for
:func:`plot_filters`, with what it shows, or None and the reason when the first layer
has no picture).  In a notebook the Figure shows itself inline when it is the last
expression of a cell; given a ``path``, the function also writes it there as a PNG
(atomically) and the Figure's ``path`` is that file (``os.fspath(fig)`` too, so code that
used the returned path keeps working).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .backend import to_numpy

__all__ = ["plot_curves", "plot_filters", "plot_misclassified", "predict_labels", "predict_proba", "save_run_plots"]


def _png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


@functools.cache
def _figure_class() -> type:
    from matplotlib.figure import Figure

    class PlotFigure(Figure):
        """A matplotlib Figure on an Agg canvas that shows itself inline in Jupyter
        (``_repr_png_``, with or without ``%matplotlib inline``) and remembers the PNG it
        was saved to: ``path`` (None when not saved), also its ``os.fspath``."""

        path: Path | None = None

        def _repr_png_(self) -> bytes:
            return _png(self)

        def __fspath__(self) -> str:
            if self.path is None:
                raise TypeError("this figure was not saved to a file (pass a path to the plotting function)")
            return str(self.path)

    PlotFigure.__module__ = __name__
    return PlotFigure


def __getattr__(name: str):
    if name == "PlotFigure":  # the class is made on first use, so importing this module needs no matplotlib
        return _figure_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = _figure_class()(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    """Write ``fig`` as a PNG at ``path`` (atomically) when a path is given; return ``fig``."""
    if path is not None:
        from ._io import atomic_write

        fig.path = atomic_write(path, _png(fig))
    return fig


def plot_curves(
    history: Sequence[Mapping[str, Any]],
    path=None,
    train_loss_list: Sequence[float] | None = None,
    *,
    first_epoch: int | None = None,
    title: str | None = None,
    labels: Sequence[str] | None = None,
):
    """Loss (left) and accuracy (right) by epoch. ``history``: the per-epoch records
    (``epoch``, ``train_loss``, ``train_acc``, ``test_acc``, and when present ``val_acc``
    -- the best validation epoch is starred -- and ``lr``, drawn dashed on its own axis
    beside the loss); ``train_loss_list``: the
    per-iteration losses of epochs ``first_epoch + 1`` to the last one (all epochs by
    default; a resumed run has only its own), drawn faintly behind the epoch means.

    Several runs overlaid: ``history`` a list of runs, each a list of records, a
    :class:`~xpconv.training.Trainer` or a run folder (its ``metrics.json``), or one run
    folder; ``labels`` names them (default: the folder names, else run 1, run 2, ...)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    if _is_several_runs(history):
        return _plot_runs(history, path, labels=labels, title=title)

    epochs = [r["epoch"] for r in history]
    fig = _figure(10, 4)
    ax1, ax2 = fig.subplots(1, 2)
    if train_loss_list and epochs:
        n, last = len(train_loss_list), epochs[-1]
        first = epochs[0] - 1 if first_epoch is None else int(first_epoch)
        per_epoch = n / max(1, last - first)
        xs = [first + (i + 1) / per_epoch for i in range(n)]
        ax1.plot(xs, train_loss_list, color="tab:blue", alpha=0.25, linewidth=0.8, label="train loss (iteration)")
    ax1.plot(epochs, [r["train_loss"] for r in history], "o-", color="tab:blue", label="train loss (epoch mean)")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.set_yscale("log")
    ax1.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax1.yaxis.set_minor_formatter(FuncFormatter(_minor_log_label))
    ax1.set_title("training loss")
    ax1.grid(True, alpha=0.3)
    ax2.plot(epochs, [r["train_acc"] for r in history], "o-", label="train")
    validated = any(r.get("val_acc") is not None for r in history)
    if validated:
        ax2.plot(epochs, [r.get("val_acc") for r in history], "^-", label="validation")
    ax2.plot(epochs, [r["test_acc"] for r in history], "s-", label="test")
    if history and validated:  # the model is chosen by validation accuracy
        best = max((r for r in history if r.get("val_acc") is not None), key=lambda r: (r["val_acc"], -(r.get("val_loss") or 0.0)))
        ax2.plot([best["epoch"]], [best["val_acc"]], "*", color="tab:red", markersize=12, zorder=3,
                 label=f"best validation {best['val_acc']:.4f} (epoch {best['epoch']}; test {best['test_acc']:.4f})")
    elif history:
        best = max(history, key=lambda r: r["test_acc"])
        ax2.plot([best["epoch"]], [best["test_acc"]], "*", color="tab:red", markersize=12, zorder=3,
                 label=f"best test {best['test_acc']:.4f} (epoch {best['epoch']})")
    extra_handles: tuple[list, list] = ([], [])
    if any(r.get("lr") is not None for r in history):  # the learning rate of each epoch, on its own scale
        ax_lr = ax1.twinx()
        ax_lr.plot(epochs, [r.get("lr") for r in history], "--", color="tab:grey", linewidth=1, label="learning rate")
        ax_lr.set_ylabel("learning rate", color="tab:grey")
        ax_lr.tick_params(axis="y", colors="tab:grey")
        ax_lr.set_ylim(bottom=0)
        extra_handles = ax_lr.get_legend_handles_labels()
    resumed = first_epoch is not None and epochs and epochs[0] <= int(first_epoch) < epochs[-1]
    for ax in (ax1, ax2):
        if resumed and first_epoch is not None:  # this run continued a checkpoint after epoch first_epoch
            ax.axvline(int(first_epoch), color="grey", linestyle=":", linewidth=1, label=f"resumed after epoch {int(first_epoch)}" if ax is ax1 else None)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(epochs) == 1:
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
    accs = [r[k] for r in history for k in ("train_acc", "test_acc", "val_acc") if r.get(k) is not None and math.isfinite(r[k])]
    if accs:  # at least 0.05 of range, so one epoch or a flat curve is not magnified
        lo, hi = min(accs), max(accs)
        pad = max(0.01, (0.05 - (hi - lo)) / 2)
        ax2.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad) + 0.002)
    handles, names = ax1.get_legend_handles_labels()
    ax1.legend(handles + extra_handles[0], names + extra_handles[1])
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy")
    ax2.set_title("accuracy")
    ax2.grid(True, alpha=0.3)
    ax2.legend(loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _minor_log_label(v: float, _pos=None) -> str:
    """Label the minor ticks 2x and 5x of a log axis (matplotlib shows minor labels only
    when the axis spans too few decades to have enough major ones)."""
    if not (v > 0 and math.isfinite(v)):
        return ""
    mantissa = v / 10 ** math.floor(math.log10(v) + 1e-9)
    return f"{v:g}" if round(mantissa) in (2, 5) else ""


def predict_proba(model, x, batch_size: int = 500) -> np.ndarray:
    """Softmax probabilities (N, K) of every sample as a host array, computed in chunks."""
    from .ops import softmax

    chunks = [to_numpy(softmax(model.predict(x[i : i + batch_size]))) for i in range(0, int(x.shape[0]), batch_size)]
    return np.concatenate(chunks) if chunks else np.zeros((0, 0))


def predict_labels(model, x, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, its probability) for every sample, as host arrays."""
    p = predict_proba(model, x, batch_size)
    if p.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    return p.argmax(axis=1), p.max(axis=1)


def _as_images(x: np.ndarray, image_hw: Sequence[int] | None = None) -> np.ndarray:
    """(N, H, W) host images from NCHW (first channel) or flattened (N, D) data: (H, W) is
    ``image_hw`` when it fits, else a square when D is one, else a 1 x D strip."""
    x = to_numpy(x)
    if x.ndim == 4:
        return x[:, 0]
    if x.ndim == 3:
        return x
    x = x.reshape(x.shape[0], -1)
    D = x.shape[1]
    side = int(round(math.sqrt(D)))
    if image_hw is not None and len(image_hw) == 2 and int(image_hw[0]) * int(image_hw[1]) == D:
        hw = (int(image_hw[0]), int(image_hw[1]))
    elif side * side == D:
        hw = (side, side)
    else:
        hw = (1, D)
    return x.reshape(x.shape[0], *hw)


def plot_misclassified(x, t_true, t_pred, path=None, *, class_names: Sequence[str] | None = None, probs=None, max_images: int = 36,
                       image_hw: Sequence[int] | None = None):
    """A grid of wrongly classified images titled ``true -> predicted``.

    ``x``: the images (NCHW or flattened), ``t_true``/``t_pred``: class indices of the
    same samples; ``probs``: the predicted class's probability (optional); ``image_hw``:
    (H, W) of flattened images. The first ``max_images`` wrong ones are drawn. Returns the
    Figure (saved as a PNG at ``path`` when given)."""
    t_true = to_numpy(t_true)
    if t_true.ndim == 2:
        t_true = t_true.argmax(axis=1)
    t_pred = to_numpy(t_pred)
    wrong = np.flatnonzero(t_true != t_pred)
    shown = wrong[:max_images]
    names = list(class_names) if class_names is not None else None

    def name(k):
        return names[int(k)] if names is not None and int(k) < len(names) else str(int(k))

    n = len(shown)
    cols = min(9, max(1, n))
    rows = max(1, math.ceil(n / cols))
    # the title on two short lines, and the figure at least as wide as they are, so a
    # grid of a few images does not cut it off
    title = (f"misclassified test images: {len(wrong)} of {len(t_true)}" + (f", first {n} shown" if len(wrong) > n else "")
             + "\n(true \u2192 predicted" + (", its probability)" if probs is not None else ")"))
    title_w = 0.085 * max(len(line) for line in title.split("\n")) + 0.4  # inches at fontsize 10
    fig = _figure(max(1.25 * cols + 0.4, title_w), 1.45 * rows + 0.9) if n else _figure(max(6.5, title_w), 1.6)
    fig.suptitle(title, fontsize=10)
    if n == 0:
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    else:
        imgs = _as_images(to_numpy(x)[shown], image_hw)
        for k, (i, img) in enumerate(zip(shown, imgs)):
            ax = fig.add_subplot(rows, cols, k + 1)
            ax.imshow(img, cmap="gray_r", interpolation="nearest", aspect="auto" if img.shape[0] == 1 else "equal")
            label = f"{name(t_true[i])} \u2192 {name(t_pred[i])}"
            if probs is not None:
                label += f"\n({float(to_numpy(probs)[i]):.0%})"
            ax.set_title(label, fontsize=8, color="tab:red")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return _save(fig, path)


def first_layer_filters(model, input_dim: Sequence[int] | None = None) -> tuple[np.ndarray | None, str]:
    """(images (K, FH, FW), description) of the model's first-layer weights, or
    (None, reason) when they have no natural picture."""
    keys = list(model.params)
    if not keys:
        return None, "the model has no parameters"
    W = to_numpy(model.params[keys[0]]).astype(np.float64)
    if W.ndim == 4:
        FN, C, FH, FW = W.shape
        what = f"{FN} filters {FH}x{FW}" + (f" (channel 0 of {C})" if C > 1 else "")
        return W[:, 0], what
    if W.ndim == 2:
        D, M = W.shape
        if input_dim is not None and len(input_dim) == 3 and input_dim[0] == 1 and input_dim[1] * input_dim[2] == D:
            hw = (int(input_dim[1]), int(input_dim[2]))
        else:
            side = int(round(math.sqrt(D)))
            if side * side != D:
                return None, f"the first layer's {D} inputs are not a square image"
            hw = (side, side)
        k = min(M, 64)
        return W[:, :k].T.reshape(k, *hw), f"weights of the first {k} of {M} hidden units as {hw[0]}x{hw[1]} images"
    return None, f"the first parameter has shape {W.shape}"


def plot_filters(model, path=None, input_dim: Sequence[int] | None = None) -> tuple[Any, str]:
    """The first layer's filters (a conv net) or input weights of the first hidden units
    (an MLP with square images), each scaled to its own range. Returns (Figure, what) --
    the Figure saved as a PNG at ``path`` when given -- or (None, why not), writing nothing."""
    imgs, what = first_layer_filters(model, input_dim)
    if imgs is None:
        return None, what
    n = len(imgs)
    cols = min(10, n)
    rows = math.ceil(n / cols)
    fig = _figure(1.0 * cols + 0.4, 1.0 * rows + 0.8)
    fig.suptitle(f"first layer: {what}\n(red > 0 > blue, each scaled to its own largest |weight|)", fontsize=10)
    for k, img in enumerate(imgs):
        ax = fig.add_subplot(rows, cols, k + 1)
        lim = float(np.abs(img).max()) or 1.0
        ax.imshow(img, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return _save(fig, path), what


def save_run_plots(out_dir, model, history, x_test, t_test, *, train_loss_list=None, first_epoch=None, class_names=None, input_dim=None, title=None) -> dict[str, str]:
    """curves.png, misclassified.png and filters.png in ``out_dir``. Returns {file: note}."""
    out = Path(out_dir)
    notes = {}
    plot_curves(history, out / "curves.png", train_loss_list, first_epoch=first_epoch, title=title)
    notes["curves.png"] = "loss and accuracy by epoch"
    pred, prob = predict_labels(model, x_test)
    t = to_numpy(t_test)
    t = t.argmax(axis=1) if t.ndim == 2 else t
    wrong = np.flatnonzero(pred != t)
    hw = list(input_dim)[1:] if input_dim is not None and len(input_dim) == 3 else None
    plot_misclassified(x_test, t, pred, out / "misclassified.png", class_names=class_names, probs=prob, image_hw=hw)
    notes["misclassified.png"] = f"{len(wrong)} of {len(t)} test images misclassified"
    fig, what = plot_filters(model, out / "filters.png", input_dim=input_dim)
    notes["filters.png"] = what if fig is not None else f"not written: {what}"
    return notes


# --------------------------------------------------------------------------- several runs

#: the largest metrics.json a run folder may hold for plotting
MAX_METRICS_BYTES = 64 << 20


def _is_several_runs(history: Any) -> bool:
    if isinstance(history, (str, Path)):
        return True
    if hasattr(history, "history") and not isinstance(history, Mapping):
        return True  # a Trainer
    return isinstance(history, Sequence) and len(history) > 0 and not isinstance(history[0], Mapping)


def _run_records(run: Any, k: int) -> tuple[str, list[Mapping[str, Any]]]:
    """(label, records) of one run: records, a Trainer, or a run folder / metrics.json."""
    import json

    from ._io import stat_regular

    if isinstance(run, (str, Path)):
        p = Path(run)
        f = p / "metrics.json" if p.is_dir() else p
        try:
            st = stat_regular(f, "metrics file")
        except FileNotFoundError:
            raise ValueError(f"plot_curves: {f} not found (expected a run folder holding metrics.json)") from None
        if st.st_size > MAX_METRICS_BYTES:
            raise ValueError(f"plot_curves: {f} holds {st.st_size:,} bytes; expected at most {MAX_METRICS_BYTES:,}")
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"plot_curves: {f} is not a metrics.json document ({exc})") from None
        records = doc.get("epochs") if isinstance(doc, dict) else None
        label = p.name if p.is_dir() else p.parent.name
    elif hasattr(run, "history") and not isinstance(run, Mapping):
        records, label = run.history, f"run {k}"
    else:
        records, label = run, f"run {k}"
    ok = isinstance(records, Sequence) and all(
        isinstance(r, Mapping) and all(isinstance(r.get(key), (int, float)) for key in ("epoch", "train_loss", "test_acc"))
        for r in records
    )
    if not ok:
        raise TypeError(f"plot_curves: run {k} should be per-epoch records (epoch, train_loss, train_acc, test_acc), "
                        f"a Trainer or a run folder; got {type(run).__name__}")
    return label or f"run {k}", list(records)  # type: ignore[arg-type]


def _plot_runs(runs: Any, path=None, *, labels: Sequence[str] | None = None, title: str | None = None):
    """Training loss and test accuracy of several runs, one colour per run."""
    from matplotlib.ticker import MaxNLocator

    if isinstance(runs, (str, Path)) or (hasattr(runs, "history") and not isinstance(runs, Mapping)):
        runs = [runs]
    loaded = [_run_records(r, k + 1) for k, r in enumerate(runs)]
    if labels is not None:
        if len(labels) != len(loaded):
            raise ValueError(f"plot_curves: {len(loaded)} runs but {len(labels)} labels")
        loaded = [(str(name), recs) for name, (_, recs) in zip(labels, loaded)]
    fig = _figure(10, 4)
    ax1, ax2 = fig.subplots(1, 2)
    for k, (label, recs) in enumerate(loaded):
        color = f"C{k % 10}"
        epochs = [r["epoch"] for r in recs]
        ax1.plot(epochs, [r["train_loss"] for r in recs], "o-", color=color, label=label)
        ax2.plot(epochs, [r["test_acc"] for r in recs], "s-", color=color, label=f"{label} test")
        if all(isinstance(r.get("train_acc"), (int, float)) for r in recs):
            ax2.plot(epochs, [r["train_acc"] for r in recs], ":", color=color, alpha=0.7, label=f"{label} train")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.set_yscale("log")
    ax1.set_title("training loss")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy")
    ax2.set_title("accuracy (solid: test, dotted: train)")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
