"""Pictures a reader looks at: nothing drawn outside the figure."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from xpconv import plotting  # noqa: E402


@pytest.mark.parametrize("n_wrong, probs", [(1, True), (3, True), (3, False), (50, True), (0, False)])
def test_misclassified_title_fits_the_figure(monkeypatch, tmp_path, n_wrong, probs):
    figures = []
    real_save = plotting._save

    def keep(fig, path):
        figures.append(fig)
        return real_save(fig, path)

    monkeypatch.setattr(plotting, "_save", keep)
    t = np.zeros(359, dtype=int)
    pred = t.copy()
    pred[:n_wrong] = 4
    path = plotting.plot_misclassified(np.random.default_rng(0).random((359, 784)), t, pred, tmp_path / "m.png",
                                       probs=np.full(359, 0.7) if probs else None)
    assert path.is_file()
    fig = figures[0]
    renderer = fig.canvas.get_renderer()
    box = fig._suptitle.get_window_extent(renderer)
    assert f"{n_wrong} of 359" in fig._suptitle.get_text()
    assert box.x0 >= 0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1, (box, fig.bbox)
