"""Red-team cases for the data path and the core's arguments: each hostile input ends in one
line naming the file or option, what was expected and what came, and (where memory is at
stake) runs in a fresh interpreter whose peak resident memory must stay under 700 MB.

Peak memory is read from ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` inside a small
wrapper process whose only child is the case, so no other test's subprocess is counted.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from xpconv import datasets, layers, models, optim
from xpconv.datasets import DatasetError

from .conftest import shared_dataset
from .test_datasets import _register, _Server, idx_bytes, make_mnist_dir

ROOT = Path(__file__).resolve().parents[1]
RSS_LIMIT_MB = 700

# The wrapper runs the case as its only child (address space capped at 4 GiB, so a
# regression fails here instead of exhausting the machine) and prints one JSON line.
_WRAPPER = r"""
import json, resource, subprocess, sys
def cap():
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
p = subprocess.run([sys.executable, "-c", sys.argv[1]], capture_output=True, text=True,
                   preexec_fn=cap, timeout=float(sys.argv[2]))
rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"rc": p.returncode, "out": p.stdout, "err": p.stderr, "rss_mb": rss_mb}))
"""

# What every case runs: its body, then one line - the error's message, or OK.
_CASE = r"""
import sys
sys.path.insert(0, {root!r})
from xpconv import datasets
try:
{body}
    print("OK")
except Exception as exc:
    print(type(exc).__name__ + ": " + str(exc))
"""


def run_case(body: str, timeout: float = 120) -> tuple[str, float]:
    """(the case's output, peak RSS of its interpreter in MB)."""
    code = _CASE.format(root=str(ROOT), body="\n".join("    " + line for line in body.strip().splitlines()))
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, code, str(timeout)], check=False, capture_output=True, text=True,
                          env=env, timeout=timeout + 30)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["rc"] == 0, res["err"]
    return res["out"].strip(), res["rss_mb"]


def gz_zeros(path: Path, head: bytes, zeros: int, chunk: int = 1 << 24) -> Path:
    """A well-formed gzip file of ``head`` followed by ``zeros`` zero bytes, built in moments:
    one deflated chunk of zeros is repeated (blocks ending in a full flush stand alone)."""
    def raw(data: bytes, final: bool) -> bytes:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        return c.compress(data) + c.flush(zlib.Z_FINISH if final else zlib.Z_FULL_FLUSH)

    n, rest = divmod(zeros, chunk)
    block, crc = raw(bytes(chunk), False), zlib.crc32(head)
    zero_chunk = bytes(chunk)
    for _ in range(n):
        crc = zlib.crc32(zero_chunk, crc)
    crc = zlib.crc32(bytes(rest), crc)
    with open(path, "wb") as f:
        f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")
        f.write(raw(head, False))
        for _ in range(n):
            f.write(block)
        f.write(raw(bytes(rest), True))
        f.write(struct.pack("<II", crc & 0xFFFFFFFF, (len(head) + zeros) & 0xFFFFFFFF))
    return path


def one_line(msg: str, *names: str) -> None:
    assert "\n" not in msg and "Traceback" not in msg, msg
    assert "expected" in msg, msg
    for name in names:
        assert name in msg, (name, msg)


def test_gz_zeros_is_a_valid_gzip(tmp_path):
    p = gz_zeros(tmp_path / "z.gz", b"head", 3 * 1000 + 7, chunk=1000)
    assert gzip.decompress(p.read_bytes()) == b"head" + bytes(3007)


# --------------------------------------------------------------------------- IDX bombs


@pytest.fixture(scope="module")
def bomb_dir(tmp_path_factory):
    """The issue's case: a 1.5 MB .gz whose header promises (and holds) 2,000,000 images
    (1.5 GB), labels that agree - and the same images next to 10,000 honest labels."""
    d = tmp_path_factory.mktemp("bomb")
    head = idx_bytes((2_000_000, 28, 28), b"")
    gz_zeros(d / "t10k-images-idx3-ubyte.gz", head, 2_000_000 * 784)
    gz_zeros(d / "t10k-labels-idx1-ubyte.gz", idx_bytes((2_000_000,), b""), 2_000_000)
    m = d / "mismatch"
    m.mkdir()
    os.link(d / "t10k-images-idx3-ubyte.gz", m / "t10k-images-idx3-ubyte.gz")
    (m / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes((10_000,), bytes(10_000)), mtime=0))
    assert (d / "t10k-images-idx3-ubyte.gz").stat().st_size < 2_000_000
    return d


