"""Atomic file writes, files opened for reading only when they are regular files, and the
one reader of ``/proc/self/status``.

A leaf: it imports nothing from xpconv, so every module (checkpoints, metrics, plots)
can write files through it.

:func:`atomic_write` writes a temporary file in the target's folder, flushes and
fsyncs it, renames it over the target with ``os.replace`` and fsyncs the folder: a
crash (even ``kill -9``) mid-write leaves the previous file intact, and readers see
the old file or the new one, never a mix. A Ctrl-C, SIGTERM or SIGHUP during the
write is held back until the file is in place, so no temp file is left behind.

The temp file is named ``.<name>.<pid>.<random>.tmp`` after the writing process, so
:func:`remove_stale_temp_files` can tell a temp file a dead writer left (``kill -9``)
from one being written now.

Readers open files through :func:`open_regular` / :func:`read_regular`: ``stat`` first (a
folder, FIFO, device or socket is named and never opened), then a non-blocking open and an
``fstat`` of the descriptor, so a path swapped between the two is refused as well.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["atomic_write", "chmod_new_file", "file_kind", "open_regular", "pid_alive", "proc_status", "read_regular", "remove_stale_temp_files", "short", "span_within", "stat_regular"]

#: the signals held back while a file is written (those that end a run the way Ctrl-C does)
DEFERRED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

#: a temp file whose writer cannot be told dead is removed once it is this old (seconds)
STALE_TEMP_AGE = 3600.0

# .<name>.<pid>.<mkstemp's 8 characters>.tmp; before the pid was in the name: .<name>.<8>.tmp
_TEMP_NAME = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<pid>[0-9]+)\.)?(?P<random>[a-z0-9_]{8})\.tmp$")


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` (``str`` is written as UTF-8) to ``path`` atomically and return the
    path. The folder is created if missing. The file gets the mode of the one it
    replaces, or what ``open(path, 'w')`` would give (0666 less the umask) when new."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    with _signals_deferred():  # a Ctrl-C or SIGTERM lands after the write, never between mkstemp and cleanup
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=folder)
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
def _signals_deferred() -> Iterator[None]:
    """Hold back SIGINT, SIGTERM and SIGHUP while the block runs and deliver them, once
    each, when the block is done: a Python handler (``KeyboardInterrupt``'s, or the one
    ``xpconv train`` installs for SIGTERM) is called then, a default action (SIGTERM
    ending the process) is taken then. Ignored signals stay ignored. Only in the main
    thread (where signal handlers live); elsewhere the block runs as it is (a kill is
    covered by the rename alone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved: dict[int, Any] = {}
    caught: list[int] = []
    try:
        for sig in DEFERRED_SIGNALS:
            handler = signal.getsignal(sig)
            if handler is signal.SIG_IGN or handler is None:  # ignored, or a handler set outside Python
                continue
            saved[sig] = handler
            signal.signal(sig, lambda signum, frame: caught.append(signum))
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    for sig in dict.fromkeys(caught):
        handler = saved[sig]
        if handler is signal.SIG_DFL:
            os.kill(os.getpid(), sig)  # the default action, now that the file is in place
        elif callable(handler):
            handler(sig, None)


#: the largest process id: pid_t is a signed 32-bit integer on every platform xpconv runs on
PID_MAX = 2**31 - 1


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (one of another user counts).
    A number no process id can be (<= 0, or past the C ``pid_t`` range that ``kill``
    takes: it came from a file name or a file, untrusted text) names no process."""
    if not 0 < pid <= PID_MAX:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:  # e.g. Windows without the process
        return False
    return True


def remove_stale_temp_files(folder: str | os.PathLike[str], *, max_age: float = STALE_TEMP_AGE) -> list[Path]:
    """Remove the temp files :func:`atomic_write` left in ``folder`` when its writer was
    killed: those whose writer (the pid in the name) is gone, and those older than
    ``max_age`` seconds (a reused pid, or a name without one). Returns the removed paths."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if m is None or not entry.is_file(follow_symlinks=False):
            continue
        pid = m.group("pid")  # untrusted text: more digits than any pid has names no process
        number = int(pid) if pid is not None and len(pid) <= 10 else 0
        stale = pid is not None and number != os.getpid() and not pid_alive(number)
        if not stale:
            try:
                stale = now - entry.stat(follow_symlinks=False).st_mtime > max_age
            except OSError:
                continue
        if stale:
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(Path(entry.path))
    return removed


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


def chmod_new_file(fd: int) -> None:
    """Give a file created by mkstemp (0600) the mode ``open(path, 'w')`` would give
    (0666 less the umask, usually 0644)."""
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    except (AttributeError, OSError):  # no fchmod (Windows) or a file system without modes
        pass


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


def file_kind(mode: int) -> str | None:
    """What a non-regular file is ('a folder', 'a FIFO (named pipe)', ...); None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def stat_regular(path: Path, what: str) -> os.stat_result:
    """``os.stat`` of ``path`` (links followed) when it is a regular file. Nothing is
    opened. Raises FileNotFoundError (missing) or ValueError (a folder, FIFO, device,
    socket, or unreadable), each with a one-line message naming the path and ``what``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what}") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    kind = file_kind(st.st_mode)
    if kind is not None:
        raise ValueError(f"{path}: is {kind}, not a regular {what}")
    return st


