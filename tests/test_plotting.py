"""Pictures a reader looks at: nothing drawn outside the figure; Figures returned for a
notebook to show, PNGs written only when a path is given."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from matplotlib.figure import Figure
from PIL import Image

from xpconv import plotting
from xpconv.models import SimpleConvNet, TwoLayerNet

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HISTORY = [{"epoch": e, "train_loss": 1.0 / e, "train_acc": 0.8 + 0.01 * e, "test_acc": 0.79 + 0.01 * e} for e in (1, 2, 3)]


@pytest.mark.parametrize("n_wrong, probs", [(1, True), (3, True), (3, False), (50, True), (0, False)])
def test_misclassified_title_fits_the_figure(tmp_path, n_wrong, probs):
    t = np.zeros(359, dtype=int)
    pred = t.copy()
    pred[:n_wrong] = 4
    fig = plotting.plot_misclassified(np.random.default_rng(0).random((359, 784)), t, pred, tmp_path / "m.png",
                                      probs=np.full(359, 0.7) if probs else None)
    assert fig.path == tmp_path / "m.png" and fig.path.is_file()
    renderer = fig.canvas.get_renderer()
    box = fig._suptitle.get_window_extent(renderer)
    assert f"{n_wrong} of 359" in fig._suptitle.get_text()
    assert box.x0 >= 0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1, (box, fig.bbox)


def _drawings(tmp_path, path):
    """Every plotting function once, saving to ``path(name)`` (None: not saving)."""
    net = SimpleConvNet(input_dim=(1, 8, 8), conv_param={"filter_num": 4, "filter_size": 3, "pad": 1}, hidden_size=8,
                        xp="numpy", seed=0)
    x = np.random.default_rng(0).random((12, 1, 8, 8)).astype(np.float32)
    t = np.arange(12) % 10
    pred, prob = plotting.predict_labels(net, x)
    filters, what = plotting.plot_filters(net, path("filters.png"))
    assert what == "4 filters 3x3"
    return {
        "curves.png": plotting.plot_curves(HISTORY, path("curves.png"), [0.5] * 30, title="t"),
        "misclassified.png": plotting.plot_misclassified(x, t, pred, path("misclassified.png"), probs=prob),
        "filters.png": filters,
    }


def test_plots_return_figures_that_show_inline_without_writing_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    figures = _drawings(tmp_path, lambda name: None)
    assert list(tmp_path.iterdir()) == []  # no path: nothing written anywhere
    for name, fig in figures.items():
        assert isinstance(fig, Figure), name
        assert fig.path is None
        png = fig._repr_png_()  # what IPython displays for the last expression of a cell
        assert png.startswith(PNG_MAGIC), name
        with pytest.raises(TypeError, match="not saved to a file"):
            os.fspath(fig)
    assert isinstance(figures["curves.png"], plotting.PlotFigure)


def test_plots_given_a_path_write_the_png_and_remember_it(tmp_path):
    figures = _drawings(tmp_path, lambda name: tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(figures)
    for name, fig in figures.items():
        assert fig.path == tmp_path / name and os.fspath(fig) == str(tmp_path / name)
        with Image.open(fig) as im:  # the Figure stands for its file where a path was expected
            w, h = im.size
        assert (w, h) == (round(fig.get_figwidth() * fig.dpi), round(fig.get_figheight() * fig.dpi)), name
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)


def test_filters_without_a_picture_give_none_and_write_nothing(tmp_path):
    fig, why = plotting.plot_filters(TwoLayerNet(10, 4, 3, xp="numpy", seed=0), tmp_path / "f.png")
    assert fig is None and "10 inputs are not a square image" in why
    assert not (tmp_path / "f.png").exists()
    fig, what = plotting.plot_filters(TwoLayerNet(64, 5, 10, xp="numpy", seed=0), input_dim=(1, 8, 8))
    assert what == "weights of the first 5 of 5 hidden units as 8x8 images"
    assert len(fig.axes) == 5 and fig.path is None
