"""Images from files, shaped for a model: what ``xpconv predict`` reads.

* PNG/JPEG/... (anything Pillow opens): converted to grey, resized to the model's
  (H, W) when it differs, scaled to [0, 1]; an image with a light border (dark ink on a
  light background) is inverted to match training data of light ink on dark; the grey
  plane is repeated over C channels.
* ``.npy``: (H, W), (C, H, W) or (N, C, H, W) arrays (a 3-D array whose first axis is not
  C is read as N images of one channel), used as they are (uint8 is divided by 255).
  Read with ``allow_pickle=False``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

__all__ = ["ImageError", "read_image", "read_images"]


class ImageError(ValueError):
    """A file that is not an image or array this model can take (the message names it)."""


def read_image(path: str | Path, input_dim: Sequence[int]) -> tuple[list[tuple[str, np.ndarray]], list[str]]:
    """``([(label, image (C, H, W) float32), ...], notes)`` for one file; a ``.npy`` file
    may hold several images (labels ``file[i]``).  Notes say what was done to the
    picture (resized, inverted)."""
    path = Path(path)
    C, H, W = (int(v) for v in input_dim)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    if path.suffix.lower() == ".npy":
        try:
            a = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ImageError(f"{path}: not a plain .npy array ({exc})") from None
        if a.dtype == np.uint8:
            a = a.astype(np.float32) / 255.0
        a = np.asarray(a, dtype=np.float32)
        if a.ndim == 2:
            a = a[None, None]
        elif a.ndim == 3:
            a = a[None] if a.shape[0] == C else a[:, None]
        if a.ndim != 4 or tuple(a.shape[1:]) != (C, H, W):
            raise ImageError(f"{path}: array of shape {a.shape}; this model takes ({C}, {H}, {W}) images (or (N, {C}, {H}, {W}))")
        return [(f"{path}[{i}]" if a.shape[0] > 1 else str(path), a[i]) for i in range(a.shape[0])], []
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            im = opened.convert("L")
            size = im.size
            if size != (W, H):
                im = im.resize((W, H), Image.Resampling.LANCZOS)
            g = np.asarray(im, dtype=np.float32) / 255.0
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read (and not a .npy file)") from None
    notes = []
    if size != (W, H):
        notes.append(f"resized {size[0]}x{size[1]} -> {W}x{H}")
    border = np.concatenate([g[0], g[-1], g[:, 0], g[:, -1]])
    if border.mean() > 0.5:
        g = 1.0 - g
        notes.append("inverted (light background)")
    return [(str(path), np.repeat(g[None], C, axis=0))], notes


def read_images(paths: Iterable[str | Path], input_dim: Sequence[int]) -> tuple[list[str], np.ndarray, dict[str, list[str]]]:
    """Every image of ``paths``: (labels, batch (N, C, H, W) float32, notes per label)."""
    labels: list[str] = []
    images: list[np.ndarray] = []
    notes_of: dict[str, list[str]] = {}
    for p in paths:
        items, notes = read_image(p, input_dim)
        for label, a in items:
            labels.append(label)
            images.append(a)
            notes_of[label] = notes
    C, H, W = (int(v) for v in input_dim)
    x = np.stack(images).astype(np.float32) if images else np.zeros((0, C, H, W), dtype=np.float32)
    return labels, x, notes_of
