"""Datasets: bundled digits, IDX parsing, real MNIST t10k files, downloads through a local
HTTP server (never the real network) and the offline message."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
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
    """Every test here: mirrors point at a closed local port, the cache root is in tmp_path,
    and http:// on 127.0.0.1 is allowed (the module's private test hook; https only otherwise)."""
    monkeypatch.setattr(datasets, "_ALLOW_HTTP_LOOPBACK", True)
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
        datasets.load_mnist(data_dir=tmp_path, download=False, verify=False)
    write(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes((20,), bytes([3] * 19 + [10])))
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte.gz: label 10 found; expected 0..9"):
        datasets.load_mnist(data_dir=tmp_path, download=False, verify=False)
    write(tmp_path / "train-images-idx3-ubyte.gz", idx_bytes((50, 28, 27)))
    write(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes((20,), bytes(20)))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.gz: dimensions \(50, 28, 27\)"):
        datasets.load_mnist(data_dir=tmp_path, download=False, verify=False)


def test_load_mnist_from_folder_book_compatible(tmp_path, monkeypatch):
    files = make_mnist_dir(tmp_path / "d")
    _register(monkeypatch, files)
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
    # Uncompressed twins cannot be checked against the published (gzip) hashes: refused,
    # unless verify=False; fashion-mnist goes through the same reader.
    for name in MNIST_FILES:
        (tmp_path / "plain").mkdir(exist_ok=True)
        (tmp_path / "plain" / name.removesuffix(".gz")).write_bytes(gzip.decompress(files[name]))
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte: an uncompressed copy cannot be checked.*verify=False"):
        datasets.load_fashion_mnist(data_dir=tmp_path / "plain")
    (xp_, tp_), _ = datasets.load_fashion_mnist(data_dir=tmp_path / "plain", verify=False)
    np.testing.assert_array_equal(xp_, x)
    np.testing.assert_array_equal(tp_, t)


def test_xpconv_data_dir_env_is_a_root_of_dataset_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("XPCONV_DATA_DIR", str(tmp_path / "root"))
    assert datasets.dataset_dir("mnist") == tmp_path / "root" / "mnist"
    assert datasets.dataset_dir("mnist", tmp_path / "x") == tmp_path / "x"
    make_mnist_dir(tmp_path / "root" / "fashion-mnist")
    (x, _), _ = datasets.load_dataset("fashion-mnist", download=False, verify=False)
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
        assert (len((mnist_dir / name).read_bytes()), digest) == datasets._KNOWN_FILES["mnist"][name]


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


# --------------------------------------------------------------------------- hostile local files


@pytest.fixture
def mnist_copy(mnist_dir, tmp_path):
    """A writable copy of the real t10k pair."""
    d = tmp_path / "copy"
    d.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (d / name).write_bytes((mnist_dir / name).read_bytes())
    return d


def test_tampered_local_file_is_refused_by_name(mnist_copy):
    p = mnist_copy / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(p.read_bytes())
    raw[-20] ^= 0x01  # same size, well-formed gzip header: only the hash tells
    p.write_bytes(bytes(raw))
    with pytest.raises(DatasetError) as err:
        datasets.load_dataset("mnist", data_dir=mnist_copy)
    msg = str(err.value)
    assert msg.startswith(f"{p}: expected MNIST's t10k-labels-idx1-ubyte.gz") and "sha256" in msg
    assert "differs" in msg and "\n" not in msg
    # A file of another size is refused without being read whole.
    p.write_bytes(b"\x1f\x8b" + b"\0" * 100)
    with pytest.raises(DatasetError, match="102 bytes, not 4,542"):
        datasets.load_dataset("mnist", data_dir=mnist_copy)


