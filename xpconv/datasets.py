"""Datasets: the bundled UCI digits, and MNIST / Fashion-MNIST read from IDX files.

Everything here is host NumPy (datasets are loaded on the host; the Trainer moves batches to
the model's device). Images come back NCHW (N, C=1, H, W) or flattened to (N, C*H*W).

    >>> from xpconv.datasets import load_dataset
    >>> (x_train, t_train), (x_test, t_test) = load_dataset("digits")
    >>> x_train.shape, x_train.dtype, t_train.dtype
    ((1438, 1, 8, 8), dtype('float32'), dtype('int64'))

Where MNIST files are looked for (first hit wins for the folder; see :func:`dataset_dir`):
``data_dir`` when given, else ``$XPCONV_DATA_DIR/<dataset>``, else the per-user cache
``pooch.os_cache('xpconv')/<dataset>`` (``~/.cache/xpconv/<dataset>`` on Linux). Every known
file is checked against its published size and SHA-256, wherever it comes from. Missing files
are downloaded (https only, size-capped, with a deadline) into the default folders, but into a
``data_dir`` you named only when asked (``download=True``); a download lands in place only
complete and verified. IDX headers are checked (counts against each other, sizes against
:data:`MAX_IDX_BYTES`) before anything large is allocated. Problems with the data raise
:class:`DatasetError`, naming the file.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import io
import logging
import math
import os
import re
import secrets
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zlib
from importlib import resources
from pathlib import Path

import numpy as np

from ._dataerrors import DatasetError, DatasetWarning, _split_indices
from ._io import open_regular, span_within

__all__ = [
    "DATASETS",
    "IDX_FILES",
    "MAX_IDX_BYTES",
    "DatasetError",
    "DatasetWarning",
    "dataset_dir",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "read_idx",
]


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
    if isinstance(test_size, bool) or not isinstance(test_size, (int, float, np.integer, np.floating)):
        raise TypeError(f"load_digits: test_size must be a number between 0 and 1, got {type(test_size).__name__}")
    if not 0.0 < float(test_size) < 1.0:  # also refuses nan and inf
        raise ValueError(f"load_digits: test_size must be a fraction strictly between 0 and 1, got {float(test_size)!r}")
    pixels, labels = _read_digits_file()
    train, test = _split_indices(pixels.shape[0], test_size, seed)
    scale = 16.0 if normalize else None

    def part(idx):
        raw = pixels[idx].reshape(-1, 8, 8)
        return _images(raw, scale, flatten), _labels(labels[idx], one_hot_label)

    return part(train), part(test)


# --------------------------------------------------------------------------- IDX files

_IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}

#: The most payload bytes one IDX file may declare (64 MiB; MNIST's 60,000 training images
#: are 47,040,000). Checked from the header, before anything of that size is allocated.
MAX_IDX_BYTES = 1 << 26


def _regular_file(path: Path, what: str = "file") -> os.stat_result:
    """stat ``path`` (following links) and require a regular file: a folder, FIFO or device
    is refused before it is opened (opening a FIFO would block)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot stat the {what} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else \
            "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a plain file"
        raise DatasetError(f"{path}: expected a regular {what}, got {kind}")
    return st


def _open_regular(path: Path, what: str):
    """``path`` opened for reading, checked again on the open descriptor (a path swapped for
    a FIFO or device after :func:`_regular_file` is refused, and opening does not block)."""
    try:
        f, _ = open_regular(path, what)
    except (FileNotFoundError, ValueError) as exc:
        raise DatasetError(str(exc)) from None
    return f


