"""A run's folder: one run at a time, never reused by accident, whole after a kill.

* :func:`stop_signals` turns SIGTERM and SIGHUP (what Docker, Slurm and Kubernetes send to
  stop a job, and what a closed terminal sends) into :class:`Terminated`, a
  ``KeyboardInterrupt``: whatever handles Ctrl-C handles them too, and ``xpconv train``
  saves ``interrupted.safetensors`` and exits with status 128 + the signal's number.
* :func:`claim_run_folder` takes the folder's lock file (``.xpconv-run.lock``: pid, host
  and the process's start time; the lock of a process that is gone is taken over with a
  warning), removes the temp files a killed writer left, refuses a folder that already
  holds a run unless the run is resumed or ``overwrite`` is given, and after a kill
  repairs ``metrics.json``/``best.safetensors`` from ``last.safetensors``
  (:func:`reconcile_run`).

The files of an epoch are written in this order, each atomically: ``last.safetensors``,
``best.safetensors`` (when the test accuracy is the best so far), a line of
``metrics.jsonl``, ``metrics.json``.  Each checkpoint holds its epoch and the records of
every epoch up to it, so whatever moment a ``kill -9`` lands at, ``last.safetensors`` is
the newest state and the other files can be rebuilt from it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import logging
import math
import os
import secrets
import signal
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .._io import atomic_write, chmod_new_file, file_kind, pid_alive, remove_stale_temp_files
from ..checkpoint import read_checkpoint
from .callbacks import append_jsonl, write_metrics
from .console import LOGGER
from .stopping import best_validation_record

__all__ = [
    "LOCK_NAME",
    "RUN_FILES",
    "STOP_SIGNALS",
    "RunFolderError",
    "RunLock",
    "Terminated",
    "claim_run_folder",
    "read_run_file",
    "reconcile_run",
    "remove_run_files",
    "stop_signals",
]

log = logging.getLogger(LOGGER + ".training")

#: the lock file in a run folder while a run writes there
LOCK_NAME = ".xpconv-run.lock"

#: the files a run writes (what ``overwrite`` removes; other files are left alone)
RUN_FILES = ("last.safetensors", "best.safetensors", "interrupted.safetensors", "metrics.json", "metrics.jsonl",
             "curves.png", "misclassified.png", "filters.png")

#: the most bytes read from a lock file (one short line) and from metrics.json (the
#: records of some 20,000 epochs: a larger one is written anew from last.safetensors,
#: which holds the same records, rather than parsed, whose objects can take 20 times
#: its size); of metrics.jsonl only the end is read (records are appended in order, the
#: last epoch recorded is at its end)
LOCK_BYTES = 4096
METRICS_BYTES = 8 << 20
JSONL_TAIL_BYTES = 1 << 20
#: the most epochs a run counts (as the checkpoint schema)
MAX_EPOCH = 10**9

#: the signals that stop a run the way Ctrl-C does
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


# --------------------------------------------------------------------------- signals


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived (a ``KeyboardInterrupt``, so it is handled as Ctrl-C is).
    ``signum``, ``signame`` ('SIGTERM') and ``exit_status`` (128 + signum, as a shell
    reports a process ended by the signal)."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        self.signame = signal.Signals(self.signum).name
        self.exit_status = 128 + self.signum
        super().__init__(self.signame)


@contextlib.contextmanager
def stop_signals(signums: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """While the block runs, SIGTERM and SIGHUP raise :class:`Terminated` in the main
    thread (the first one; later ones are ignored, so a second SIGTERM cannot cut the
    saving of the interrupted checkpoint short).  Only signals left at their default
    action are taken: an ignored SIGHUP (``nohup``) stays ignored, a handler of the
    caller's own is kept.  Elsewhere than in the main thread the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise Terminated(signum)

    installed = []
    try:
        for sig in signums:
            if signal.getsignal(sig) is signal.SIG_DFL:
                signal.signal(sig, handler)
                installed.append(sig)
        yield
    finally:
        for sig in installed:
            signal.signal(sig, signal.SIG_DFL)


