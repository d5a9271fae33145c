"""Datasets: the bundled UCI digits, and MNIST / Fashion-MNIST read from IDX files.

Everything here is host NumPy (datasets are loaded on the host; the Trainer moves batches to
the model's device). Images come back NCHW (N, C=1, H, W) or flattened to (N, C*H*W).

    >>> from xpconv.datasets import load_dataset
    >>> (x_train, t_train), (x_test, t_test) = load_dataset("digits")
    >>> x_train.shape, x_train.dtype, t_train.dtype
    ((1438, 1, 8, 8), dtype('float32'), dtype('int64'))

Where MNIST files are looked for (first hit wins for the folder; see :func:`dataset_dir`):
``data_dir`` when given, else ``$XPCONV_DATA_DIR/<dataset>``, else the per-user cache
``pooch.os_cache('xpconv')/<dataset>`` (``~/.cache/xpconv/<dataset>`` on Linux). Missing files
are downloaded there with pooch, checked against their published SHA-256 and moved into place
only when the hash matches. Problems with the data raise :class:`DatasetError`, naming the file.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import warnings
import zlib
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = [
    "DATASETS",
    "DatasetError",
    "DatasetWarning",
    "dataset_dir",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "read_idx",
]


class DatasetError(ValueError):
    """A dataset file is missing, malformed or fails its checksum (the message names it)."""


class DatasetWarning(UserWarning):
    """The data actually used differs from what was asked for (e.g. a split test set)."""


_FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_DIGIT_CLASSES = tuple(str(i) for i in range(10))

#: What each dataset name means: ``input_dim`` is (C, H, W) of one image.
DATASETS = {
    "digits": {
        "input_dim": (1, 8, 8),
        "classes": 10,
        "class_names": _DIGIT_CLASSES,
        "description": "UCI handwritten digits, 1,797 8x8 grey images (bundled, CC BY 4.0)",
    },
    "mnist": {
        "input_dim": (1, 28, 28),
        "classes": 10,
        "class_names": _DIGIT_CLASSES,
        "description": "MNIST handwritten digits, 60,000 + 10,000 28x28 grey images (IDX files)",
    },
    "fashion-mnist": {
        "input_dim": (1, 28, 28),
        "classes": 10,
        "class_names": _FASHION_CLASSES,
        "description": "Zalando Fashion-MNIST, 60,000 + 10,000 28x28 grey images (IDX files)",
    },
}

# --------------------------------------------------------------------------- bundled digits

_DIGITS_FILE = "digits.csv.gz"
_DIGITS_SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
_DIGITS_ROWS = 1797


def _read_digits_file(path=None) -> tuple[np.ndarray, np.ndarray]:
    """The digits CSV as (pixels (1797, 64) uint8 in 0..16, labels (1797,) int64).

    ``path`` defaults to the copy bundled in the package; its SHA-256 must match."""
    if path is None:
        res = resources.files("xpconv").joinpath("data", _DIGITS_FILE)
        source = str(res)
        data = res.read_bytes()
    else:
        source = str(path)
        data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != _DIGITS_SHA256:
        raise DatasetError(
            f"{source}: sha256 {digest} does not match the bundled digits data "
            f"(expected {_DIGITS_SHA256}); the file is damaged - reinstall xpconv"
        )
    table = np.loadtxt(io.BytesIO(gzip.decompress(data)), delimiter=",", dtype=np.int64)
    if table.shape != (_DIGITS_ROWS, 65):
        raise DatasetError(f"{source}: table of shape {table.shape}; expected ({_DIGITS_ROWS}, 65)")
    return table[:, :64].astype(np.uint8), table[:, 64].copy()


def _split_indices(n: int, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) index arrays: ``p = np.random.default_rng(seed).permutation(n)``,
    ``k = round(test_size * n)``; test is ``p[:k]``, train ``p[k:]`` (both in shuffled order)."""
    k = int(round(test_size * n))
    if not 0 < k < n:
        raise ValueError(f"test_size={test_size} leaves no train or no test samples out of {n}")
    p = np.random.default_rng(seed).permutation(n)
    return p[k:], p[:k]


