"""The ``xpconv`` command (also ``python -m xpconv``): train, eval, predict, serve, info.

    xpconv train                         # SimpleConvNet on the bundled digits, >= 97% in seconds
    xpconv train --dataset mnist --data-dir ~/mnist --device cuda
    xpconv train --config my-recipe.toml # a recipe file (xpconv.recipes); options still win
    xpconv eval runs/20250101-120000/last.safetensors
    xpconv predict runs/.../best.safetensors digit.png more.npy
    xpconv serve runs/.../best.safetensors  # draw a digit at http://127.0.0.1:8000/, curves at /runs
    xpconv info [--json]

One argparse parser serves every subcommand.  The recipes are data in
:mod:`xpconv.recipes`, image decoding is :mod:`xpconv.images`, the machine report is
:mod:`xpconv.info`; this module parses, dispatches and turns errors into one line.

User errors (bad options, missing or damaged data and checkpoint files) print one line
``xpconv: error: ...`` on stderr and exit with status 2; running out of (GPU) memory
prints ``xpconv: error: out of GPU memory at --batch-size N (...): try a smaller
--batch-size, e.g. --batch-size N/2`` and exits with status 1; Ctrl-C during training
writes ``interrupted.safetensors`` and exits with status 130, SIGTERM and SIGHUP do the
same and exit with 128 + the signal's number (143, 129).  ``train`` refuses an output
folder that holds a run unless it is resumed (``--resume``) or replaced (``--overwrite``),
and one that another run is writing to (its lock file).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib
import logging
import math
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._training_options import new_run_options, options_line, resume_options
from ._version import __version__
from .recipes import (
    DATASET_NAMES,
    DEFAULT_LR,
    MODELS,
    OPTIMIZER_NAMES,
    merged,
    model_config,
    read_config,
    recipe,
)
from .settings import LR_SCHEDULES, RULES, SettingError, check_model_config, check_setting, eval_chunk, short

__all__ = ["build_parser", "main", "nonnegative_int", "out_of_memory_message", "positive_float", "positive_int"]

PROG = "xpconv"
class UserError(Exception):
    """A problem the user can fix (printed as one line, exit status 2)."""


class OutOfMemory(Exception):
    """The array library ran out of memory (printed as one line, exit status 1)."""


def _is_out_of_memory(exc: BaseException) -> bool:
    """An out-of-memory error of any array library, known by its class name (CuPy's
    ``cupy.cuda.memory.OutOfMemoryError``, ``torch.OutOfMemoryError``) or a MemoryError."""
    return isinstance(exc, MemoryError) or any(c.__name__ == "OutOfMemoryError" for c in type(exc).__mro__)


def out_of_memory_message(exc: BaseException, batch_size: int | None, option: str = "--batch-size") -> str:
    """``out of GPU memory at --batch-size 1000 (<the library's message>): try a smaller
    --batch-size, e.g. --batch-size 500``."""
    where = "GPU memory" if any(c.__name__ == "OutOfMemoryError" for c in type(exc).__mro__) else "memory"
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if batch_size is None:
        return f"out of {where} ({detail})"
    smaller = max(1, int(batch_size) // 2)
    hint = f"try a smaller {option}, e.g. {option} {smaller}" if batch_size > 1 else "the model does not fit even one sample"
    return f"out of {where} at {option} {batch_size} ({detail}): {hint}"


# --------------------------------------------------------------------------- parser


def _number_type(convert, ok, wanted: str, name: str, doc: str, echo_text: bool = False):
    """An argparse type: ``convert(text)`` that must pass ``ok``; either failure is the
    one-line "expected <wanted>, got ..." (the value as parsed, or the text when
    ``echo_text``)."""

    def parse(text: str):
        try:
            v = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text if echo_text else v}")
        return v

    parse.__name__ = parse.__qualname__ = name
    parse.__doc__ = doc
    return parse


positive_int = _number_type(int, lambda v: v >= 1, "a positive integer", "positive_int",
                            "argparse type: an integer >= 1 (also the benchmarks' options).")
positive_float = _number_type(float, lambda v: v > 0 and math.isfinite(v), "a positive number", "positive_float",
                              "argparse type: a finite number > 0.", echo_text=True)
nonnegative_int = _number_type(int, lambda v: v >= 0, "an integer >= 0", "nonnegative_int",
                               "argparse type: an integer >= 0 (e.g. a seed).")
_fraction = _number_type(float, lambda v: 0 <= v < 1, "a fraction from 0 up to (not including) 1", "fraction",
                         "argparse type: a number in [0, 1).", echo_text=True)
_nonnegative_float = _number_type(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0", "nonnegative_float",
                                  "argparse type: a finite number >= 0.", echo_text=True)
_shift = _number_type(int, lambda v: v >= 0, "a number of pixels >= 0", "shift", "argparse type: pixels >= 0.")


def _setting_type(key: str, convert=int):
    """An argparse type for the run setting ``key``, by the rule a --config file and a
    checkpoint's run configuration obey (:data:`xpconv.settings.RULES`)."""
    test, expected = RULES[key]

    def parse(text: str):
        try:
            v = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {short(text)}") from None
        if not test(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text if len(text) <= 40 else text[:37] + '...'}")
        return v

    parse.__name__ = parse.__qualname__ = f"{key}_setting"
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse with errors in one line: ``xpconv train: error: argument --seed: expected
    an integer >= 0, got -1 (see xpconv train --help)``, exit status 2."""

    def error(self, message: str):
        _err(f"{message} (see '{self.prog} --help')", prog=self.prog)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = _Parser(
        prog=PROG,
        description="xpconv: the CNN stack of 'Deep Learning from Scratch' on NumPy, CuPy and other Array-API libraries.",
        epilog="Run 'xpconv COMMAND --help' for the options of a command.",
        formatter_class=fmt,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more messages (checkpoint writes, data placement)")
    p.add_argument("-q", "--quiet", action="count", default=0, help="only results and errors: no progress bar, no per-epoch lines")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error instead of one line")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train a network (default: SimpleConvNet on the bundled digits)",
        description=(
            "Train a network and write metrics.json, curves.png, misclassified.png, filters.png and\n"
            "checkpoints (last.safetensors, best.safetensors) into the output folder.\n"
            "Options left out take the --config file's settings, else the recipe of the chosen\n"
            "dataset and model (xpconv.recipes, see README); with --resume they take the\n"
            "checkpoint's settings."
        ),
        formatter_class=fmt,
    )
    t.add_argument("--config", metavar="FILE.toml", default=None,
                   help="a recipe file (TOML; see xpconv.recipes): its settings replace the built-in recipe's, "
                        "options given here replace the file's")
    t.add_argument("--model", choices=MODELS, default=None,
                   help="network: 'simple' = conv-relu-pool-affine(100)-relu-affine (the book's SimpleConvNet), "
                        "'deep' = the book's DeepConvNet (6 conv layers, dropout), 'mlp' = TwoLayerNet (default: simple)")
    t.add_argument("--dataset", choices=DATASET_NAMES, default=None,
                   help="'digits' = bundled UCI 8x8 digits (offline, fixed seeded 80/20 split); 'mnist' and "
                        "'fashion-mnist' = 28x28 IDX files, downloaded when missing (default: digits)")
    t.add_argument("--data-dir", metavar="DIR", default=None,
                   help="folder holding the MNIST/Fashion-MNIST .gz files (default: $XPCONV_DATA_DIR/<dataset> or the "
                        "per-user cache); with only the t10k files the 10,000 test images are split 8,000/2,000")
    t.add_argument("--no-download", action="store_true", help="never download missing dataset files")
    t.add_argument("--download", action="store_true",
                   help="download missing dataset files into --data-dir too (by default only the cache folder is written)")
    # your own data (xpconv.folders): a folder of class subfolders or a .npz file
    t.add_argument("--data", metavar="DIR|FILE.npz", default=None,
                   help="train on your own data: a folder with one subfolder of images (PNG/JPEG/.npy) per class "
                        "(DIR/train and DIR/test when both exist, else a seeded 80/20 split), or a .npz file with "
                        "x_train, t_train, x_test, t_test; instead of --dataset")
    t.add_argument("--input-size", metavar="N|HxW", default=None,
                   help="with --data DIR: resize the images to N x N or H x W (default: the size most images have)")
    t.add_argument("--epochs", type=_setting_type("epochs"), default=None, help="number of epochs in total (with --resume: including those done)")
    t.add_argument("--batch-size", type=_setting_type("batch_size"), default=None, help="samples per mini-batch")
    t.add_argument("--optimizer", choices=OPTIMIZER_NAMES, type=str.lower, default=None, help="update rule")
    t.add_argument("--lr", type=_setting_type("lr", float), default=None,
                   help="learning rate (default: the recipe's, or for another optimizer: "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    t.add_argument("--seed", type=_setting_type("seed"), default=None, help="seed of the initial weights, the sample order and dropout (default: 0)")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="'cpu' = NumPy, 'cuda' = CuPy on the GPU, 'auto' = CUDA when it really works, else CPU (default: auto)")
    t.add_argument("--dtype", choices=("float32", "float64"), default=None, help="floating-point type of weights and data (default: float32)")
    t.add_argument("--out", metavar="DIR", default=None, help="output folder (default: runs/<timestamp>; with --resume: the checkpoint's folder)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its checkpoints, metrics and figures); without it a folder "
                        "holding a run is refused")
    t.add_argument("--resume", metavar="CKPT", default=None,
                   help="continue from a checkpoint (last.safetensors) at its next epoch, with its optimizer state; "
                        "with the same settings this repeats an uninterrupted run exactly")
    t.add_argument("--no-plots", action="store_true", help="do not draw the PNG figures")
    # also after the command (default SUPPRESS: an absent flag keeps the top-level value)
    t.add_argument("--quiet", "-q", action="count", default=argparse.SUPPRESS, help="no progress bar and no per-epoch lines; only the result")
    t.add_argument("--verbose", "-v", action="count", default=argparse.SUPPRESS, help="more messages (checkpoint writes, data placement)")
    t.add_argument("--distributed", action="store_true",
                   help="data-parallel training over MPI/NCCL (launch with mpiexec -n K); needs xpconv.distributed and mpi4py")
    # model selection, schedules, augmentation, stopping (see README: "Training options")
    t.add_argument("--val-split", type=_fraction, default=None, metavar="F",
                   help="hold out this fraction of the training set, drawn by --seed, for validation: best.safetensors "
                        "is the best validation epoch and its test accuracy is reported (default: 0.1; 0 = the book's "
                        "way, the best test epoch)")
    t.add_argument("--lr-schedule", choices=LR_SCHEDULES, type=str.lower, default=None,
                   help="learning rate per epoch: constant, step (x0.1 every third of the epochs) or cosine (down "
                        "towards 0) (default: the recipe's, constant)")
    t.add_argument("--warmup-epochs", type=nonnegative_int, default=None, metavar="N",
                   help="raise the learning rate linearly over the first N epochs before the schedule (default: 0)")
    t.add_argument("--augment", type=_shift, nargs="?", const=True, default=None, metavar="K",
                   help="translate each training image by up to K pixels (random, seeded by --seed); without K: "
                        "2 for 28x28 images, 1 for 8x8; 0 = off (default: the recipe's, off)")
    t.add_argument("--early-stop", type=positive_int, default=None, metavar="N",
                   help="stop after N epochs without a better validation accuracy (needs --val-split > 0)")
    t.add_argument("--weight-decay", type=_nonnegative_float, default=None, metavar="W",
                   help="the optimizer's weight decay: W * parameter added to every gradient (default: 0)")

    e = sub.add_parser("eval", help="accuracy of a checkpoint on a dataset's test set",
                       description="Evaluate a checkpoint on the test set of the dataset it was trained on (or --dataset).")
    e.add_argument("checkpoint", metavar="CKPT", help="a .safetensors checkpoint or params file written by xpconv")
    e.add_argument("--dataset", choices=DATASET_NAMES, default=None, help="dataset (default: the one the checkpoint was trained on)")
    e.add_argument("--data-dir", metavar="DIR", default=None, help="folder holding the MNIST/Fashion-MNIST files")
    e.add_argument("--no-download", action="store_true", help="never download missing dataset files")
    e.add_argument("--download", action="store_true",
                   help="download missing dataset files into --data-dir too (by default only the cache folder is written)")
    e.add_argument("--data", metavar="DIR|FILE.npz", default=None,
                   help="your own data (as for train --data): the test part of the folder or .npz file")
    e.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to compute (default: auto)")
    e.add_argument("--batch-size", type=_setting_type("batch_size"), default=500, help="samples per evaluation chunk (default: 500)")

    pr = sub.add_parser(
        "predict",
        help="classify images (PNG or .npy) with a checkpoint",
        description=(
            "Print the predicted class and its probability for each image.\n"
            "PNG/JPEG/...: read with Pillow, converted to grey, resized to the model's input size and\n"
            "scaled to [0, 1]; an image with a light background (dark ink) is inverted to match the\n"
            "training data (light ink on dark). .npy: (H, W), (C, H, W) or (N, C, H, W) arrays, used as\n"
            "they are (uint8 is divided by 255), already in the training data's scale."
        ),
        formatter_class=fmt,
    )
    pr.add_argument("checkpoint", metavar="CKPT", help="a .safetensors checkpoint or params file written by xpconv")
    pr.add_argument("files", metavar="FILE", nargs="+", help="image files (.png, .jpg, ...) or .npy arrays")
    pr.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="where to compute (default: cpu)")
    pr.add_argument("--top", type=positive_int, default=1, help="show the K most probable classes (default: 1)")

    i = sub.add_parser("info", help="versions, namespaces and CUDA status (xpconv.info)",
                       description="Report versions, usable array namespaces, CUDA devices (or why none is usable), "
                                   "NumPy's BLAS and what --device auto picks. Exits with 0 either way.")
    i.add_argument("--json", action="store_true", help="print the report as one JSON object")

    sv = sub.add_parser(
        "serve",
        help="a local web page: draw a digit for a checkpoint, watch runs' curves (needs xpconv[serve])",
        description=(
            "Serve http://HOST:PORT/: a canvas to draw a digit on, with the checkpoint's class\n"
            "probabilities and first-layer feature maps, and /runs: the learning curves of the runs\n"
            "under --runs, updating while they train; and a JSON API (/api/predict, /api/runs).\n"
            "Binds 127.0.0.1 unless --host names another address. Needs: pip install 'xpconv[serve]'."
        ),
        formatter_class=fmt,
    )
    sv.add_argument("checkpoint", metavar="CKPT", nargs="?", default=None,
                    help="a .safetensors checkpoint for the drawing page and /api/predict (without it only /runs works)")
    sv.add_argument("--runs", metavar="DIR", default="runs", help="folder holding the runs shown on /runs (default: runs)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    sv.add_argument("--port", type=positive_int, default=8000, help="port to listen on (default: 8000)")

    for sp in (t, e, pr, sv):  # --debug also after the command
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the Python traceback of an error")
    return p


# --------------------------------------------------------------------------- helpers


def printable(text: Any) -> str:
    """``text`` with every control or non-printable character (terminal escape
    sequences, newlines) written as a Python escape (``\\x1b``), so that a string from a
    file prints as one harmless line."""
    text = " ".join(part.strip() for part in str(text).splitlines() if part.strip()) if "\n" in str(text) else str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _err(message: str, prog: str = PROG) -> None:
    sys.stderr.write(f"{printable(prog)}: error: {printable(message)}\n")
    sys.stderr.flush()


def _note(message: str) -> None:
    sys.stderr.write(f"{PROG}: note: {printable(message)}\n")
    sys.stderr.flush()


@contextlib.contextmanager
def _one_line_warnings():
    """Show warnings as ``xpconv: warning: ...`` lines (no file names and source lines)."""
    old = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(f"{PROG}: warning: {message}\n")

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = old


def _console_logging(args):
    """The ``xpconv`` logger's messages on the console (INFO lines on stdout, the rest on
    stderr) at the level -q/-v ask for: WARNING, INFO (default) or DEBUG."""
    from .training.console import console_logging

    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    return console_logging(level, propagate=False)


def _user_errors() -> tuple[type[BaseException], ...]:
    from .backend import BackendUnavailable
    from .checkpoint import CheckpointError
    from .training import TrainingDiverged

    errs: list[type[BaseException]] = [UserError, ValueError, CheckpointError, BackendUnavailable, TrainingDiverged, OSError]
    try:
        from .datasets import DatasetError

        errs.append(DatasetError)
    except ImportError:
        pass
    return tuple(errs)


def _download_choice(args) -> bool | None:
    """--no-download: never; --download: also into --data-dir; neither: only into the cache."""
    if args.no_download and args.download:
        raise UserError("--download and --no-download exclude each other")
    return False if args.no_download else (True if args.download else None)


def _load_data(dataset: str, data_dir, download: bool | None):
    from .datasets import load_dataset

    return load_dataset(dataset, data_dir=data_dir, download=download, seed=0)


# --------------------------------------------------------------------------- your own data (--data)


def _check_data_dir(args, dataset: str | None) -> None:
    """--data-dir names where MNIST/Fashion-MNIST files are: with digits (bundled) or with
    --data it would be ignored, so it is refused."""
    if args.data_dir is None:
        return
    if getattr(args, "data", None):
        raise UserError(f"--data-dir {args.data_dir} is for the MNIST/Fashion-MNIST files; with --data the data come "
                        f"from {args.data}: leave --data-dir out")
    if dataset == "digits":
        raise UserError(f"--data-dir {args.data_dir}: the digits dataset is bundled and reads no folder; pass "
                        f"--dataset mnist or --dataset fashion-mnist to read IDX files there, or --data "
                        f"{args.data_dir} for a folder of your own images (one subfolder per class)")


def _read_own_data(source, input_size, channels=None, seed: int = 0):
    from .folders import load_data

    try:
        return load_data(source, input_size=input_size, channels=channels, seed=seed)
    except ValueError as exc:  # DatasetError included: one line naming the file
        raise UserError(str(exc)) from None


def _own_data(args):
    """--data DIR|FILE.npz read (kept on ``args.own_data``), or None without --data."""
    data = getattr(args, "data", None)
    if data is None:
        if getattr(args, "input_size", None) is not None:
            raise UserError("--input-size resizes the images of --data DIR; without --data it has nothing to do")
        _check_data_dir(args, args.dataset or "digits")
        return None
    if args.dataset is not None:
        raise UserError(f"--data {data} and --dataset {args.dataset} exclude each other: pass one")
    _check_data_dir(args, None)
    args.own_data = _read_own_data(data, args.input_size, seed=0)
    return args.own_data


def _own_data_resumed(args, cfg: dict) -> None:
    """A run trained on --data resumes on the same data, named again (a checkpoint never
    chooses where data is read); its classes and image size must match."""
    if not cfg.get("data"):
        if getattr(args, "data", None):
            raise UserError(f"--data {args.data}: {args.resume} was trained on {cfg.get('dataset')}; leave --data out")
        _check_data_dir(args, cfg.get("dataset"))
        return
    if not getattr(args, "data", None):
        raise UserError(f"{args.resume} was trained on your own data ({cfg['data']}); pass --data again to resume")
    _check_data_dir(args, None)
    dim = cfg.get("input_dim") or [1, 1, 1]
    own = _read_own_data(args.data, None if str(args.data).lower().endswith(".npz") else dim[1:], dim[0],
                         seed=int(cfg.get("split_seed") or 0))
    if list(own.input_dim) != list(dim) or list(own.class_names) != list(cfg.get("class_names") or own.class_names):
        raise UserError(f"--data {args.data}: classes {own.class_names[:10]} of {tuple(own.input_dim)} images; "
                        f"{args.resume} was trained on {(cfg.get('class_names') or [])[:10]} of {tuple(dim)}")
    cfg["data"] = str(args.data)
    args.own_data = own


def _own_data_recipe(model: str, own):
    """Settings for a model on your own data: the MNIST recipe (Adam 0.001, 20 epochs of
    batches of 100, or of all the training images when there are fewer: see
    :func:`_train_settings`), with 3x3 padded filters so that images of any size fit the
    simple model."""
    import dataclasses

    r = recipe("mnist", model)
    config = dict(r.model_config)
    if model == "simple":
        config["conv_param"] = {"filter_num": 30, "filter_size": 3, "pad": 1, "stride": 1}
    return dataclasses.replace(r, model_config=config)


def _own_test_data(args, cfg: dict, input_dim, checkpoint):
    """(x_test, t_test, label) of --data for eval, labels mapped onto the checkpoint's classes."""
    import numpy as np

    dim = list(input_dim) if input_dim is not None else None
    npz = str(args.data).lower().endswith(".npz")
    own = _read_own_data(args.data, None if npz or dim is None else dim[1:], None if dim is None else dim[0],
                         seed=int(cfg.get("split_seed") or 0))
    if dim is not None and list(own.input_dim) != dim:
        raise UserError(f"{checkpoint} takes inputs of shape {tuple(dim)}, but {args.data} holds {tuple(own.input_dim)} images")
    x_test, t_test = own[1]
    names = list(cfg.get("class_names") or [])
    if names and list(own.class_names) != names[: len(own.class_names)]:
        index = {n: i for i, n in enumerate(names)}
        unknown = [n for n in own.class_names if n not in index]
        if unknown:
            raise UserError(f"{args.data}: classes {', '.join(map(repr, unknown[:5]))} are not among {checkpoint}'s "
                            f"classes ({', '.join(map(repr, names[:10]))})")
        t_test = np.asarray([index[n] for n in own.class_names], dtype=np.int64)[t_test]
    return x_test, t_test, str(args.data)