def test_idx_bomb_with_agreeing_labels_is_capped(bomb_dir):
    out, rss = run_case(f"datasets.load_mnist(data_dir={str(bomb_dir)!r}, verify=False, download=False)")
    assert out.startswith(f"DatasetError: {bomb_dir / 't10k-images-idx3-ubyte.gz'}: header promises 2000000 x 28 x 28"), out
    one_line(out, "t10k-images-idx3-ubyte.gz", "1,568,000,000", "67,108,864")
    assert rss < RSS_LIMIT_MB, f"t10k-images-idx3-ubyte.gz bomb: expected < {RSS_LIMIT_MB} MB resident, got {rss:.0f} MB"


def test_idx_bomb_against_honest_labels_is_a_count_mismatch(bomb_dir):
    m = bomb_dir / "mismatch"
    out, rss = run_case(f"datasets.load_mnist(data_dir={str(m)!r}, verify=False, download=False)")
    one_line(out, "2000000 images", "10000 labels")
    assert rss < RSS_LIMIT_MB, f"count mismatch: expected < {RSS_LIMIT_MB} MB resident, got {rss:.0f} MB"


def test_idx_bomb_is_refused_by_hash_first(bomb_dir):
    out, rss = run_case(f"datasets.load_mnist(data_dir={str(bomb_dir)!r}, download=False)")
    one_line(out, "t10k-images-idx3-ubyte.gz", "expected MNIST's t10k-images-idx3-ubyte.gz", "not 1,648,877")
    assert rss < RSS_LIMIT_MB, f"bomb with verify: expected < {RSS_LIMIT_MB} MB resident, got {rss:.0f} MB"


def test_trailing_gzip_bomb_is_not_decompressed(tmp_path):
    p = gz_zeros(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes((3,)), 1 << 30)  # 1 GiB after 3 labels
    out, rss = run_case(f"datasets.read_idx({str(p)!r}, 'labels')")
    one_line(out, str(p), "over 1 MiB of bytes after the payload")
    assert rss < RSS_LIMIT_MB, f"trailing bomb: expected < {RSS_LIMIT_MB} MB resident, got {rss:.0f} MB"


# --------------------------------------------------------------------------- files that are not files


@pytest.mark.parametrize("target, kind", [("/dev/zero", "a device"), ("/dev/urandom", "a device"), ("fifo", "a FIFO"),
                                          ("folder", "a folder")])
def test_non_regular_dataset_files(tmp_path, target, kind):
    d = tmp_path / "data"
    d.mkdir()
    name = d / "t10k-images-idx3-ubyte.gz"
    if target == "fifo":
        os.mkfifo(name)
    elif target == "folder":
        name.mkdir()
    else:
        name.symlink_to(target)
    for call in (f"datasets.load_mnist(data_dir={str(d)!r}, download=False)",
                 f"datasets.load_mnist(data_dir={str(d)!r}, download=False, verify=False)",
                 f"datasets.read_idx({str(name)!r})"):
        out, rss = run_case(call, timeout=60)  # a FIFO opened for reading would hang
        one_line(out, str(name), f"got {kind}")
        assert rss < RSS_LIMIT_MB, f"{target}: expected < {RSS_LIMIT_MB} MB resident, got {rss:.0f} MB"


