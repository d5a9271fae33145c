"""Saving and loading parameters without pickle (placeholder format: .npz with
allow_pickle=False, written atomically)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


def save_params(model, path) -> None:
    path = Path(path)
    arrays = model.state_arrays()
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_params(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