def _default_out() -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / stamp
    k = 1
    while out.exists():
        k += 1
        out = Path("runs") / f"{stamp}-{k}"
    return out


def _dataset_info(name: str) -> dict:
    from .datasets import DATASETS

    return DATASETS[name]


# --------------------------------------------------------------------------- train


def _config_file(args) -> dict:
    """Fill the options left out from ``--config FILE.toml``; returns the file's
    ``[model_config]`` table (empty without a file)."""
    if not args.config:
        return {}
    if args.resume:
        raise UserError("--config with --resume: a resumed run takes the checkpoint's settings; leave --config out")
    data = read_config(args.config, model=args.model)
    for key, value in data.items():
        if key != "model_config" and getattr(args, key) is None:
            setattr(args, key, value)
    return dict(data.get("model_config") or {})


def _train_settings(args) -> tuple[dict, Any]:
    """The run's configuration (a JSON-able dict) and the checkpoint to resume (or None)."""
    ckpt = None
    file_model_config = _config_file(args)
    if args.resume:
        from .checkpoint import load_checkpoint

        device = args.device
        ckpt = load_checkpoint(args.resume, device=device, dtype=args.dtype, require_finite=True)
        old = dict(ckpt.extra.get("config") or {})
        if not old or ckpt.epoch is None or ckpt.optimizer is None:
            raise UserError(f"{args.resume}: not a training checkpoint written by 'xpconv train' (no run configuration); use it with eval/predict")
        check_run_config(old, args.resume, needed=_RESUME_NEEDS)
        for key in ("model", "dataset"):
            given = getattr(args, key)
            if given is not None and given != old[key]:
                raise UserError(f"--{key} {given} does not match the checkpoint's {old[key]!r} ({args.resume})")
        cfg = dict(old)
        for key in ("epochs", "batch_size", "seed"):
            given = getattr(args, key)
            if given is not None and given != cfg.get(key):
                if key != "epochs":
                    _note(f"--{key.replace('_', '-')} {given} differs from the checkpoint's {cfg.get(key)}: the run will not repeat an uninterrupted one")
                cfg[key] = given
        if args.optimizer is not None and args.optimizer != cfg["optimizer"]:
            raise UserError(f"--optimizer {args.optimizer} does not match the checkpoint's {cfg['optimizer']!r}: its state cannot be reused")
        if args.lr is not None and args.lr != cfg["lr"]:
            _note(f"--lr {args.lr:g} replaces the checkpoint's {cfg['lr']:g}")
            cfg["lr"] = args.lr
            ckpt.optimizer.lr = float(args.lr)
        cfg["data_dir"] = args.data_dir  # a checkpoint never chooses where data is read or written
        cfg["dtype"] = args.dtype or cfg.get("dtype", "float32")
        cfg["device"] = args.device
        if ckpt.epoch >= cfg["epochs"]:
            raise UserError(
                f"{args.resume} already has {ckpt.epoch} of {cfg['epochs']} epochs; pass --epochs N with N > {ckpt.epoch} to train further"
            )
        cfg["resumed_from"] = str(args.resume)
        resume_options(cfg, args, ckpt, note=_note)
        _own_data_resumed(args, cfg)
        _check_settings(cfg, args.resume)
        return cfg, ckpt

    own = _own_data(args)
    dataset = args.dataset or "digits"
    model = args.model or "simple"
    r = recipe(dataset, model) if own is None else _own_data_recipe(model, own)
    optimizer = args.optimizer or r.optimizer
    lr = args.lr if args.lr is not None else (r.lr if optimizer == r.optimizer else DEFAULT_LR[optimizer])
    info = _dataset_info(dataset) if own is None else own.info()
    cfg = {
        "model": model,
        "dataset": dataset if own is None else None,
        "data_dir": args.data_dir,
        "model_config": model_config(model, info, merged(r.model_config, file_model_config)),
        "input_dim": list(info["input_dim"]),
        "class_names": list(info.get("class_names") or []),
        "epochs": args.epochs or r.epochs,
        "batch_size": args.batch_size or r.batch_size,
        "optimizer": optimizer,
        "lr": lr,
        "seed": 0 if args.seed is None else args.seed,
        "split_seed": 0,
        "device": args.device,
        "dtype": args.dtype or "float32",
        "xpconv_version": __version__,
    }
    cfg.update(new_run_options(args, r, info))
    if own is not None and args.batch_size is None:  # fewer images than a batch: one batch of all those trained on
        n = int(own[0][0].shape[0])
        cfg["batch_size"] = max(1, min(cfg["batch_size"], n - int(round(cfg["val_split"] * n))))
    if args.config:
        cfg["config_file"] = str(args.config)
    if own is not None:
        cfg["data"] = str(args.data)
    _check_settings(cfg, args.config)
    return cfg, None