# --------------------------------------------------------------------------- the lock


class RunFolderError(Exception):
    """The run folder cannot be used: another run holds it, or it holds a run already
    (one line naming the folder and what to do)."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str | None:
    """An identity of process ``pid``'s start (boot id and start time in clock ticks, from
    Linux's /proc), so a reused pid is not mistaken for the process; None elsewhere."""
    try:
        with open(f"/proc/{int(pid)}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rpartition(")")[2].split()
        return f"{_boot_id()}:{fields[19]}"
    except (OSError, IndexError):
        return None


def _describe(owner: dict) -> str:
    return f"pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('since')}"


class RunLock:
    """The lock of one run folder, held by this process (re-entrant within it)."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.held = False  # True when this object took the lock (and so releases it)
        self.replacing = False  # claim_run_folder(overwrite=True, remove_now=False) left an old run to remove

    def _me(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start(os.getpid()),
                "since": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}

    def _read(self) -> dict | None:
        return self._read_file(self.path)

    def _is_mine(self, owner: dict) -> bool:
        return owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname() \
            and owner.get("start") == process_start(os.getpid())

    def _is_stale(self, owner: dict) -> bool:
        """The owner is gone: a lock of this machine whose process does not exist any more
        (or is another process with a reused pid), or an unreadable lock file."""
        pid = owner.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or not isinstance(owner.get("host"), str):
            return True
        if owner["host"] != socket.gethostname():
            return False  # another machine's process: its state cannot be told from here
        if not pid_alive(pid):  # a pid out of range names no process
            return True
        start = owner.get("start")
        now = process_start(pid)
        return start is not None and now is not None and now != start

    def acquire(self) -> RunLock:
        """Take the lock; raise :class:`RunFolderError` when a live run holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        me = json.dumps(self._me()) + "\n"
        for _ in range(3):
            # the lock file appears whole (written aside, then linked under its name: a
            # link fails when the name exists, so two runs cannot both take it)
            tmp = self._staged(me)
            try:
                os.link(tmp, self.path)
                self.held = True
                return self
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
            owner = self._read()
            if owner is None:
                continue  # released meanwhile: try again
            if self._is_mine(owner):
                return self  # this process holds it already (the CLI around a Trainer)
            if not self._is_stale(owner):
                raise RunFolderError(
                    f"{self.folder}: another run is writing to this folder ({_describe(owner)}); wait for it to end or "
                    f"choose another --out (if that run is gone, delete {self.path})"
                )
            # take it over: move the stale lock aside (atomic), check it is the one judged stale
            # a name no other file has (whatever was left in the folder), and one that
            # remove_stale_temp_files clears if this process is killed right here
            aside = self.folder / f"{LOCK_NAME}.stale.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            try:
                os.replace(self.path, aside)
            except FileNotFoundError:
                continue
            moved = self._read_file(aside)
            if moved != owner:  # another run took it over meanwhile: put its lock back
                with contextlib.suppress(FileExistsError, FileNotFoundError):
                    os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            if moved == owner:
                log.warning(f"{self.folder}: taking over the lock of a run that is gone ({_describe(owner) if owner else 'unreadable lock file'})")
        raise RunFolderError(f"{self.folder}: could not take the lock {self.path}; another run is starting there")

    def _staged(self, text: str) -> Path:
        """A new file of this folder holding ``text``, under a name created for it (never
        an existing file, link or folder; a temp file's name, so that one left by a kill
        is removed by :func:`remove_stale_temp_files`)."""
        fd, name = tempfile.mkstemp(prefix=f"{LOCK_NAME}.{os.getpid()}.", suffix=".tmp", dir=self.folder)
        try:
            chmod_new_file(fd)
            os.write(fd, text.encode("utf-8"))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(name)
            raise
        os.close(fd)
        return Path(name)

    @staticmethod
    def _read_file(path: Path) -> dict | None:
        """The lock file's owner record; None when there is no lock, {} when it cannot
        be read as one (judged stale). A link, FIFO, device or folder in its place is
        refused by name (:class:`RunFolderError`), never read."""
        try:
            raw = read_run_file(path, "lock file", LOCK_BYTES)
        except FileNotFoundError:
            return None
        except ValueError:  # larger than any lock file xpconv writes
            return {}
        try:
            data = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):
            return {}
        return data if isinstance(data, dict) else {}

    def release(self) -> None:
        """Remove the lock file if this object took it (and it is still this process's)."""
        if not self.held:
            return
        self.held = False
        owner = self._read()
        if owner is not None and self._is_mine(owner):
            self.path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- reading a run's files


