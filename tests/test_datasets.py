"""Datasets: bundled digits, IDX parsing, real MNIST t10k files, downloads through a local
HTTP server (never the real network) and the offline message."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import socket
import threading
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from xpconv import datasets
from xpconv.datasets import DatasetError, DatasetWarning, read_idx

from .conftest import shared_dataset

MNIST_FILES = list(datasets.IDX_FILES.values())
DIGIT_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # per class, all 1,797 rows


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"  # nothing listens there once the socket is closed


@pytest.fixture(autouse=True)
def _no_network_no_user_cache(monkeypatch, tmp_path):
    """Every test here: mirrors point at a closed local port, the cache root is in tmp_path."""
    dead = _closed_port_url()
    monkeypatch.setenv("XPCONV_MNIST_URL", dead)
    monkeypatch.setenv("XPCONV_FASHION_MNIST_URL", dead)
    monkeypatch.setenv("XPCONV_DATA_DIR", str(tmp_path / "cache-root"))


# --------------------------------------------------------------------------- helpers


def idx_bytes(dims, payload=None, magic=None) -> bytes:
    """An unsigned-byte IDX file: magic 0x000008<ndim>, big-endian dims, payload."""
    if magic is None:
        magic = 0x00000800 | len(dims)
    if payload is None:
        payload = (np.arange(int(np.prod(dims))) % 251).astype(np.uint8).tobytes()
    head = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in dims)
    return head + payload


def write(path: Path, data: bytes, compress=True) -> Path:
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    return path


def make_mnist_dir(folder: Path, n_train=50, n_test=20, seed=0) -> dict[str, bytes]:
    """Four small valid MNIST-style .gz files in ``folder``; returns name -> file bytes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        t = rng.integers(0, 10, size=n, dtype=np.uint8)
        for kind, arr, dims in (("images-idx3", x, (n, 28, 28)), ("labels-idx1", t, (n,))):
            name = f"{prefix}-{kind}-ubyte.gz"
            write(folder / name, idx_bytes(dims, arr.tobytes()))
            out[name] = (folder / name).read_bytes()
    return out


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# --------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_range_and_counts():
    (x, t), (xt, tt) = datasets.load_digits()
    assert x.shape == (1438, 1, 8, 8) and xt.shape == (359, 1, 8, 8)
    assert x.dtype == xt.dtype == np.float32
    assert t.dtype == tt.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0 and xt.min() >= 0.0 and xt.max() <= 1.0
    counts = np.bincount(np.concatenate([t, tt]), minlength=10)
    assert counts.tolist() == DIGIT_COUNTS
    assert np.bincount(tt, minlength=10).min() >= 20  # every class is in the test set


def test_digits_options():
    (x, t), (xt, _) = datasets.load_digits()
    (xf, _), (xtf, _) = datasets.load_digits(flatten=True)
    assert xf.shape == (1438, 64) and xtf.shape == (359, 64)
    np.testing.assert_array_equal(xf, x.reshape(1438, 64))
    (xr, _), _ = datasets.load_digits(normalize=False)
    assert xr.dtype == np.float32 and xr.max() == 16.0
    np.testing.assert_array_equal(xr / 16, x)
    (_, oh), _ = datasets.load_digits(one_hot_label=True)
    assert oh.shape == (1438, 10) and oh.dtype == np.float32
    np.testing.assert_array_equal(oh.argmax(1), t)
    assert (oh.sum(1) == 1).all()
    (x3, _), (xt3, _) = datasets.load_digits(test_size=0.3)
    assert xt3.shape[0] == round(0.3 * 1797) and x3.shape[0] + xt3.shape[0] == 1797
    with pytest.raises(ValueError, match="test_size"):
        datasets.load_digits(test_size=0.0)


def test_digits_split_is_the_documented_permutation():
    (x, t), (xt, tt) = datasets.load_digits(seed=0)
    pixels, labels = datasets._read_digits_file()
    p = np.random.default_rng(0).permutation(1797)
    np.testing.assert_array_equal(tt, labels[p[:359]])
    np.testing.assert_array_equal(t, labels[p[359:]])
    np.testing.assert_array_equal(xt.reshape(359, 64) * 16, pixels[p[:359]])


