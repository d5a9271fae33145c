"""Training recipes as data: the defaults of ``xpconv train`` per (dataset, model), and
the TOML files that ``xpconv train --config FILE.toml`` reads.

A recipe is a :class:`Recipe` (model constructor settings, optimizer, learning rate,
epochs, batch size).  ``xpconv train`` starts from ``RECIPES[(dataset, model)]``; a
``--config`` file replaces any of its fields, and command-line options replace the file's.
A config file holds the same keys as the command line (``model``, ``dataset``,
``epochs``, ``batch_size``, ``optimizer``, ``lr``, ``seed``, ``dtype``, ``data_dir``,
``val_split``, ``lr_schedule``, ``warmup_epochs``, ``augment``, ``early_stop``,
``weight_decay``) and a
``[model_config]`` table merged over the recipe's constructor settings (key by key, nested
tables too: see :func:`merged`)::

    model = "simple"
    dataset = "digits"
    optimizer = "adam"
    lr = 0.001
    epochs = 5

    [model_config]
    hidden_size = 50
    conv_param = { filter_num = 16, filter_size = 3, pad = 1, stride = 1 }
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "DATASET_NAMES",
    "DEFAULT_LR",
    "MODELS",
    "OPTIMIZER_NAMES",
    "RECIPES",
    "ConfigError",
    "Recipe",
    "merged",
    "model_config",
    "read_config",
    "recipe",
]

MODELS = ("simple", "deep", "mlp")
DATASET_NAMES = ("digits", "mnist", "fashion-mnist")
OPTIMIZER_NAMES = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam")
DTYPES = ("float32", "float64")
LR_SCHEDULES = ("constant", "step", "cosine")

#: learning rate used with an optimizer that is not the recipe's own
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.01, "nesterov": 0.01, "adagrad": 0.05, "rmsprop": 0.001, "adam": 0.001}


@dataclass(frozen=True)
class Recipe:
    """How to train one model on one dataset."""

    optimizer: str
    lr: float
    epochs: int
    batch_size: int
    #: constructor settings of the model (beyond the input shape and the number of classes)
    model_config: Mapping[str, Any] = field(default_factory=dict)
    #: fraction of the training set held out for validation (model selection, early stopping)
    val_split: float = 0.1
    #: learning-rate schedule (xpconv.schedules): constant, step or cosine, after warmup_epochs
    lr_schedule: str = "constant"
    warmup_epochs: int = 0
    #: largest random translation of the training images in pixels (0: none)
    augment: int = 0
    #: the optimizer's weight decay (L2 on every parameter)
    weight_decay: float = 0.0


_BOOK_SIMPLE = Recipe(
    "adam", 0.001, 20, 100,
    {"conv_param": {"filter_num": 30, "filter_size": 5, "pad": 0, "stride": 1}, "hidden_size": 100, "weight_init_std": 0.01},
)

#: Default recipe per (dataset, model). digits/simple is tuned to pass 97% test accuracy with
#: margin on any seed (98.3-99.2% over seeds 0-4) in about a second of training on a 2-core
#: CPU; the MNIST recipes are the book's; Fashion-MNIST takes MNIST's.
RECIPES: dict[tuple[str, str], Recipe] = {
    ("digits", "simple"): Recipe(
        "adagrad", 0.05, 20, 50,
        {"conv_param": {"filter_num": 30, "filter_size": 3, "pad": 1, "stride": 1}, "hidden_size": 100, "weight_init_std": 0.1},
    ),
    ("digits", "deep"): Recipe("adam", 0.001, 30, 50, {"hidden_size": 50}),
    ("digits", "mlp"): Recipe("adagrad", 0.05, 30, 50, {"hidden_size": 100, "weight_init_std": 0.1}),
    ("mnist", "simple"): _BOOK_SIMPLE,
    ("mnist", "deep"): Recipe("adam", 0.001, 20, 100, {"hidden_size": 50}),
    ("mnist", "mlp"): Recipe("adam", 0.001, 20, 100, {"hidden_size": 100, "weight_init_std": 0.01}),
}
for _m in MODELS:
    RECIPES[("fashion-mnist", _m)] = RECIPES[("mnist", _m)]


def recipe(dataset: str, model: str) -> Recipe:
    """The default recipe for a (dataset, model) pair, with its own copy of ``model_config``."""
    try:
        r = RECIPES[(dataset, model)]
    except KeyError:
        raise ValueError(f"no recipe for model {model!r} on dataset {dataset!r}; expected a model of {MODELS} "
                         f"and a dataset of {DATASET_NAMES}") from None
    return replace(r, model_config=copy.deepcopy(dict(r.model_config)))


def merged(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override``'s keys replaced, tables merged key by key (so a config
    file's ``conv_param = { filter_num = 16 }`` keeps the recipe's filter size)."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def model_config(model: str, dataset_info: Mapping[str, Any], recipe_config: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor config of ``model`` for a dataset's image shape and number of classes."""
    C, H, W = (int(v) for v in dataset_info["input_dim"])
    if model == "mlp":
        return {"input_size": C * H * W, "output_size": int(dataset_info["classes"]), **recipe_config}
    return {"input_dim": [C, H, W], "output_size": int(dataset_info["classes"]), **recipe_config}


# --------------------------------------------------------------------------- config files


class ConfigError(ValueError):
    """A --config file that cannot be used (the message names the file)."""


def _choice(options):
    def check(v):
        return isinstance(v, str) and v in options, f"one of {', '.join(options)}"

    return check


def _is_positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer"


def _is_positive_number(v):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v)
    return ok, "a positive number"


def _is_integer(v):
    return isinstance(v, int) and not isinstance(v, bool), "an integer"


def _is_string(v):
    return isinstance(v, str), "a string"


def _is_fraction(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1


def _is_table(v):
    return isinstance(v, dict), "a table"


#: the keys a config file may hold, with their checks
CONFIG_KEYS = {
    "model": _choice(MODELS),
    "dataset": _choice(DATASET_NAMES),
    "epochs": _is_positive_int,
    "batch_size": _is_positive_int,
    "optimizer": _choice(OPTIMIZER_NAMES),
    "lr": _is_positive_number,
    "seed": _is_integer,
    "dtype": _choice(DTYPES),
    "data_dir": _is_string,
    "model_config": _is_table,
    "val_split": lambda v: (_is_fraction(v), "a number from 0 up to (not including) 1"),
    "lr_schedule": _choice(LR_SCHEDULES),
    "warmup_epochs": lambda v: (_is_integer(v)[0] and v >= 0, "an integer >= 0"),
    "augment": lambda v: (isinstance(v, bool) or (_is_integer(v)[0] and v >= 0), "true, false or a number of pixels >= 0"),
    "early_stop": _is_positive_int,
    "weight_decay": lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf, "a number >= 0"),
}


def read_config(path: str | Path) -> dict[str, Any]:
    """The settings of a TOML config file, checked (unknown keys and wrong types raise
    :class:`ConfigError` naming the file, the key, what was expected and what came)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not a valid TOML file ({exc})") from None
    for key, value in data.items():
        check = CONFIG_KEYS.get(key)
        if check is None:
            raise ConfigError(f"{path}: unknown key {key!r}; expected some of {', '.join(CONFIG_KEYS)}")
        ok, want = check(value)
        if not ok:
            raise ConfigError(f"{path}: {key} must be {want}, got {value!r}")
    if "lr" in data:
        data["lr"] = float(data["lr"])
    return data