def _check_settings(cfg: dict, source: Any) -> None:
    """The run's settings, checked once by the rules a checkpoint is read by
    (:mod:`xpconv.settings`), so the run never writes a checkpoint that eval, predict or
    --resume would refuse; UserError naming the setting (and the file it came from)."""
    where = f"{source}: " if source else ""
    try:
        for key in RULES:
            if cfg.get(key) is not None:
                check_setting(key, cfg[key])
        if "model_config" in cfg:
            itemsize = 8 if cfg.get("dtype") == "float64" else 4
            try:
                check_model_config(cfg["model"], cfg["model_config"], itemsize=itemsize)
            except SettingError as exc:
                raise SettingError(f"model_{exc}" if str(exc).startswith("config") else str(exc)) from None
    except SettingError as exc:
        raise UserError(f"{where}{exc}") from None


def _setup_distributed(args):
    if not args.distributed:
        return None
    try:
        from . import distributed
    except ModuleNotFoundError as exc:
        if exc.name == "xpconv.distributed":
            raise UserError("--distributed is not available in this installation (xpconv.distributed is missing)") from None
        raise
    return distributed.setup(args.device)


def cmd_train(args) -> int:
    from .training import stop_signals

    # SIGTERM/SIGHUP end the run as Ctrl-C does, from the first line on; the run folder's
    # lock is released on the way out
    with stop_signals(), contextlib.ExitStack() as cleanup:
        return _train(args, cleanup)