def test_digits_split_determinism():
    a = datasets.load_digits(seed=3)
    b = datasets.load_digits(seed=3)
    c = datasets.load_digits(seed=4)
    for (xa, ta), (xb, tb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ta, tb)
    assert not np.array_equal(a[1][1], c[1][1])
    assert not np.array_equal(a[1][0], c[1][0])


def test_digits_bundled_file_and_tamper_detection(tmp_path):
    res = resources.files("xpconv").joinpath("data", "digits.csv.gz")
    data = res.read_bytes()
    assert hashlib.sha256(data).hexdigest() == datasets._DIGITS_SHA256
    assert resources.files("xpconv").joinpath("data", "DIGITS_LICENSE.md").read_text().count("CC BY 4.0")

    good = tmp_path / "digits.csv.gz"
    good.write_bytes(data)
    pixels, labels = datasets._read_digits_file(good)
    assert pixels.shape == (1797, 64) and pixels.dtype == np.uint8 and pixels.max() == 16
    assert labels.shape == (1797,) and labels.dtype == np.int64

    bad = tmp_path / "tampered.csv.gz"
    raw = bytearray(data)
    raw[len(raw) // 2] ^= 0x01
    bad.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="tampered.csv.gz.*sha256"):
        datasets._read_digits_file(bad)


def test_load_dataset_digits_and_info():
    (x, t), (xt, tt) = datasets.load_dataset("digits", seed=1)
    assert x.shape[1:] == datasets.DATASETS["digits"]["input_dim"] and x.dtype == np.float32
    assert t.dtype == np.int64 and xt.shape == (359, 1, 8, 8)
    (xf, _), _ = datasets.load_dataset("digits", flatten=True)
    assert xf.shape == (1438, 64)
    assert set(datasets.DATASETS) == {"digits", "mnist", "fashion-mnist"}
    assert datasets.DATASETS["fashion-mnist"]["class_names"][9] == "Ankle boot"
    assert all(info["classes"] == len(info["class_names"]) == 10 for info in datasets.DATASETS.values())
    with pytest.raises(ValueError, match="unknown dataset 'cifar'.*digits"):
        datasets.load_dataset("cifar")


# --------------------------------------------------------------------------- IDX parsing


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "plain"])
def test_read_idx_valid(tmp_path, compress):
    p = write(tmp_path / "imgs.idx", idx_bytes((3, 28, 28)), compress)
    x = read_idx(p, "images", (None, 28, 28))
    assert x.shape == (3, 28, 28) and x.dtype == np.uint8
    np.testing.assert_array_equal(x.reshape(-1), (np.arange(3 * 784) % 251).astype(np.uint8))
    lab = read_idx(write(tmp_path / "labs.idx", idx_bytes((5,)), compress), "labels")
    assert lab.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "name, data, kind, shape, message",
    [
        ("bad_magic.gz", idx_bytes((2, 28, 28), magic=0x00000804), "images", None,
         "magic number 0x00000804; expected 0x00000803"),
        ("labels_as_images.gz", idx_bytes((4,)), "images", None,
         "magic number 0x00000801; expected 0x00000803"),
        ("not_idx.gz", b"hello, not an IDX file", None, None,
         "magic number 0x68656c6c is not an unsigned-byte IDX file"),
        ("float_idx.gz", idx_bytes((2,), b"\0" * 8, magic=0x00000D01), None, None,
         "not an unsigned-byte IDX file"),
        ("wrong_dims.gz", idx_bytes((2, 27, 28)), "images", (None, 28, 28),
         r"dimensions \(2, 27, 28\); expected \(N, 28, 28\)"),
        ("short_header.gz", idx_bytes((2, 28, 28))[:9], "images", None, "header truncated"),
        ("truncated.gz", idx_bytes((2, 28, 28))[:-100], "images", None,
         r"payload truncated: 1468 bytes; expected 1568 = 2 x 28 x 28"),
        ("trailing.gz", idx_bytes((3,)) + b"xx", "labels", None, "2 bytes after the payload"),
        ("empty.gz", b"", None, None, "too short for an IDX header"),
    ],
)
def test_read_idx_rejects_bad_files(tmp_path, name, data, kind, shape, message):
    compress = not data.startswith(b"\x1f\x8b")
    p = write(tmp_path / name, data, compress)
    with pytest.raises(DatasetError, match=message) as err:
        read_idx(p, kind, shape)
    assert name in str(err.value)


