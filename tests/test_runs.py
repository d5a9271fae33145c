"""Runs under faults: SIGTERM/SIGHUP stop ``xpconv train`` as Ctrl-C does, a run folder is
never reused by accident nor written by two runs at once, and ``kill -9`` at any moment of
an epoch's writes leaves files that are whole and are brought into agreement on resume.

The CLI cases run ``python -m xpconv train`` on the bundled digits in a subprocess; a
kill inside the save sequence stops the subprocess in ``os.replace`` of a chosen file
(the same hook as tests/test_checkpoint.py's mid-save kills) and kills it there."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from xpconv import _io
from xpconv.checkpoint import load_checkpoint, read_checkpoint
from xpconv.datasets import load_digits
from xpconv.models import SimpleConvNet
from xpconv.training import (
    Callback,
    Run,
    RunFolderError,
    RunLock,
    Terminated,
    Trainer,
    reconcile_run,
    stop_signals,
)
from xpconv.training.runs import LOCK_NAME, process_start

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL") or sys.platform == "win32", reason="POSIX signals")

# python -m xpconv train, with os.replace stopped at the N-th write of one file (N = 0: never)
_TRAIN = textwrap.dedent(
    """
    import os, sys, time
    target, nth = sys.argv[1], int(sys.argv[2])
    real_replace, count = os.replace, [0]

    def replace(src, dst):
        if os.path.basename(os.fspath(dst)) == target:
            count[0] += 1
            if count[0] == nth:
                print("STALLED before renaming " + target, flush=True)
                time.sleep(600)
        return real_replace(src, dst)

    os.replace = replace
    from xpconv import cli
    if target == "LOAD":  # stop while the data is read instead
        def load(*a, **k):
            print("STALLED while loading the data", flush=True)
            time.sleep(600)
        cli._load_data = load
    from xpconv.cli import main
    sys.exit(main(["train", *sys.argv[3:]]))
    """
)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XPCONV_DATA_DIR", None)
    return env


class _Proc:
    """A training subprocess whose stdout lines are read by a thread (so waiting for a
    line cannot hang the test if the process stalls elsewhere)."""

    def __init__(self, *args, cwd, stall=("-", 0)):
        cmd = [sys.executable, "-c", _TRAIN, stall[0], str(stall[1]), *map(str, args)]
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=_env())
        self.lines: queue.Queue = queue.Queue()
        self.out: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, prefix: str) -> str:
        """The first stdout line starting with ``prefix`` (a regular expression; the bound
        on the wait is a safety net, not a timing check)."""
        while True:
            line = self.lines.get(timeout=180)
            assert line is not None, f"no line {prefix!r}: " + "".join(self.out) + self.p.stderr.read()
            self.out.append(line)
            if re.match(prefix, line):
                return line

    def finish(self, sig=None) -> tuple[int, str]:
        try:
            if sig is not None:
                self.p.send_signal(sig)
            self.p.wait(timeout=120)
            err = self.p.stderr.read()
        finally:
            if self.p.poll() is None:
                self.p.kill()
                self.p.wait()
            self.p.stderr.close()
        return self.p.returncode, err


def _train(*args, cwd):
    return subprocess.run([sys.executable, "-m", "xpconv", "train", "--no-plots", *map(str, args)], check=False, capture_output=True,
                          text=True, timeout=300, cwd=cwd, env=_env())


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert not _io.pid_alive(p.pid)
    return p.pid


def _write_lock(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    owner = {"pid": _dead_pid(), "host": socket.gethostname(), "start": None, "since": "2020-01-01T00:00:00+00:00"}
    owner.update(fields)
    path = folder / LOCK_NAME
    path.write_text(json.dumps(owner))
    return path


def _assert_agree(out: Path, epoch: int) -> None:
    """last.safetensors holds ``epoch``; metrics.json and metrics.jsonl list epochs 1..epoch
    with the same records as the checkpoint, and name as best the epoch best.safetensors holds."""
    _, last = read_checkpoint(out / "last.safetensors")
    assert last["epoch"] == epoch
    doc = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in doc["epochs"]] == list(range(1, epoch + 1))
    assert doc["final"]["epoch"] == epoch
    assert doc["epochs"] == last["metrics"]
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert jsonl == doc["epochs"]
    best = load_checkpoint(out / "best.safetensors")
    assert doc["final"]["best_epoch"] == best.epoch
    key = "val_acc" if "val_acc" in doc["epochs"][0] else "test_acc"  # the validation split chooses, when there is one
    assert doc["final"]["best_" + key] == max(r[key] for r in doc["epochs"]) == best.metrics[-1][key]
    assert not _temps(out)


# ----------------------------------------------------------------------------- signals (CLI)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_stop_signal_saves_the_run_and_exits_128_plus_the_signal(tmp_path, sig):
    signum = getattr(signal, sig)
    out = tmp_path / "run"
    proc = _Proc("--epochs", 100000, "--no-plots", "--out", out, cwd=tmp_path)
    proc.wait_for(r"epoch +1/")
    code, err = proc.finish(signum)
    assert code == 128 + signum, err
    assert err.count("\n") == 1, err  # one line, no traceback
    m = re.fullmatch(rf"xpconv: interrupted by {sig} at epoch (\d+), iteration (\d+); saved (\S+) \(mid-epoch weights\); "
                     r"resume exactly with --resume (\S+)\n", err)
    assert m, err
    assert Path(m.group(3)) == out / "interrupted.safetensors" and Path(m.group(4)) == out / "last.safetensors"
    stopped = load_checkpoint(out / "interrupted.safetensors")
    last = load_checkpoint(out / "last.safetensors")
    assert stopped.epoch == last.epoch >= 1
    assert stopped.extra["interrupted_at"] == {"epoch": int(m.group(1)), "iteration": int(m.group(2))}
    assert not (out / LOCK_NAME).exists() and not _temps(out)
    _assert_agree(out, last.epoch)


def test_sigterm_while_the_data_loads_exits_143_in_one_line(tmp_path):
    """SIGTERM before the trainer exists (the process stopped while it reads the data):
    status 143, one line, and the folder's lock is released."""
    out = tmp_path / "run"
    proc = _Proc("--epochs", 3, "--no-plots", "--out", out, cwd=tmp_path, stall=("LOAD", 1))
    proc.wait_for("STALLED")
    code, err = proc.finish(signal.SIGTERM)
    assert code == 143, err
    assert err == "xpconv: interrupted by SIGTERM\n"
    assert sorted(p.name for p in out.iterdir()) == []


