"""Images from files, shaped for a model: what ``xpconv predict`` reads.

* PNG/JPEG/... (anything Pillow opens): converted to grey, resized to the model's
  (H, W) when it differs, scaled to [0, 1]; an image with a light border (dark ink on a
  light background) is inverted to match training data of light ink on dark; the grey
  plane is repeated over C channels.
* ``.npy``: (H, W), (C, H, W) or (N, C, H, W) arrays (a 3-D array whose first axis is not
  C is read as N images of one channel), used as they are (uint8 is divided by 255).
  Read with ``allow_pickle=False``; zip archives (``.npz``), structured dtypes and
  arrays whose header does not match the file's size are refused before reading.

Every file is ``stat``-ed first: a folder, FIFO or device is named for what it is and
never opened. An image's pixel count is read from its header and capped
(:data:`MAX_PIXELS`) before it is decoded.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ._fileformat import short
from ._io import stat_regular

__all__ = ["ImageError", "read_image", "read_images"]


class ImageError(ValueError):
    """A file that is not an image or array this model can take (the message names it)."""


#: the most pixels an image file may declare (checked from its header, before decoding)
MAX_PIXELS = 16_000_000
#: the most values a ``.npy`` file may hold
MAX_NPY_VALUES = 64_000_000


def _check_file(path: Path) -> None:
    """``stat`` first: a folder, FIFO or device is named for what it is, never opened."""
    try:
        stat_regular(path, "image file")
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except ValueError as exc:
        raise ImageError(str(exc)) from None


def _read_npy(path: Path) -> np.ndarray:
    """A plain numeric array from a ``.npy`` file: the header (dtype, shape) is checked
    against the file's size and a value cap before the data is read; pickles, ``.npz``
    archives and structured dtypes are refused."""
    with open(path, "rb") as f:
        head = f.read(6)
        if head[:4] == b"PK\x03\x04":
            raise ImageError(f"{path}: expected a .npy array, got a zip archive (a .npz file?); save one array with numpy.save")
        if head != b"\x93NUMPY":
            raise ImageError(f"{path}: expected a .npy array (starting with \\x93NUMPY), got {short(head)}")
        f.seek(0)
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=10_000)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=10_000)
        except (ValueError, SyntaxError, TypeError) as exc:
            raise ImageError(f"{path}: a damaged .npy header ({short(str(exc), 100)})") from None
        data_start = f.tell()
    if dtype.names is not None or dtype.subdtype is not None:
        raise ImageError(f"{path}: not a plain .npy array: expected integers or floats, got a structured dtype {short(str(dtype), 80)}")
    if dtype.kind not in "uif":
        raise ImageError(f"{path}: not a plain .npy array: expected integers or floats, got dtype {dtype}")
    count = math.prod(shape)
    if count > MAX_NPY_VALUES:
        raise ImageError(f"{path}: an array of shape {shape} ({count:,} values); expected at most {MAX_NPY_VALUES:,}")
    size = path.stat().st_size
    if size - data_start != count * dtype.itemsize:
        raise ImageError(f"{path}: the header promises {count * dtype.itemsize:,} bytes of {dtype} {shape}, the file holds {size - data_start:,} (truncated?)")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ImageError(f"{path}: not a plain .npy array ({short(str(exc), 100)})") from None


def read_image(path: str | Path, input_dim: Sequence[int]) -> tuple[list[tuple[str, np.ndarray]], list[str]]:
    """``([(label, image (C, H, W) float32), ...], notes)`` for one file; a ``.npy`` file
    may hold several images (labels ``file[i]``).  Notes say what was done to the
    picture (resized, inverted)."""
    path = Path(path)
    C, H, W = (int(v) for v in input_dim)
    _check_file(path)
    if path.suffix.lower() == ".npy":
        a = _read_npy(path)
        if a.dtype == np.uint8:
            a = a.astype(np.float32) / 255.0
        a = np.asarray(a, dtype=np.float32)
        if not np.isfinite(a).all():
            raise ImageError(f"{path}: expected finite values, got NaN or inf")
        if a.ndim == 2:
            a = a[None, None]
        elif a.ndim == 3:
            a = a[None] if a.shape[0] == C else a[:, None]
        if a.ndim != 4 or tuple(a.shape[1:]) != (C, H, W):
            raise ImageError(f"{path}: array of shape {a.shape}; this model takes ({C}, {H}, {W}) images (or (N, {C}, {H}, {W}))")
        return [(f"{path}[{i}]" if a.shape[0] > 1 else str(path), a[i]) for i in range(a.shape[0])], []
    from PIL import Image, UnidentifiedImageError

    limit = Image.MAX_IMAGE_PIXELS
    try:
        # Pillow's own bomb check (at open, without the size) is replaced by ours below,
        # which reads the size from the header and refuses before anything is decoded
        Image.MAX_IMAGE_PIXELS = None
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                size = opened.size  # from the header: nothing is decoded yet
                if size[0] * size[1] > MAX_PIXELS:
                    raise ImageError(
                        f"{path}: an image of {size[0]}x{size[1]} pixels; expected at most {MAX_PIXELS:,} pixels (decoding refused)"
                    )
                im = opened.convert("L")
                if size != (W, H):
                    im = im.resize((W, H), Image.Resampling.LANCZOS)
                g = np.asarray(im, dtype=np.float32) / 255.0
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read (and not a .npy file)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{path}: refused as a decompression bomb ({short(str(exc), 120)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"{path}: a damaged or truncated image ({short(str(exc), 120)})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
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
