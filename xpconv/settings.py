"""The one set of rules every run setting obeys, wherever it comes from.

``xpconv train``'s options, a ``--config`` TOML recipe and the run configuration a
checkpoint stores (``extra.config``) are checked here by the same rules, before anything
is read, built, written or deleted; so a run never writes a checkpoint that ``eval``,
``predict`` or ``--resume`` would then refuse.

* :data:`RULES`: each scalar setting (``epochs``, ``batch_size``, ``lr``, ``seed``, ...)
  and its range; :func:`check_setting` applies one of them.
* :func:`check_model_config`: a model's constructor settings (``hidden_size``,
  ``conv_param``, ...): known keys only, each of the right type and range, and the model
  they describe bounded for the work it causes (:func:`check_work`) and for the size of
  its checkpoint.
* :func:`check_work`: the values and multiply-adds one sample takes through the model
  (:func:`xpconv.models.sample_work`, computed by arithmetic: nothing is allocated),
  bounded by :data:`MAX_SAMPLE_VALUES` and :data:`MAX_SAMPLE_MACS`; a stored config asking
  for a 20000x20000 input or a pad of 4096 is refused before any allocation.
  :func:`eval_chunk` is the number of samples evaluated at once that keeps one pass's
  largest intermediate array under :data:`EVAL_CHUNK_VALUES` values.

Each check raises :class:`SettingError` (a ``ValueError``) with one line naming the
setting, what was expected and what came; callers put the file or option in front.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from . import _io

__all__ = [
    "EVAL_CHUNK_VALUES",
    "MAX_SAMPLE_MACS",
    "MAX_SAMPLE_VALUES",
    "MODEL_KEYS",
    "RULES",
    "SettingError",
    "check_model_config",
    "check_recipe_model_config",
    "check_setting",
    "check_work",
    "eval_chunk",
]

#: the most values one sample may take in any single array of a forward pass (the padded
#: input, im2col's columns, a layer's output): 2**24 (64 MiB in float32).
#: ``XPCONV_MAX_SAMPLE_VALUES`` raises it for a larger model of your own
MAX_SAMPLE_VALUES = int(os.environ.get("XPCONV_MAX_SAMPLE_VALUES") or 1 << 24)
#: the most multiply-adds one sample's forward pass may take
MAX_SAMPLE_MACS = 256 * MAX_SAMPLE_VALUES
#: eval and predict run at most this many values through any one array at once
EVAL_CHUNK_VALUES = 1 << 25
#: an upper bound of what a run may count: epochs, batch size (as the checkpoint schema)
MAX_COUNT = 10**9
MAX_SEED = 2**63 - 1


def short(value: Any, limit: int = 80) -> str:
    """:func:`xpconv._io.short` with the settings' limit: a setting's value, up to 80 characters."""
    return _io.short(value, limit)


class SettingError(ValueError):
    """A setting out of its rules (one line naming the setting, what was expected and what came)."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _count(v: Any) -> bool:
    return _is_int(v) and 1 <= v <= MAX_COUNT


def _seed(v: Any) -> bool:
    return _is_int(v) and 0 <= v <= MAX_SEED


