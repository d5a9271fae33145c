"""``xpconv serve``'s pages in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) driven by Selenium.  Digits are drawn stroke by stroke with pointer
events (a mouse and a finger) on the canvas, and the predicted class is read from the
page; ``/runs`` is open while ``xpconv train`` runs, and its curves gain points.

Without Chromium these tests skip, except under CI (``CI=true``), where that is a failure
(``.ci/run`` installs it)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.actions import interaction
from selenium.webdriver.common.actions.action_builder import ActionBuilder
from selenium.webdriver.common.actions.pointer_input import PointerInput
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from xpconv import cli
from xpconv.backend import to_numpy
from xpconv.datasets import load_digits
from xpconv.serve.app import Loaded, create_app, warm_up

from .conftest import shared_dataset

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("XPCONV_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("XPCONV_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--window-size=1100,1000")
PAD = 280  # the canvas's CSS size

# Digits as strokes on the 280x280 pad: lists of (x, y) points, one list per stroke
ONE = [[(150, 50 + 10 * i) for i in range(19)]]
ZERO = [[(140 + 60 * math.sin(a * math.pi / 10), 140 - 85 * math.cos(a * math.pi / 10)) for a in range(21)]]
FOUR = [[(170, 50), (140, 110), (110, 160), (90, 180), (200, 180)], [(170, 100), (170, 240)]]
SEVEN = [[(80 + 10 * i, 60) for i in range(13)], [(200 - 6 * i, 60 + 11 * i) for i in range(19)]]


@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (os.path.isfile(p) and os.access(p, os.X_OK))]
    if missing:
        msg = f"{', '.join(missing)} missing: apt-get install chromium chromium-driver"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """The app under uvicorn on 127.0.0.1 in a thread."""

    def __init__(self, loaded, runs):
        app = create_app(loaded, runs)
        warm_up(app)
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def _train(out: Path, *args) -> Loaded:
    assert cli.main(["train", "--out", str(out), "--no-plots", "--quiet", *map(str, args)]) == 0
    ckpt, cfg, input_dim = cli._load_for_inference(str(out / "best.safetensors"), "cpu")
    return Loaded(str(out / "best.safetensors"), ckpt.model, tuple(input_dim), cfg.get("class_names"), cfg.get("dataset"))


def _stroke(driver, pad, points, kind):
    """One stroke: pointer down at the first point, a move to each next one, up."""
    builder = ActionBuilder(driver, mouse=PointerInput(kind, kind), duration=10)
    act = builder.pointer_action
    x, y = points[0]
    act.move_to(pad, int(x - PAD / 2), int(y - PAD / 2))  # offsets from the element's centre
    act.pointer_down()
    for x, y in points[1:]:
        act.move_to(pad, int(x - PAD / 2), int(y - PAD / 2))
    act.pointer_up()
    builder.perform()


def _draw(driver, strokes, kind) -> tuple[int, str]:
    """Clear the pad, draw ``strokes`` and wait for the answer to the last one: (class, its text)."""
    driver.find_element(By.ID, "clear").click()
    pad = driver.find_element(By.ID, "pad")
    for points in strokes:
        _stroke(driver, pad, points, kind)
    out = driver.find_element(By.ID, "predicted")
    WebDriverWait(driver, 20).until(lambda d: out.get_attribute("data-strokes") == str(len(strokes)))
    return int(out.get_attribute("data-class")), out.text


# the model's input as the page sent it: (bounding box height, width, centre of mass row, column)
INPUT_GEOMETRY = """
const c = document.getElementById('input'), W = c.width, H = c.height;
const d = c.getContext('2d').getImageData(0, 0, W, H).data;
let x0 = W, x1 = -1, y0 = H, y1 = -1, m = 0, mx = 0, my = 0;
for (let y = 0; y < H; y++) for (let x = 0; x < W; x++) {
  const v = d[(y * W + x) * 4] / 255;
  if (v > 0) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
  m += v; mx += v * (x + 0.5); my += v * (y + 0.5);
}
return [y1 - y0 + 1, x1 - x0 + 1, my / m, mx / m];
"""


def _open_drawing_page(driver, url):
    driver.get(url + "/")
    WebDriverWait(driver, 20).until(lambda d: d.execute_script("return document.body.dataset.ready") == "1")
    assert driver.execute_script("return document.getElementById('bars').querySelectorAll('rect').length") == 10


@pytest.mark.slow
def test_draw_digits_with_mouse_and_finger_on_the_digits_model(browser, tmp_path):
    """The bundled 8x8 digits' model: the strokes are scaled to fill the 8x8 box."""
    loaded = _train(tmp_path / "runs" / "digits", "--epochs", 8)
    with _Server(loaded, tmp_path / "runs") as url:
        _open_drawing_page(browser, url)
        for expected, strokes in ((1, ONE), (0, ZERO), (4, FOUR)):
            for kind in (interaction.POINTER_MOUSE, interaction.POINTER_TOUCH):
                got, text = _draw(browser, strokes, kind)
                assert (got, text) == (expected, str(expected)), (kind, expected)
        # the model's view: an 8x8 picture; the first layer's 30 maps are drawn
        assert browser.execute_script("const c = document.getElementById('input'); return [c.width, c.height]") == [8, 8]
        h, w, _, _ = browser.execute_script(INPUT_GEOMETRY)  # the 4: its box fills the 8x8 image, as the UCI digits do
        assert h == 8 and w >= 5
        assert len(browser.find_elements(By.CSS_SELECTOR, "#maps canvas")) == loaded.model.layers[0].W.shape[0]
        assert "probability" in browser.find_element(By.ID, "confidence").text
        # a file picked in the drop zone goes to /api/predict as it is (here a test image as PNG)
        x, _ = load_digits()[1]
        png = tmp_path / "digit.png"
        Image.fromarray(np.round(x[5, 0] * 255).astype(np.uint8)).save(png)
        expected = int(np.argmax(to_numpy(loaded.model.predict(x[5:6]))))
        browser.find_element(By.ID, "file").send_keys(str(png))
        WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "status").text.startswith("digit.png: read as"))
        assert browser.find_element(By.ID, "predicted").get_attribute("data-class") == str(expected)
        _draw(browser, FOUR, interaction.POINTER_MOUSE)
        bars = browser.execute_script(
            "return [...document.querySelectorAll('#bars rect')].map(r => [Number(r.dataset.p), r.classList.contains('top')])")
        assert abs(sum(p for p, _ in bars) - 1) < 1e-4 and [k for k, (_, top) in enumerate(bars) if top] == [4]