def _images(raw: np.ndarray, scale: float | None, flatten: bool, keep_uint8: bool = False) -> np.ndarray:
    """(N, H, W) uint8 -> (N, 1, H, W), or (N, H*W) with ``flatten``; converted to float32
    once and divided by ``scale`` when given (left uint8 when ``keep_uint8`` and no scale)."""
    n = raw.shape[0]
    x = raw.reshape(n, -1) if flatten else raw.reshape(n, 1, *raw.shape[-2:])
    if keep_uint8 and scale is None:
        return x
    x = x.astype(np.float32)
    if scale is not None:
        x /= np.float32(scale)
    return x


def _labels(t: np.ndarray, one_hot: bool, classes: int = 10) -> np.ndarray:
    t = t.astype(np.int64, copy=False)
    if not one_hot:
        return t
    out = np.zeros((t.shape[0], classes), dtype=np.float32)
    out[np.arange(t.shape[0]), t] = 1.0
    return out


def load_digits(normalize=True, flatten=False, one_hot_label=False, test_size=0.2, seed=0):
    """The bundled UCI handwritten digits (E. Alpaydin and C. Kaynak, UCI ML Repository 1998,
    CC BY 4.0; see ``xpconv/data/DIGITS_LICENSE.md``), split into train and test.

    Returns ``((x_train, t_train), (x_test, t_test))``. Images are float32 (N, 1, 8, 8), or
    (N, 64) with ``flatten``; pixel values 0..16, divided by 16 into [0, 1] with ``normalize``.
    Labels are int64 (N,), or one-hot float32 (N, 10) with ``one_hot_label``.

    The split is a plain (not stratified) seeded permutation of the 1,797 rows in file order:
    ``p = numpy.random.default_rng(seed).permutation(1797)``, ``k = round(test_size * 1797)``
    (359 for the default 0.2); the test set is rows ``p[:k]`` and the train set rows ``p[k:]``,
    in that order. The same ``seed`` always gives the same split on every machine.
    """
    pixels, labels = _read_digits_file()
    train, test = _split_indices(pixels.shape[0], test_size, seed)
    scale = 16.0 if normalize else None

    def part(idx):
        raw = pixels[idx].reshape(-1, 8, 8)
        return _images(raw, scale, flatten), _labels(labels[idx], one_hot_label)

    return part(train), part(test)


# --------------------------------------------------------------------------- IDX files

_IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}


def _open_maybe_gzip(path: Path):
    f = open(path, "rb")
    head = f.read(2)
    f.seek(0)
    if head == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f, mode="rb"), f
    return f, f