def _train(args, cleanup: contextlib.ExitStack) -> int:
    from . import backend
    from .models import build_model
    from .optim import get_optimizer
    from .schedules import make_schedule
    from .training import (
        EpochLine,
        ProgressBar,
        Run,
        RunFolderError,
        Trainer,
        claim_run_folder,
        format_seconds,
    )
    from .training.runs import remove_run_files

    cfg, ckpt = _train_settings(args)
    comm = _setup_distributed(args)
    is_root = comm is None or comm.is_root
    say = (lambda *a: print(*a, flush=True)) if is_root else (lambda *a: None)
    log = logging.getLogger("xpconv")
    tell = log.info if is_root else (lambda *a: None)  # the set-up lines; --quiet keeps only the result

    out = Path(args.out) if args.out else (Path(args.resume).parent if ckpt is not None else _default_out())
    lock = None
    if is_root:  # before the data is read: a folder that cannot be used is said at once
        try:
            # an old run that --overwrite replaces is removed only once this one can start
            lock = claim_run_folder(out, resume=args.resume, overwrite=args.overwrite, remove_now=False)
        except RunFolderError as exc:
            raise UserError(str(exc)) from None
        cleanup.callback(lock.release)
    own = getattr(args, "own_data", None)
    if own is not None:
        (x_train, t_train), (x_test, t_test) = own
    else:
        (x_train, t_train), (x_test, t_test) = _load_data(cfg["dataset"], cfg.get("data_dir"), _download_choice(args))
    cfg["train_samples"], cfg["test_samples"] = int(x_train.shape[0]), int(x_test.shape[0])
    device = comm.device if comm is not None else cfg["device"]
    if ckpt is not None:
        net, optimizer, start_epoch, history = ckpt.model, ckpt.optimizer, int(ckpt.epoch), ckpt.metrics
        if comm is not None:
            net.to(device)
    else:
        net = build_model(cfg["model"], cfg["model_config"], device=device, dtype=cfg["dtype"], seed=cfg["seed"])
        optimizer = get_optimizer(cfg["optimizer"], lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        start_epoch, history = 0, []
    cfg["backend"] = backend.namespace_name(net.xp)
    old_ranks = cfg.get("ranks", 1)
    cfg["ranks"] = comm.size if comm is not None else 1
    if ckpt is not None and old_ranks != cfg["ranks"]:
        _note(f"the checkpoint was trained on {old_ranks} rank(s), this run has {cfg['ranks']}: "
              "the global batch is the same, results agree up to rounding")

    if is_root:
        out.mkdir(parents=True, exist_ok=True)
        if lock is not None and lock.replacing:  # the settings are valid, the data read, the model built
            removed = remove_run_files(out)
            logging.getLogger("xpconv").debug(f"--overwrite: removed {', '.join(removed)} of the previous run in {out}")
    n_val = int(round(cfg["val_split"] * cfg["train_samples"]))
    n_batches = (cfg["train_samples"] - n_val) // cfg["batch_size"]
    tell(
        f"{PROG} {__version__}: {type(net).__name__} on {cfg['dataset'] or cfg.get('data')} ({cfg['train_samples'] - n_val:,} train / "
        + (f"{n_val:,} validation / " if n_val else "") + f"{cfg['test_samples']:,} test), {cfg['backend']} {cfg['dtype']}, {type(optimizer).__name__} lr {cfg['lr']:g}, "
        f"{cfg['epochs']} epoch{'s' if cfg['epochs'] != 1 else ''} x {n_batches} batches of {cfg['batch_size']}, seed {cfg['seed']}"
        + (f"; {comm.size} ranks" if comm is not None else "")
    )
    tell(options_line(cfg, n_val))
    if ckpt is not None:
        tell(f"resuming from {args.resume} after epoch {start_epoch}")
    tell(f"writing to {out}")

    trainer = None
    t0 = time.perf_counter()
    try:
        trainer = Trainer(
            net, x_train, t_train, x_test, t_test,
            epochs=cfg["epochs"], mini_batch_size=cfg["batch_size"], optimizer=optimizer, verbose=False,
            seed=cfg["seed"], comm=comm,
            val_split=cfg["val_split"], augment=cfg["augment"], early_stop=cfg["early_stop"],
            lr_schedule=make_schedule(cfg["lr_schedule"], optimizer, cfg["epochs"], warmup_epochs=cfg["warmup_epochs"], base_lr=cfg["lr"]),
            run=Run(out_dir=out if is_root else None, config=cfg, start_epoch=start_epoch, history=history),
            callbacks=[ProgressBar(None if log.isEnabledFor(logging.INFO) else False), EpochLine(summary=False)],
        )
        trainer.train()
    except Exception as exc:
        if not _is_out_of_memory(exc):
            raise
        msg = out_of_memory_message(exc, cfg["batch_size"])
        last = trainer.last_checkpoint if trainer is not None else None
        if last is not None:
            msg += f"; the last good checkpoint {last} is kept"
        raise OutOfMemory(msg) from exc
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP (training.Terminated)
        signame = getattr(exc, "signame", None)
        status = getattr(exc, "exit_status", 130)
        if trainer is None:
            sys.stderr.write(f"{PROG}: interrupted{' by ' + signame if signame else ''} before training started\n")
            return status
        path = trainer.save_interrupted()
        pos = trainer.position
        msg = f"interrupted{' by ' + signame if signame else ''} at epoch {pos['epoch']}, iteration {pos['iteration']}"
        if path is not None:
            msg += f"; saved {path} (mid-epoch weights)"
            if trainer.last_checkpoint is not None:
                msg += f"; resume exactly with --resume {trainer.last_checkpoint}"
        sys.stderr.write(f"{PROG}: {msg}\n")
        return status
    seconds = time.perf_counter() - t0
    if not is_root:
        return 0
    files = ["metrics.json", "last.safetensors"] + (["best.safetensors"] if (out / "best.safetensors").exists() else [])
    if not args.no_plots and trainer.history:
        from .plotting import save_run_plots

        notes = save_run_plots(
            out, net, trainer.history, x_test, t_test,
            train_loss_list=trainer.train_loss_list, first_epoch=start_epoch,
            class_names=cfg.get("class_names") or None, input_dim=cfg.get("input_dim"),
            title=f"{type(net).__name__} on {cfg['dataset'] or Path(str(cfg.get('data'))).name}",
        )
        for name, note in notes.items():
            if note.startswith("not written"):
                _note(f"{name} {note}")
            else:
                files.append(name)
    doc = trainer.metrics()
    m = doc["final"]
    if doc.get("stopped"):
        say(doc["stopped"]["message"])
    if m and "test_acc_of_best" in m:
        say(
            f"test accuracy of best.safetensors {m['test_acc_of_best']:.4f} (epoch {m['best_epoch']}, chosen by its validation "
            f"accuracy {m['best_val_acc']:.4f}) after {m['epoch']} epoch{'s' if m['epoch'] != 1 else ''}, {format_seconds(seconds)}"
        )
    elif m:
        say(
            f"test accuracy {m['test_acc']:.4f} (best {m['best_test_acc']:.4f} at epoch {m['best_epoch']}) "
            f"after {m['epoch']} epoch{'s' if m['epoch'] != 1 else ''}, {format_seconds(seconds)}"
        )
    say(f"results in {out}: {', '.join(files)}")
    return 0


# --------------------------------------------------------------------------- eval / predict


_RUN_CONFIG_KINDS: dict[str, Any] = {
    "model": MODELS,
    "dataset": DATASET_NAMES,
    "optimizer": OPTIMIZER_NAMES,
    "dtype": ("float32", "float64"),
    "epochs": "count",
    "batch_size": "count",
    "ranks": "count",
    "seed": "index",
    "split_seed": "index",
    "lr": "rate",
    "input_dim": "dims",
    "class_names": "names",
    "data_dir": "text",
    "data": "text",
}
_RESUME_NEEDS = ("model", "dataset", "epochs", "batch_size", "optimizer", "lr")


def check_run_config(cfg: Any, path: Any, *, needed: Sequence[str] = ()) -> dict:
    """The run configuration a checkpoint stores (``extra.config``), each known entry
    checked for type and range; raises UserError naming the file and the entry."""
    from ._fileformat import short

    if not isinstance(cfg, dict):
        raise UserError(f"{path}: bad run configuration: extra.config should be an object, got {short(cfg)}")
    for key in needed:
        if key not in cfg:
            raise UserError(f"{path}: bad run configuration: config.{key} is missing")
    for key, kind in _RUN_CONFIG_KINDS.items():
        if key not in cfg or (cfg[key] is None and key in ("data_dir", "data", "class_names", "input_dim", "ranks", "split_seed", "dtype")):
            continue
        if key == "dataset" and cfg[key] is None and cfg.get("data"):
            continue  # trained on --data (your own folder or .npz file)
        v = cfg[key]
        if isinstance(kind, tuple):
            ok, expected = v in kind, "one of " + ", ".join(kind)
        elif kind in ("count", "index", "rate"):  # the rules of the command line and of --config
            test, expected = RULES[key]
            ok = test(v)
        elif kind == "dims":
            ok = isinstance(v, list) and len(v) == 3 and all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 1 << 20 for d in v)
            expected = "[channels, height, width] of positive integers"
        elif kind == "names":
            ok = isinstance(v, list) and len(v) <= 100_000 and all(isinstance(n, str) and len(n) <= 200 for n in v)
            expected = "a list of class names (strings)"
        else:
            ok, expected = isinstance(v, str), "a string"
        if not ok:
            raise UserError(f"{path}: bad run configuration: config.{key} should be {expected}, got {short(v)}")
    return cfg


