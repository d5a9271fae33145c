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
    FORMAT,
    FORMAT_VERSION,
    MODEL_PREFIX,
    OPTIM_PREFIX,
    SUFFIX,
    CheckpointError,
    jsonable,
    model_arrays,
    read_file,
    write_file,
)
from ._io import atomic_write as atomic_write  # alias kept for modules that import it from here

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


def load_checkpoint(path: str | os.PathLike[str], *, xp=None, device=None, dtype=None, model=None) -> Checkpoint:
    """Read a checkpoint (or a params file) and rebuild what it describes.

    The model is rebuilt by :func:`xpconv.models.model_from_checkpoint` in namespace
    ``xp`` (a name or module) or on ``device`` ('cpu', 'cuda', 'auto'); NumPy when
    neither is given. ``dtype`` overrides the stored one. Pass ``model=`` to load the
    weights into a model you built yourself (needed for a custom ``Sequential``). The
    optimizer, when the file has one, is rebuilt with its hyper-parameters, step count
    and slots.
    """
    path = Path(path)
    tensors, meta = read_file(path)
    if not meta:
        raise CheckpointError(f"{path}: a safetensors file without xpconv metadata; use load_params() for bare weights")
    try:
        model = models.model_from_checkpoint(meta["model"], model_arrays(tensors, meta), xp=xp, device=device, dtype=dtype, model=model)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc

    opt = None
    ometa = meta.get("optimizer")
    if ometa:
        try:
            opt = optim.get_optimizer(ometa["type"].lower(), **ometa.get("hyper", {}))
            slots = {
                slot: {key: tensors[f"{OPTIM_PREFIX}{slot}/{key}"] for key in keys} for slot, keys in ometa.get("slots", {}).items()
            }
            opt.load_state_dict({"type": ometa["type"], "iter": ometa.get("iter", 0), "slots": slots})
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot restore the optimizer state: {exc!r}") from exc
    return Checkpoint(
        path=path,
        model=model,
        optimizer=opt,
        epoch=meta.get("epoch"),
        metrics=list(meta.get("metrics") or []),
        extra=dict(meta.get("extra") or {}),
        metadata=meta,
    )