def test_fashion_mnist_pointed_at_mnist_files_is_refused(mnist_copy):
    with pytest.raises(DatasetError) as err:
        datasets.load_dataset("fashion-mnist", data_dir=mnist_copy)
    msg = str(err.value)
    assert "expected Fashion-MNIST's t10k-images-idx3-ubyte.gz" in msg
    assert "this is MNIST's t10k-images-idx3-ubyte.gz" in msg
    # Swapped names are caught the same way.
    a, b = mnist_copy / "t10k-images-idx3-ubyte.gz", mnist_copy / "t10k-labels-idx1-ubyte.gz"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.gz: expected MNIST's t10k-images.*this is MNIST's t10k-labels"):
        datasets.load_dataset("mnist", data_dir=mnist_copy)


def test_idx_header_checked_before_allocation(tmp_path):
    # 2,000,000 images promised in a few KB: the labels disagree -> refused from the headers.
    zeros = bytes(1 << 16)
    body = gzip.compress(idx_bytes((2_000_000, 28, 28), zeros), mtime=0)
    write(tmp_path / "t10k-images-idx3-ubyte.gz", body, compress=False)
    write(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes((20,), bytes(20)))
    with pytest.raises(DatasetError, match="2000000 images but .*t10k-labels-idx1-ubyte.gz holds 20 labels"):
        datasets.load_mnist(data_dir=tmp_path, download=False, verify=False)
    # Agreeing counts: the size cap refuses it, still before any payload is read.
    write(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes((2_000_000,), zeros))
    with pytest.raises(DatasetError, match=r"header promises 2000000 x 28 x 28 = 1,568,000,000 bytes; expected at most 67,108,864"):
        datasets.load_mnist(data_dir=tmp_path, download=False, verify=False)
    with pytest.raises(DatasetError, match="promises 2000000 x 28 x 28"):
        read_idx(tmp_path / "t10k-images-idx3-ubyte.gz")
    assert read_idx(write(tmp_path / "ok.gz", idx_bytes((4, 2))), max_bytes=8).shape == (4, 2)
    with pytest.raises(DatasetError, match="expected at most 7"):
        read_idx(tmp_path / "ok.gz", max_bytes=7)


def test_trailing_data_is_not_decompressed_without_bound(tmp_path):
    p = write(tmp_path / "bomb.gz", idx_bytes((3,)) + bytes(50 << 20))
    with pytest.raises(DatasetError, match="bomb.gz: over 1 MiB of bytes after the payload"):
        read_idx(p, "labels")


def test_only_regular_files_are_opened(tmp_path):
    fifo = tmp_path / "t10k-images-idx3-ubyte.gz"
    os.mkfifo(fifo)  # opening it would block forever
    with pytest.raises(DatasetError, match="expected a regular IDX file, got a FIFO"):
        read_idx(fifo)
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.gz: expected a regular dataset file, got a FIFO"):
        datasets.load_mnist(data_dir=tmp_path, download=False)
    with pytest.raises(DatasetError, match="expected a regular IDX file, got a folder"):
        read_idx(tmp_path)
    link = tmp_path / "zero.gz"
    link.symlink_to("/dev/zero")
    with pytest.raises(DatasetError, match="zero.gz: expected a regular IDX file, got a device"):
        read_idx(link)


# --------------------------------------------------------------------------- downloads