def _load_for_inference(path: str, device: str, batch_size: int = 500):
    """(checkpoint, run configuration, input image shape or None) of a checkpoint to
    evaluate; the model's ``eval_batch_size`` is lowered, where one sample's arrays are
    large, so that a pass holds at most ``EVAL_CHUNK_VALUES`` values at once. The input
    shape is the model's own: a run configuration's ``input_dim`` must agree with it."""
    from .checkpoint import load_checkpoint
    from .models import MODELS

    ckpt = load_checkpoint(path, device=device, require_finite=True)
    cfg = check_run_config(ckpt.extra.get("config") or {}, path)
    mmeta = ckpt.metadata["model"]
    model_cfg = mmeta.get("config") or {}
    stated = cfg.get("input_dim")
    input_dim = model_cfg.get("input_dim")
    size = model_cfg.get("input_size")
    if input_dim is None and isinstance(size, int) and not isinstance(size, bool) and size > 0:
        if stated is not None and math.prod(stated) == size:
            input_dim = stated
        else:
            side = math.isqrt(size)
            input_dim = [1, side, side] if side * side == size else None
    if stated is not None and input_dim is not None and list(stated) != list(input_dim):
        raise UserError(f"{path}: bad run configuration: config.input_dim {tuple(stated)} does not match the model's "
                        f"input shape {tuple(input_dim)}")
    if mmeta.get("name") in MODELS and ckpt.model is not None:
        ckpt.model.eval_batch_size = eval_chunk(mmeta["name"], model_cfg, batch_size)
    return ckpt, cfg, input_dim


