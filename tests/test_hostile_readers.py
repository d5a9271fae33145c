"""Hostile files for the readers of the book's pickles and of ``xpconv predict``'s inputs:
each is refused in one line naming the file, never read when it is not a regular file, and
handled within a budget (peak resident memory under 700 MB, measured in a fresh
interpreter by the wrapper of tests/test_hostile.py; through the CLI, exit status 2).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from xpconv import _io, bookpickle, images
from xpconv.bookpickle import UnsafePickleError
from xpconv.images import ImageError, read_images

from .test_hostile import RSS_LIMIT_MB, run_case
from .test_hostile_checkpoints import fails, good  # noqa: F401, F811 - good is a fixture

# ----------------------------------------------------------------------------- helpers


def load_case(call: str, timeout: float = 120) -> tuple[str, float]:
    """``call`` (an expression using bookpickle, models or images) in a fresh interpreter:
    (its one line of output, peak RSS in MB)."""
    body = f"from xpconv import bookpickle, images, models\n{call}"
    return run_case(body, timeout=timeout)


def refused(out: str, rss: float, *pieces: str) -> None:
    assert "\n" not in out and "Traceback" not in out and out != "OK", out
    assert rss < RSS_LIMIT_MB, f"peak RSS {rss:.0f} MB: {out}"
    for piece in pieces:
        assert piece in out, (piece, out)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png(width: int, height: int, rows: int | None = None, *, interlace: int = 0, value: int = 200, end_stream: bool = True) -> bytes:
    """A grey 8-bit PNG whose compressed data holds ``rows`` rows (all of them by default;
    interlaced: the rows of the passes, in order)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, interlace)
    sizes = [(width, height)]
    if interlace:
        sizes = [(len(range(x0, width, dx)), len(range(y0, height, dy))) for x0, y0, dx, dy in ADAM7]
    lines = [b"\0" + bytes([value]) * w for w, h in sizes if w for _ in range(h)]
    raw = b"".join(lines[: len(lines) if rows is None else rows])
    c = zlib.compressobj()
    data = c.compress(raw) + (c.flush() if end_stream else c.flush(zlib.Z_SYNC_FLUSH))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def big_png(side: int) -> bytes:
    """A grey ``side`` x ``side`` PNG of zeros, compressed piecewise (about 1 KB per MB)."""
    c = zlib.compressobj(9)
    block = bytes(side + 1) * 1000
    data = b"".join(c.compress(block) for _ in range(side // 1000)) + c.compress(bytes(side + 1) * (side % 1000)) + c.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def ico_of(png_bytes: bytes, listed: int = 16) -> bytes:
    """An ICO file with one entry, a PNG, listed in its directory as ``listed`` x ``listed``."""
    head = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", listed % 256, listed % 256, 0, 0, 1, 32, len(png_bytes), 6 + 16)
    return head + entry + png_bytes


# ----------------------------------------------------------------------------- not a regular file


@pytest.mark.parametrize("call", ["bookpickle.load_params({p!r})", "models.SimpleConvNet().load_params({p!r})",
                                  "assert bookpickle.file_kind({p!r}) == 'unknown'\nbookpickle.load({p!r})"])
@pytest.mark.parametrize("target", ["fifo", "/dev/zero", "folder"])
def test_params_that_are_not_regular_files_are_refused_unread(tmp_path, call, target):
    path = tmp_path / "params.pkl"
    if target == "fifo":
        os.mkfifo(path)
        kind = "is a FIFO (named pipe), not a regular"
    elif target == "folder":
        path.mkdir()
        kind = "is a folder, not a regular"
    else:
        path.symlink_to(target)  # read in full, /dev/zero never ends
        kind = "is a character device, not a regular"
    out, rss = load_case(call.format(p=str(path)), timeout=60)  # a FIFO opened for reading would hang
    refused(out, rss, str(path), kind)


def test_a_path_swapped_after_its_stat_is_refused_without_hanging(tmp_path, monkeypatch):
    """The open is checked again by fstat: a path that becomes a FIFO or another file
    between the stat and the open is refused, and opening the FIFO does not block."""
    regular = tmp_path / "regular.pkl"
    regular.write_bytes(b"x")
    fifo = tmp_path / "later.pkl"
    os.mkfifo(fifo)
    real_stat = _io.stat_regular
    monkeypatch.setattr(_io, "stat_regular", lambda path, what: real_stat(regular, what))
    with pytest.raises(ValueError, match=r"later\.pkl: is a FIFO \(named pipe\), not a regular parameter file"):
        _io.open_regular(fifo, "parameter file")
    other = tmp_path / "other.pkl"
    other.write_bytes(b"y")
    with pytest.raises(ValueError, match=r"other\.pkl: the parameter file was replaced while being opened"):
        _io.open_regular(other, "parameter file")
    with pytest.raises(UnsafePickleError, match=r"later\.pkl: is a FIFO"):
        bookpickle.load(fifo)


def test_read_regular_reads_what_stat_said(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc")
    assert _io.read_regular(p, "file", max_bytes=3) == b"abc"
    with pytest.raises(ValueError, match=r"f\.bin: a file of 3 bytes; expected a file of at most 2 bytes"):
        _io.read_regular(p, "file", max_bytes=2)
    with pytest.raises(FileNotFoundError, match=r"nope: no such file"):
        _io.read_regular(tmp_path / "nope", "file", max_bytes=2)


# ----------------------------------------------------------------------------- the pickle reader's budget


def _pickle_case(tmp_path: Path, name: str, data: bytes) -> tuple[str, float]:
    path = tmp_path / name
    path.write_bytes(data)
    return load_case(f"bookpickle.load({str(path)!r})")


def test_three_million_empty_sets_are_refused_by_the_container_budget(tmp_path):
    # 3 MB: MARK, 3,000,000 x EMPTY_SET, LIST (1.1 GB and 12 s when built)
    out, rss = _pickle_case(tmp_path, "sets.pkl", b"\x80\x04(" + b"\x8f" * 3_000_000 + b"l.")
    refused(out, rss, "sets.pkl: refusing to load: more than 100,000 containers")


def test_four_megabytes_of_empty_dicts_are_refused(tmp_path):
    out, rss = _pickle_case(tmp_path, "dicts.pkl", b"\x80\x04" + b"}" * 4_000_000 + b".")
    refused(out, rss, "dicts.pkl: refusing to load: more than 100,000 containers")


def test_opcodes_and_items_have_budgets_too(tmp_path):
    # 1.1 million pushes and pops of None: no container, only opcodes
    out, rss = _pickle_case(tmp_path, "ops.pkl", b"\x80\x04" + b"N0" * 550_000 + b"N.")
    refused(out, rss, "ops.pkl: refusing to load: more than 1,000,000 opcodes")
    # one list receiving 600,000 references to one memoized empty list
    out, rss = _pickle_case(tmp_path, "items.pkl", b"\x80\x04]\x94(" + b"h\x00" * 600_000 + b"e.")
    refused(out, rss, "items.pkl: refusing to load: more than 500,000 items in containers")


def test_objects_left_on_the_stack_are_refused():
    with pytest.raises(UnsafePickleError, match="2 objects or marks left on the stack at STOP"):
        bookpickle.loads(b"\x80\x04NNN.")
    with pytest.raises(UnsafePickleError, match="without a MARK"):
        bookpickle.loads(b"\x80\x04Nl.")
    with pytest.raises(UnsafePickleError, match="takes more from the stack than it holds"):
        bookpickle.loads(b"\x80\x04(a.")


def test_a_memoized_string_encoded_again_and_again_is_refused(tmp_path):
    # _codecs.encode(s, 'latin1') of one 10 MB string, 100 times: 1 GB of bytes from a 10 MB file
    text = b"X" * (10 << 20)
    data = (b"\x80\x02c_codecs\nencode\nq\x00X" + struct.pack("<I", len(text)) + text + b"q\x01X\x06\x00\x00\x00latin1q\x02000("
            + b"h\x00h\x01h\x02\x86R" * 100 + b"l.")
    out, rss = _pickle_case(tmp_path, "encode.pkl", data)
    refused(out, rss, "encode.pkl: refusing to load: _codecs.encode of 10,485,760 characters")


def test_a_refused_argument_is_never_printed_in_full(tmp_path):
    # a 100 MB bytes object handed to _codecs.encode (which takes a str): refused, and its
    # repr (400 MB of '\x00' escapes) is never built
    n = 100 << 20
    data = b"\x80\x04\x8c\x07_codecs\x8c\x06encode\x93\x8e" + struct.pack("<Q", n) + bytes(n) + b"\x85R."
    out, rss = _pickle_case(tmp_path, "repr.pkl", data)
    refused(out, rss, "repr.pkl: refusing to load: _codecs.encode(<104,857,600 bytes: b'\\x00\\x00")
    assert len(out) < 400, out
    # huge numbers are named by their size, never converted to text
    with pytest.raises(UnsafePickleError, match=r"dtype <an int of 79,993 bits> refused"):
        bookpickle.loads(b"\x80\x04cnumpy\ndtype\n\x8b" + struct.pack("<I", 10_000) + b"\x01" * 10_000 + b"\x85R.")


def test_no_state_is_left_behind_between_loads():
    """BUILD on a stand-in (numpy.ndarray, numpy.dtype, ...) is refused: the stand-ins are
    made afresh for each load and take no state."""
    def module_objects_state():
        return {name: dict(getattr(v, "__dict__", {})) for name, v in vars(bookpickle).items()
                if type(v).__module__ == bookpickle.__name__}

    before = module_objects_state()
    for glob in (b"cnumpy\nndarray\n", b"cnumpy\ndtype\n", b"cnumpy.core.multiarray\n_reconstruct\n"):
        with pytest.raises(UnsafePickleError, match=r"a state \(BUILD\) given to"):
            bookpickle.loads(b"\x80\x02" + glob + b"}U\x01xK\x01sb.")
    assert module_objects_state() == before
    # an array made by _frombuffer takes no state either
    data = pickle.dumps(np.arange(3.0), protocol=5)
    assert data.endswith(b"\x94.")
    with pytest.raises(UnsafePickleError, match=r"a state \(BUILD\) given to ndarray"):
        bookpickle.loads(data[:-1] + b"}b.")
    np.testing.assert_array_equal(bookpickle.loads(data), np.arange(3.0))


def test_the_books_format_still_loads_at_the_size_limit_within_budget(tmp_path):
    """An honest file close to the size limit (a 100 MB float64 array, protocol 2 writes it
    as text, the costliest form) loads within the memory budget."""
    path = tmp_path / "big.pkl"
    with open(path, "wb") as f:
        pickle.dump({"W1": np.zeros(12_500_000)}, f, protocol=2)
    assert path.stat().st_size < bookpickle.MAX_FILE_BYTES
    out, rss = load_case(f"p = bookpickle.load_params({str(path)!r}); assert p['W1'].shape == (12_500_000,), p['W1'].shape")
    assert out == "OK", out
    assert rss < RSS_LIMIT_MB, f"peak RSS {rss:.0f} MB"


# ----------------------------------------------------------------------------- predict's images


def test_an_ico_whose_entry_is_a_huge_png_is_refused_before_decoding(tmp_path, good):  # noqa: F811
    ico = tmp_path / "bomb.ico"
    ico.write_bytes(ico_of(big_png(30_000)))  # 16x16 in the directory, 30000x30000 inside (900 MB)
    fails("predict", good, ico, cwd=tmp_path, expect=(str(ico), "an image or frame of 900,000,000 pixels; expected at most 16,000,000 pixels (decoding refused)"))


def test_a_png_whose_data_ends_early_is_refused(tmp_path, good):  # noqa: F811
    short_png = tmp_path / "short.png"
    short_png.write_bytes(png(8, 8, rows=2))  # a complete zlib stream of 2 rows out of 8
    fails("predict", good, short_png, cwd=tmp_path, expect=(str(short_png), "the image data ends early (2 of 8 rows)"))
    cut = tmp_path / "cut.png"
    cut.write_bytes(png(8, 8, rows=2, end_stream=False))
    fails("predict", good, cut, cwd=tmp_path, expect=(str(cut), "ends early"))
    laced = tmp_path / "laced.png"
    laced.write_bytes(png(8, 8, rows=2, interlace=1))
    fails("predict", good, laced, cwd=tmp_path, expect=(str(laced), "the image data ends early"))


def test_whole_pngs_still_read_interlaced_or_not(tmp_path):
    for interlace in (0, 1):
        from PIL import Image

        p = tmp_path / f"whole{interlace}.png"
        Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 3).save(p, interlace=interlace)
        labels, x, _ = read_images([p], (1, 8, 8))
        np.testing.assert_allclose(x[0, 0], np.arange(64).reshape(8, 8) * 3 / 255.0, rtol=1e-6)
    for width, height in ((1, 1), (3, 5), (9, 2)):
        p = tmp_path / f"w{width}x{height}.png"
        p.write_bytes(png(width, height, interlace=1, value=20))
        read_images([p], (1, 8, 8))


def test_pillow_settings_are_held_while_decoding_and_restored(tmp_path, monkeypatch):
    from PIL import Image, ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    cut = tmp_path / "cut.png"
    cut.write_bytes(png(8, 8, rows=2, end_stream=False))
    with pytest.raises(ImageError, match="ends early"):
        read_images([cut], (1, 8, 8))
    ico = tmp_path / "mid.ico"
    ico.write_bytes(ico_of(big_png(5_000)))  # 25 million pixels inside a 16x16 entry
    with pytest.raises(ImageError, match="of 25,000,000 pixels; expected at most 16,000,000"):
        read_images([ico], (1, 8, 8))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True and Image.MAX_IMAGE_PIXELS is None


def test_only_the_listed_image_formats_are_tried(tmp_path):
    from PIL import Image

    pcx = tmp_path / "digit.pcx"
    Image.new("L", (8, 8), 10).save(pcx, format="PCX")
    with pytest.raises(ImageError, match=r"digit\.pcx: not an image xpconv reads \(expected PNG, JPEG, BMP"):
        read_images([pcx], (1, 8, 8))
    ico = tmp_path / "digit.ico"
    ico.write_bytes(ico_of(png(8, 8, value=30), listed=8))
    _, x, _ = read_images([ico], (1, 8, 8))
    np.testing.assert_allclose(x, np.full((1, 1, 8, 8), 30 / 255, dtype=np.float32), rtol=1e-6)


def test_a_large_float64_npy_is_refused_within_budget(tmp_path):
    huge = tmp_path / "huge.npy"
    with open(huge, "wb") as f:  # 40 million float64 values (320 MB, sparse): 4 bytes of float32 each after reading
        np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (625_000, 1, 8, 8)})
        f.truncate(f.tell() + 40_000_000 * 8)
    out, rss = load_case(f"images.read_images([{str(huge)!r}], (1, 8, 8))")
    refused(out, rss, str(huge), "(40,000,000 values); expected at most 16,000,000 values and 134,217,728 bytes")