#: how a file that :func:`open_regular` checked is opened: never blocking (a path that became
#: a FIFO since the ``stat`` does not hang the open), never becoming the controlling terminal,
#: not inherited by child processes
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def open_regular(path: str | os.PathLike[str], what: str, *, max_bytes: int | None = None) -> tuple[BinaryIO, os.stat_result]:
    """Open a regular file for reading, checked twice: :func:`stat_regular` before the
    open (a folder, FIFO, device or socket is named and never opened) and ``fstat`` of the
    opened descriptor after it (a path swapped for another file, a FIFO or a device between
    the two is refused too). Links are followed. Returns the binary file object (blocking
    again) and its ``fstat``.

    Raises FileNotFoundError (missing) or ValueError (not a regular file, changed, larger
    than ``max_bytes``, unreadable), each with one line naming ``path`` and ``what``."""
    path = Path(path)
    before = stat_regular(path, what)
    if max_bytes is not None and before.st_size > max_bytes:
        raise ValueError(f"{path}: a file of {before.st_size:,} bytes; expected a {what} of at most {max_bytes:,} bytes")
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what}") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        kind = file_kind(st.st_mode)
        if kind is not None:
            raise ValueError(f"{path}: is {kind}, not a regular {what}")
        if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
            raise ValueError(f"{path}: the {what} was replaced while being opened; try again")
        if max_bytes is not None and st.st_size > max_bytes:
            raise ValueError(f"{path}: a file of {st.st_size:,} bytes; expected a {what} of at most {max_bytes:,} bytes")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike[str], what: str, *, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (see :func:`open_regular`):
    no more than the size ``fstat`` gave is read, and a file that grows or shrinks while
    being read is refused. Raises FileNotFoundError or ValueError with one line naming it."""
    f, st = open_regular(path, what, max_bytes=max_bytes)
    with f:
        try:
            data = f.read(st.st_size + 1)
        except OSError as exc:
            raise ValueError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    if len(data) != st.st_size:
        raise ValueError(f"{path}: the {what} changed while being read ({st.st_size:,} bytes, then {len(data):,})")
    return data


def span_within(shape: Iterable[int], cap: int) -> bool:
    """Whether a stored shape's non-zero sizes multiply to at most ``cap`` (stopping at the first
    partial product past it, so a size of a million digits costs nothing).  An array with a size
    of 0 holds nothing, but NumPy still refuses a shape whose other sizes multiply past its
    largest array ("array is too big"): a reader checks this beside its element count."""
    n = 1
    for d in shape:
        if d:
            n *= d
            if n > cap:
                return False
    return True


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (control characters escaped): how a
    message shows a value that came from a file or a user (a value nested too deep for
    ``repr`` is named by its type)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<a {type(value).__name__} nested too deep>"
    except ValueError:  # an integer past Python's 4,300 digits for str()
        text = f"<a {type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