def cmd_eval(args) -> int:
    ckpt, cfg, input_dim = _load_for_inference(args.checkpoint, args.device, args.batch_size)
    if getattr(args, "data", None) or (cfg.get("data") and not args.dataset):
        if not getattr(args, "data", None):
            raise UserError(f"{args.checkpoint} was trained on your own data ({cfg['data']}); pass --data DIR|FILE.npz to evaluate it")
        if args.dataset is not None:
            raise UserError(f"--data {args.data} and --dataset {args.dataset} exclude each other: pass one")
        _check_data_dir(args, None)
        x_test, t_test, dataset = _own_test_data(args, cfg, input_dim, args.checkpoint)
        return _report_eval(args, ckpt, x_test, t_test, dataset)
    dataset = args.dataset or cfg.get("dataset")
    _check_data_dir(args, dataset)
    if dataset is None:
        raise UserError(f"{args.checkpoint} does not say which dataset it was trained on; pass --dataset")
    info = _dataset_info(dataset)
    if input_dim is not None and list(input_dim) != list(info["input_dim"]):
        raise UserError(f"{args.checkpoint} takes inputs of shape {tuple(input_dim)}, but {dataset} images are {tuple(info['input_dim'])}")
    # the data are read from --data-dir or the default folders: a checkpoint never chooses
    # where data is read or written (its stored data_dir is not used)
    _, (x_test, t_test) = _load_data(dataset, args.data_dir, _download_choice(args))
    return _report_eval(args, ckpt, x_test, t_test, dataset)