@pytest.mark.parametrize("shape,values", [((0, 1320807, 1321124, 1321438), "0 values"), ((10**3000, 10**3000), "more than 10^18 values")])
def test_an_empty_or_astronomic_npy_shape_numpy_cannot_hold_is_refused(tmp_path, shape, values):
    """A size of 0 beside sizes multiplying past NumPy's largest array (found by the fuzzer:
    NumPy's "array is too big" escaped), and sizes of thousands of digits, which Python will
    not print: refused in one line, the shape cut short."""
    p = tmp_path / "empty-but-huge.npy"
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': " + repr(shape) + "}"
    header += " " * (-(len(header) + 11) % 64) + "\n"
    p.write_bytes(b"\x93NUMPY\x02\x00" + struct.pack("<I", len(header)) + header.encode())
    with pytest.raises(ImageError) as err:
        read_images([p], (1, 8, 8))
    msg = str(err.value)
    assert f"empty-but-huge.npy: an array of shape ({str(shape[0])[:20]}" in msg and f"({values}); expected at most 16,000,000" in msg, msg
    assert len(msg) < 400 and "\n" not in msg, msg


def test_npy_arrays_read_through_the_opened_file(tmp_path):
    a = np.asfortranarray(np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8) / 128)
    p = tmp_path / "two.npy"
    np.save(p, a)
    labels, x, _ = read_images([p], (1, 8, 8))
    assert labels == [f"{p}[0]", f"{p}[1]"]
    np.testing.assert_array_equal(x[:, 0], a)
    neg = tmp_path / "neg.npy"
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (-1, -1)})
    neg.write_bytes(buf.getvalue() + b"\0" * 4)
    with pytest.raises(ImageError, match=r"neg\.npy: an array of shape \(-1, -1\); expected sizes of 0 or more"):
        read_images([neg], (1, 8, 8))
    assert images.MAX_NPY_VALUES * 8 <= images.MAX_NPY_BYTES


