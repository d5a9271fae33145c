"""Your own data: a folder of images with one subfolder per class, or a ``.npz`` file.

:func:`load_folder` reads ``DIR/<class>/<file>`` (PNG, JPEG, anything Pillow opens, and
``.npy`` arrays) the way ``xpconv predict`` reads an image (:func:`xpconv.images.read_image`:
converted to grey, resized to the chosen (H, W), scaled to [0, 1], a light-background picture
inverted), so a model trained on a folder sees at prediction time what it saw in training.
``.npy`` files keep their channels (a (C, H, W) array) and must already have the chosen size.
When ``DIR/train`` and ``DIR/test`` exist they are the split; otherwise a seeded split
(``test_size``, ``seed``) is drawn from the file list before anything is read.

:func:`load_npz` reads ``x_train``, ``t_train``, ``x_test``, ``t_test`` (and optionally
``class_names``) from one ``.npz`` file, with ``allow_pickle=False`` and every member's size
checked in the zip directory before it is decompressed.

Both return a :class:`LoadedData`, which unpacks like :func:`xpconv.datasets.load_dataset`'s
result, ``(x_train, t_train), (x_test, t_test) = load_folder("pets")``, and also carries
``class_names`` and ``input_dim``.

Bounded like every reader: the walk never follows a folder link twice (a symlink loop ends),
stops at ``max_files`` files and ``MAX_DEPTH`` levels, the arrays' size is checked against
``max_bytes`` before they are allocated, each file is ``stat``-ed before it is opened (a FIFO
or device is named and skipped, never opened), and a file that cannot be read is named in a
:class:`~xpconv.datasets.DatasetWarning` and skipped (``on_error="raise"`` refuses instead).
"""

from __future__ import annotations

import math
import os
import stat
import warnings
import zipfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._dataerrors import DatasetError, DatasetWarning, _split_indices
from ._fileformat import short

__all__ = ["MAX_DEPTH", "MAX_FILES", "MAX_FOLDER_BYTES", "LoadedData", "load_folder", "load_npz", "parse_input_size"]

#: the most files a folder dataset may list (the walk stops and refuses beyond it)
MAX_FILES = 1_000_000
#: the most bytes the loaded float32 arrays may take together
MAX_FOLDER_BYTES = 4 << 30
#: how deep the walk goes below a class folder
MAX_DEPTH = 8
#: files read to find the most common image size when none is given
SIZE_SAMPLE = 2_000

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".npy")


def _error(message: str) -> Exception:
    return DatasetError(message)


class LoadedData(tuple):
    """``((x_train, t_train), (x_test, t_test))`` with ``class_names`` (one per label) and
    ``input_dim`` ((C, H, W) of one image); ``skipped`` lists ``(path, reason)`` of the files
    left out."""

    class_names: list[str]
    input_dim: tuple[int, int, int]
    skipped: list[tuple[str, str]]

    def __new__(cls, train, test, class_names, input_dim, skipped=()):
        self = super().__new__(cls, (tuple(train), tuple(test)))
        self.class_names = [str(n) for n in class_names]
        self.input_dim = tuple(int(v) for v in input_dim)
        self.skipped = list(skipped)
        return self

    def info(self) -> dict[str, Any]:
        """The dataset description the CLI and recipes use (like ``DATASETS[name]``)."""
        return {"input_dim": self.input_dim, "classes": len(self.class_names), "class_names": tuple(self.class_names)}


def parse_input_size(text: Any) -> tuple[int, int] | None:
    """``28`` or ``"28"`` -> (28, 28); ``"32x48"`` or (32, 48) -> (H, W) = (32, 48); None stays None."""
    if text is None:
        return None
    if isinstance(text, (tuple, list)):
        parts = list(text)
    elif isinstance(text, int) and not isinstance(text, bool):
        parts = [text, text]
    else:
        s = str(text).lower().strip()
        parts = s.split("x") if "x" in s else [s, s]
    try:
        h, w = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"input size: expected N or HxW (e.g. 28 or 32x48), got {short(text)}") from None
    if not (1 <= h <= 4096 and 1 <= w <= 4096):
        raise ValueError(f"input size: expected sides from 1 to 4096, got {h}x{w}")
    return h, w


# --------------------------------------------------------------------------- the walk