# ----------------------------------------------------------------------------- the run folder (CLI)


def test_a_run_folder_is_reused_only_with_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    first = _train("--epochs", 2, "--out", out, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    best, metrics = (out / "best.safetensors").read_bytes(), (out / "metrics.json").read_bytes()

    again = _train("--epochs", 1, "--out", out, cwd=tmp_path)
    assert again.returncode == 2
    assert again.stderr == (f"xpconv: error: {out} holds a run (best.safetensors, last.safetensors, metrics.json, metrics.jsonl): "
                            f"pass --resume {out / 'last.safetensors'} to continue it, --overwrite to replace it, "
                            "or choose another --out\n")
    assert (out / "best.safetensors").read_bytes() == best and (out / "metrics.json").read_bytes() == metrics
    assert not (out / LOCK_NAME).exists()

    resumed = _train("--resume", out / "last.safetensors", "--epochs", 3, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    _assert_agree(out, 3)

    replaced = _train("--epochs", 1, "--out", out, "--overwrite", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr
    _assert_agree(out, 1)
    assert load_checkpoint(out / "best.safetensors").epoch == 1


def test_a_folder_with_other_files_is_refused_and_overwrite_keeps_them(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    got = _train("--epochs", 1, "--out", out, cwd=tmp_path)
    assert got.returncode == 2 and got.stderr.startswith(f"xpconv: error: {out} is not empty (notes.txt)")
    assert got.stderr.count("\n") == 1
    got = _train("--epochs", 1, "--out", out, "--overwrite", cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert (out / "notes.txt").read_text() == "keep me"


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path):
    out = tmp_path / "run"
    first = _Proc("--epochs", 100000, "--no-plots", "--out", out, cwd=tmp_path)
    try:
        first.wait_for(r"epoch +1/")
        second = _train("--epochs", 1, "--out", out, "--overwrite", cwd=tmp_path)
        assert second.returncode == 2
        assert re.fullmatch(rf"xpconv: error: {re.escape(str(out))}: another run is writing to this folder "
                            rf"\(pid {first.p.pid} on {re.escape(socket.gethostname())}, since \S+\); wait for it to end or "
                            rf"choose another --out \(if that run is gone, delete {re.escape(str(out / LOCK_NAME))}\)\n",
                            second.stderr), second.stderr
        assert first.p.poll() is None  # the first run goes on
        assert (out / "last.safetensors").exists()
    finally:
        code, err = first.finish(signal.SIGTERM)
    assert code == 143, err
    load_checkpoint(out / "interrupted.safetensors")


def test_the_lock_of_a_dead_run_is_taken_over_with_a_warning(tmp_path):
    out = tmp_path / "run"
    _write_lock(out)
    got = _train("--epochs", 1, "--out", out, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert "taking over the lock of a run that is gone" in got.stderr
    assert not (out / LOCK_NAME).exists()
    assert load_checkpoint(out / "last.safetensors").epoch == 1


# ----------------------------------------------------------------------------- kill -9 inside the save sequence


@pytest.mark.parametrize("stall", [
    ("last.safetensors", 2),  # epoch 2's last.safetensors complete in its temp file, not renamed
    ("best.safetensors", 1),  # last of epoch 1 written, no best, no metrics
    ("best.safetensors", 2),  # last of epoch 2 written, best and metrics still epoch 1's
    ("metrics.json", 2),      # last and best of epoch 2 written, metrics.json still epoch 1's
])
def test_kill_9_at_any_moment_of_an_epochs_writes(tmp_path, stall):
    out = tmp_path / "run"
    proc = _Proc("--epochs", 3, "--no-plots", "--out", out, cwd=tmp_path, stall=stall)
    proc.wait_for("STALLED")
    code, _ = proc.finish(signal.SIGKILL)
    assert code == -signal.SIGKILL
    # what the kill leaves: whole files, the newest state in last.safetensors, a temp file
    temps = _temps(out)
    assert len(temps) == 1 and temps[0].startswith(f".{stall[0]}."), temps
    last = load_checkpoint(out / "last.safetensors")
    assert [r["epoch"] for r in last.metrics] == list(range(1, last.epoch + 1))
    if (out / "metrics.json").exists():
        assert json.loads((out / "metrics.json").read_text())["final"]["epoch"] <= last.epoch
    if (out / "best.safetensors").exists():
        assert load_checkpoint(out / "best.safetensors").epoch <= last.epoch
    assert (out / LOCK_NAME).exists()  # the killed run's lock

    # the next start repairs: the folder's files agree with last.safetensors again
    resumed = _train("--resume", out / "last.safetensors", "--epochs", 3, "-v", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "taking over the lock of a run that is gone" in resumed.stderr
    assert f"removed {temps[0]}, left by a write that was killed" in resumed.stdout
    _assert_agree(out, 3)
    assert not (out / LOCK_NAME).exists()


def test_reconcile_run_makes_the_files_agree_after_each_kill(tmp_path):
    """The repair alone (no further training), on the states a kill leaves."""
    out = tmp_path / "run"
    proc = _Proc("--epochs", 3, "--no-plots", "--out", out, cwd=tmp_path, stall=("best.safetensors", 2))
    proc.wait_for("STALLED")
    assert proc.finish(signal.SIGKILL)[0] == -signal.SIGKILL
    assert load_checkpoint(out / "best.safetensors").epoch == 1 and load_checkpoint(out / "last.safetensors").epoch == 2
    done = reconcile_run(out)
    assert done == {"best.safetensors": 2, "metrics.jsonl": [2], "metrics.json": 2}
    _io.remove_stale_temp_files(out)
    _assert_agree(out, 2)
    assert reconcile_run(out) == {}  # nothing more to do


# ----------------------------------------------------------------------------- the lock, in-process


def test_lock_is_taken_and_released_and_reentrant(tmp_path):
    lock = RunLock(tmp_path).acquire()
    owner = json.loads((tmp_path / LOCK_NAME).read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    inner = RunLock(tmp_path).acquire()  # the same process: re-entrant, and not released by the inner one
    inner.release()
    assert (tmp_path / LOCK_NAME).exists()
    lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("make", ["folder", "fifo", "link"])
def test_the_lock_is_taken_whatever_holds_the_names_it_is_staged_under(tmp_path, make):
    """The lock file is written aside under a name of its own before it is linked in, and a
    stale one is moved aside the same way: a folder, FIFO or link left at the names a
    process of this pid once used is neither written through nor in the way."""
    _write_lock(tmp_path)
    outside = tmp_path.parent / f"{tmp_path.name}-outside.txt"
    outside.write_text("mine")
    names = [f"{LOCK_NAME}.{os.getpid()}", f"{LOCK_NAME}.stale.{os.getpid()}"]
    for name in names:
        path = tmp_path / name
        {"folder": path.mkdir, "fifo": lambda p=path: os.mkfifo(p), "link": lambda p=path: p.symlink_to(outside)}[make]()
    lock = RunLock(tmp_path).acquire()
    assert lock.held and json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names) and outside.read_text() == "mine"


def test_lock_of_a_live_process_is_refused(tmp_path):
    parent = os.getppid()
    _write_lock(tmp_path, pid=parent, start=process_start(parent))
    with pytest.raises(RunFolderError, match=rf"another run is writing to this folder \(pid {parent} on "):
        RunLock(tmp_path).acquire()


def test_lock_of_another_machine_is_refused(tmp_path):
    _write_lock(tmp_path, pid=os.getppid(), host=socket.gethostname() + "-elsewhere")
    with pytest.raises(RunFolderError, match="another run is writing"):
        RunLock(tmp_path).acquire()


@pytest.mark.parametrize("how", ["dead pid", "reused pid", "garbage"])
def test_stale_lock_is_taken_over(tmp_path, how, caplog):
    if how == "reused pid":
        if process_start(os.getppid()) is None:
            pytest.skip("no /proc to tell a process's start time")
        _write_lock(tmp_path, pid=os.getppid(), start="another-boot:1")
    elif how == "garbage":
        tmp_path.joinpath(LOCK_NAME).write_text("{not json")
    else:
        _write_lock(tmp_path)
    with caplog.at_level("WARNING", logger="xpconv"):
        lock = RunLock(tmp_path).acquire()
    assert lock.held and json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert any("taking over the lock of a run that is gone" in r.getMessage() for r in caplog.records)
    lock.release()
    assert not list(tmp_path.iterdir())


def test_trainer_refuses_a_folder_another_run_holds(tmp_path):
    parent = os.getppid()
    _write_lock(tmp_path, pid=parent, start=process_start(parent))
    (x, t), (xt, tt) = load_digits()
    trainer = Trainer(_net(), x[:200], t[:200], xt[:50], tt[:50], epochs=1, mini_batch_size=50, verbose=False,
                      run=Run(out_dir=tmp_path))
    with pytest.raises(RunFolderError):
        trainer.train()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]  # nothing written


# ----------------------------------------------------------------------------- stale temp files


def test_stale_temp_files_are_removed_and_live_ones_kept(tmp_path):
    dead = tmp_path / f".last.safetensors.{_dead_pid()}.abc_1234.tmp"
    live = tmp_path / f".metrics.json.{os.getpid()}.zz99yy88.tmp"
    old = tmp_path / ".best.safetensors.q1w2e3r4.tmp"   # a name without a pid, hours old
    fresh = tmp_path / ".best.safetensors.a1s2d3f4.tmp"  # a name without a pid, just written
    other = tmp_path / ".notes.tmp"                      # not a name atomic_write gives
    for p in (dead, live, old, fresh, other):
        p.write_bytes(b"x")
    os.utime(old, (time.time() - 2 * _io.STALE_TEMP_AGE,) * 2)
    assert sorted(_io.remove_stale_temp_files(tmp_path)) == sorted([dead, old])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, fresh, other))


def test_atomic_write_names_its_temp_file_after_its_pid(tmp_path, monkeypatch):
    seen = []
    real = _io.os.replace

    def replace(src, dst):
        seen.append(Path(src).name)
        real(src, dst)

    monkeypatch.setattr(_io.os, "replace", replace)
    _io.atomic_write(tmp_path / "last.safetensors", b"x")
    assert re.fullmatch(rf"\.last\.safetensors\.{os.getpid()}\.[a-z0-9_]{{8}}\.tmp", seen[0])


# ----------------------------------------------------------------------------- signals, in-process


def test_sigterm_during_a_write_lands_after_it(tmp_path, monkeypatch):
    real = _io._chmod_like_new_file

    def terminated(fd, path):
        os.kill(os.getpid(), signal.SIGTERM)
        real(fd, path)

    monkeypatch.setattr(_io, "_chmod_like_new_file", terminated)
    with stop_signals():
        with pytest.raises(Terminated) as got:
            _io.atomic_write(tmp_path / "metrics.json", "{}")
        assert got.value.signum == signal.SIGTERM and got.value.exit_status == 143
        assert isinstance(got.value, KeyboardInterrupt)
    assert (tmp_path / "metrics.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_default_sigterm_during_a_write_ends_the_process_after_it(tmp_path):
    """No handler (a plain script): the SIGTERM still ends the process, once the file is
    in place and no temp file is left."""
    script = textwrap.dedent(
        """
        import os, signal, sys
        from xpconv import _io
        real = _io._chmod_like_new_file
        def terminated(fd, path):
            os.kill(os.getpid(), signal.SIGTERM)
            real(fd, path)
        _io._chmod_like_new_file = terminated
        _io.atomic_write(sys.argv[1], "whole")
        print("not reached", flush=True)
        """
    )
    target = tmp_path / "metrics.json"
    got = subprocess.run([sys.executable, "-c", script, str(target)], check=False, capture_output=True, text=True, timeout=120, env=_env())
    assert got.returncode == -signal.SIGTERM and got.stdout == ""
    assert target.read_text() == "whole" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_stop_signals_leaves_ignored_and_own_handlers_alone():
    if not hasattr(signal, "SIGHUP"):
        pytest.skip("no SIGHUP")
    mine = lambda signum, frame: None
    old_hup, old_term = signal.signal(signal.SIGHUP, signal.SIG_IGN), signal.signal(signal.SIGTERM, mine)
    try:
        with stop_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGHUP, old_hup)
        signal.signal(signal.SIGTERM, old_term)


def _net():
    return SimpleConvNet(input_dim=(1, 8, 8), conv_param={"filter_num": 4, "filter_size": 3, "pad": 1, "stride": 1},
                         hidden_size=16, weight_init_std=0.1, xp="numpy", seed=0)


class _SignalAt(Callback):
    """Sends a signal to this process at the end of an epoch (checking first that the
    trainer handles it: a default SIGTERM would end the test run)."""

    def __init__(self, epoch, sig):
        self.epoch, self.sig = epoch, sig

    def on_epoch_end(self, trainer, record):
        if record["epoch"] == self.epoch:
            assert signal.getsignal(self.sig) is not signal.SIG_DFL
            os.kill(os.getpid(), self.sig)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_trainer_train_raises_terminated_and_save_interrupted_keeps_the_run(tmp_path, sig):
    signum = getattr(signal, sig)
    (x, t), (xt, tt) = load_digits()
    trainer = Trainer(_net(), x[:300], t[:300], xt[:100], tt[:100], epochs=5, mini_batch_size=50, verbose=False,
                      run=Run(out_dir=tmp_path), callbacks=[_SignalAt(2, signum)])
    with pytest.raises(Terminated) as got:
        trainer.train()
    assert got.value.signum == signum and got.value.exit_status == 128 + signum
    assert signal.getsignal(signum) is signal.SIG_DFL  # restored
    assert not (tmp_path / LOCK_NAME).exists()
    path = trainer.save_interrupted()
    assert load_checkpoint(path).epoch == 2
    _assert_agree(tmp_path, 2)


def test_a_signal_between_last_and_best_is_finished_by_save_interrupted(tmp_path, monkeypatch):
    """SIGTERM after epoch 2's last.safetensors but before its best.safetensors: the
    interrupted save writes best too, so metrics.json names what best.safetensors holds."""
    (x, t), (xt, tt) = load_digits()
    trainer = Trainer(_net(), x[:300], t[:300], xt[:100], tt[:100], epochs=4, mini_batch_size=50, verbose=False,
                      optimizer="Adam", optimizer_param={"lr": 0.01}, run=Run(out_dir=tmp_path), seed=1)
    real = Trainer.checkpoint
    fired = []

    def checkpoint(self, path, **kw):
        if Path(path).name == "best.safetensors" and self.current_epoch == 2 and not fired:
            fired.append(1)
            raise Terminated(signal.SIGTERM)
        return real(self, path, **kw)

    monkeypatch.setattr(Trainer, "checkpoint", checkpoint)
    with pytest.raises(Terminated):
        trainer.train()
    if not fired:
        pytest.fail("epoch 2 was not the best so far: pick another seed for this test")
    assert load_checkpoint(tmp_path / "last.safetensors").epoch == 2
    trainer.save_interrupted()
    _assert_agree(tmp_path, 2)
    assert load_checkpoint(tmp_path / "best.safetensors").epoch == 2
    np.testing.assert_array_equal(load_checkpoint(tmp_path / "best.safetensors").model.params["W1"],
                                  load_checkpoint(tmp_path / "last.safetensors").model.params["W1"])