def read_idx(path, kind=None, shape=None) -> np.ndarray:
    """Read one IDX file of unsigned bytes (gzip-compressed or plain) into a uint8 array.

    ``kind`` 'images' requires the magic number 0x00000803 (3 dimensions), 'labels'
    0x00000801 (1 dimension); None accepts any unsigned-byte IDX file. ``shape`` optionally
    fixes the dimensions, with None as a wildcard, e.g. ``(None, 28, 28)``. The payload must
    be exactly the product of the dimensions. Any problem raises :class:`DatasetError` naming
    the file and what was expected vs found.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    stream, raw = _open_maybe_gzip(path)
    try:
        with raw, stream:
            return _read_idx_stream(stream, path, kind, shape)
    except (EOFError, OSError, zlib.error) as exc:
        # gzip.BadGzipFile is an OSError; a gzip stream cut short raises EOFError.
        raise DatasetError(f"{path}: corrupt or truncated gzip data ({exc})") from exc


def _read_idx_stream(f, path: Path, kind, shape) -> np.ndarray:
    head = f.read(4)
    if len(head) < 4:
        raise DatasetError(f"{path}: file too short for an IDX header ({len(head)} bytes; expected 4+)")
    magic = int.from_bytes(head, "big")
    want = _IDX_MAGIC.get(kind) if kind is not None else None
    if kind is not None and want is None:
        raise ValueError(f"read_idx: kind must be 'images', 'labels' or None, got {kind!r}")
    if want is not None and magic != want:
        raise DatasetError(
            f"{path}: magic number 0x{magic:08x}; expected 0x{want:08x} (IDX {kind}: unsigned bytes, "
            f"{want & 0xFF} dimension{'s' if want & 0xFF > 1 else ''})"
        )
    if head[:2] != b"\0\0" or head[2] != 0x08 or head[3] == 0:
        raise DatasetError(
            f"{path}: magic number 0x{magic:08x} is not an unsigned-byte IDX file "
            f"(expected 0x000008NN with NN the number of dimensions)"
        )
    ndim = head[3]
    dims_raw = f.read(4 * ndim)
    if len(dims_raw) < 4 * ndim:
        raise DatasetError(
            f"{path}: header truncated: {ndim} dimensions need {4 * ndim} bytes, found {len(dims_raw)}"
        )
    dims = tuple(int.from_bytes(dims_raw[4 * i : 4 * i + 4], "big") for i in range(ndim))
    if shape is not None:
        shape = tuple(shape)
        if len(shape) != ndim or any(s is not None and s != d for s, d in zip(shape, dims)):
            pattern = "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"
            raise DatasetError(f"{path}: dimensions {dims}; expected {pattern}")
    size = int(np.prod(dims, dtype=np.int64))
    out = np.empty(dims, dtype=np.uint8)
    got = _read_into(f, out.reshape(-1))
    if got < size:
        raise DatasetError(
            f"{path}: payload truncated: {got} bytes; expected {size} = {' x '.join(map(str, dims))}"
        )
    extra = 0
    while chunk := f.read(1 << 20):
        extra += len(chunk)
    if extra:
        raise DatasetError(
            f"{path}: {extra} bytes after the payload; expected exactly {size} = "
            f"{' x '.join(map(str, dims))}"
        )
    return out


def _read_into(f, buf: np.ndarray) -> int:
    view = memoryview(buf)
    total = 0
    while total < len(view):
        n = f.readinto(view[total:])
        if not n:
            break
        total += n
    return total


def _read_idx_pair(images_path, labels_path, image_hw=(28, 28), classes=10):
    """(images (N, H, W) uint8, labels (N,) uint8) with counts and label range checked."""
    x = read_idx(images_path, "images", (None, *image_hw))
    t = read_idx(labels_path, "labels")
    if x.shape[0] != t.shape[0]:
        raise DatasetError(
            f"{images_path} holds {x.shape[0]} images but {labels_path} holds {t.shape[0]} labels; "
            "expected the same count"
        )
    if t.size and int(t.max()) >= classes:
        raise DatasetError(f"{labels_path}: label {int(t.max())} found; expected 0..{classes - 1}")
    return x, t


# --------------------------------------------------------------------------- MNIST-style sets

#: Standard file names, keyed as in the book's ``mnist.py``.
IDX_FILES = {
    "test_img": "t10k-images-idx3-ubyte.gz",
    "test_label": "t10k-labels-idx1-ubyte.gz",
    "train_img": "train-images-idx3-ubyte.gz",
    "train_label": "train-labels-idx1-ubyte.gz",
}

# Published SHA-256 of the standard gzip files (identical on every mirror).
_SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
}

# Mirrors tried in order; an environment variable or ``base_url`` replaces them.
_BASE_URLS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "fashion-mnist": (
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ),
}
_URL_ENV = {"mnist": "XPCONV_MNIST_URL", "fashion-mnist": "XPCONV_FASHION_MNIST_URL"}
_TITLE = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
_DOWNLOAD_TIMEOUT_S = 30


def _cache_root() -> Path:
    try:
        import pooch
    except ImportError:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / "xpconv"
    return Path(pooch.os_cache("xpconv"))


def dataset_dir(name: str, data_dir=None) -> Path:
    """The folder where the files of dataset ``name`` are looked for and downloaded to:
    ``data_dir`` itself when given (a folder holding the files), else
    ``$XPCONV_DATA_DIR/<name>`` when that variable is set, else the per-user cache
    ``pooch.os_cache('xpconv')/<name>``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    root = os.environ.get("XPCONV_DATA_DIR")
    return (Path(root).expanduser() if root else _cache_root()) / name


def _base_urls(name: str, base_url) -> list[str]:
    if base_url is None:
        base_url = os.environ.get(_URL_ENV[name]) or _BASE_URLS[name]
    urls = base_url.replace(",", " ").split() if isinstance(base_url, str) else list(base_url)
    return [u if u.endswith("/") else u + "/" for u in urls]