class _Server:
    """http.server on 127.0.0.1:0 serving ``files``. Per file name: ``short`` sends a
    Content-Length larger than the bytes that follow (then closes); ``drip`` sends one byte
    every 0.1 s; ``endless`` sends zeros without a Content-Length until the client leaves;
    ``redirect`` maps a name to a Location header (302)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.short: set[str] = set()
        self.drip: set[str] = set()
        self.endless: set[str] = set()
        self.redirect: dict[str, str] = {}
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append(name)
                if name in server.redirect:
                    self.send_response(302)
                    self.send_header("Location", server.redirect[name])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if name in server.endless:
                    self.send_response(200)
                    self.end_headers()  # no Content-Length: the body ends when the connection does
                    self.close_connection = True
                    try:
                        for _ in range(10_000):
                            self.wfile.write(bytes(1 << 16))
                    except OSError:
                        pass
                    return
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
                elif name in server.drip:
                    self.close_connection = True
                    try:
                        for i in range(min(len(body), 600)):
                            self.wfile.write(body[i : i + 1])
                            self.wfile.flush()
                            time.sleep(0.1)
                    except OSError:
                        pass
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


def _register(monkeypatch, files, name="mnist"):
    """Put the sizes and hashes of ``files`` in place of the published ones of ``name``."""
    monkeypatch.setitem(datasets._KNOWN_FILES, name, {n: (len(b), hashlib.sha256(b).hexdigest()) for n, b in files.items()})


@pytest.fixture
def synthetic_hashes(tmp_path, monkeypatch):
    """Small valid MNIST files, with their sizes and hashes put in place of the published ones."""
    files = make_mnist_dir(tmp_path / "source")
    _register(monkeypatch, files)
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


def test_nothing_is_downloaded_into_the_users_folder_unless_asked(server, mnist_dir, tmp_path):
    """A --data-dir holding only the test files: read as it is (split, with a warning), no
    request made, the folder untouched - until download=True asks for the rest."""
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        server.files[name] = (mnist_dir / name).read_bytes()
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in server.files:
        (mine / name).write_bytes(server.files[name])
    for _ in range(2):  # every eval alike
        with pytest.warns(DatasetWarning, match="nothing is downloaded into it unless asked"):
            datasets.load_dataset("mnist", data_dir=mine, base_url=server.url)
    assert server.requests == []
    assert files_under(mine) == sorted(server.files)
    # A named folder that does not exist is not created.
    with pytest.raises(DatasetError, match="unless asked") as err:
        datasets.load_mnist(data_dir=tmp_path / "nowhere", base_url=server.url)
    assert "\n" in str(err.value) and not (tmp_path / "nowhere").exists() and server.requests == []


def test_download_real_published_hashes(server, mnist_dir, tmp_path):
    """The real t10k files pass the real sizes and SHA-256 constants through the download path."""
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        server.files[name] = (mnist_dir / name).read_bytes()
    cache = tmp_path / "dl"
    with pytest.warns(DatasetWarning, match="8,000 train"):
        (x, t), (xt, tt) = datasets.load_dataset("mnist", data_dir=cache, base_url=server.url, download=True)
    assert files_under(cache) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    assert x.shape[0] + xt.shape[0] == 10000
    # Only the train files are missing now; they were asked for and answered 404.
    assert "train-images-idx3-ubyte.gz" in server.requests


def test_download_checksum_mismatch_leaves_nothing(server, synthetic_hashes, tmp_path):
    server.files.update(synthetic_hashes)
    good = synthetic_hashes["t10k-images-idx3-ubyte.gz"]
    server.files["t10k-images-idx3-ubyte.gz"] = good[:-1] + bytes([good[-1] ^ 1])  # same size
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError) as err:
        datasets.load_mnist(data_dir=cache, base_url=server.url, download=True)
    msg = str(err.value)
    assert "checksum mismatch" in msg and "t10k-images-idx3-ubyte.gz" in msg and str(cache) in msg
    # The good labels file may stay; the bad one and any temporary file may not.
    assert files_under(cache) == ["t10k-labels-idx1-ubyte.gz"]


def test_download_truncated_transfer_leaves_nothing(server, synthetic_hashes, tmp_path):
    # Fewer bytes than Content-Length for one file; a size other than the known one for another.
    server.files.update(synthetic_hashes)
    server.short.add("t10k-images-idx3-ubyte.gz")
    labels = synthetic_hashes["t10k-labels-idx1-ubyte.gz"]
    server.files["t10k-labels-idx1-ubyte.gz"] = labels[: len(labels) - 10]
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.gz") as err:
        datasets.load_mnist(data_dir=cache, base_url=server.url, download=True)
    msg = str(err.value)
    assert "transfer broken off" in msg and f"server announces {len(labels) - 10} bytes; expected {len(labels):,}" in msg
    assert "t10k-labels-idx1-ubyte.gz" in msg and "train-images-idx3-ubyte.gz" in msg
    assert server.requests.count("t10k-images-idx3-ubyte.gz") == 1
    assert "train-images-idx3-ubyte.gz" not in server.requests  # no use fetching it
    assert files_under(cache) == []


def test_download_endless_body_is_cut_at_the_known_size(server, synthetic_hashes, tmp_path):
    server.files.update(synthetic_hashes)
    server.endless.add("t10k-images-idx3-ubyte.gz")
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError) as err:
        datasets.load_mnist(data_dir=cache, base_url=server.url, download=True)
    size = len(synthetic_hashes["t10k-images-idx3-ubyte.gz"])
    assert f"t10k-images-idx3-ubyte.gz: more than the {size:,} bytes expected, download discarded" in str(err.value)
    assert files_under(cache) == ["t10k-labels-idx1-ubyte.gz"]


def test_download_has_a_total_deadline(server, synthetic_hashes, tmp_path, monkeypatch):
    """A server that keeps sending a byte now and then never trips a read timeout; the
    deadline for the whole file ends it (here shortened to 0.5 s for the test)."""
    monkeypatch.setattr(datasets, "_deadline_s", lambda size: 0.5)
    server.files.update(synthetic_hashes)
    server.drip.add("t10k-labels-idx1-ubyte.gz")
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte.gz: not complete within 0 s \(\d+ of [\d,]+ bytes\), download discarded"):
        datasets.load_mnist(data_dir=cache, base_url=server.url, download=True)
    assert "t10k-labels-idx1-ubyte.gz" not in files_under(cache)
    assert not [p for p in files_under(cache) if p.endswith(".part")]


def test_downloads_are_https_only(server, synthetic_hashes, tmp_path, monkeypatch):
    assert all(u.startswith("https://") for urls in datasets._BASE_URLS.values() for u in urls)
    # A plain-http redirect is refused even where the loopback test hook is on.
    server.files.update(synthetic_hashes)
    server.redirect["t10k-images-idx3-ubyte.gz"] = "http://example.invalid/t10k-images-idx3-ubyte.gz"
    with pytest.raises(DatasetError, match="redirected to 'http://example.invalid/.*'; expected https:// only"):
        datasets.load_mnist(data_dir=tmp_path / "c", base_url=server.url, download=True)
    # Without the hook, http:// is refused outright, naming where the URL came from.
    monkeypatch.setattr(datasets, "_ALLOW_HTTP_LOOPBACK", False)
    with pytest.raises(DatasetError, match="base_url: 'http://127.0.0.1.*' is not allowed; expected an https:// URL"):
        datasets.load_mnist(base_url=server.url)
    monkeypatch.setenv("XPCONV_MNIST_URL", "http://mirror.example/mnist/")
    with pytest.raises(DatasetError, match="XPCONV_MNIST_URL: 'http://mirror.example/mnist/' is not allowed"):
        datasets.load_mnist()
    assert "t10k-images-idx3-ubyte.gz" in server.requests and "train-images-idx3-ubyte.gz" not in server.requests


def test_stale_temporary_files_are_removed_on_the_next_start(server, synthetic_hashes, tmp_path):
    cache = tmp_path / "cache-root" / "mnist"
    cache.mkdir(parents=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that has exited, as after kill -9
    stale = cache / f".t10k-images-idx3-ubyte.gz.{gone.pid}-0a1b.part"
    live = cache / f".train-images-idx3-ubyte.gz.{os.getppid()}-0a1b.part"  # a download in progress
    other = cache / ".notes.1-0a1b.part"  # not ours
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    server.files.update(synthetic_hashes)
    datasets.load_mnist(base_url=server.url)
    assert not stale.exists() and live.exists() and other.exists()
    # A fresh-looking file of a live pid is kept, an old one is not.
    os.utime(live, (0, 0))
    datasets.load_mnist(base_url=server.url)
    assert not live.exists()


def test_offline_without_files_lists_them(tmp_path):
    folder = tmp_path / "nothing-here"
    with pytest.raises(DatasetError) as err:
        datasets.load_mnist(data_dir=folder, base_url=_closed_port_url(), download=True)
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
