"""The notebooks in examples/notebooks run top to bottom in a real Jupyter kernel (quick
sizes: XPCONV_NOTEBOOK_QUICK=1, under which each still checks its accuracy), show their
pictures and models inline, keep the progress bar to one widget per epoch, and are
committed without outputs."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from .conftest import shared_dataset

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "examples" / "notebooks"
NAMES = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))


def test_there_are_the_four_notebooks():
    assert NAMES == ["01_digits_cnn.ipynb", "02_mnist_simpleconvnet.ipynb", "03_twolayernet_inside.ipynb",
                     "04_own_data_and_model.ipynb"]


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_carry_no_outputs(name):
    nb = json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code
    stale = [i for i, c in enumerate(code) if c.get("outputs") or c.get("execution_count") is not None]
    assert stale == [], f"{name}: code cells {stale} carry outputs; clear them before committing"
    params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1 and "XPCONV_NOTEBOOK_QUICK" in "".join(params[0]["source"])


def _outputs(cell) -> list[dict]:
    return list(cell.get("outputs", []))


def _stream_text(cell, name=None) -> str:
    return "".join(o["text"] for o in _outputs(cell) if o["output_type"] == "stream" and (name is None or o["name"] == name))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_a_kernel(name, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("XPCONV_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    if "mnist" in name:
        monkeypatch.setenv("XPCONV_MNIST_DIR", shared_dataset("mnist"))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on any cell error, failed accuracy assertions included
    assert list(tmp_path.iterdir()) == []  # nothing written beside the notebook

    cells = [c for c in nb.cells if c.cell_type == "code"]
    # the learning curves (and the other figures) show inline as PNGs
    plots = [c for c in cells if "plot_" in c.source and any("image/png" in o.get("data", {}) for o in _outputs(c))]
    assert any("plot_curves" in c.source for c in plots), name
    if "inside" in name:
        assert any("plot_filters" in c.source for c in plots) and any("plot_misclassified" in c.source for c in plots)
    # a model ending a cell shows its summary
    summaries = [o["data"] for c in cells for o in _outputs(c) if o["output_type"] == "execute_result"
                 and "parameters" in o["data"].get("text/plain", "") and "text/html" in o["data"]]
    assert summaries and summaries[0]["text/html"].startswith("<pre>"), name
    # training: one line per epoch; the progress bar is a widget, not a stream of redraws
    train = next(c for c in cells if "trainer.train()" in c.source)
    epochs = int(train.source.split("epochs=")[1].split(" if QUICK")[0])
    lines = [ln for ln in _stream_text(train, "stdout").splitlines() if ln.startswith("epoch ")]
    assert len(lines) == epochs, _stream_text(train)
    assert "test accuracy" in "".join(_stream_text(c) for c in cells)
    if importlib.util.find_spec("ipywidgets") is not None:
        bars = [o for o in _outputs(train) if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
        assert len(bars) == epochs
        assert "img/s" not in _stream_text(train)
    else:  # tqdm's text fallback redraws in place: at most one bar line per epoch once carriage returns apply
        shown = [seg.rsplit("\r", 1)[-1] for seg in _stream_text(train, "stderr").split("\n")]
        assert sum("img/s" in s for s in shown) <= epochs