def _local_file(folder: Path, fname: str) -> Path | None:
    """The file ``fname`` in ``folder``, or its uncompressed twin (name without .gz)."""
    for cand in (folder / fname, folder / fname.removesuffix(".gz")):
        if cand.is_file():
            return cand
    return None


def _download(name: str, fname: str, folder: Path, urls: list[str], dead: set, why: list):
    """Fetch ``fname`` into ``folder`` from the first mirror that serves it with the right
    SHA-256; return its path, or None after appending the reasons to ``why``.

    pooch streams into a temporary file in ``folder`` and renames it only after the hash
    check; on any failure the temporary file is deleted, so no partial file is left. Mirrors
    that cannot be reached are added to ``dead`` and not tried again for the other files."""
    try:
        import pooch
        import requests
    except ImportError:
        why.append("pooch is not installed (pip install pooch), so nothing can be downloaded")
        return None
    try:
        import tqdm  # noqa: F401

        progress = True
    except ImportError:
        progress = False
    downloader = pooch.HTTPDownloader(
        progressbar=progress, timeout=_DOWNLOAD_TIMEOUT_S, chunk_size=1 << 16
    )
    for base in urls:
        if base in dead:
            continue
        url = base + fname
        try:
            path = pooch.retrieve(
                url,
                known_hash="sha256:" + _SHA256[name][fname],
                fname=fname,
                path=folder,
                downloader=downloader,
            )
            return Path(path)
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            dead.add(base)
            kind = "timed out" if isinstance(exc, requests.exceptions.Timeout) else "could not connect"
            why.append(f"{base}: {kind}")
        except requests.exceptions.ChunkedEncodingError as exc:
            why.append(f"{url}: transfer broken off, download discarded ({_first_line(exc)})")
        except requests.exceptions.HTTPError as exc:
            status = getattr(exc.response, "status_code", "error")
            why.append(f"{url}: HTTP {status}")
        except ValueError as exc:  # pooch's hash mismatch; the download was discarded
            why.append(f"{url}: checksum mismatch, download discarded ({_first_line(exc)})")
        except OSError as exc:  # e.g. a read-only folder; requests' other errors are OSErrors too
            why.append(f"{url}: {type(exc).__name__}: {_first_line(exc)}")
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def _obtain(name, folder: Path, keys, download: bool, base_url):
    """Paths of the files ``keys`` (IDX_FILES keys): found in ``folder`` or downloaded there.
    Returns (found: dict key -> Path, missing: list of file names, why: str)."""
    found, missing, why = {}, [], []
    dead = set()  # mirrors found unreachable: not retried for the next file
    urls = _base_urls(name, base_url) if download else []
    for key in keys:
        fname = IDX_FILES[key]
        path = _local_file(folder, fname)
        if path is None and download:
            path = _download(name, fname, folder, urls, dead, why)
        if path is None:
            missing.append(fname)
        else:
            found[key] = path
    if missing and not download:
        why.append("downloading is switched off")
    elif missing and not why:
        why.append("no mirror could be reached")
    return found, missing, "; ".join(dict.fromkeys(why))


def _missing_message(name, folder: Path, missing, why: str) -> str:
    files = "\n".join(f"  {f}" for f in missing)
    return (
        f"{_TITLE[name]} files missing from {folder}:\n{files}\n"
        f"They could not be downloaded ({why}).\n"
        f"Put these standard IDX .gz files (or their uncompressed twins) in {folder}, or point "
        f"--data-dir DIR (data_dir=DIR in Python) at a folder that holds them; "
        f"{_URL_ENV[name]} or base_url= selects another download mirror."
    )


