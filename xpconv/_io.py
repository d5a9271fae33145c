"""Atomic file writes, and the one reader of ``/proc/self/status``.

A leaf: it imports nothing from xpconv, so every module (checkpoints, metrics, plots)
can write files through it.

:func:`atomic_write` writes a temporary file in the target's folder, flushes and
fsyncs it, renames it over the target with ``os.replace`` and fsyncs the folder: a
crash (even ``kill -9``) mid-write leaves the previous file intact, and readers see
the old file or the new one, never a mix. A Ctrl-C during the write is held back
until the file is in place, so no temp file is left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_write", "proc_status"]


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` (``str`` is written as UTF-8) to ``path`` atomically and return the
    path. The folder is created if missing. The file gets the mode of the one it
    replaces, or what ``open(path, 'w')`` would give (0666 less the umask) when new."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    with _ctrl_c_deferred():  # a Ctrl-C lands after the write, never between mkstemp and cleanup
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        try:
            _chmod_like_new_file(fd, path)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        _fsync_dir(folder)
    return path


@contextlib.contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """Hold back SIGINT (Python's KeyboardInterrupt) while the block runs and raise it
    when the block is done. Only in the main thread with Python's own handler installed;
    elsewhere the block runs as it is (a kill -9 is covered by the rename alone)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


def proc_status(key: str) -> str | None:
    """The value of ``key`` (e.g. ``'Umask'``, ``'VmRSS'``) in Linux's
    ``/proc/self/status``, as written there (``'0022'``, ``'123456 kB'``); None where
    there is no such file or key."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                name, sep, value = line.partition(":")
                if sep and name == key:
                    return value.strip()
    except (OSError, UnicodeDecodeError):
        pass
    return None


def _umask() -> int:
    """The process's umask, read from /proc where possible (setting it to read it back
    is not thread-safe)."""
    value = proc_status("Umask")
    if value:
        try:
            return int(value, 8)
        except ValueError:
            pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _chmod_like_new_file(fd: int, path: Path) -> None:
    """Give the temp file (created 0600 by mkstemp) the mode the final file should have:
    the mode of the file it replaces, or what ``open(path, 'w')`` would give (0666 less
    the umask, usually 0644)."""
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~_umask()
    try:
        os.fchmod(fd, mode)
    except (AttributeError, OSError):  # no fchmod (Windows) or a file system without modes
        pass


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