def test_read_idx_truncated_gzip_stream(tmp_path):
    full = gzip.compress(idx_bytes((20, 28, 28)), mtime=0)
    p = tmp_path / "cut.gz"
    p.write_bytes(full[: len(full) // 2])
    with pytest.raises(DatasetError, match="cut.gz.*(truncated|corrupt)"):
        read_idx(p, "images")
    with pytest.raises(DatasetError, match="missing.gz: no such file"):
        read_idx(tmp_path / "missing.gz")


def test_idx_pair_count_mismatch_and_label_range(tmp_path):
    make_mnist_dir(tmp_path)
    write(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes((19,), bytes(19)))
    with pytest.raises(DatasetError, match="t10k-images.*20 images.*t10k-labels.*19 labels"):
        datasets.load_mnist(data_dir=tmp_path, download=False)
    write(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes((20,), bytes([3] * 19 + [10])))
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte.gz: label 10 found; expected 0..9"):
        datasets.load_mnist(data_dir=tmp_path, download=False)
    write(tmp_path / "train-images-idx3-ubyte.gz", idx_bytes((50, 28, 27)))
    write(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes((20,), bytes(20)))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.gz: dimensions \(50, 28, 27\)"):
        datasets.load_mnist(data_dir=tmp_path, download=False)


def test_load_mnist_from_folder_book_compatible(tmp_path):
    files = make_mnist_dir(tmp_path / "d")
    (x, t), (xt, tt) = datasets.load_mnist(data_dir=tmp_path / "d")
    assert x.shape == (50, 784) and xt.shape == (20, 784) and x.dtype == np.float32
    assert t.dtype == np.int64 and 0 <= x.min() and x.max() <= 1
    raw = np.frombuffer(gzip.decompress(files["train-images-idx3-ubyte.gz"])[16:], np.uint8)
    np.testing.assert_array_equal(x.reshape(-1), raw.astype(np.float32) / np.float32(255))
    (x4, _), _ = datasets.load_mnist(flatten=False, data_dir=tmp_path / "d")
    assert x4.shape == (50, 1, 28, 28)
    (xu, _), _ = datasets.load_mnist(normalize=False, data_dir=tmp_path / "d")
    assert xu.dtype == np.uint8
    np.testing.assert_array_equal(xu.reshape(-1), raw)
    (_, oh), _ = datasets.load_mnist(one_hot_label=True, data_dir=tmp_path / "d")
    assert oh.shape == (50, 10) and oh.dtype == np.float32
    np.testing.assert_array_equal(oh.argmax(1), t)
    # Uncompressed twins are read too; fashion-mnist goes through the same reader.
    for name in MNIST_FILES:
        (tmp_path / "plain").mkdir(exist_ok=True)
        (tmp_path / "plain" / name.removesuffix(".gz")).write_bytes(gzip.decompress(files[name]))
    (xp_, tp_), _ = datasets.load_fashion_mnist(data_dir=tmp_path / "plain")
    np.testing.assert_array_equal(xp_, x)
    np.testing.assert_array_equal(tp_, t)


def test_xpconv_data_dir_env_is_a_root_of_dataset_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("XPCONV_DATA_DIR", str(tmp_path / "root"))
    assert datasets.dataset_dir("mnist") == tmp_path / "root" / "mnist"
    assert datasets.dataset_dir("mnist", tmp_path / "x") == tmp_path / "x"
    make_mnist_dir(tmp_path / "root" / "fashion-mnist")
    (x, _), _ = datasets.load_dataset("fashion-mnist", download=False)
    assert x.shape == (50, 1, 28, 28) and x.dtype == np.float32


# --------------------------------------------------------------------------- real MNIST t10k


@pytest.fixture(scope="module")
def mnist_dir():
    return Path(shared_dataset("mnist"))


def test_real_mnist_t10k_files(mnist_dir):
    x = read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz", "images", (None, 28, 28))
    t = read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz", "labels")
    assert x.shape == (10000, 28, 28) and t.shape == (10000,)
    assert t[0] == 7 and t[:5].tolist() == [7, 2, 1, 0, 4]
    assert t.min() == 0 and t.max() == 9
    assert np.bincount(t).min() > 800  # every digit is well represented
    mean = float(x.mean()) / 255
    assert 0.12 < mean < 0.14, mean  # MNIST's pixel mean is about 0.133
    assert x.max() == 255 and x.min() == 0
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        digest = hashlib.sha256((mnist_dir / name).read_bytes()).hexdigest()
        assert digest == datasets._SHA256["mnist"][name]


def test_real_mnist_test_only_folder(mnist_dir):
    with pytest.raises(DatasetError) as err:
        datasets.load_mnist(data_dir=mnist_dir)
    msg = str(err.value)
    assert "train-images-idx3-ubyte.gz" in msg and "train-labels-idx1-ubyte.gz" in msg
    assert str(mnist_dir) in msg and "allow_test_split" in msg and "--data-dir" in msg
    assert "t10k-images" not in msg  # the files that are there are not listed as missing

    with pytest.warns(DatasetWarning, match="splitting the 10,000-image test set into 8,000 train / 2,000 test"):
        (x, t), (xt, tt) = datasets.load_dataset("mnist", data_dir=mnist_dir, seed=0)
    assert x.shape == (8000, 1, 28, 28) and xt.shape == (2000, 1, 28, 28)
    assert x.dtype == np.float32 and t.dtype == np.int64
    assert 0.12 < float(x.mean()) < 0.14
    with pytest.warns(DatasetWarning):
        (x2, t2), _ = datasets.load_mnist(data_dir=mnist_dir, allow_test_split=True, seed=0,
                                          flatten=False, download=False)
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(t2, t)
    # The split is the documented seeded permutation of the 10,000 test images.
    full = read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz", "labels")
    p = np.random.default_rng(0).permutation(10000)
    np.testing.assert_array_equal(tt, full[p[:2000]])
    np.testing.assert_array_equal(t, full[p[2000:]])


# --------------------------------------------------------------------------- downloads


class _Server:
    """http.server on 127.0.0.1:0 serving ``files``; ``short`` names are sent with a
    Content-Length larger than the bytes that follow (the connection then closes)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.short: set[str] = set()
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append(name)
                body = server.files.get(name)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name in server.short:
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                else:
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture
def synthetic_hashes(tmp_path, monkeypatch):
    """Small valid MNIST files, with their hashes put in place of the published ones."""
    files = make_mnist_dir(tmp_path / "source")
    monkeypatch.setitem(datasets._SHA256, "mnist", {n: hashlib.sha256(b).hexdigest() for n, b in files.items()})
    return files


def test_download_success_into_cache(server, synthetic_hashes, tmp_path):
    server.files.update(synthetic_hashes)
    (x, t), (xt, tt) = datasets.load_mnist(base_url=server.url)
    cache = tmp_path / "cache-root" / "mnist"
    assert files_under(cache) == sorted(MNIST_FILES)  # nothing else (no temp files)
    for name, body in synthetic_hashes.items():
        assert (cache / name).read_bytes() == body
    assert x.shape == (50, 784) and xt.shape == (20, 784)
    # A second load reads the cache and downloads nothing.
    n = len(server.requests)
    (x2, _), _ = datasets.load_mnist(base_url=server.url)
    assert len(server.requests) == n
    np.testing.assert_array_equal(x2, x)


def test_download_env_url_and_mirror_fallback(server, synthetic_hashes, tmp_path, monkeypatch):
    server.files.update(synthetic_hashes)
    monkeypatch.setenv("XPCONV_MNIST_URL", f"{_closed_port_url()} {server.url}")
    (x, _), _ = datasets.load_dataset("mnist")
    assert x.shape == (50, 1, 28, 28)
    assert files_under(tmp_path / "cache-root" / "mnist") == sorted(MNIST_FILES)


def test_download_real_published_hashes(server, mnist_dir, tmp_path):
    """The real t10k files pass the real SHA-256 constants through the download path."""
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        server.files[name] = (mnist_dir / name).read_bytes()
    cache = tmp_path / "dl"
    with pytest.warns(DatasetWarning, match="8,000 train"):
        (x, t), (xt, tt) = datasets.load_dataset("mnist", data_dir=cache, base_url=server.url)
    assert files_under(cache) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    assert x.shape[0] + xt.shape[0] == 10000
    # Only the train files are missing now; they were asked for and answered 404.
    assert "train-images-idx3-ubyte.gz" in server.requests


def test_download_checksum_mismatch_leaves_nothing(server, synthetic_hashes, tmp_path):
    server.files.update(synthetic_hashes)
    server.files["t10k-images-idx3-ubyte.gz"] = gzip.compress(idx_bytes((20, 28, 28)), mtime=0)
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError) as err:
        datasets.load_mnist(data_dir=cache, base_url=server.url)
    msg = str(err.value)
    assert "checksum mismatch" in msg and "t10k-images-idx3-ubyte.gz" in msg and str(cache) in msg
    # The good labels file may stay; the bad one and any temporary file may not.
    assert files_under(cache) == ["t10k-labels-idx1-ubyte.gz"]


def test_download_truncated_transfer_leaves_nothing(server, synthetic_hashes, tmp_path):
    # Fewer bytes than Content-Length for one file; a gzip cut short (hash mismatch) for another.
    server.files.update(synthetic_hashes)
    server.short.add("t10k-images-idx3-ubyte.gz")
    labels = synthetic_hashes["t10k-labels-idx1-ubyte.gz"]
    server.files["t10k-labels-idx1-ubyte.gz"] = labels[: len(labels) - 10]
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.gz") as err:
        datasets.load_mnist(data_dir=cache, base_url=server.url)
    msg = str(err.value)
    assert "transfer broken off" in msg and "checksum mismatch" in msg
    assert "t10k-labels-idx1-ubyte.gz" in msg and "train-images-idx3-ubyte.gz" in msg
    assert server.requests.count("t10k-images-idx3-ubyte.gz") == 1
    assert "train-images-idx3-ubyte.gz" not in server.requests  # no use fetching it
    left = files_under(cache)
    assert "t10k-images-idx3-ubyte.gz" not in left and "t10k-labels-idx1-ubyte.gz" not in left
    assert left == []


def test_offline_without_files_lists_them(tmp_path):
    folder = tmp_path / "nothing-here"
    with pytest.raises(DatasetError) as err:
        datasets.load_mnist(data_dir=folder, base_url=_closed_port_url())
    msg = str(err.value)
    for name in MNIST_FILES:
        assert name in msg
    assert str(folder) in msg and "--data-dir" in msg and "could not connect" in msg
    assert files_under(folder) == []
    # Server stopped: the same clear message for the default cache folder, fashion included.
    s = _Server()
    url = s.url
    s.close()
    with pytest.raises(DatasetError, match="Fashion-MNIST files missing from .*fashion-mnist") as err:
        datasets.load_fashion_mnist(base_url=url)
    assert all(name in str(err.value) for name in MNIST_FILES)
    with pytest.raises(DatasetError, match="downloading is switched off"):
        datasets.load_dataset("mnist", data_dir=folder, download=False)
