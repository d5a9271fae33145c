"""Your own data: folders of class subfolders and .npz files, in Python (xpconv.datasets.load_folder /
load_npz) and on the command line (xpconv train/eval/predict --data); hostile folders (a symlink
loop, a FIFO, files that are no images, an image too large, too many files) end in a warning or a
one-line error, never a crash or a hang."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xpconv import cli, folders, images
from xpconv.checkpoint import load_checkpoint
from xpconv.datasets import DatasetError, DatasetWarning, load_digits, load_folder, load_npz


def _digits(n=120):
    (x, t), _ = load_digits()
    return x[:n], t[:n]


def _png(path: Path, a: np.ndarray, size=None, mode="L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8))
    if size is not None:
        im = im.resize(size)
    im.convert(mode).save(path)


def _folder(root: Path, n=60, size=(12, 12), classes=3) -> tuple[np.ndarray, np.ndarray]:
    x, t = _digits(400)
    keep = np.flatnonzero(t < classes)[:n]
    for i in keep:
        _png(root / f"class{t[i]}" / f"{i:04d}.png", x[i, 0], size)
    return x[keep], t[keep]


def _main(capsys, *args):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- load_folder


def test_folder_classes_split_and_images_as_predict_reads_them(tmp_path):
    _, t = _folder(tmp_path, n=60, size=(12, 12))
    data = load_folder(tmp_path, seed=3)
    (x_train, t_train), (x_test, t_test) = data
    assert data.class_names == ["class0", "class1", "class2"]
    assert data.input_dim == (1, 12, 12)
    assert x_train.shape == (48, 1, 12, 12) and x_test.shape == (12, 1, 12, 12)
    assert x_train.dtype == np.float32 and t_train.dtype == np.int64
    assert float(x_train.min()) >= 0.0 and float(x_train.max()) <= 1.0
    assert sorted(np.concatenate([t_train, t_test]).tolist()) == sorted(t.tolist())
    # each image is exactly what `xpconv predict` makes of the file
    files = sorted(tmp_path.glob("*/*.png"))
    _, x_all, _ = images.read_images(files, (1, 12, 12))
    found = {x.tobytes() for x in x_all}
    assert all(x.tobytes() in found for x in x_test)
    # the split is seeded: the same seed gives the same split, another seed another
    (again, _), (again_test, _) = load_folder(tmp_path, seed=3)
    np.testing.assert_array_equal(again, x_train)
    (_, _), (other_test, _) = load_folder(tmp_path, seed=4)
    assert not np.array_equal(other_test, again_test)


def test_folder_size_is_the_common_one_or_the_one_asked(tmp_path):
    x, t = _digits(30)
    for i in range(30):  # most 10x10, a few 20x14, grey and colour, PNG and JPEG
        size = (20, 14) if i % 10 == 0 else (10, 10)
        ext, mode = (".jpg", "RGB") if i % 3 == 0 else (".png", "L")
        _png(tmp_path / f"d{t[i] % 2}" / f"{i}{ext}", x[i, 0], size, mode)
    data = load_folder(tmp_path)
    assert data.input_dim == (1, 10, 10)
    assert data[0][0].shape[1:] == (1, 10, 10)
    assert data[0][0].shape[0] + data[1][0].shape[0] == 30
    data = load_folder(tmp_path, input_size="16x8")
    assert data.input_dim == (1, 16, 8) and data[1][0].shape[1:] == (1, 16, 8)
    data = load_folder(tmp_path, 6)
    assert data.input_dim == (1, 6, 6)
    with pytest.raises(ValueError, match="expected N or HxW"):
        load_folder(tmp_path, "big")


def test_folder_train_and_test_subfolders_are_the_split(tmp_path):
    x, t = _digits(40)
    for i in range(40):
        part = "test" if i % 4 == 0 else "train"
        _png(tmp_path / part / ("even" if t[i] % 2 == 0 else "odd") / f"{i}.png", x[i, 0])
    (x_train, t_train), (x_test, t_test) = data = load_folder(tmp_path)
    assert data.class_names == ["even", "odd"]
    assert x_train.shape[0] == 30 and x_test.shape[0] == 10
    np.testing.assert_array_equal(t_test, np.sort(t[::4] % 2))  # class by class, in name order
    _png(tmp_path / "test" / "other" / "1.png", x[0, 0])
    with pytest.raises(DatasetError, match="'other' are not among the training classes"):
        load_folder(tmp_path)


def test_folder_npy_files_keep_their_channels(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for i in range(5):
            (tmp_path / c).mkdir(exist_ok=True)
            np.save(tmp_path / c / f"{i}.npy", rng.random((3, 8, 8)).astype(np.float32))
    data = load_folder(tmp_path, channels=3)
    assert data.input_dim == (3, 8, 8) and data[0][0].shape[1:] == (3, 8, 8)
    data = load_folder(tmp_path)  # the channels come from the arrays' headers
    assert data.input_dim == (3, 8, 8)


def test_folder_hostile_entries_are_named_and_skipped(tmp_path, monkeypatch):
    _folder(tmp_path, n=30)
    cls = tmp_path / "class0"
    (cls / "loop").symlink_to(tmp_path, target_is_directory=True)  # a symlink loop
    (cls / "self").symlink_to(cls, target_is_directory=True)
    os.mkfifo(cls / "pipe.png")  # would block an open() forever
    (cls / "notes.txt").write_text("not an image")
    (cls / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    np.save(cls / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _png(cls / "huge.png", np.zeros((40, 40)))
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)  # 40x40 = 1,600 pixels: over the cap
    with pytest.warns(DatasetWarning, match="entries left out") as caught:
        data = load_folder(tmp_path, input_size=8)
    message = str(caught[0].message)
    skipped = dict(data.skipped)
    assert any("FIFO" in r for p, r in skipped.items() if p.endswith("pipe.png"))
    assert "not an image" in skipped[str(cls / "notes.txt")]
    assert any(p.endswith("junk.png") for p in skipped)
    assert any(p.endswith("pickled.npy") for p in skipped)
    assert any("pixels" in r for p, r in skipped.items() if p.endswith("huge.png"))
    assert "junk.png" in message and "pipe.png" in message
    # every real image is read once: the loops added nothing
    assert data[0][0].shape[0] + data[1][0].shape[0] == 30
    counts = np.bincount(np.concatenate([data[0][1], data[1][1]]), minlength=3)
    for k in (1, 2):  # the link from class0 to the root did not relabel other classes' images
        assert counts[k] == len(list((tmp_path / f"class{k}").glob("*.png")))
    with pytest.raises(DatasetError, match="pipe.png|junk.png|pickled.npy|huge.png"):
        load_folder(tmp_path, input_size=8, on_error="raise")


def test_folder_caps_files_and_bytes(tmp_path):
    _folder(tmp_path, n=30)
    with pytest.raises(DatasetError, match="class0: more than 10 entries; expected at most max_files=10"):
        load_folder(tmp_path, max_files=10)  # refused while one folder is listed
    with pytest.raises(DatasetError, match="more than 20 image files; expected at most max_files=20"):
        load_folder(tmp_path, max_files=20)  # each folder fits, all of them together do not
    with pytest.raises(DatasetError, match="expected at most max_bytes=1,000"):
        load_folder(tmp_path, max_bytes=1000)
    with pytest.raises(DatasetError, match="take 0.11 GiB"):
        load_folder(tmp_path, input_size=1000, max_bytes=100_000_000)  # refused before anything is allocated
    monkeypatch_depth = tmp_path / "class0"
    deep = monkeypatch_depth
    for k in range(folders.MAX_DEPTH + 2):
        deep = deep / f"d{k}"
    _png(deep / "x.png", np.zeros((12, 12)))
    with pytest.warns(DatasetWarning, match="deeper than"):
        load_folder(tmp_path)


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(DatasetError, match="not a folder"):
        load_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="expected at least 2"):
        load_folder(tmp_path / "empty")
    (tmp_path / "flat").mkdir()
    _png(tmp_path / "flat" / "a" / "1.png", np.zeros((4, 4)))
    (tmp_path / "flat" / "a" / "2.png").write_bytes(b"garbage")
    (tmp_path / "flat" / "b").mkdir()
    (tmp_path / "flat" / "b" / "3.png").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="no readable image among"):
        load_folder(tmp_path / "flat", test_size=0.5, seed=1)
    with pytest.warns(DatasetWarning), pytest.raises(DatasetError, match="none of the training images"):
        load_folder(tmp_path / "flat", 4, test_size=0.5, seed=1)


# --------------------------------------------------------------------------- load_npz


def test_npz_round_trip_and_refusals(tmp_path):
    x, t = _digits(50)
    raw = (x[:, 0] * 255).astype(np.uint8)  # (N, H, W) uint8
    f = tmp_path / "d.npz"
    np.savez(f, x_train=raw[:40], t_train=t[:40], x_test=raw[40:], t_test=t[40:],
             class_names=np.array([f"digit {i}" for i in range(10)]))
    (x_train, t_train), (x_test, t_test) = data = load_npz(f)
    assert x_train.shape == (40, 1, 8, 8) and x_train.dtype == np.float32 and float(x_train.max()) <= 1.0
    np.testing.assert_array_equal(t_test, t[40:])
    assert data.class_names[3] == "digit 3" and data.input_dim == (1, 8, 8)

    np.savez(f, x_train=raw[:40, :, :, None], t_train=t[:40], x_test=raw[40:, :, :, None], t_test=t[40:])
    with pytest.raises(DatasetError, match=r"channels-last.*transpose\(0, 3, 1, 2\)"):
        load_npz(f)
    np.savez(f, x_train=raw[:40], t_train=t[:40])
    with pytest.raises(DatasetError, match="missing x_test, t_test"):
        load_npz(f)
    np.savez(f, x_train=raw[:40], t_train=t[:39], x_test=raw[40:], t_test=t[40:])
    with pytest.raises(DatasetError, match="t_train should be 40 integer labels"):
        load_npz(f)
    np.savez(f, x_train=np.array([None] * 4, dtype=object), t_train=t[:4], x_test=raw[:4], t_test=t[:4])
    with pytest.raises(DatasetError, match="cannot read its arrays|should hold numbers"):
        load_npz(f)
    # a zip bomb: the unpacked size is read from the zip directory and refused before inflating
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for k in ("x_train", "t_train", "x_test", "t_test"):
            z.writestr(k + ".npy", b"\0" * 2_000_000)
    with pytest.raises(DatasetError, match="expected at most max_bytes=1,000,000"):
        load_npz(f, max_bytes=1_000_000)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="not a .npz file"):
        load_npz(tmp_path / "bad.npz")


# --------------------------------------------------------------------------- the command line


def test_cli_train_eval_predict_on_a_folder(tmp_path, capsys):
    _folder(tmp_path / "imgs", n=90, size=(10, 10))
    out = tmp_path / "run"
    code, text, err = _main(capsys, "train", "--data", tmp_path / "imgs", "--epochs", "2", "--out", out, "--no-plots", "-q")
    assert code == 0, err
    cfg = json.loads((out / "metrics.json").read_text())["config"]
    assert cfg["data"] == str(tmp_path / "imgs") and cfg["dataset"] is None
    assert cfg["class_names"] == ["class0", "class1", "class2"] and cfg["input_dim"] == [1, 10, 10]
    ckpt = load_checkpoint(out / "last.safetensors")
    assert ckpt.extra["config"]["class_names"] == ["class0", "class1", "class2"]

    code, text, err = _main(capsys, "eval", out / "last.safetensors", "--data", tmp_path / "imgs")
    assert code == 0, err
    assert "imgs test set: accuracy" in text and "of 18)" in text
    code, text, err = _main(capsys, "eval", out / "last.safetensors")
    assert code == 2 and "trained on your own data" in err and "--data" in err
    some = sorted((tmp_path / "imgs" / "class1").glob("*.png"))[0]
    code, text, err = _main(capsys, "predict", out / "last.safetensors", some, "--top", "3")
    assert code == 0, err
    assert all(f"class{k}" in text for k in range(3))
    # resuming reads the same folder again, named again
    code, text, err = _main(capsys, "train", "--resume", out / "last.safetensors", "--epochs", "3", "-q", "--no-plots")
    assert code == 2 and "pass --data again" in err
    code, text, err = _main(capsys, "train", "--resume", out / "last.safetensors", "--data", tmp_path / "imgs",
                            "--epochs", "3", "-q", "--no-plots")
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["final"]["epoch"] == 3


def test_cli_train_on_npz_with_a_size_no_built_in_set_has(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.random((60, 1, 16, 16)).astype(np.float32)
    t = (x.mean(axis=(1, 2, 3)) > 0.5).astype(np.int64)
    np.savez(tmp_path / "d.npz", x_train=x[:48], t_train=t[:48], x_test=x[48:], t_test=t[48:])
    code, text, err = _main(capsys, "train", "--data", tmp_path / "d.npz", "--epochs", "1", "--out", tmp_path / "r",
                            "--no-plots", "-q")
    assert code == 0, err
    cfg = json.loads((tmp_path / "r" / "metrics.json").read_text())["config"]
    assert cfg["input_dim"] == [1, 16, 16] and cfg["class_names"] == ["0", "1"]
    code, text, err = _main(capsys, "eval", tmp_path / "r" / "last.safetensors", "--data", tmp_path / "d.npz")
    assert code == 0 and "of 12)" in text, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data-dir", "{tmp}"], "the digits dataset is bundled and reads no folder"),
        (["--dataset", "digits", "--data-dir", "{tmp}"], "the digits dataset is bundled"),
        (["--data", "{tmp}", "--data-dir", "{tmp}"], "leave --data-dir out"),
        (["--data", "{tmp}", "--dataset", "mnist"], "exclude each other"),
        (["--input-size", "28"], "without --data it has nothing to do"),
        (["--data", "{tmp}/nothing"], "not a folder"),
    ],
)
def test_cli_data_options_refuse_what_would_be_ignored(tmp_path, capsys, args, message):
    code, _, err = _main(capsys, "train", *[a.replace("{tmp}", str(tmp_path)) for a in args], "--epochs", "1",
                         "--out", tmp_path / "run")
    assert code == 2
    assert message in err
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_cli_eval_data_dir_with_digits_is_refused(tmp_path, capsys):
    _folder(tmp_path / "imgs", n=30, size=(8, 8))
    assert _main(capsys, "train", "--epochs", "1", "--out", tmp_path / "run", "--no-plots", "-q")[0] == 0
    code, _, err = _main(capsys, "eval", tmp_path / "run" / "last.safetensors", "--data-dir", tmp_path)
    assert code == 2 and "the digits dataset is bundled" in err
    # a folder whose classes the checkpoint does not know
    code, _, err = _main(capsys, "eval", tmp_path / "run" / "last.safetensors", "--data", tmp_path / "imgs")
    assert code == 2 and "'class0'" in err and "are not among" in err


# --------------------------------------------------------------------------- evaluate, runs, callbacks, curves


def _small_net(xp=None, seed=0):
    from xpconv.models import SimpleConvNet

    return SimpleConvNet(input_dim=(1, 8, 8), conv_param={"filter_num": 4, "filter_size": 3, "pad": 1, "stride": 1},
                         hidden_size=10, output_size=10, xp=xp, seed=seed)


def test_evaluate_is_chunked_inference_on_every_namespace(xp):
    from xpconv.backend import asarray_in

    (x, t), (xt, tt) = load_digits()
    net = _small_net(xp)
    xs, ts = asarray_in(xt[:50], xp), asarray_in(tt[:50], xp)
    whole = net.evaluate(xs, ts, batch_size=50)
    chunked = net.evaluate(xs, ts, batch_size=7)
    assert whole["samples"] == chunked["samples"] == 50
    assert chunked["loss"] == pytest.approx(float(net.loss(xs, ts, train_flg=False)), rel=1e-5)
    assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert chunked["accuracy"] == whole["accuracy"] == net.accuracy(xs, ts)
    with pytest.raises(ValueError, match="50 samples but 49 labels"):
        net.evaluate(xs, ts[:49])


def test_evaluate_leaves_dropout_off_and_batchnorm_statistics_alone():
    from xpconv.models import MultiLayerNetExtend

    (x, t), _ = load_digits()
    net = MultiLayerNetExtend(64, [30, 30], 10, use_dropout=True, dropout_ration=0.5, use_batchnorm=True, seed=0)
    xf = x[:64].reshape(64, -1)
    net.loss(xf, t[:64], train_flg=True)  # running statistics move away from their start
    stats = [np.array(layer.running_mean) for layer in net.layers if hasattr(layer, "running_mean")]
    assert stats
    first, second = net.evaluate(xf, t[:64], batch_size=16), net.evaluate(xf, t[:64], batch_size=64)
    assert first["loss"] == pytest.approx(second["loss"], rel=1e-5) and first["accuracy"] == second["accuracy"]
    after = [np.array(layer.running_mean) for layer in net.layers if hasattr(layer, "running_mean")]
    for a, b in zip(stats, after):
        np.testing.assert_array_equal(a, b)


def test_channels_last_input_names_the_layout_and_the_transpose():
    net = _small_net()
    x = np.zeros((4, 8, 8, 1), dtype=np.float32)
    for call in (lambda: net.predict(x), lambda: net.evaluate(x, np.zeros(4, dtype=np.int64)),
                 lambda: net.loss(x, np.zeros(4, dtype=np.int64))):
        with pytest.raises(ValueError, match=r"channels last \(N, H, W, C\).*C=1.*x\.transpose\(0, 3, 1, 2\)"):
            call()
    assert net.predict(x.transpose(0, 3, 1, 2)).shape == (4, 10)


def test_trainer_without_test_data_says_so():
    from xpconv.training import Trainer

    (x, t), _ = load_digits()
    with pytest.raises(TypeError, match="x_test, t_test are None; expected arrays"):
        Trainer(_small_net(), x, t, None, None)


def test_callbacks_added_after_construction_run_or_are_refused():
    from xpconv.training import Trainer

    (x, t), (xt, tt) = load_digits()
    seen = []
    tr = Trainer(_small_net(), x[:200], t[:200], xt[:50], tt[:50], epochs=2, mini_batch_size=50, verbose=False)
    tr.callbacks.append(lambda trainer, record: seen.append(record["epoch"]))
    tr.train()
    assert seen == [1, 2]
    tr = Trainer(_small_net(), x[:200], t[:200], xt[:50], tt[:50], epochs=1, mini_batch_size=50, verbose=False)
    tr.callbacks.append("save")
    with pytest.raises(TypeError, match="callback 'save' has none of the hooks"):
        tr.train()


def test_run_out_dir_refuses_a_folder_holding_a_run_as_the_cli_does(tmp_path):
    from xpconv.checkpoint import load_checkpoint
    from xpconv.training import Run, RunFolderError, Trainer

    (x, t), (xt, tt) = load_digits()
    data = (x[:200], t[:200], xt[:50], tt[:50])
    out = tmp_path / "run"
    Trainer(_small_net(), *data, epochs=3, mini_batch_size=50, verbose=False, run=Run(out_dir=out)).train()
    before = (out / "metrics.json").read_text()
    again = Trainer(_small_net(), *data, epochs=2, mini_batch_size=50, verbose=False, run=Run(out_dir=out))
    with pytest.raises(RunFolderError, match="holds a run.*overwrite=True"):
        again.train()
    assert (out / "metrics.json").read_text() == before  # nothing was replaced
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    # resuming continues the run in place; overwrite replaces it
    ckpt = load_checkpoint(out / "last.safetensors")
    more = Trainer(ckpt.model, *data, epochs=4, mini_batch_size=50, verbose=False, optimizer=ckpt.optimizer,
                   run=Run.resume(ckpt, out_dir=out))
    assert [r["epoch"] for r in more.train()] == [1, 2, 3, 4]
    Trainer(_small_net(), *data, epochs=2, mini_batch_size=50, verbose=False, run=Run(out_dir=out, overwrite=True)).train()
    assert json.loads((out / "metrics.json").read_text())["final"]["epoch"] == 2
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_plot_curves_overlays_several_runs(tmp_path):
    pytest.importorskip("matplotlib")  # the plot extra; CI installs it
    from xpconv.plotting import plot_curves
    from xpconv.training import Run, Trainer

    (x, t), (xt, tt) = load_digits()
    histories = []
    for seed in (0, 1):
        tr = Trainer(_small_net(seed=seed), x[:200], t[:200], xt[:50], tt[:50], epochs=2, mini_batch_size=50,
                     verbose=False, run=Run(out_dir=tmp_path / f"seed{seed}"))
        histories.append(tr.train())
    fig = plot_curves(histories, tmp_path / "both.png")
    loss_ax, acc_ax = fig.axes[:2]
    assert len(loss_ax.lines) == 2 and len(acc_ax.lines) == 4
    np.testing.assert_array_equal(loss_ax.lines[1].get_ydata(), [r["train_loss"] for r in histories[1]])
    assert (tmp_path / "both.png").stat().st_size > 0
    fig = plot_curves([tmp_path / "seed0", tmp_path / "seed1"])
    assert [ln.get_label() for ln in fig.axes[0].lines] == ["seed0", "seed1"]
    fig = plot_curves(histories, labels=["a", "b"])
    assert [ln.get_label() for ln in fig.axes[0].lines] == ["a", "b"]
    with pytest.raises(TypeError, match="run 2 should be per-epoch records"):
        plot_curves([histories[0], 42])
    assert len(plot_curves(histories[0]).axes[0].lines) >= 1  # one run: the book's figure as before
