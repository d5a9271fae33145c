"""Images from files, shaped for a model: what ``xpconv predict`` reads.

* PNG, JPEG, BMP, GIF, TIFF, WebP, PPM/PGM/PBM and ICO (read by Pillow; no other format is
  tried, so no plug-in that runs an outside program, as EPS does, is ever reached):
  converted to grey, resized to the model's (H, W) when it differs, scaled to [0, 1]; an
  image with a light border (dark ink on a light background) is inverted to match
  training data of light ink on dark; the grey plane is repeated over C channels.
* ``.npy``: (H, W), (C, H, W) or (N, C, H, W) arrays (a 3-D array whose first axis is not
  C is read as N images of one channel), used as they are (uint8 is divided by 255).
  Read with ``allow_pickle=False``; zip archives (``.npz``), structured dtypes and
  arrays whose header does not match the file's size are refused before reading.

Every file is ``stat``-ed first: a folder, FIFO or device is named for what it is and
never opened; the file is then opened once and read through that descriptor. An image's
pixel count is read from its header and capped (:data:`MAX_PIXELS`) before it is decoded,
and Pillow's own limit is held at the same cap while decoding, so that every frame a
container format (ICO, TIFF, GIF) decodes is checked too. An image whose data ends early is
refused, never completed with blank rows: Pillow's ``LOAD_TRUNCATED_IMAGES`` is held off
while decoding, and a PNG's compressed data must give every row its header promises.
"""

from __future__ import annotations

import math
import os
import re
import struct
import threading
import warnings
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ._fileformat import short
from ._io import open_regular, span_within

__all__ = ["ImageError", "read_image", "read_images"]


class ImageError(ValueError):
    """A file that is not an image or array this model can take (the message names it)."""


#: the most pixels an image file may declare (checked from its header, before decoding)
MAX_PIXELS = 16_000_000
#: the most values a ``.npy`` file may hold
MAX_NPY_VALUES = 16_000_000
#: the most bytes of data a ``.npy`` file may hold
MAX_NPY_BYTES = 128 * 2**20
#: the image formats Pillow is allowed to read
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM", "ICO")

# Pillow's limits are module globals: one decode at a time sets them
_PILLOW_LOCK = threading.Lock()


def _open(path: Path):
    """The file opened for reading, ``stat``-ed first: a folder, FIFO or device is named for
    what it is, never opened (see :func:`xpconv._io.open_regular`)."""
    try:
        f, _ = open_regular(path, "image file")
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except ValueError as exc:
        raise ImageError(str(exc)) from None
    return f