def test_sparse_6gb_file(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    name = d / "t10k-images-idx3-ubyte.gz"
    with open(name, "wb") as f:
        f.truncate(6 << 30)  # sparse: no disk used
    out, rss = run_case(f"datasets.load_mnist(data_dir={str(d)!r}, download=False)")
    one_line(out, str(name), "6,442,450,944 bytes, not 1,648,877")
    assert rss < RSS_LIMIT_MB, f"sparse file: expected < {RSS_LIMIT_MB} MB resident, got {rss:.0f} MB"
    out, rss = run_case(f"datasets.read_idx({str(name)!r})")
    one_line(out, str(name), "magic number 0x00000000")
    assert rss < RSS_LIMIT_MB, f"sparse file, unchecked: expected < {RSS_LIMIT_MB} MB resident, got {rss:.0f} MB"


# --------------------------------------------------------------------------- wrong or tampered data


def test_fashion_mnist_given_mnist_and_a_tampered_file(tmp_path):
    src = Path(shared_dataset("mnist"))
    d = tmp_path / "d"
    d.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (d / name).write_bytes((src / name).read_bytes())
    with pytest.raises(DatasetError) as err:
        datasets.load_fashion_mnist(data_dir=d)
    one_line(str(err.value), "t10k-images-idx3-ubyte.gz", "Fashion-MNIST's", "this is MNIST's t10k-images-idx3-ubyte.gz")
    raw = bytearray((d / "t10k-images-idx3-ubyte.gz").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (d / "t10k-images-idx3-ubyte.gz").write_bytes(bytes(raw))
    with pytest.raises(DatasetError) as err:
        datasets.load_mnist(data_dir=d)
    one_line(str(err.value), "t10k-images-idx3-ubyte.gz", "sha256", "differs")


# --------------------------------------------------------------------------- downloads


@pytest.fixture
def loopback(monkeypatch):
    monkeypatch.setattr(datasets, "_ALLOW_HTTP_LOOPBACK", True)
    s = _Server()
    yield s
    s.close()


def test_kill_9_mid_download_leaves_a_part_file_the_next_run_removes(loopback, tmp_path, monkeypatch):
    files = make_mnist_dir(tmp_path / "src")
    _register(monkeypatch, files)
    loopback.files.update(files)
    loopback.drip.add("t10k-images-idx3-ubyte.gz")  # a byte every 0.1 s: the download lasts
    cache = tmp_path / "cache"
    known = {n: (len(b), hashlib.sha256(b).hexdigest()) for n, b in files.items()}
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "from xpconv import datasets\n"
        "datasets._ALLOW_HTTP_LOOPBACK = True\n"
        f"datasets._KNOWN_FILES['mnist'] = {known!r}\n"
        f"datasets.load_mnist(data_dir={str(cache)!r}, base_url={loopback.url!r}, download=True)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(600):  # up to 60 s for the part file to appear (not a timing assertion)
            parts = list(cache.glob(".t10k-images-idx3-ubyte.gz.*.part")) if cache.exists() else []
            if parts:
                break
            assert child.poll() is None, child.stderr.read().decode()
            time.sleep(0.1)
        else:
            pytest.fail("the download never started: expected a .part file in the cache folder")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stderr.close()
    assert parts[0].exists() and f".{child.pid}-" in parts[0].name
    loopback.drip.clear()
    datasets.load_mnist(data_dir=cache, base_url=loopback.url, download=True)
    left = sorted(p.name for p in cache.iterdir())
    assert left == sorted(files), f"{cache}: expected only the four data files after the next run, got {left}"


# --------------------------------------------------------------------------- core arguments

NAN = math.nan

ARGUMENT_CASES = [
    (lambda: optim.Momentum(momentum=NAN), ValueError, "Momentum: momentum must be in [0, 1), got nan"),
    (lambda: optim.Momentum(momentum=5), ValueError, "Momentum: momentum must be in [0, 1), got 5"),
    (lambda: optim.Nesterov(momentum=-0.1), ValueError, "Nesterov: momentum must be in [0, 1)"),
    (lambda: optim.RMSprop(decay_rate=2), ValueError, "RMSprop: decay_rate must be in [0, 1), got 2"),
    (lambda: optim.SGD(weight_decay=NAN), ValueError, "SGD: weight_decay must be a finite number >= 0, got nan"),
    (lambda: optim.Adam(weight_decay=math.inf), ValueError, "Adam: weight_decay must be a finite number >= 0, got inf"),
    (lambda: optim.SGD(lr=NAN), ValueError, "SGD: lr must be a positive number, got nan"),
    (lambda: layers.Pooling(2, 2, 2, pad=2), ValueError, "Pooling: pad must be smaller than the window (2, 2), got 2"),
    (lambda: layers.AvgPooling(3, 3, 1, pad=(0, 3)), ValueError, "AvgPooling: pad must be smaller than the window"),
    (lambda: layers.Pooling(2, 2, stride=1.5), ValueError, "Pooling stride must be a whole number, got 1.5 (not truncated)"),
    (lambda: layers.Pooling(2.5, 2), ValueError, "Pooling pool size must be a whole number, got (2.5, 2)"),
    (lambda: layers.Convolution(np.zeros((2, 1, 3, 3), np.float32), np.zeros(2, np.float32), stride=(1, 1.5)),
     ValueError, "Convolution stride must be a whole number, got (1, 1.5)"),
    (lambda: layers.Convolution(np.zeros((2, 1, 3, 3), np.float32), np.zeros(2, np.float32), pad="1"),
     TypeError, "Convolution pad must be an int or an (h, w) pair of ints, got '1'"),
]


@pytest.mark.parametrize("make, exc, message", ARGUMENT_CASES, ids=[c[2].split(" got")[0] for c in ARGUMENT_CASES])
def test_bad_arguments_are_refused_in_one_line(make, exc, message):
    with pytest.raises(exc) as err:
        make()
    msg = str(err.value)
    assert message in msg and "\n" not in msg, msg


def test_pooling_pad_below_window_still_works():
    out = layers.Pooling(3, 3, 1, pad=2).forward(np.ones((1, 1, 4, 4), np.float32))
    assert np.isfinite(out).all() and out.shape == (1, 1, 6, 6)
    assert layers.Pooling(2.0, 2, stride=np.int64(2)).forward(np.ones((1, 1, 4, 4), np.float32)).shape == (1, 1, 2, 2)


@pytest.fixture(scope="module")
def net():
    return models.SimpleConvNet(input_dim=(1, 8, 8), conv_param={"filter_num": 4, "filter_size": 3, "pad": 0, "stride": 1},
                                hidden_size=10, output_size=10)


def test_accuracy_refuses_labels_out_of_range(net):
    x = np.zeros((3, 1, 8, 8), np.float32)
    for bad in ([1, 200, 3], [0, -1, 2]):
        with pytest.raises(ValueError) as err:
            net.accuracy(x, np.array(bad))
        msg = str(err.value)
        assert msg.startswith("accuracy: expected labels 0 <= t < 10, got min") and "\n" not in msg, msg


def test_empty_batches_give_a_clear_error(net):
    x0, t0 = np.zeros((0, 1, 8, 8), np.float32), np.zeros(0, np.int64)
    for call in (lambda: net.loss(x0, t0), lambda: net.gradient(x0, t0), lambda: net.accuracy(x0, t0)):
        with pytest.raises(ValueError) as err:
            call()
        msg = str(err.value)
        assert ("N=0" in msg or "no samples" in msg) and "\n" not in msg, msg
    bn = layers.BatchNormalization(np.ones(4, np.float32), np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="BatchNormalization: expected a training batch of at least one sample, got N=0"):
        bn.forward(np.zeros((0, 4), np.float32), True)
    assert net.predict(x0).shape == (0, 10)  # predicting nothing is fine: no mean is taken


def test_python_lists_are_accepted_and_other_inputs_named(net):
    x = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(net.predict(x.tolist()), net.predict(x), rtol=1e-6)
    assert net.accuracy(x.tolist(), [1, 2]) == net.accuracy(x, np.array([1, 2]))
    with pytest.raises(TypeError, match=r"^predict: expected an array of shape \(N, ...\) or a nested list, got str$"):
        net.predict("digits.png")