def read_run_file(path: str | os.PathLike[str], what: str, limit: int, *, tail: bool = False) -> bytes:
    """The bytes of a file of a run folder (a lock file, ``metrics.json``,
    ``metrics.jsonl``), ``stat``-ed before it is opened and never through a link: a
    symbolic link, FIFO, device or folder in its place is refused by name
    (:class:`RunFolderError`) without being read; a file over ``limit`` bytes raises
    ValueError after ``limit`` bytes are read, or with ``tail`` gives its last ``limit``
    bytes after the byte before them (``limit + 1`` bytes: more than ``limit`` when the
    file is longer, so a line cut at the start can be told). FileNotFoundError when there
    is none."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what}") from None
    except OSError as exc:
        raise RunFolderError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    _refuse_odd(path, st.st_mode, what)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)  # O_NOFOLLOW, O_NONBLOCK: swapped for a link or a FIFO since the stat, still not read
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            _refuse_odd(path, stat.S_IFLNK, what)
        raise RunFolderError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        _refuse_odd(path, st.st_mode, what)
        if tail and st.st_size > limit:
            f.seek(st.st_size - limit - 1)
            return f.read(limit + 1)
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path}: a {what} of more than {limit:,} bytes")
    return data


def _refuse_odd(path: Path, mode: int, what: str) -> None:
    """RunFolderError naming ``path`` unless ``mode`` is a regular file's."""
    kind = "a symbolic link" if stat.S_ISLNK(mode) else file_kind(mode)
    if kind is not None:
        raise RunFolderError(
            f"{path}: is {kind}, not a {what} xpconv wrote; it is neither read nor written through: "
            "remove it or choose another --out"
        )


def _check_run_files(folder: Path, names: list[str], *, overwrite: bool) -> None:
    """Refuse, by name, a run file that is not a regular file of this folder: one a run
    would write through (a symbolic link, or a ``metrics.jsonl`` with other hard links:
    appending there writes elsewhere) or could not remove (a folder); with ``overwrite``
    a link is only removed, never followed, so only folders are refused."""
    for name in names:
        if name not in RUN_FILES:
            continue
        path = folder / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if overwrite:
            if stat.S_ISDIR(st.st_mode):
                raise RunFolderError(f"{path}: is a folder, not a file of a run; --overwrite removes only files: remove it yourself")
            continue
        _refuse_odd(path, st.st_mode, "file")
        if name == "metrics.jsonl" and st.st_nlink > 1:
            raise RunFolderError(
                f"{path}: has {st.st_nlink} hard links; appending to it would change a file outside the run: "
                "remove it or choose another --out"
            )


def remove_run_files(folder: str | os.PathLike[str]) -> list[str]:
    """Remove the files of the run in ``folder`` (:data:`RUN_FILES`; links are removed, not
    followed; other files are left alone); returns the names removed."""
    removed = []
    for name in RUN_FILES:
        try:
            os.unlink(Path(folder) / name)
        except FileNotFoundError:
            continue
        removed.append(name)
    return removed


# --------------------------------------------------------------------------- claiming and repairing


