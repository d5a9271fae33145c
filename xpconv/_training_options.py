"""The training options of ``xpconv train`` beyond the recipe's basics: validation split,
learning-rate schedule and warm-up, augmentation, early stopping and weight decay.

For a new run they come from the command line, else the recipe (:mod:`xpconv.recipes`);
a resumed run keeps the checkpoint's, and an option given that differs replaces it with a
note.  :mod:`xpconv.cli` calls these; errors are ValueErrors (one line, exit status 2).
"""

from __future__ import annotations

from collections.abc import Callable

from .augment import default_max_shift
from .settings import SettingError, check_setting

__all__ = ["TRAINING_OPTIONS", "check_options", "new_run_options", "options_line", "resume_options"]

TRAINING_OPTIONS = ("val_split", "lr_schedule", "warmup_epochs", "augment", "early_stop", "weight_decay")


def _augment_pixels(value, info) -> int:
    """--augment's pixels: True (the flag alone) is the default for the dataset's image size."""
    if value is True:
        return default_max_shift(int(info["input_dim"][1]), int(info["input_dim"][2]))
    return int(value or 0)


def new_run_options(args, r, info) -> dict:
    """The validation split, schedule, augmentation, early stopping and weight decay of a
    new run: the options given, else the recipe's."""
    def given(key, default):
        value = getattr(args, key, None)
        return default if value is None else value

    return {
        "val_split": float(given("val_split", r.val_split)),
        "lr_schedule": given("lr_schedule", r.lr_schedule),
        "warmup_epochs": int(given("warmup_epochs", r.warmup_epochs)),
        "augment": _augment_pixels(given("augment", r.augment), info),
        "early_stop": getattr(args, "early_stop", None),
        "weight_decay": float(given("weight_decay", r.weight_decay)),
    }


def resume_options(cfg: dict, args, ckpt, *, note: Callable[[str], None]) -> None:
    """A resumed run keeps the checkpoint's training options (a checkpoint written before
    they existed had none of them: no validation split, a constant rate, no augmentation);
    an option given that differs replaces it, with a note when the run will then not repeat
    an uninterrupted one."""
    old = {"val_split": 0.0, "lr_schedule": "constant", "warmup_epochs": 0, "augment": 0, "early_stop": None, "weight_decay": 0.0}
    for key in TRAINING_OPTIONS:
        if key in cfg:
            old[key] = cfg[key]
    check_options(old, args.resume)
    cfg.update(old)
    for key in TRAINING_OPTIONS:
        value = getattr(args, key, None)
        if key == "augment" and value is not None:
            value = _augment_pixels(value, {"input_dim": cfg.get("input_dim") or [1, 28, 28]})
        if value is None or value == cfg[key]:
            continue
        if key != "early_stop":
            note(f"--{key.replace('_', '-')} {value} differs from the checkpoint's {cfg[key]}: the run will not repeat an uninterrupted one")
        cfg[key] = value
        if key == "weight_decay":
            ckpt.optimizer.weight_decay = float(value)


def check_options(cfg: dict, path) -> None:
    """The training options a checkpoint stores, checked by the rules every setting obeys
    (:data:`xpconv.settings.RULES`)."""
    for key in TRAINING_OPTIONS:
        try:
            check_setting(key, cfg[key])
        except SettingError as exc:
            raise ValueError(f"{path}: bad run configuration: config.{exc}") from None


def options_line(cfg: dict, n_val: int) -> str:
    """The set-up line of the validation split, schedule, augmentation and stopping."""
    if n_val:
        parts = [f"best.safetensors: the best validation epoch (--val-split {cfg['val_split']:g}, drawn by the seed)"]
    else:
        parts = ["no validation split (--val-split 0): best.safetensors is the best test epoch, as in the book, so its "
                 "test accuracy is an optimistic estimate"]
    schedule = cfg["lr_schedule"] + (f" after {cfg['warmup_epochs']} warm-up epoch{'s' if cfg['warmup_epochs'] != 1 else ''}"
                                     if cfg["warmup_epochs"] else "")
    parts.append(f"lr schedule {schedule}")
    if cfg["augment"]:
        parts.append(f"random translation by up to {cfg['augment']} pixel{'s' if cfg['augment'] != 1 else ''}")
    if cfg["early_stop"]:
        parts.append(f"early stop after {cfg['early_stop']} epochs without a better validation accuracy")
    if cfg["weight_decay"]:
        parts.append(f"weight decay {cfg['weight_decay']:g}")
    return "; ".join(parts)