def _entries(folder: Path, limit: int) -> list[os.DirEntry]:
    """The folder's entries in name order; more than ``limit`` of them is refused while
    listing (a folder of millions of files is not read into memory first)."""
    out = []
    try:
        with os.scandir(folder) as it:
            for e in it:
                out.append(e)
                if len(out) > limit:
                    raise _error(f"{folder}: more than {limit:,} entries; expected at most max_files={limit:,} files")
    except OSError as exc:
        raise _error(f"{folder}: cannot list the folder: {exc.strerror or exc}") from None
    return sorted(out, key=lambda e: e.name)


def _dir_key(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def _class_folders(root: Path, limit: int) -> list[tuple[str, Path]]:
    out = []
    for e in _entries(root, limit):
        if e.name.startswith("."):
            continue
        if _dir_key(Path(e.path)) is not None:
            out.append((e.name, Path(e.path)))
    return out


def _walk(folder: Path, budget: list[int], max_files: int, seen: set, skipped: list, depth: int = 0) -> list[str]:
    """Files below ``folder`` with an image suffix, in name order; a folder reached twice
    (a link loop, or a link to the root or another class) is walked once, as itself."""
    key = _dir_key(folder)
    if key is None or (key in seen and depth > 0):
        if key is not None:
            skipped.append((str(folder), "a folder already read (a link loop?)"))
        return []
    seen.add(key)
    files: list[str] = []
    for e in _entries(folder, max_files):
        if e.name.startswith("."):
            continue
        p = Path(e.path)
        if _dir_key(p) is not None:
            if depth + 1 > MAX_DEPTH:
                skipped.append((str(p), f"deeper than {MAX_DEPTH} levels"))
                continue
            files += _walk(p, budget, max_files, seen, skipped, depth + 1)
            continue
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append((str(p), "not an image or .npy file (by its name)"))
            continue
        budget[0] += 1
        if budget[0] > max_files:
            raise _error(f"{folder}: more than {max_files:,} image files; expected at most max_files={max_files:,}")
        files.append(str(p))
    return files


def _listing(root: Path, max_files: int, skipped: list, seen: set, budget: list[int],
             names: Sequence[str] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    classes = _class_folders(root, max_files)
    if names is None:
        names = [n for n, _ in classes]
        index = {n: i for i, n in enumerate(names)}
    else:
        index = {n: i for i, n in enumerate(names)}
        unknown = [n for n, _ in classes if n not in index]
        if unknown:
            raise _error(f"{root}: class folders {', '.join(map(repr, unknown[:5]))} are not among the training classes "
                         f"({', '.join(map(repr, list(names)[:10]))})")
    items: list[tuple[str, int]] = []
    # the root and every class folder are taken before the walk: a link inside one class
    # to the root or to another class adds nothing to it
    seen.update(k for k in [_dir_key(root), *(_dir_key(p) for _, p in classes)] if k is not None)
    for name, path in classes:
        items += [(f, index[name]) for f in _walk(path, budget, max_files, seen, skipped)]
    return list(names), items


# --------------------------------------------------------------------------- reading


def _header_size(path: str) -> tuple[int, int, int] | None:
    """(C, H, W) an image or .npy file declares in its header, nothing decoded; None when
    the header cannot be read (the file is named later, when it is read)."""
    from ._io import stat_regular

    try:
        stat_regular(Path(path), "image file")
        if path.lower().endswith(".npy"):
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape = read(f, max_header_size=10_000)[0]
            if len(shape) == 2:
                return (1, int(shape[0]), int(shape[1]))
            if len(shape) == 3:
                return (int(shape[0]), int(shape[1]), int(shape[2]))
            return None
        from PIL import Image

        with Image.open(path) as im:  # reads the header only
            w, h = im.size
        return (1, int(h), int(w))
    except Exception:  # noqa: BLE001 - any unreadable header: the file is named when it is read
        return None


def _common_dim(files: Sequence[str], channels: int | None) -> tuple[int, int, int]:
    step = max(1, len(files) // SIZE_SAMPLE)
    dims = Counter(d for d in (_header_size(f) for f in files[::step][:SIZE_SAMPLE]) if d is not None)
    if not dims:
        raise _error(f"no readable image among the {len(files):,} files")
    (c, h, w), _ = dims.most_common(1)[0]
    return (channels or c, h, w)


def _read_into(items: Sequence[tuple[str, int]], input_dim, on_error: str, skipped: list) -> tuple[np.ndarray, np.ndarray]:
    from .images import ImageError, read_image

    C, H, W = input_dim
    x = np.empty((len(items), C, H, W), dtype=np.float32)
    t = np.empty(len(items), dtype=np.int64)
    k = 0
    for path, label in items:
        try:
            got, _ = read_image(path, (C, H, W))
            if len(got) != 1:
                raise ImageError(f"{path}: holds {len(got)} images; a folder dataset takes one image per file")
        except (ImageError, OSError, MemoryError) as exc:
            if on_error == "raise":
                raise _error(f"{path}: {exc}" if str(path) not in str(exc) else str(exc)) from None
            skipped.append((str(path), str(exc)))
            continue
        x[k] = got[0][1]
        t[k] = label
        k += 1
    return x[:k], t[:k]


def _check_bytes(n: int, input_dim, max_bytes: int, where: Path) -> None:
    need = n * math.prod(input_dim) * 4
    if need > max_bytes:
        raise _error(f"{where}: {n:,} images of {tuple(input_dim)} take {need / 2**30:.2f} GiB as float32; expected at most "
                     f"max_bytes={max_bytes:,} (a smaller input size, or fewer files)")


def load_folder(path, input_size=None, *, channels: int | None = None, test_size: float = 0.2, seed: int = 0,
                max_files: int = MAX_FILES, max_bytes: int = MAX_FOLDER_BYTES, on_error: str = "skip") -> LoadedData:
    """Images in class subfolders as ``((x_train, t_train), (x_test, t_test))`` float32 NCHW in
    [0, 1] with int64 labels; the result also has ``class_names`` (the subfolders' names,
    sorted: label ``i`` is ``class_names[i]``) and ``input_dim``.

    ``input_size``: ``N``, ``"HxW"`` or ``(H, W)``; by default the size most images have (read
    from their headers). ``channels``: C for ``.npy`` files (images are read as grey, C=1).
    ``DIR/train`` and ``DIR/test``, when both exist, are used as the split; otherwise the
    files are split with ``test_size`` and ``seed`` (the permutation of
    :func:`xpconv.datasets.load_digits`). ``on_error``: ``"skip"`` (warn and leave out a file
    that cannot be read) or ``"raise"``.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error: expected 'skip' or 'raise', got {short(on_error)}")
    root = Path(path)
    if _dir_key(root) is None:
        raise _error(f"{root}: not a folder (expected a folder with one subfolder per class, or a .npz file)")
    hw = parse_input_size(input_size)
    skipped: list[tuple[str, str]] = []
    seen: set = set()
    budget = [0]
    train_dir, test_dir = root / "train", root / "test"
    if _dir_key(train_dir) is not None and _dir_key(test_dir) is not None:
        names, train_items = _listing(train_dir, max_files, skipped, seen, budget)
        _, test_items = _listing(test_dir, max_files, skipped, seen, budget, names)
    else:
        names, items = _listing(root, max_files, skipped, seen, budget)
        if len(items) < 2:
            raise _error(f"{root}: {len(items)} image files in class subfolders; expected at least 2 "
                         f"(a folder per class, e.g. {root}/cats/1.png, {root}/dogs/1.png)")
        tr, te = _split_indices(len(items), test_size, seed)
        train_items, test_items = [items[i] for i in tr], [items[i] for i in te]
    if not names:
        raise _error(f"{root}: no class subfolders (expected one folder per class holding its images)")
    if not train_items:
        raise _error(f"{root}: no image files in the class subfolders")
    if hw is None:
        input_dim = _common_dim([f for f, _ in train_items], channels)
    else:
        input_dim = (channels or 1, hw[0], hw[1])
    _check_bytes(len(train_items) + len(test_items), input_dim, max_bytes, root)
    train = _read_into(train_items, input_dim, on_error, skipped)
    test = _read_into(test_items, input_dim, on_error, skipped)
    if skipped:  # files that could not be read first, then what the walk left out
        skipped.sort(key=lambda item: "already read" in item[1] or "by its name" in item[1] or "levels" in item[1])
        listed = "; ".join(f"{p}: {short(r, 120)}" if p not in r else short(r, 160) for p, r in skipped[:5])
        more = f" (and {len(skipped) - 5:,} more)" if len(skipped) > 5 else ""
        warnings.warn(f"{root}: {len(skipped):,} entries left out: {listed}{more}", DatasetWarning, stacklevel=2)
    if train[0].shape[0] == 0:
        raise _error(f"{root}: none of the training images could be read")
    return LoadedData(train, test, names, input_dim, skipped)


# --------------------------------------------------------------------------- .npz


_NPZ_KEYS = ("x_train", "t_train", "x_test", "t_test")


def _npz_images(a: np.ndarray, path: Path, key: str) -> np.ndarray:
    if a.dtype.kind not in "uif":
        raise _error(f"{path}: {key} should hold numbers, got dtype {a.dtype}")
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4:
        raise _error(f"{path}: {key} should be (N, C, H, W) or (N, H, W) images, got shape {a.shape}")
    if a.shape[-1] in (1, 3, 4) and a.shape[1] not in (1, 3, 4):
        raise _error(f"{path}: {key} of shape {a.shape} looks channels-last (N, H, W, C); xpconv takes channels-first "
                     f"(N, C, H, W): store {key}.transpose(0, 3, 1, 2)")
    scaled = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32, copy=False)
    if not np.isfinite(scaled).all():
        raise _error(f"{path}: {key} holds NaN or inf")
    return scaled


def _npz_labels(t: np.ndarray, path: Path, key: str, n: int) -> np.ndarray:
    if t.ndim == 2 and t.dtype.kind == "f":
        t = t.argmax(axis=1)  # one-hot
    if t.ndim != 1 or t.dtype.kind not in "ui" or t.shape[0] != n:
        raise _error(f"{path}: {key} should be {n:,} integer labels (or one-hot rows), got {t.dtype} {t.shape}")
    if t.size and int(t.min()) < 0:
        raise _error(f"{path}: {key} holds a negative label {int(t.min())}")
    return t.astype(np.int64)


def load_npz(path, *, max_bytes: int = MAX_FOLDER_BYTES) -> LoadedData:
    """``x_train``, ``t_train``, ``x_test``, ``t_test`` from a ``.npz`` file (``numpy.savez``)
    as :func:`load_folder` returns them: images (N, C, H, W) or (N, H, W), uint8 divided by
    255, other numbers used as they are; labels integers (or one-hot rows). An optional
    ``class_names`` array of strings names the classes (else "0", "1", ...)."""
    from ._io import stat_regular

    path = Path(path)
    try:
        stat_regular(path, ".npz file")
    except (FileNotFoundError, ValueError) as exc:
        raise _error(str(exc)) from None
    try:
        with zipfile.ZipFile(path) as z:
            infos = {i.filename: i for i in z.infolist()}
    except (zipfile.BadZipFile, OSError) as exc:
        raise _error(f"{path}: not a .npz file (numpy.savez writes one): {short(str(exc), 100)}") from None
    total = sum(i.file_size for i in infos.values())
    if total > max_bytes:
        raise _error(f"{path}: its arrays take {total:,} bytes unpacked; expected at most max_bytes={max_bytes:,}")
    missing = [k for k in _NPZ_KEYS if k + ".npy" not in infos]
    if missing:
        raise _error(f"{path}: expected arrays {', '.join(_NPZ_KEYS)}; missing {', '.join(missing)} "
                     f"(found {', '.join(sorted(n.removesuffix('.npy') for n in infos)[:10]) or 'none'})")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in (*_NPZ_KEYS, "class_names") if k + ".npy" in infos}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise _error(f"{path}: cannot read its arrays ({short(str(exc), 120)})") from None
    x_train = _npz_images(arrays["x_train"], path, "x_train")
    x_test = _npz_images(arrays["x_test"], path, "x_test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise _error(f"{path}: x_train images are {x_train.shape[1:]}, x_test images {x_test.shape[1:]}; expected one shape")
    t_train = _npz_labels(arrays["t_train"], path, "t_train", x_train.shape[0])
    t_test = _npz_labels(arrays["t_test"], path, "t_test", x_test.shape[0])
    if x_train.shape[0] == 0:
        raise _error(f"{path}: x_train holds no images")
    classes = int(max(t_train.max(initial=0), t_test.max(initial=0))) + 1
    if "class_names" in arrays:
        cn = arrays["class_names"]
        if cn.dtype.kind not in "U" or cn.ndim != 1 or cn.shape[0] < classes:
            raise _error(f"{path}: class_names should be {classes} or more strings, got {cn.dtype} {cn.shape}")
        names = [str(s) for s in cn]
    else:
        names = [str(i) for i in range(classes)]
    C, H, W = x_train.shape[1:]
    return LoadedData((x_train, t_train), (x_test, t_test), names, (C, H, W))


def load_data(source, input_size=None, **kwargs) -> LoadedData:
    """:func:`load_npz` for a ``.npz`` file, else :func:`load_folder`."""
    if str(source).lower().endswith(".npz"):
        if input_size is not None:
            raise ValueError("input size: a .npz file's images are used at their own size; leave the input size out")
        kwargs.pop("test_size", None), kwargs.pop("seed", None)
        return load_npz(source, **{k: v for k, v in kwargs.items() if k == "max_bytes"})
    return load_folder(source, input_size, **kwargs)