def _read_npy(path: Path, f) -> np.ndarray:
    """A plain numeric array from a ``.npy`` file: the header (dtype, shape) is checked
    against the file's size and a value cap before the data is read; pickles, ``.npz``
    archives and structured dtypes are refused."""
    head = f.read(6)
    if head[:4] == b"PK\x03\x04":
        raise ImageError(f"{path}: expected a .npy array, got a zip archive (a .npz file?); save one array with numpy.save")
    if head != b"\x93NUMPY":
        raise ImageError(f"{path}: expected a .npy array (starting with \\x93NUMPY), got {short(head)}")
    f.seek(0)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=10_000)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=10_000)
    except Exception as exc:  # NumPy parses at most 10,000 characters of header; any failure (tokenize's too) means damaged
        raise ImageError(f"{path}: a damaged .npy header ({type(exc).__name__}: {short(str(exc), 100)})") from None
    data_start = f.tell()
    if dtype.names is not None or dtype.subdtype is not None:
        raise ImageError(f"{path}: not a plain .npy array: expected integers or floats, got a structured dtype {short(str(dtype), 80)}")
    if dtype.kind not in "uif":
        raise ImageError(f"{path}: not a plain .npy array: expected integers or floats, got dtype {dtype}")
    if any(d < 0 for d in shape):
        raise ImageError(f"{path}: an array of shape {short(shape, 80)}; expected sizes of 0 or more")
    if not span_within(shape, min(MAX_NPY_VALUES, MAX_NPY_BYTES // dtype.itemsize)):  # a size of 0 counts as 1 here
        count_text = f"{math.prod(shape):,} values" if 0 in shape or span_within(shape, 10**18) else "more than 10^18 values"
        raise ImageError(
            f"{path}: an array of shape {short(shape, 80)} and dtype {dtype} ({count_text}); expected at most "
            f"{MAX_NPY_VALUES:,} values and {MAX_NPY_BYTES:,} bytes, even counting a size of 0 as 1"
        )
    count = math.prod(shape)
    size = os.fstat(f.fileno()).st_size
    if size - data_start != count * dtype.itemsize:
        raise ImageError(f"{path}: the header promises {count * dtype.itemsize:,} bytes of {dtype} {shape}, the file holds {size - data_start:,} (truncated?)")
    raw = f.read(count * dtype.itemsize)
    if len(raw) != count * dtype.itemsize:
        raise ImageError(f"{path}: the file changed while being read")
    return np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C")


#: bits per pixel of each PNG colour type, per bit of depth
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
#: Adam7: (first column, first row, column step, row step) of each pass
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _check_png_rows(path: Path, f) -> None:
    """Refuse a PNG whose compressed image data (IDAT) ends before the last row its header
    promises (Pillow would fill the missing rows with zeros). The data is inflated in
    pieces and counted, never kept."""
    f.seek(8)
    head = f.read(25)
    if len(head) < 25 or head[4:8] != b"IHDR":
        return  # Pillow has refused it already
    width, height = int.from_bytes(head[8:12], "big"), int.from_bytes(head[12:16], "big")
    depth, color, interlace = head[16], head[17], head[20]
    if color not in _PNG_CHANNELS:
        return
    bits = depth * _PNG_CHANNELS[color]

    def rows_bytes(w: int, h: int) -> int:
        return h * (1 + (w * bits + 7) // 8) if w and h else 0

    if interlace:
        expected = sum(rows_bytes(-(-(width - x0) // dx) if width > x0 else 0, -(-(height - y0) // dy) if height > y0 else 0)
                       for x0, y0, dx, dy in _ADAM7)
    else:
        expected = rows_bytes(width, height)
    inflate = zlib.decompressobj()
    got = 0
    seen_idat = False
    pos = 8
    try:
        while got < expected:
            f.seek(pos)
            chunk = f.read(8)
            if len(chunk) < 8:
                break
            length, kind = int.from_bytes(chunk[:4], "big"), chunk[4:8]
            if kind != b"IDAT":
                if seen_idat or kind == b"IEND":
                    break
                pos += 12 + length
                continue
            seen_idat = True
            left = length
            while left and got < expected:
                piece = f.read(min(left, 1 << 20))
                if not piece:
                    break
                left -= len(piece)
                data = piece
                while data and got < expected:
                    out = inflate.decompress(data, 1 << 20)
                    got += len(out)
                    data = inflate.unconsumed_tail
                if inflate.eof:
                    break
            if inflate.eof:
                break
            pos += 12 + length
    except zlib.error as exc:
        raise ImageError(f"{path}: damaged PNG image data ({short(str(exc), 80)})") from None
    if got < expected:
        row = 1 + (width * bits + 7) // 8
        done = f"{got // row} of {height} rows" if not interlace else f"{got:,} of {expected:,} bytes"
        raise ImageError(f"{path}: the image data ends early ({done}); expected the whole image (truncated or damaged file)")


def read_image(path: str | Path, input_dim: Sequence[int]) -> tuple[list[tuple[str, np.ndarray]], list[str]]:
    """``([(label, image (C, H, W) float32), ...], notes)`` for one file; a ``.npy`` file
    may hold several images (labels ``file[i]``).  Notes say what was done to the
    picture (resized, inverted)."""
    path = Path(path)
    C, H, W = (int(v) for v in input_dim)
    with _open(path) as f:
        if path.suffix.lower() == ".npy":
            a = _read_npy(path, f)
        else:
            return _read_picture(path, f, C, H, W)
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


def _read_picture(path: Path, f, C: int, H: int, W: int) -> tuple[list[tuple[str, np.ndarray]], list[str]]:
    from PIL import Image, ImageFile, UnidentifiedImageError

    try:
        with _PILLOW_LOCK, warnings.catch_warnings():
            # Pillow's own bomb check stays on, at our cap: it guards each frame a container
            # format decodes (an ICO entry may be far larger than its directory says)
            limit, truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
            Image.MAX_IMAGE_PIXELS = min(MAX_PIXELS, limit or MAX_PIXELS)
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                with Image.open(f, formats=FORMATS) as opened:
                    size = opened.size  # from the header: nothing is decoded yet
                    if size[0] * size[1] > MAX_PIXELS:
                        raise ImageError(
                            f"{path}: an image of {size[0]}x{size[1]} pixels; expected at most {MAX_PIXELS:,} pixels (decoding refused)"
                        )
                    if opened.format == "PNG":
                        _check_png_rows(path, f)
                        f.seek(0)
                    im = opened.convert("L")
                    size = im.size  # what was decoded (a container may correct its header)
                    if size[0] * size[1] > MAX_PIXELS:  # pragma: no cover - Pillow's check refuses first
                        raise ImageError(f"{path}: decoded an image of {size[0]}x{size[1]} pixels; expected at most {MAX_PIXELS:,}")
                    if size != (W, H):
                        im = im.resize((W, H), Image.Resampling.LANCZOS)
                    g = np.asarray(im, dtype=np.float32) / 255.0
            finally:
                Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = limit, truncated
    except UnidentifiedImageError:
        raise ImageError(
            f"{path}: not an image xpconv reads (expected {', '.join(FORMATS)} or a .npy file named *.npy)"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        what = f"an image or frame of {int(found.group(1)):,} pixels" if found else "an image or frame"
        raise ImageError(f"{path}: {what}; expected at most {MAX_PIXELS:,} pixels (decoding refused)") from None
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise ImageError(f"{path}: a damaged or truncated image ({type(exc).__name__}: {short(str(exc), 120)})") from None
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
