"""Checkpoints and parameter files that cannot execute code on load.

One file per checkpoint, in the `safetensors <https://github.com/huggingface/safetensors>`_
format (the layout and the metadata schema are in :mod:`xpconv._fileformat`): the model's
arrays, the optimizer's slots, and a JSON document with the model's name and config, the
optimizer's hyper-parameters and step count, the epoch, the metrics so far and anything
JSON the caller adds. Files are written atomically (:func:`xpconv._io.atomic_write`), so a
crash mid-save leaves the previous file intact. Reading refuses pickles with
:class:`CheckpointError`: unpickling can run arbitrary code.

This module turns objects into files and back: the format itself lives in
``_fileformat`` (which ``models`` uses for ``save_params``/``load_params``), and the
model is rebuilt by :func:`xpconv.models.model_from_checkpoint`. It imports the core
(models, optim); the core never imports it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import models, optim
from ._fileformat import (
    FLOAT_DTYPES,
    FORMAT,
    FORMAT_VERSION,
    MODEL_PREFIX,
    OPTIM_PREFIX,
    SUFFIX,
    CheckpointError,
    jsonable,
    model_arrays,
    nonfinite,
    open_file,
    read_file,
    write_file,
)
from ._io import atomic_write as atomic_write  # alias kept for modules that import it from here
from .settings import check_work

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SUFFIX",
    "Checkpoint",
    "CheckpointError",
    "load_checkpoint",
    "load_params",
    "read_checkpoint",
    "save_checkpoint",
    "save_params",
]


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, metadata) of a safetensors file, validated; never executes code.

    ``metadata`` is the decoded ``xpconv`` document (format version 1 or 2; a version-1
    document comes without its unused ``rng`` field), or ``{}`` for a plain safetensors
    file written by another tool. Raises CheckpointError naming the file otherwise.
    """
    return read_file(path)


def save_params(model: models.Sequential, path: str | os.PathLike[str]) -> Path:
    """Write the model's parameters (host copies) and its name/config to ``path``."""
    return model.save_params(path)