def _rate(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf


def _choice(options: tuple[str, ...]):
    return lambda v: isinstance(v, str) and v in options


def _string(v: Any) -> bool:
    return isinstance(v, str) and len(v) <= 4096 and "\0" not in v


def _fraction(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1


def _nonnegative(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf


def _whole(limit: int):
    return lambda v: _is_int(v) and 0 <= v <= limit


#: the learning-rate schedules by name (:data:`xpconv.schedules.SCHEDULES` holds their classes)
LR_SCHEDULES = ("constant", "step", "cosine")
#: the largest translation --augment takes, in pixels
MAX_AUGMENT = 1 << 20

#: setting -> (test, what is expected)
RULES: dict[str, tuple[Any, str]] = {
    "epochs": (_count, f"an integer from 1 to {MAX_COUNT:,}"),
    "batch_size": (_count, f"an integer from 1 to {MAX_COUNT:,}"),
    "ranks": (_count, f"an integer from 1 to {MAX_COUNT:,}"),
    "seed": (_seed, "an integer from 0 to 2**63-1"),
    "split_seed": (_seed, "an integer from 0 to 2**63-1"),
    "lr": (_rate, "a finite number > 0"),
    "dtype": (_choice(("float32", "float64")), "one of float32, float64"),
    "data_dir": (_string, "a path (a string)"),
    "val_split": (_fraction, "a number from 0 up to (not including) 1"),
    "lr_schedule": (_choice(LR_SCHEDULES), "one of " + ", ".join(LR_SCHEDULES)),
    "warmup_epochs": (_whole(MAX_COUNT), f"an integer from 0 to {MAX_COUNT:,}"),
    "augment": (_whole(MAX_AUGMENT), f"a number of pixels from 0 to {MAX_AUGMENT:,}"),
    "early_stop": (lambda v: v is None or _count(v), f"null or an integer from 1 to {MAX_COUNT:,}"),
    "weight_decay": (_nonnegative, "a finite number >= 0"),
}


def check_setting(key: str, value: Any) -> Any:
    """``value`` when it obeys the rule of setting ``key``; else :class:`SettingError`."""
    test, expected = RULES[key]
    if not test(value):
        raise SettingError(f"{key} should be {expected}, got {short(value)}")
    return value


# --------------------------------------------------------------------------- model settings

_CONV_KEYS = ("filter_num", "filter_size", "pad", "stride")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _init_std(v: Any) -> bool:
    return _number(v) and v >= 0


def _ratio(v: Any) -> bool:
    return _number(v) and 0 <= v < 1


def _size(v: Any) -> bool:
    """An integer, or an (h, w) pair of them (ranges are param_shapes' to check)."""
    return _is_int(v) or (isinstance(v, list) and 1 <= len(v) <= 2 and all(_is_int(x) for x in v))


def _conv_table(v: Any) -> bool:
    return isinstance(v, Mapping) and all(k in _CONV_KEYS and _size(x) for k, x in v.items())


def _conv_list(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 6 and all(_conv_table(cp) for cp in v)


_CONV = (_conv_table, "a table of " + ", ".join(_CONV_KEYS) + " (integers)")
#: per model: the constructor settings a recipe may give, with their type tests (ranges
#: and the shapes they imply are checked by :func:`xpconv.models.param_shapes`); the
#: input size and the number of classes come from the dataset
MODEL_KEYS: dict[str, dict[str, tuple[Any, str]]] = {
    "simple": {
        "conv_param": _CONV,
        "hidden_size": (_is_int, "an integer"),
        "weight_init_std": (_init_std, "a finite number >= 0"),
    },
    "deep": {
        **{f"conv_param_{i}": _CONV for i in range(1, 7)},
        "conv_params": (_conv_list, "a list of 6 tables of " + ", ".join(_CONV_KEYS)),
        "hidden_size": (_is_int, "an integer"),
        "dropout_ratio": (_ratio, "a number from 0 to below 1"),
    },
    "mlp": {
        "hidden_size": (_is_int, "an integer"),
        "weight_init_std": (_init_std, "a finite number >= 0"),
    },
}
_FROM_DATASET = ("input_dim", "input_size", "output_size")


def check_recipe_model_config(model: str, config: Mapping[str, Any]) -> None:
    """The keys a recipe's ``model_config`` gives for ``model``: known, of the right
    type. Raises :class:`SettingError` naming ``model_config.<key>``."""
    known = MODEL_KEYS.get(model)
    if known is None:
        raise SettingError(f"model should be one of {', '.join(MODEL_KEYS)}, got {short(model)}")
    for key, value in config.items():
        if key in _FROM_DATASET:
            raise SettingError(f"model_config.{key} is set by the dataset, not by a recipe")
        rule = known.get(key)
        if rule is None:
            raise SettingError(f"model_config: unknown key {short(key)} for model {model!r}; expected some of {', '.join(known)}")
        test, expected = rule
        if not test(value):
            raise SettingError(f"model_config.{key} should be {expected}, got {short(value)}")


def check_work(name: str, config: Mapping[str, Any]) -> tuple[int, int]:
    """(values, multiply-adds) one sample takes through the model ``name`` built from
    ``config`` (already checked by :func:`xpconv.models.param_shapes`), when both are
    within :data:`MAX_SAMPLE_VALUES` and :data:`MAX_SAMPLE_MACS`; else
    :class:`SettingError` saying which layer asks for how much."""
    from . import models

    values, macs, where = models.sample_work(name, config)
    if values > MAX_SAMPLE_VALUES:
        raise SettingError(
            f"config: {where} takes {values:,} values per sample; expected at most {MAX_SAMPLE_VALUES:,} "
            "(input size, pad, stride and filter sizes too large; set XPCONV_MAX_SAMPLE_VALUES to allow more)"
        )
    if macs > MAX_SAMPLE_MACS:
        raise SettingError(
            f"config: the model takes {macs:,} multiply-adds per sample; expected at most {MAX_SAMPLE_MACS:,} "
            "(set XPCONV_MAX_SAMPLE_VALUES to allow more)"
        )
    return values, macs


def check_model_config(name: str, config: Mapping[str, Any], *, itemsize: int = 4) -> dict[str, tuple[tuple[int, ...], bool]]:
    """The parameter shapes of the model ``name`` built from the full constructor
    ``config`` (input size and classes included), when every entry is in range
    (:func:`xpconv.models.param_shapes`), the work per sample is bounded
    (:func:`check_work`) and its checkpoint, with an optimizer's two slots per parameter,
    fits the size a checkpoint may have. Raises :class:`SettingError`."""
    from . import models
    from ._fileformat import MAX_FILE_BYTES

    try:
        shapes = models.param_shapes(name, config)
    except ValueError as exc:
        raise SettingError(str(exc)) from None
    n = sum(math.prod(shape) for shape, _ in shapes.values())
    if 3 * n * itemsize > MAX_FILE_BYTES:
        raise SettingError(
            f"config: the model has {n:,} parameters; with an optimizer's state its checkpoint would take "
            f"{3 * n * itemsize:,} bytes, expected at most {MAX_FILE_BYTES:,} (set XPCONV_MAX_CHECKPOINT_BYTES to allow more)"
        )
    check_work(name, config)
    return shapes


def eval_chunk(name: str, config: Mapping[str, Any], batch_size: int) -> int:
    """How many samples to evaluate at once: ``batch_size``, or fewer so that no array of
    one pass holds more than :data:`EVAL_CHUNK_VALUES` values."""
    from . import models

    values, _, _ = models.sample_work(name, config)
    return max(1, min(int(batch_size), EVAL_CHUNK_VALUES // max(values, 1)))