def _report_eval(args, ckpt, x_test, t_test, dataset: str) -> int:
    t0 = time.perf_counter()
    acc = ckpt.model.accuracy(x_test, t_test, batch_size=min(args.batch_size, ckpt.model.eval_batch_size))
    n = int(x_test.shape[0])
    epoch = f", epoch {ckpt.epoch}" if ckpt.epoch is not None else ""
    print(f"{printable(args.checkpoint)} ({type(ckpt.model).__name__}{epoch}) on {printable(dataset)} test set: "
          f"accuracy {acc:.4f} ({round(acc * n):,} of {n:,}) in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_predict(args) -> int:
    import numpy as np

    from .backend import to_numpy
    from .images import read_image
    from .ops import softmax

    ckpt, cfg, input_dim = _load_for_inference(args.checkpoint, args.device)
    if input_dim is None:
        raise UserError(f"{args.checkpoint}: cannot tell the model's input image size")
    names = cfg.get("class_names") or None
    labels: list[str] = []
    images = []
    notes_of: dict[str, list[str]] = {}
    for path in args.files:
        items, notes = read_image(path, input_dim)
        if not items:  # e.g. a .npy of shape (0, 1, 8, 8): nothing to classify is said, not skipped
            raise UserError(f"{path}: holds no image to classify (an empty array)")
        for label, a in items:
            labels.append(label)
            images.append(a)
            notes_of[label] = notes
    x = np.stack(images).astype(np.float32)
    p = to_numpy(softmax(ckpt.model.predict(x)))  # predict streams through eval_batch_size chunks
    k = min(args.top, p.shape[1])
    for label, row in zip(labels, p):
        order = np.argsort(-row)[:k]
        parts = []
        for c in order:
            name = printable(names[c]) if names and c < len(names) else str(int(c))
            parts.append(f"{name} ({row[c]:.3f})" if k > 1 else f"class {name} (probability {row[c]:.3f})")
        note = f"  [{'; '.join(notes_of[label])}]" if notes_of.get(label) else ""
        print(f"{printable(label)}: {', '.join(parts)}{note}")
    return 0


def cmd_serve(args) -> int:
    missing = []
    for name in ("starlette", "uvicorn", "python_multipart"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"'xpconv serve' needs {', '.join(missing)}: pip install 'xpconv[serve]'")
    from .serve.app import Loaded, create_app, run, warm_up

    loaded = None
    if args.checkpoint is not None:
        ckpt, cfg, input_dim = _load_for_inference(args.checkpoint, "cpu")
        if input_dim is None or len(input_dim) != 3:
            raise UserError(f"{args.checkpoint}: cannot tell the model's input image size")
        C, H, W = (int(v) for v in input_dim)
        loaded = Loaded(str(args.checkpoint), ckpt.model, (C, H, W), cfg.get("class_names") or None, cfg.get("dataset"))
    if args.port > 65535:
        raise UserError(f"--port: expected a port number 1..65535, got {args.port}")
    app = create_app(loaded, args.runs)
    warm_up(app)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        sys.stderr.write(f"{PROG}: warning: listening on {printable(args.host)}: anyone who can reach it there can use "
                         "the model and read the runs' metrics (no login, no TLS)\n")
    print(f"xpconv serve: http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}/ "
          f"(runs from {printable(args.runs)}; Ctrl-C stops)", flush=True)
    run(app, args.host, args.port)
    return 0


# --------------------------------------------------------------------------- info


def cmd_info(args) -> int:
    from .info import print_report

    return print_report(as_json=args.json)


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "info":
        return cmd_info(args)
    handler = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "serve": cmd_serve}[args.command]
    with _one_line_warnings(), _console_logging(args):
        try:
            return handler(args)
        except KeyboardInterrupt as exc:  # SIGTERM/SIGHUP in train come as training.Terminated
            if getattr(args, "debug", False):
                raise
            signame = getattr(exc, "signame", None)
            sys.stderr.write(f"{PROG}: interrupted{' by ' + signame if signame else ''}\n")
            return int(getattr(exc, "exit_status", 130))
        except Exception as exc:
            if getattr(args, "debug", False):
                raise
            return _handle(exc, args)