def load_params(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The model parameters in a file written by ``save_params`` or ``save_checkpoint``
    (or a plain safetensors file of named arrays), as host NumPy arrays keyed W1, b1, ..."""
    return model_arrays(*read_file(path))


def save_checkpoint(
    path: str | os.PathLike[str],
    model: models.Sequential,
    optimizer: optim.Optimizer | None = None,
    *,
    epoch: int | None = None,
    metrics: list | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a training checkpoint atomically and return its path.

    ``epoch``: epochs completed; ``optimizer``: an ``xpconv.optim`` optimizer (its
    hyper-parameters, step count and slot arrays are stored); ``metrics``: the per-epoch
    records so far; ``extra``: any JSON-serializable dict (e.g. the run's configuration).
    """
    tensors: dict[str, Any] = {MODEL_PREFIX + k: v for k, v in model.state_arrays().items()}
    opt_meta = None
    if optimizer is not None:
        sd = optimizer.state_dict()
        opt_meta = {"type": sd["type"], "hyper": jsonable(sd["hyper"]), "iter": int(sd["iter"]), "slots": {}}
        for slot, values in sd["slots"].items():
            opt_meta["slots"][slot] = sorted(values)
            for key, arr in values.items():
                tensors[f"{OPTIM_PREFIX}{slot}/{key}"] = arr
    document = {
        "kind": "checkpoint",
        "model": models.model_meta(model),
        "epoch": None if epoch is None else int(epoch),
        "optimizer": opt_meta,
        "metrics": list(metrics or []),
        "extra": dict(extra or {}),
    }
    return write_file(path, tensors, document)


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns."""

    path: Path
    model: Any  # an xpconv.models.Sequential
    optimizer: Any  # an xpconv.optim optimizer with its state, or None
    epoch: int | None
    metrics: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.metadata["model"]["name"]


def load_checkpoint(
    path: str | os.PathLike[str], *, xp=None, device=None, dtype=None, model=None, require_finite: bool = False
) -> Checkpoint:
    """Read a checkpoint (or a params file) and rebuild what it describes.

    The model is rebuilt by :func:`xpconv.models.model_from_checkpoint` in namespace
    ``xp`` (a name or module) or on ``device`` ('cpu', 'cuda', 'auto'); NumPy when
    neither is given. ``dtype`` overrides the stored one. Pass ``model=`` to load the
    weights into a model you built yourself (needed for a custom ``Sequential``). The
    optimizer, when the file has one, is rebuilt with its hyper-parameters, step count
    and slots.

    Nothing is allocated before the file is checked: the header (bounded), the
    metadata's schema, the shapes the stored config implies against the stored
    tensors' shapes and dtypes (computed by arithmetic, see
    :func:`xpconv.models.param_shapes`), and the work per sample that config asks for
    (:func:`xpconv.settings.check_work`: a huge input size or pad is refused). Tensors are then read memory-mapped.
    ``require_finite``: refuse weights holding NaN or inf, naming the tensor. Raises
    :class:`CheckpointError` naming the file, what was expected and what came.
    """
    path = Path(path)
    stored = open_file(path)
    meta = stored.meta
    if not meta:
        raise CheckpointError(f"{path}: a safetensors file without xpconv metadata; use load_params() for bare weights")
    index = models.stored_model_index(stored)
    try:
        if model is None:
            mmeta = meta["model"]
            if mmeta["name"] not in models.MODELS:
                raise ValueError(
                    f"model {mmeta['name']!r} cannot be rebuilt from its config (known: {', '.join(models.MODELS)}); "
                    "build it yourself and pass model=..."
                )
            try:
                expected = models.param_shapes(mmeta["name"], mmeta.get("config") or {})
                # the work the stored settings ask for (input size, pad, stride), before any allocation
                check_work(mmeta["name"], mmeta.get("config") or {})
            except ValueError as exc:
                raise ValueError(f"bad stored config of model {mmeta['name']!r}: {exc}") from None
        else:
            expected = model.expected_arrays()
        keys = models.check_arrays(expected, index)
        opt, slot_keys = _plan_optimizer(meta.get("optimizer"), expected, stored.index)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    arrays = stored.read(models.stored_keys(stored, keys) + slot_keys)
    if require_finite:
        bad = nonfinite(arrays)
        if bad:
            raise CheckpointError(f"{path}: expected finite weights, got non-finite values in tensor {bad}")
    try:
        model = models.model_from_checkpoint(
            meta["model"], model_arrays({k: arrays[k] for k in arrays if not k.startswith(OPTIM_PREFIX)}, meta),
            xp=xp, device=device, dtype=dtype, model=model,
        )
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    if opt is not None:
        ometa = meta["optimizer"]
        slots = {slot: {key: arrays[f"{OPTIM_PREFIX}{slot}/{key}"] for key in names} for slot, names in ometa.get("slots", {}).items()}
        try:
            opt.load_state_dict({"type": type(opt).__name__, "iter": ometa.get("iter", 0), "slots": slots})
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot restore the optimizer state: {exc}") from exc
    return Checkpoint(
        path=path,
        model=model,
        optimizer=opt,
        epoch=meta.get("epoch"),
        metrics=list(meta.get("metrics") or []),
        extra=dict(meta.get("extra") or {}),
        metadata=meta,
    )


def _plan_optimizer(ometa: Any, expected: Mapping[str, Any], index: Mapping[str, Any]) -> tuple[Any, list[str]]:
    """(the optimizer with its hyper-parameters, the file's slot tensor names) when the
    stored optimizer entry is one xpconv knows and its slots fit the parameters; else
    ValueError saying which part does not."""
    if not ometa:
        return None, []
    kind = ometa["type"]
    if kind.lower() not in optim.OPTIMIZERS:
        raise ValueError(f"optimizer.type should be one of {', '.join(optim.OPTIMIZERS)}, got {kind!r}")
    try:
        opt = optim.get_optimizer(kind.lower(), **ometa.get("hyper", {}))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad stored optimizer.hyper: {exc}") from None
    keys = []
    for slot, names in ometa.get("slots", {}).items():
        if slot not in opt._slots:
            raise ValueError(f"optimizer.slots: {kind} has slots {list(opt._slots)}, got {slot!r}")
        for name in names:
            if name not in expected or not expected[name][1]:
                raise ValueError(f"optimizer slot {slot}/{name}: no such parameter in the model")
            dtype, shape = index[f"{OPTIM_PREFIX}{slot}/{name}"]
            if tuple(shape) != tuple(expected[name][0]) or dtype not in FLOAT_DTYPES:
                raise ValueError(
                    f"optimizer slot {slot}/{name}: expected a float array of shape {tuple(expected[name][0])}, got {dtype} {tuple(shape)}"
                )
            keys.append(f"{OPTIM_PREFIX}{slot}/{name}")
    return opt, keys