# ----------------------------------------------------------------------------- what the fuzzer found


def test_idx_headers_numpy_cannot_shape_are_refused(tmp_path):
    from xpconv.datasets import DatasetError, read_idx

    empty_but_huge = tmp_path / "empty-but-huge-idx"
    empty_but_huge.write_bytes(b"\x00\x00\x08\x05" + struct.pack(">5I", 11, 15, 0x06BBF82A, 0x1D7D77E9, 0))
    with pytest.raises(DatasetError, match=r"empty-but-huge-idx: header promises 11 x 15 x 112982058 x 494761961 x 0 = 0 bytes; expected at most"):
        read_idx(empty_but_huge)
    many = tmp_path / "many-dims-idx"
    many.write_bytes(b"\x00\x00\x08\x41" + bytes(4 * 65))
    with pytest.raises(DatasetError, match=r"many-dims-idx: magic number 0x00000841 gives 65 dimensions; expected at most 32"):
        read_idx(many)
    empty = tmp_path / "empty-idx"
    empty.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 0, 28, 28))
    assert read_idx(empty).shape == (0, 28, 28)


def test_an_npy_header_numpy_cannot_tokenize_is_damaged(tmp_path):
    p = tmp_path / "open-brace.npy"
    p.write_bytes(b"\x93NUMPY\x01\x006\x00{" + b" " * 52 + b"\n")
    with pytest.raises(ImageError, match=r"open-brace\.npy: a damaged \.npy header \(TokenError"):
        read_images([p], (1, 8, 8))


def test_idx_files_are_checked_again_on_the_open_descriptor(tmp_path, monkeypatch):
    """A dataset file swapped for a FIFO between its stat and its open is refused, and the
    open does not block."""
    from xpconv import datasets
    from xpconv.datasets import DatasetError, read_idx

    regular = tmp_path / "regular-idx"
    regular.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07")
    fifo = tmp_path / "t10k-labels-idx1-ubyte"
    os.mkfifo(fifo)
    real_stat = _io.stat_regular
    monkeypatch.setattr(datasets, "_regular_file", lambda path, what="file": os.stat(regular))
    monkeypatch.setattr(_io, "stat_regular", lambda path, what: real_stat(regular, what))
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte: is a FIFO \(named pipe\), not a regular IDX file"):
        read_idx(fifo)