class _IdxFile:
    """One IDX file opened and its header parsed (``dims``); ``read()`` streams the payload
    (gunzipping on the fly) into one uint8 array. Nothing of the size the header promises is
    allocated until :meth:`check_size` passed."""

    def __init__(self, path, kind=None, shape=None):
        self.path = Path(path)
        _regular_file(self.path, "IDX file")
        if kind is not None and kind not in _IDX_MAGIC:
            raise ValueError(f"read_idx: kind must be 'images', 'labels' or None, got {kind!r}")
        self._raw = _open_regular(self.path, "IDX file")
        try:
            gz = self._raw.read(2) == b"\x1f\x8b"
            self._raw.seek(0)
            self._f = gzip.GzipFile(fileobj=self._raw, mode="rb") if gz else self._raw
            self.dims = self._guard(self._header, kind, shape)
        except BaseException:
            self._raw.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._raw.close()

    @property
    def size(self) -> int:
        return math.prod(self.dims)

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except (EOFError, OSError, zlib.error) as exc:
            # gzip.BadGzipFile is an OSError; a gzip stream cut short raises EOFError.
            raise DatasetError(f"{self.path}: corrupt or truncated gzip data ({exc})") from exc

    def _header(self, kind, shape) -> tuple[int, ...]:
        f, path = self._f, self.path
        head = f.read(4)
        if len(head) < 4:
            raise DatasetError(f"{path}: file too short for an IDX header ({len(head)} bytes; expected 4+)")
        magic = int.from_bytes(head, "big")
        want = _IDX_MAGIC.get(kind) if kind is not None else None
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
        if ndim > 32:
            raise DatasetError(f"{path}: magic number 0x{magic:08x} gives {ndim} dimensions; expected at most 32")
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
        return dims

    def check_size(self, max_bytes: int = MAX_IDX_BYTES) -> None:
        # the dimensions other than 0 are bounded too: (0, 2**32-1, 2**32-1) holds nothing,
        # but no array of that shape can be made
        if self.size > max_bytes or not span_within(self.dims, max_bytes):
            raise DatasetError(
                f"{self.path}: header promises {' x '.join(map(str, self.dims))} = {self.size:,} bytes; "
                f"expected at most {max_bytes:,} (max_bytes)"
            )

    def read(self, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
        self.check_size(max_bytes)
        return self._guard(self._payload)

    def _payload(self) -> np.ndarray:
        f, path, dims, size = self._f, self.path, self.dims, self.size
        out = np.empty(dims, dtype=np.uint8)
        got = _read_into(f, out.reshape(-1))
        if got < size:
            raise DatasetError(
                f"{path}: payload truncated: {got} bytes; expected {size} = {' x '.join(map(str, dims))}"
            )
        # Count what follows the payload, but never decompress more than 1 MiB of it.
        extra = len(f.read(1 << 20))
        if extra:
            many = f"{extra}" if extra < 1 << 20 else "over 1 MiB of"
            raise DatasetError(
                f"{path}: {many} bytes after the payload; expected exactly {size} = "
                f"{' x '.join(map(str, dims))}"
            )
        return out


def read_idx(path, kind=None, shape=None, *, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Read one IDX file of unsigned bytes (gzip-compressed or plain) into a uint8 array.

    ``kind`` 'images' requires the magic number 0x00000803 (3 dimensions), 'labels'
    0x00000801 (1 dimension); None accepts any unsigned-byte IDX file. ``shape`` optionally
    fixes the dimensions, with None as a wildcard, e.g. ``(None, 28, 28)``. The payload must
    be exactly the product of the dimensions, and at most ``max_bytes`` (checked from the
    header before anything is allocated; gzip data is decompressed as a stream). Only regular
    files are opened. Any problem raises :class:`DatasetError` naming the file and what was
    expected vs found.
    """
    with _IdxFile(path, kind, shape) as f:
        return f.read(max_bytes)


def _read_into(f, buf: np.ndarray) -> int:
    view = memoryview(buf)  # type: ignore[arg-type]  # ndarray exports the buffer protocol
    total = 0
    while total < len(view):
        n = f.readinto(view[total:])
        if not n:
            break
        total += n
    return total


def _read_idx_pair(images_path, labels_path, image_hw=(28, 28), classes=10, max_bytes=MAX_IDX_BYTES):
    """(images (N, H, W) uint8, labels (N,) uint8) with counts and label range checked.

    Both headers are read first: the counts must agree, and each payload must be within
    ``max_bytes``, before either payload is allocated."""
    with _IdxFile(images_path, "images", (None, *image_hw)) as xf, _IdxFile(labels_path, "labels") as tf:
        if xf.dims[0] != tf.dims[0]:
            raise DatasetError(
                f"{images_path} holds {xf.dims[0]} images but {labels_path} holds {tf.dims[0]} labels; "
                "expected the same count"
            )
        tf.check_size(max_bytes)
        xf.check_size(max_bytes)
        t = tf.read(max_bytes)
        x = xf.read(max_bytes)
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

# Published (size in bytes, SHA-256) of the standard gzip files, identical on every mirror.
# Every copy is checked against them, downloaded or found on disk.
_KNOWN_FILES = {
    "mnist": {
        "train-images-idx3-ubyte.gz": (9912422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        "train-labels-idx1-ubyte.gz": (28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        "t10k-images-idx3-ubyte.gz": (1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        "t10k-labels-idx1-ubyte.gz": (4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": (26421880, "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
        "train-labels-idx1-ubyte.gz": (29515, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
        "t10k-images-idx3-ubyte.gz": (4422102, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
        "t10k-labels-idx1-ubyte.gz": (5148, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
    },
}

# Mirrors tried in order (https only); an environment variable or ``base_url`` replaces them.
_BASE_URLS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "fashion-mnist": (
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
}
_URL_ENV = {"mnist": "XPCONV_MNIST_URL", "fashion-mnist": "XPCONV_FASHION_MNIST_URL"}
_TITLE = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
_READ_TIMEOUT_S = 30  # no byte for this long: the mirror is given up

#: Private test hook: when true, ``http://`` URLs on the loopback interface (127.0.0.1, ::1,
#: localhost) are allowed as well, so tests can serve files from a local ``http.server``.
#: Every other URL must be ``https://``, redirects included.
_ALLOW_HTTP_LOOPBACK = False

_log = logging.getLogger("xpconv")


def _deadline_s(size: int) -> float:
    """The whole time one file of ``size`` bytes may take: 60 s plus 20 s per MB (a 50 kB/s
    line), so a server that trickles a byte now and then is given up in bounded time."""
    return 60.0 + size / 50_000


def _cache_root() -> Path:
    try:
        import pooch
    except ImportError:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / "xpconv"
    return Path(pooch.os_cache("xpconv"))


def dataset_dir(name: str, data_dir=None) -> Path:
    """The folder where the files of dataset ``name`` are looked for (and, unless it is the
    user's own ``data_dir``, downloaded to): ``data_dir`` itself when given (a folder holding
    the files), else ``$XPCONV_DATA_DIR/<name>`` when that variable is set, else the per-user
    cache ``pooch.os_cache('xpconv')/<name>``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    root = os.environ.get("XPCONV_DATA_DIR")
    return (Path(root).expanduser() if root else _cache_root()) / name


def _url_allowed(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    return bool(_ALLOW_HTTP_LOOPBACK and parts.scheme == "http" and parts.hostname in ("127.0.0.1", "::1", "localhost"))


def _base_urls(name: str, base_url) -> list[str]:
    where = "base_url"
    if base_url is None:
        env = os.environ.get(_URL_ENV[name])
        where = _URL_ENV[name] if env else "mirror"
        base_url = env or _BASE_URLS[name]
    urls = base_url.replace(",", " ").split() if isinstance(base_url, str) else list(base_url)
    for u in urls:
        if not _url_allowed(u):
            raise DatasetError(f"{where}: {u!r} is not allowed; expected an https:// URL (downloads are https only)")
    return [u if u.endswith("/") else u + "/" for u in urls]


def _local_file(folder: Path, fname: str) -> Path | None:
    """The file ``fname`` in ``folder``, or its uncompressed twin (name without .gz); any
    entry of that name counts (a folder or FIFO is refused later, by name)."""
    for cand in (folder / fname, folder / fname.removesuffix(".gz")):
        if os.path.lexists(cand):
            return cand
    return None


def _what_it_is(size: int, digest: str | None) -> str | None:
    """'Fashion-MNIST's train-images-idx3-ubyte.gz' when (size, digest) is a known file."""
    for name, files in _KNOWN_FILES.items():
        for fname, (known_size, known_sha) in files.items():
            if size == known_size and digest == known_sha:
                return f"{_TITLE[name]}'s {fname}"
    return None


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with _open_regular(path, "dataset file") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _verify(name: str, fname: str, path: Path) -> None:
    """Refuse ``path`` (found on disk as ``fname`` of dataset ``name``) unless it is the
    published file, by size and SHA-256; the message says what the file is when it is
    another known file (say MNIST's in place of Fashion-MNIST's)."""
    want_size, want_sha = _KNOWN_FILES[name][fname]
    st = _regular_file(path, "dataset file")
    if path.name != fname:
        raise DatasetError(
            f"{path}: an uncompressed copy cannot be checked (the published SHA-256 is of {fname}); "
            f"expected {fname} itself, or pass verify=False to read it unchecked"
        )
    digest = None
    if st.st_size == want_size or any(st.st_size == s for f in _KNOWN_FILES.values() for s, _ in f.values()):
        digest = _sha256_of(path)  # only files of a known size are read whole
        if digest == want_sha:
            return
    found = _what_it_is(st.st_size, digest)
    got = f"this is {found}" if found else (
        f"sha256 {digest[:12]}... differs" if digest else f"{st.st_size:,} bytes, not {want_size:,}")
    raise DatasetError(
        f"{path}: expected {_TITLE[name]}'s {fname} (sha256 {want_sha[:12]}...), but {got}; "
        f"replace it with the published file, or pass verify=False to read it unchecked"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: a process of another user holds that pid
        return True
    return True


_PART = re.compile(r"\.(?P<fname>[\w.-]+)\.(?P<pid>\d+)-[0-9a-f]+\.part")


def _remove_stale_parts(folder: Path) -> None:
    """Delete our own temporary download files (``.<file>.<pid>-<tag>.part``) left in ``folder``
    by a process that is gone (kill -9, power cut) or that is past any download deadline."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    oldest = time.time() - max(_deadline_s(s) for f in _KNOWN_FILES.values() for s, _ in f.values()) - 60
    for entry in entries:
        m = _PART.fullmatch(entry.name)
        if not m or m["fname"] not in IDX_FILES.values():
            continue
        try:
            if _pid_alive(int(m["pid"])) and entry.stat(follow_symlinks=False).st_mtime > oldest:
                continue
            os.unlink(entry.path)
        except OSError:
            pass


class _HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not _url_allowed(newurl):
            raise _Refused(f"{req.full_url}: redirected to {newurl!r}; expected https:// only")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Refused(Exception):
    """One mirror failed for one file (the message says why); try the next."""


class _Unreachable(_Refused):
    """The mirror cannot be reached at all: skip it for the other files too."""


def _fetch(url: str, dest: Path, size: int, sha256: str) -> None:
    """Stream ``url`` into ``dest``: the bytes go to a temporary file beside it
    (``.<name>.<pid>-<tag>.part``), counted and hashed on the way; more than ``size`` bytes, a
    wrong SHA-256, a silence of _READ_TIMEOUT_S or the whole transfer past ``_deadline_s(size)``
    abort it. Only a complete, verified file is renamed into place; the temporary file never
    outlives the call (after kill -9, :func:`_remove_stale_parts` removes it on the next run)."""
    deadline = time.monotonic() + _deadline_s(size)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
    opener = urllib.request.build_opener(_HttpsOnlyRedirects)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as out:
            timeout = max(0.1, min(_READ_TIMEOUT_S, deadline - time.monotonic()))
            try:
                resp = opener.open(urllib.request.Request(url, headers={"Accept-Encoding": "identity"}), timeout=timeout)
            except urllib.error.HTTPError as exc:
                raise _Refused(f"{url}: HTTP {exc.code}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                reason = getattr(exc, "reason", exc)
                kind = "timed out" if isinstance(reason, TimeoutError) else "could not connect"
                raise _Unreachable(kind) from None
            with resp:
                length = resp.headers.get("Content-Length")
                if length is not None and length.strip() != str(size):
                    raise _Refused(f"{url}: server announces {length.strip()} bytes; expected {size:,}")
                h, got = hashlib.sha256(), 0
                while True:
                    if time.monotonic() > deadline:
                        raise _Refused(f"{url}: not complete within {_deadline_s(size):.0f} s "
                                       f"({got:,} of {size:,} bytes), download discarded")
                    try:
                        chunk = resp.read1(1 << 16)
                    except (TimeoutError, OSError, http.client.HTTPException) as exc:
                        raise _Refused(f"{url}: transfer broken off after {got:,} of {size:,} bytes "
                                       f"({type(exc).__name__}), download discarded") from None
                    if not chunk:
                        break
                    got += len(chunk)
                    if got > size:
                        raise _Refused(f"{url}: more than the {size:,} bytes expected, download discarded")
                    h.update(chunk)
                    out.write(chunk)
            if got != size:
                raise _Refused(f"{url}: transfer broken off after {got:,} of {size:,} bytes, download discarded")
            if h.hexdigest() != sha256:
                raise _Refused(f"{url}: checksum mismatch (sha256 {h.hexdigest()[:12]}..., expected "
                               f"{sha256[:12]}...), download discarded")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _download(name: str, fname: str, folder: Path, urls: list[str], dead: set, why: list):
    """Fetch ``fname`` into ``folder`` from the first mirror that serves the published file;
    return its path, or None after appending the reasons to ``why``. Mirrors that cannot be
    reached are added to ``dead`` and not tried again for the other files."""
    size, sha256 = _KNOWN_FILES[name][fname]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why.append(f"{folder}: cannot create the folder ({exc.strerror or exc})")
        return None
    for base in urls:
        if base in dead:
            continue
        url = base + fname
        _log.info("downloading %s (%.1f MB) into %s", url, size / 1e6, folder)
        try:
            _fetch(url, folder / fname, size, sha256)
            return folder / fname
        except _Unreachable as exc:
            dead.add(base)
            why.append(f"{base}: {exc}")
        except _Refused as exc:
            why.append(str(exc))
        except OSError as exc:  # e.g. a read-only folder
            why.append(f"{folder / fname}: {type(exc).__name__}: {exc.strerror or exc}")
    return None


def _verify_choice(verify) -> bool:
    """``verify`` as given, or (None) True unless ``$XPCONV_DATA_VERIFY`` is "0": the
    opt-out for folders of one's own files (subsets, uncompressed copies)."""
    if verify is None:
        return os.environ.get("XPCONV_DATA_VERIFY", "1").strip() != "0"
    return bool(verify)


def _obtain(name, folder: Path, keys, may_download: bool, base_url, verify: bool, why_not: str):
    """Paths of the files ``keys`` (IDX_FILES keys): found in ``folder`` (verified by SHA-256
    unless ``verify`` is false) or downloaded there when ``may_download``.
    Returns (found: dict key -> Path, missing: list of file names, why: str)."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    why: list[str] = []
    dead: set[str] = set()  # mirrors found unreachable: not retried for the next file
    _remove_stale_parts(folder)
    urls = None
    for key in keys:
        fname = IDX_FILES[key]
        path = _local_file(folder, fname)
        if path is not None:  # a folder, FIFO or device is refused by name, checked or not
            _regular_file(path, "dataset file")
            if verify:
                _verify(name, fname, path)
        if path is None and may_download:
            if urls is None:
                urls = _base_urls(name, base_url)
            path = _download(name, fname, folder, urls, dead, why)
        if path is None:
            missing.append(fname)
        else:
            found[key] = path
    if missing and not may_download:
        why.append(why_not)
    elif missing and not why:
        why.append("no mirror could be reached")
    return found, missing, "; ".join(dict.fromkeys(why))


def _missing_message(name, folder: Path, missing, why: str) -> str:
    files = "\n".join(f"  {f}" for f in missing)
    return (
        f"{_TITLE[name]} files missing from {folder}:\n{files}\n"
        f"They were not downloaded ({why}).\n"
        f"Put these standard IDX .gz files in {folder}, or point "
        f"--data-dir DIR (data_dir=DIR in Python) at a folder that holds them; "
        f"{_URL_ENV[name]} or base_url= selects another https download mirror."
    )


def _load_idx_dataset(name, normalize, flatten, one_hot_label, data_dir, download, base_url,
                      allow_test_split, seed, keep_uint8, verify=None):
    if download not in (None, True, False):
        raise TypeError(f"download must be None, True or False, got {download!r}")
    folder = dataset_dir(name, data_dir)
    # The user's own folder is read, never written, unless download=True says so.
    may_download = download is True or (download is None and data_dir is None)
    why_not = ("downloading is switched off" if download is False else
               f"{folder} is your folder: nothing is downloaded into it unless asked (download=True)")

    def obtain(keys):
        return _obtain(name, folder, keys, may_download, base_url, _verify_choice(verify), why_not)

    found, missing, why = obtain(("test_img", "test_label"))
    if missing:  # list the train files too, but don't download them for nothing
        missing += [IDX_FILES[k] for k in ("train_img", "train_label")
                    if _local_file(folder, IDX_FILES[k]) is None]
        raise DatasetError(_missing_message(name, folder, missing, why))
    train, missing, why = obtain(("train_img", "train_label"))
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
        f"{_TITLE[name]} training files ({', '.join(missing)}) are not in {folder} and were not "
        f"obtained ({why}); splitting the {n:,}-image test set into {tr.size:,} train / "
        f"{te.size:,} test (seed {seed}) instead.",
        DatasetWarning,
        stacklevel=3,
    )
    # Index the uint8 data first, so the float32 copy is made once per part.
    return convert(x_test[tr], t_test[tr]), convert(x_test[te], t_test[te])


_DOWNLOAD_DOC = """
    Where files come from: :func:`dataset_dir` (name, data_dir). Every file found there is
    checked against its published size and SHA-256 (``verify=False``, or ``$XPCONV_DATA_VERIFY=0``
    when ``verify`` is left at None, reads unchecked files,
    e.g. uncompressed copies, still with the header and size checks of :func:`read_idx`); a
    mismatch names the file and, when it is another known file, which one. Missing files are
    downloaded - https only, with a size cap and a deadline, verified before they are moved
    into place - into the default folders when ``download`` is None (the default), but into
    a ``data_dir`` you named only with ``download=True``; ``download=False`` never downloads.
    Mirrors: ``base_url`` (a URL prefix, or several), else the environment variable, else the
    standard ones."""


def load_mnist(normalize=True, flatten=True, one_hot_label=False, *, data_dir=None,
               download=None, base_url=None, allow_test_split=False, seed=0, verify=None):
    """MNIST, book-compatible: ``((x_train, t_train), (x_test, t_test))``.

    Images are (N, 784), or (N, 1, 28, 28) with ``flatten=False``; float32 in [0, 1] with
    ``normalize`` (divided by 255), else uint8 0..255 as in the book. Labels are int64 (N,),
    or one-hot float32 (N, 10) with ``one_hot_label``.

    Without the training files this raises :class:`DatasetError` - unless
    ``allow_test_split``, which splits the 10,000-image test set 8,000 / 2,000 with the seeded
    permutation of :func:`load_digits` (``seed``) and warns (:class:`DatasetWarning`).
    The mirror variable is ``$XPCONV_MNIST_URL``.
    """
    return _load_idx_dataset("mnist", normalize, flatten, one_hot_label, data_dir, download,
                             base_url, allow_test_split, seed, keep_uint8=True, verify=verify)


def load_fashion_mnist(normalize=True, flatten=True, one_hot_label=False, *, data_dir=None,
                       download=None, base_url=None, allow_test_split=False, seed=0, verify=None):
    """Fashion-MNIST, the same way as :func:`load_mnist` (folder 'fashion-mnist', mirror
    variable ``$XPCONV_FASHION_MNIST_URL``). Class names are in
    ``DATASETS['fashion-mnist']['class_names']``. MNIST's files in its place are refused."""
    return _load_idx_dataset("fashion-mnist", normalize, flatten, one_hot_label, data_dir,
                             download, base_url, allow_test_split, seed, keep_uint8=True, verify=verify)


if load_mnist.__doc__ and load_fashion_mnist.__doc__:  # None under python -OO
    load_mnist.__doc__ += _DOWNLOAD_DOC
    load_fashion_mnist.__doc__ += _DOWNLOAD_DOC


def load_dataset(name, data_dir=None, normalize=True, flatten=False, seed=0, download=None,
                 base_url=None, verify=None):
    """``((x_train, t_train), (x_test, t_test))`` for 'digits', 'mnist' or 'fashion-mnist':
    images float32 NCHW (or (N, C*H*W) with ``flatten``), in [0, 1] with ``normalize``;
    labels int64. This is what the CLI and the Trainer call.

    digits is the bundled set (``data_dir`` is ignored), split by :func:`load_digits` with
    ``seed``. For MNIST-style sets ``data_dir`` may be any folder holding the files there are:
    when only the t10k pair can be had, the test set is split 8,000 / 2,000 (``seed``) with a
    :class:`DatasetWarning` saying so. ``download``, ``base_url`` and ``verify`` as in
    :func:`load_mnist`.
    """
    key = str(name).lower().replace("_", "-")
    if key == "fashion":
        key = "fashion-mnist"
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if key == "digits":
        return load_digits(normalize=normalize, flatten=flatten, seed=seed)
    return _load_idx_dataset(key, normalize, flatten, False, data_dir, download, base_url,
                             allow_test_split=True, seed=seed, keep_uint8=False, verify=verify)


# your own data (a folder of class subfolders, or a .npz file): see xpconv.folders
from .folders import LoadedData, load_folder, load_npz  # noqa: E402

__all__ += ["LoadedData", "load_folder", "load_npz"]
