"""Hostile settings and run folders: a TOML recipe, the command line and a checkpoint's
stored config are checked by one set of rules before anything is read, built, written or
deleted; a checkpoint's config is bounded for the work it causes; the files of a run folder
are stat-ed first, read within a budget and never read or written through a link.

Each case run through ``python -m xpconv`` ends in one line on stderr naming the file or
setting, exit status 2, under 700 MB of peak memory (the wrapper of
``test_hostile_checkpoints``), within a deadline.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import test_hostile_checkpoints as _checkpoints
from tests.test_hostile_checkpoints import RUN_CONFIG, crafted, fails
from xpconv._fileformat import CheckpointError
from xpconv.checkpoint import load_checkpoint
from xpconv.training import RunLock, claim_run_folder, reconcile_run
from xpconv.training.callbacks import append_jsonl

good = _checkpoints.good  # the fixture: a small training checkpoint as ``xpconv train`` writes it

# ----------------------------------------------------------------------------- TOML recipes


@pytest.mark.parametrize("text, pieces", [
    ('[model_config]\nhidden_size = "12"\n', ("model_config.hidden_size", "'12'")),
    ('[model_config]\nconv_param = "x"\n', ("model_config.conv_param", "'x'")),
    ('[model_config]\ndtype = "float16"\n', ("model_config", "'dtype'")),
    ('[model_config]\nhidden_layers = 3\n', ("model_config", "'hidden_layers'")),
    ('[model_config]\ninput_dim = [1, 28, 28]\n', ("model_config.input_dim", "dataset")),
    ('[model_config]\nconv_param = { filter_num = { a = 1 } }\n', ("model_config.conv_param",)),
    ('[model_config]\nhidden_size = 0\n', ("model_config.hidden_size", "got 0")),
    ('[model_config]\nconv_param = { pad = 4096, stride = 4096 }\n', ("model_config", "padded input", "values per sample")),
    ('[model_config]\nhidden_size = 10000000\n', ("parameters", "checkpoint")),
    ('dtype = "float16"\n', ("dtype", "'float16'")),
    ("epochs = 1000000000000\n", ("epochs", "1000000000000")),
    ("seed = 18446744073709551616\n", ("seed", "18446744073709551616")),
    ("seed = -1\n", ("seed", "-1")),
    ("lr = inf\n", ("lr", "inf")),
    ("a = " + "[" * 1000 + "]" * 1000 + "\n", ("nested too deep",)),
    ("[model_config]\nconv_param = " + "{ a = " * 1000 + "1" + " }" * 1000 + "\n", ("nested too deep",)),
])
def test_a_bad_recipe_is_one_line_naming_the_file_and_key(tmp_path, text, pieces):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    fails("train", "--config", path, "--out", tmp_path / "run", cwd=tmp_path, timeout=60, expect=(str(path), *pieces))
    assert not (tmp_path / "run").exists()


def test_a_recipe_of_invalid_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'data_dir = "caf\xe9"\n')
    fails("train", "--config", path, "--out", tmp_path / "run", cwd=tmp_path, timeout=60, expect=(str(path), "UTF-8"))


@pytest.mark.parametrize("target, kind", [("/dev/zero", "character device"), ("fifo", "FIFO")])
def test_a_recipe_that_is_no_regular_file_is_refused_unread(tmp_path, target, kind):
    path = tmp_path / "recipe.toml"
    if target == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(target)
    fails("train", "--config", path, "--out", tmp_path / "run", cwd=tmp_path, timeout=30, expect=(str(path), kind))


@pytest.mark.parametrize("option, value", [("--epochs", 10**12), ("--seed", 2**64), ("--batch-size", 10**10)])
def test_options_obey_the_rules_a_checkpoint_is_read_by(tmp_path, option, value):
    fails("train", option, value, "--out", tmp_path / "run", cwd=tmp_path, timeout=60, expect=(option, str(value)))


def test_the_rules_are_those_of_a_stored_run_configuration(tmp_path, good):
    """What the command line and a recipe refuse, a checkpoint's stored config is refused
    for too, and the other way round: one table of rules."""
    from xpconv import settings
    from xpconv.cli import UserError, check_run_config

    for key, value in [("epochs", 10**12), ("seed", 2**64), ("batch_size", 0), ("lr", float("inf"))]:
        with pytest.raises(settings.SettingError, match=key):
            settings.check_setting(key, value)
        with pytest.raises(UserError, match=f"config.{key}"):
            check_run_config({**RUN_CONFIG, key: value}, "x.safetensors")
    settings.check_model_config("simple", RUN_CONFIG["model_config"])
    with pytest.raises(settings.SettingError, match="hidden_size"):
        settings.check_model_config("simple", {**RUN_CONFIG["model_config"], "hidden_size": 0})


# ----------------------------------------------------------------------------- a checkpoint's settings and their work


def _big_pad(doc):
    doc["model"]["config"]["conv_param"].update(pad=4096, stride=4096)
    doc["optimizer"] = None


def _small_w2(arrays):
    # pad 4096, stride 4096 over 8x8: a 3x3 output, pooled to 1x1: W2 is (4 * 1 * 1, 12)
    arrays["model/W2"] = arrays["model/W2"][:4].copy()
    for k in [k for k in arrays if k.startswith("optim/")]:
        del arrays[k]


def test_a_tiny_checkpoint_asking_a_huge_pad_is_refused_before_allocation(tmp_path, good):
    path = crafted(good, tmp_path / "pad.safetensors", meta=_big_pad, tensors=_small_w2)
    assert path.stat().st_size < 4096
    with pytest.raises(CheckpointError, match="padded input takes 67,240,000 values per sample"):
        load_checkpoint(path)
    fails("eval", path, cwd=tmp_path, timeout=60, expect=(str(path), "padded input", "values per sample"))
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    fails("predict", path, tmp_path / "x.npy", cwd=tmp_path, timeout=60, expect=(str(path), "padded input"))


def test_a_checkpoint_asking_a_huge_input_is_refused(tmp_path, good):
    def meta(doc):
        doc["model"]["config"]["input_dim"] = [1, 4100, 4100]
        doc["model"]["config"]["conv_param"].update(pad=0, stride=4096)
        doc["optimizer"] = None

    def tensors(arrays):  # (4100 - 3) // 4096 + 1 = 2, pooled to 1x1
        _small_w2(arrays)

    path = crafted(good, tmp_path / "wide.safetensors", meta=meta, tensors=tensors)
    fails("eval", path, cwd=tmp_path, timeout=60, expect=(str(path), "the input takes 16,810,000 values per sample"))


def test_predict_takes_the_input_size_of_the_model_not_a_stated_one(tmp_path, good):
    """A run configuration stating a 20000x20000 input for an 8x8 model: refused, no upscaling."""
    path = crafted(good, tmp_path / "huge.safetensors", meta=lambda d: d["extra"]["config"].update(input_dim=[1, 20000, 20000]))
    from PIL import Image

    Image.fromarray(np.full((8, 8), 30, np.uint8)).save(tmp_path / "digit.png")
    fails("predict", path, tmp_path / "digit.png", cwd=tmp_path, timeout=60, expect=(str(path), "config.input_dim", "(1, 8, 8)"))


def test_eval_chunks_follow_the_work_per_sample():
    from xpconv import settings

    deep = {"input_dim": [1, 28, 28]}
    assert settings.eval_chunk("deep", deep, 500) == settings.EVAL_CHUNK_VALUES // 112896
    assert settings.eval_chunk("simple", {"input_dim": [1, 8, 8]}, 500) == 500


def test_predict_on_an_empty_array_says_so(tmp_path, good):
    np.save(tmp_path / "empty.npy", np.zeros((0, 1, 8, 8), np.float32))
    fails("predict", good, tmp_path / "empty.npy", cwd=tmp_path, timeout=60, expect=(str(tmp_path / "empty.npy"),))


# ----------------------------------------------------------------------------- run folders


@pytest.fixture
def run_dir(tmp_path, good) -> Path:
    """A run folder after epoch 1 of 3: last.safetensors, metrics.json, metrics.jsonl."""
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(good, folder / "last.safetensors")
    (folder / "metrics.json").write_text(json.dumps({"epochs": [], "final": {}, "config": RUN_CONFIG}))
    (folder / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 2.3, "train_acc": 0.1, "test_acc": 0.1}\n')
    return folder


@pytest.mark.parametrize("name, make, kind", [
    (".xpconv-run.lock", os.mkfifo, "FIFO"),
    (".xpconv-run.lock", lambda p: p.symlink_to("/dev/zero"), "symbolic link"),
    ("metrics.json", os.mkfifo, "FIFO"),
    ("metrics.json", lambda p: p.symlink_to("/dev/zero"), "symbolic link"),
    ("metrics.jsonl", os.mkfifo, "FIFO"),
])
def test_resume_refuses_odd_run_files_unread(tmp_path, run_dir, name, make, kind):
    path = run_dir / name
    path.unlink(missing_ok=True)
    make(path)
    fails("train", "--resume", run_dir / "last.safetensors", cwd=tmp_path, timeout=30, expect=(str(path), kind))


@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_a_linked_metrics_jsonl_is_never_appended_to(tmp_path, run_dir, link):
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("mine\n")
    (run_dir / "metrics.jsonl").unlink()
    if link == "symbolic":
        (run_dir / "metrics.jsonl").symlink_to(outside)
    else:
        os.link(outside, run_dir / "metrics.jsonl")
    fails("train", "--resume", run_dir / "last.safetensors", cwd=tmp_path, timeout=60, expect=("metrics.jsonl",))
    assert outside.read_text() == "mine\n"
    with pytest.raises(OSError, match="metrics.jsonl"):
        append_jsonl(run_dir / "metrics.jsonl", {"epoch": 2})
    assert outside.read_text() == "mine\n"


def test_overwrite_keeps_the_old_run_until_the_new_one_can_start(tmp_path, run_dir, good):
    before = sorted(p.name for p in run_dir.iterdir())
    bad = tmp_path / "bad.toml"
    bad.write_text('[model_config]\nhidden_size = "12"\n')
    fails("train", "--config", bad, "--out", run_dir, "--overwrite", cwd=tmp_path, timeout=60, expect=(str(bad),))
    fails("train", "--dataset", "mnist", "--data-dir", tmp_path / "missing", "--no-download", "--out", run_dir, "--overwrite",
          cwd=tmp_path, timeout=60, expect=("missing",))
    assert sorted(p.name for p in run_dir.iterdir()) == before
    assert (run_dir / "last.safetensors").read_bytes() == good.read_bytes()


def test_a_lock_with_an_impossible_pid_is_taken_over(tmp_path, caplog):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".xpconv-run.lock").write_text(json.dumps({"pid": 2**31, "host": socket.gethostname(), "start": None, "since": "x"}))
    with caplog.at_level(logging.WARNING, logger="xpconv"):
        lock = RunLock(folder).acquire()
    assert lock.held and "taking over the lock" in caplog.text
    lock.release()


def test_a_temp_file_with_a_20_digit_pid_is_removed(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    temp = folder / ".metrics.json.12345678901234567890.abcdefgh.tmp"
    temp.write_text("{}")
    claim_run_folder(folder).release()
    assert not temp.exists()


def test_metrics_jsonl_lines_are_untrusted_text(tmp_path, run_dir, caplog):
    (run_dir / "metrics.jsonl").write_text('{"epoch": Infinity}\n{"epoch": 1e400}\n{"epoch": true}\n' + "[" * 100000 + "\n")
    with caplog.at_level(logging.WARNING, logger="xpconv"):
        done = reconcile_run(run_dir)
    assert done["metrics.jsonl"] == [1]
    assert "4 line(s) that are not an epoch's record ignored" in caplog.text


def test_a_record_is_appended_on_a_line_of_its_own(tmp_path, run_dir):
    """A metrics.jsonl whose last line is unfinished (a cut copy, an edit): the records a
    resume appends start a line of their own instead of joining that line."""
    jsonl = run_dir / "metrics.jsonl"
    jsonl.write_text('{"epoch": 1, "train_loss": 2.3, "train_acc": 0.1, "test_acc": 0.1}\n{"epoch": 2, "tra')
    append_jsonl(jsonl, {"epoch": 2, "test_acc": 0.5})
    append_jsonl(jsonl, {"epoch": 3, "test_acc": 0.6})
    lines = jsonl.read_text().splitlines()
    assert lines[1] == '{"epoch": 2, "tra'
    assert [json.loads(line)["epoch"] for line in lines[2:]] == [2, 3]


_CAPPED_RESUME = r"""
import resource, sys
from pathlib import Path
from xpconv._io import proc_status
from xpconv.training import claim_run_folder
limit = int(proc_status("VmSize").split()[0]) * 1024 + (700 << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
folder = Path(sys.argv[1])
claim_run_folder(folder, resume=folder / "last.safetensors").release()
"""


def _sparse(path: Path, size: int) -> None:
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


@pytest.mark.parametrize("name, content", [
    ("metrics.json", "[" + "[]," * 13_000_000 + "[]]"),  # 39 MB whose objects take some 800 MB
    ("metrics.jsonl", "{}\n" * 13_000_000),  # 39 MB of lines: some 800 MB as a list of strings
    ("metrics.jsonl", 1 << 40),  # a sparse terabyte
])
def test_resume_reads_huge_metrics_files_within_the_memory_budget(tmp_path, run_dir, name, content):
    """metrics.json is parsed only up to a size whose objects fit the budget (a larger one is
    written anew from last.safetensors, which holds the same records); of metrics.jsonl only
    the end is read: the repair on resume runs in 700 MB of address space beyond its imports."""
    if isinstance(content, int):
        _sparse(run_dir / name, content)
    else:
        (run_dir / name).write_text(content)
    proc = subprocess.run([sys.executable, "-c", _CAPPED_RESUME, str(run_dir)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(_checkpoints.ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((run_dir / "metrics.json").read_text())
    assert doc["final"]["epoch"] == 1 and [r["epoch"] for r in doc["epochs"]] == [1]


def test_resume_goes_on_after_a_metrics_jsonl_of_a_terabyte(tmp_path, run_dir):
    """A metrics.jsonl larger than any run writes is no reason to refuse the run: its end
    is read (it holds no record here), the records are appended on lines of their own."""
    path = run_dir / "metrics.jsonl"
    _sparse(path, 1 << 40)
    rc, out, err, rss = _checkpoints.xpconv("train", "--resume", run_dir / "last.safetensors", "--no-plots", cwd=tmp_path, timeout=120)
    assert rc == 0, err
    assert rss < _checkpoints.RSS_LIMIT_MB, f"peak RSS {rss:.0f} MB"
    doc = json.loads((run_dir / "metrics.json").read_text())
    assert doc["final"]["epoch"] == 3 and [r["epoch"] for r in doc["epochs"]] == [1, 2, 3]
    with open(path, "rb") as f:
        f.seek(1 << 40)
        added = [json.loads(line) for line in f.read().splitlines() if line.strip()]
    assert [r["epoch"] for r in added] == [1, 2, 3]  # its end holds no record: all of them are appended