def _contents(folder: Path) -> list[str]:
    """The names in a run folder that make it 'not empty' (not the lock, not temp files)."""
    try:
        names = sorted(p.name for p in folder.iterdir())
    except FileNotFoundError:
        return []
    return [n for n in names if not n.startswith(LOCK_NAME) and not (n.startswith(".") and n.endswith(".tmp"))]


def claim_run_folder(folder: str | os.PathLike[str], *, resume: str | os.PathLike[str] | None = None,
                     overwrite: bool = False, remove_now: bool = True) -> RunLock:
    """Take ``folder`` for a run and return its held :class:`RunLock` (release it when
    the run ends; a lock left by a killed run is taken over by the next one).

    * another live run holds the folder: :class:`RunFolderError`;
    * temp files a killed writer left are removed;
    * the folder holds files: with ``resume`` (the checkpoint being resumed) in this
      folder it is repaired after a kill (:func:`reconcile_run`) and reused; with
      ``overwrite`` the run's files (:data:`RUN_FILES`) are removed (with
      ``remove_now=False`` not yet: ``lock.replacing`` is set, and the caller removes
      them with :func:`remove_run_files` once the new run is ready to start); otherwise
      :class:`RunFolderError` says how to go on;
    * a run file that is a link, FIFO, device or folder is refused by name, never read
      or written through.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"{folder}: expected a folder for the run's files, found a file")
    lock = RunLock(folder).acquire()
    try:
        for path in remove_stale_temp_files(folder):
            log.info(f"removed {path.name}, left by a write that was killed")
        names = _contents(folder)
        same = resume is not None and _same_folder(Path(resume).parent, folder)
        if names and same:
            _check_run_files(folder, names, overwrite=False)
            reconcile_run(folder)
        elif names and overwrite:
            _check_run_files(folder, names, overwrite=True)
            if remove_now:
                remove_run_files(folder)
            else:
                lock.replacing = any(n in RUN_FILES for n in names)
        elif names:
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            cont = f"--resume {folder / 'last.safetensors'} to continue it, " if "last.safetensors" in names else ""
            if any(n in RUN_FILES for n in names):
                what, over = "holds a run", "--overwrite to replace it"
            else:
                what, over = "is not empty", "--overwrite to write the run there anyway (other files are left alone)"
            raise RunFolderError(f"{folder} {what} ({shown}): pass {cont}{over}, or choose another --out")
    except BaseException:
        lock.release()
        raise
    return lock


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _best_record(history: list[dict]) -> dict | None:
    """The first record of the best validation epoch when the records hold one (a run
    with a validation split: highest validation accuracy, then lowest validation loss),
    else with the highest test accuracy: the one best.safetensors holds."""
    if any(r.get("val_acc") is not None for r in history):
        return best_validation_record(history)
    best = None
    for r in history:
        acc = r.get("test_acc")
        if isinstance(acc, (int, float)) and not math.isnan(acc) and (best is None or acc > best["test_acc"]):
            best = r
    return best


def reconcile_run(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Bring a run folder's files into agreement with ``last.safetensors`` (the newest
    state; a ``kill -9`` can land between the writes of an epoch): ``best.safetensors``
    is refreshed from it when its epoch is the best one and the file is behind,
    ``metrics.jsonl`` gets the records it is missing and ``metrics.json`` is rewritten
    from its records when it disagrees.  Returns what was done ({} when all agreed)."""
    folder = Path(folder)
    last_path = folder / "last.safetensors"
    if not last_path.is_file():
        return {}
    _, meta = read_checkpoint(last_path)
    epoch = meta.get("epoch")
    history = [r for r in (meta.get("metrics") or []) if isinstance(r, dict) and isinstance(r.get("epoch"), int)]
    if not isinstance(epoch, int) or not history:
        return {}
    history = [r for r in history if r["epoch"] <= epoch]
    done: dict[str, Any] = {}

    best = _best_record(history)
    best_path = folder / "best.safetensors"
    if best is not None and best["epoch"] == epoch:
        best_epoch = None
        if best_path.is_file():
            best_epoch = read_checkpoint(best_path)[1].get("epoch")
        if best_epoch != epoch:  # killed after last.safetensors, before best.safetensors: the same state
            atomic_write(best_path, last_path.read_bytes())
            done["best.safetensors"] = epoch

    jsonl = folder / "metrics.jsonl"
    seen = 0
    try:
        raw = read_run_file(jsonl, "metrics file", JSONL_TAIL_BYTES, tail=True)
    except FileNotFoundError:
        raw = b""
    if len(raw) > JSONL_TAIL_BYTES:  # the end of a longer file: drop the line cut at its start
        raw = raw.partition(b"\n")[2]
    text = raw.decode("utf-8", errors="replace")
    ignored = 0
    for line in text.splitlines():
        line_epoch = _record_epoch(line)
        if line_epoch is None:
            ignored += bool(line.strip())
        else:
            seen = max(seen, line_epoch)
    if ignored:
        log.warning(f"{jsonl}: {ignored} line(s) that are not an epoch's record ignored")
    missing = [r for r in history if r["epoch"] > seen]
    for r in missing:
        append_jsonl(jsonl, r)
    if missing:
        done["metrics.jsonl"] = [r["epoch"] for r in missing]

    mpath = folder / "metrics.json"
    try:
        doc = json.loads(read_run_file(mpath, "metrics file", METRICS_BYTES).decode("utf-8"))
    except (FileNotFoundError, ValueError, RecursionError):  # missing, too large, not JSON: rewritten
        doc = None
    final = (doc or {}).get("final") if isinstance(doc, dict) else None
    want_best = best["epoch"] if best is not None else None
    if not isinstance(final, dict) or final.get("epoch") != epoch or final.get("best_epoch") != want_best:
        config = (meta.get("extra") or {}).get("config") if isinstance(meta.get("extra"), dict) else None
        if not isinstance(config, dict):
            config = doc.get("config", {}) if isinstance(doc, dict) else {}
        write_metrics(mpath, metrics_document(history, config))
        done["metrics.json"] = epoch
    if done:
        log.warning(f"{folder}: brought the run's files up to last.safetensors (epoch {epoch}) after an interrupted write: "
                    + ", ".join(sorted(done)))
    return done