@pytest.mark.slow
def test_draw_digits_on_an_mnist_model(browser, tmp_path):
    """SimpleConvNet after one epoch on 8,000 real MNIST digits: the strokes are scaled to
    a 20x20 box and centred by their centre of mass in 28x28, as MNIST's digits were."""
    data = shared_dataset("mnist")
    loaded = _train(tmp_path / "runs" / "mnist", "--dataset", "mnist", "--data-dir", data, "--no-download", "--epochs", 1, "--lr", 0.003)
    with _Server(loaded, tmp_path / "runs") as url:
        _open_drawing_page(browser, url)
        for expected, strokes in ((1, ONE), (0, ZERO), (7, SEVEN)):
            got, _ = _draw(browser, strokes, interaction.POINTER_MOUSE)
            assert got == expected
            # MNIST's geometry: the longer side of the box is 20 pixels, the centre of mass at (14, 14)
            h, w, cy, cx = browser.execute_script(INPUT_GEOMETRY)
            assert max(h, w) in (20, 21) and abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5, (expected, h, w, cy, cx)
        assert browser.execute_script("const c = document.getElementById('input'); return [c.width, c.height]") == [28, 28]


@pytest.mark.slow
def test_runs_page_curves_gain_points_while_training(browser, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    epochs = 40  # an epoch of the digits takes well under the page's 200 ms poll on a fast core: enough of them to see it grow
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    with _Server(None, runs) as url:
        browser.get(url + "/runs?poll=200")
        WebDriverWait(browser, 20).until(lambda d: "no runs in" in d.find_element(By.ID, "status").text)
        proc = subprocess.Popen([sys.executable, "-m", "xpconv", "train", "--epochs", str(epochs), "--out", str(runs / "live"),
                                 "--no-plots", "--quiet"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        seen = []  # (points on the accuracy chart, whether the run was still training)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                points = browser.execute_script(
                    "const s = document.querySelector('[data-run=\"live\"] svg.acc'); return s ? Number(s.dataset.points || 0) : -1")
                running = proc.poll() is None
                seen.append((points, running))
                if not running and points == epochs:
                    break
                time.sleep(0.1)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err
        during = sorted({p for p, running in seen if running and p > 0})
        assert len(during) >= 2, f"the page showed {during} epochs while training ran"  # it grew while training ran
        assert seen[-1][0] == epochs
        lines = [json.loads(line) for line in (runs / "live" / "metrics.jsonl").read_text().splitlines()]
        # read in one script: the page redraws the run's card at every poll, so an element found
        # by one WebDriver call can be replaced before the next call reads it
        page = browser.execute_script(
            "const run = document.querySelector('[data-run=\"live\"]');"
            "const pts = (sel) => { const e = run.querySelector(sel); return e ? e.getAttribute('points') : null; };"
            "return {loss: pts(\"svg.loss polyline[data-key='train_loss']\"), acc: pts(\"svg.acc polyline[data-key='test_acc']\"),"
            " lr: pts('svg.lr polyline'), text: run.querySelector('p').innerText};")
        for key in ("loss", "acc"):
            assert len(page[key].split()) == len(lines) == epochs, (key, page[key])
        assert len(page["lr"].split()) == epochs
        assert f"{epochs} of {epochs} epochs" in page["text"]