def _load_idx_dataset(name, normalize, flatten, one_hot_label, data_dir, download, base_url,
                      allow_test_split, seed, keep_uint8):
    folder = dataset_dir(name, data_dir)
    found, missing, why = _obtain(name, folder, ("test_img", "test_label"), download, base_url)
    if missing:  # list the train files too, but don't download them for nothing
        missing += [IDX_FILES[k] for k in ("train_img", "train_label")
                    if _local_file(folder, IDX_FILES[k]) is None]
        raise DatasetError(_missing_message(name, folder, missing, why))
    train, missing, why = _obtain(name, folder, ("train_img", "train_label"), download, base_url)
    found.update(train)
    scale = 255.0 if normalize else None

    def convert(raw_x, raw_t):
        return (_images(raw_x, scale, flatten, keep_uint8), _labels(raw_t, one_hot_label))

    x_test, t_test = _read_idx_pair(found["test_img"], found["test_label"])
    if not missing:
        x_train, t_train = _read_idx_pair(found["train_img"], found["train_label"])
        return convert(x_train, t_train), convert(x_test, t_test)
    if not allow_test_split:
        raise DatasetError(
            _missing_message(name, folder, missing, why)
            + " To train on the test set split 80/20 instead, pass allow_test_split=True "
            "(load_dataset does so with a warning)."
        )
    n = x_test.shape[0]
    tr, te = _split_indices(n, 0.2, seed)
    warnings.warn(
        f"{_TITLE[name]} training files ({', '.join(missing)}) are not in {folder} and could not "
        f"be obtained ({why}); splitting the {n:,}-image test set into {tr.size:,} train / "
        f"{te.size:,} test (seed {seed}) instead.",
        DatasetWarning,
        stacklevel=3,
    )
    # Index the uint8 data first, so the float32 copy is made once per part.
    return convert(x_test[tr], t_test[tr]), convert(x_test[te], t_test[te])


def load_mnist(normalize=True, flatten=True, one_hot_label=False, *, data_dir=None,
               download=True, base_url=None, allow_test_split=False, seed=0):
    """MNIST, book-compatible: ``((x_train, t_train), (x_test, t_test))``.

    Images are (N, 784), or (N, 1, 28, 28) with ``flatten=False``; float32 in [0, 1] with
    ``normalize`` (divided by 255), else uint8 0..255 as in the book. Labels are int64 (N,),
    or one-hot float32 (N, 10) with ``one_hot_label``.

    Files (``IDX_FILES``) are read from :func:`dataset_dir` ('mnist', data_dir); missing ones
    are downloaded there (when ``download``) from ``base_url`` (a URL prefix, or several), else
    ``$XPCONV_MNIST_URL``, else the standard mirrors, and verified by SHA-256. Without the
    training files this raises :class:`DatasetError` - unless ``allow_test_split``, which
    splits the 10,000-image test set 8,000 / 2,000 with the seeded permutation of
    :func:`load_digits` (``seed``) and warns (:class:`DatasetWarning`).
    """
    return _load_idx_dataset("mnist", normalize, flatten, one_hot_label, data_dir, download,
                             base_url, allow_test_split, seed, keep_uint8=True)


def load_fashion_mnist(normalize=True, flatten=True, one_hot_label=False, *, data_dir=None,
                       download=True, base_url=None, allow_test_split=False, seed=0):
    """Fashion-MNIST, the same way as :func:`load_mnist` (folder 'fashion-mnist', mirror
    variable ``$XPCONV_FASHION_MNIST_URL``). Class names are in
    ``DATASETS['fashion-mnist']['class_names']``."""
    return _load_idx_dataset("fashion-mnist", normalize, flatten, one_hot_label, data_dir,
                             download, base_url, allow_test_split, seed, keep_uint8=True)


def load_dataset(name, data_dir=None, normalize=True, flatten=False, seed=0, download=True,
                 base_url=None):
    """``((x_train, t_train), (x_test, t_test))`` for 'digits', 'mnist' or 'fashion-mnist':
    images float32 NCHW (or (N, C*H*W) with ``flatten``), in [0, 1] with ``normalize``;
    labels int64. This is what the CLI and the Trainer call.

    digits is the bundled set (``data_dir`` is ignored), split by :func:`load_digits` with
    ``seed``. For MNIST-style sets ``data_dir`` may be any folder holding the files there are:
    when only the t10k pair can be had, the test set is split 8,000 / 2,000 (``seed``) with a
    :class:`DatasetWarning` saying so.
    """
    key = str(name).lower().replace("_", "-")
    if key == "fashion":
        key = "fashion-mnist"
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if key == "digits":
        return load_digits(normalize=normalize, flatten=flatten, seed=seed)
    return _load_idx_dataset(key, normalize, flatten, False, data_dir, download, base_url,
                             allow_test_split=True, seed=seed, keep_uint8=False)