def _record_epoch(line: str) -> int | None:
    """The epoch of one line of metrics.jsonl, read as untrusted text: an integer from 1 to
    :data:`MAX_EPOCH`, else None (``{"epoch": Infinity}``, ``1e400``, ``true``, not JSON)."""
    if len(line) > 1 << 16:
        return None
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    epoch = record.get("epoch") if isinstance(record, dict) else None
    if isinstance(epoch, int) and not isinstance(epoch, bool) and 1 <= epoch <= MAX_EPOCH:
        return epoch
    return None


def metrics_document(history: list[dict], config: dict, *, stopped: dict | None = None) -> dict[str, Any]:
    """The metrics.json document of these per-epoch records (as ``Trainer.metrics()``).

    With validation records the best epoch is chosen by ``val_acc``, and ``final`` holds
    ``best_val_acc`` and ``test_acc_of_best`` -- the test accuracy of that epoch's
    weights (best.safetensors), which played no part in choosing it -- instead of
    ``best_test_acc``.  ``stopped``: why training ended before its last epoch."""
    final: dict[str, Any] = {}
    if history:
        last = history[-1]
        best = _best_record(history) or last
        final = {
            "epoch": last["epoch"],
            "test_acc": last.get("test_acc"),
            "train_acc": last.get("train_acc"),
            "train_loss": last.get("train_loss"),
            "best_test_acc": best.get("test_acc"),
            "best_epoch": best["epoch"],
        }
        if best.get("val_acc") is not None:
            del final["best_test_acc"]
            final.update({"val_acc": last.get("val_acc"), "best_val_acc": best["val_acc"], "test_acc_of_best": best.get("test_acc")})
    doc = {"epochs": list(history), "final": final, "config": dict(config)}
    if stopped is not None:
        doc["stopped"] = dict(stopped)
    return doc