def _handle(exc: Exception, args) -> int:
    """The one line (and exit status) for an error: 2 for what the user can fix, 1 for
    running out of memory and for anything unforeseen (never a traceback: ``--debug``
    shows it)."""
    batch_size = getattr(args, "batch_size", None)
    if isinstance(exc, OutOfMemory):
        return _fail(str(exc), 1)
    if _is_out_of_memory(exc):  # e.g. eval's chunks on a full GPU
        return _fail(out_of_memory_message(exc, batch_size), 1)
    if isinstance(exc, _user_errors()):
        return _fail(str(exc) or type(exc).__name__, 2)
    detail = (str(exc).strip().splitlines() or [""])[0][:200]
    return _fail(f"internal error: {type(exc).__name__}: {detail} (rerun with --debug for the traceback)", 1)


def _fail(message: str, code: int) -> int:
    """Print ``xpconv: error: message``; in a multi-rank job end every rank (an error
    that only this rank met would leave the others waiting in a collective forever, and
    a normal exit waits for them in MPI_Finalize)."""
    _err(message)
    dist = sys.modules.get("xpconv.distributed")
    comm = dist.current() if dist is not None and hasattr(dist, "current") else None
    if comm is not None and comm.size > 1:
        comm.abort(code, message)
    return code


if __name__ == "__main__":
    sys.exit(main())
