"""``xpconv serve``'s app through Starlette's TestClient: /api/predict answers what the
model computes for what ``xpconv predict`` reads (raw body by Content-Type, multipart
field), hostile uploads are one-line 4xx answers, bodies over the cap are refused
without being read whole, run names cannot leave --runs, the server writes nothing;
and the command itself (its one-line message without the extra, its warning for another
host, a real server on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx  # the test extra installs xpconv[serve] and httpx: no skip when they are missing
import numpy as np
import pytest
from PIL import Image

with warnings.catch_warnings():  # Starlette >= 1.x prefers httpx2 for its TestClient; httpx works
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from xpconv import cli
from xpconv.backend import to_numpy
from xpconv.datasets import load_digits
from xpconv.images import read_image
from xpconv.ops import softmax
from xpconv.serve.app import MAX_UPLOAD, Loaded, create_app

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XPCONV_DATA_DIR", None)
    return env


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A 2-epoch SimpleConvNet on the bundled digits (``xpconv train`` in this process),
    its run folder inside a runs folder, and a TestClient on the app serving it."""
    base = tmp_path_factory.mktemp("serve")
    runs = base / "runs"
    out = runs / "digits2"
    assert cli.main(["train", "--epochs", "2", "--out", str(out), "--no-plots", "--quiet"]) == 0
    ckpt_path = out / "last.safetensors"
    ckpt, cfg, input_dim = cli._load_for_inference(str(ckpt_path), "cpu")
    loaded = Loaded(str(ckpt_path), ckpt.model, tuple(input_dim), cfg.get("class_names"), cfg.get("dataset"))
    client = TestClient(create_app(loaded, runs))
    return client, loaded, runs, out


@pytest.fixture(scope="module")
def digits():
    return load_digits()[1]


def _npy(a) -> bytes:
    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


def _png(a, fmt="PNG") -> bytes:
    b = io.BytesIO()
    Image.fromarray(a).save(b, fmt)
    return b.getvalue()


def _softmax(loaded, x):
    return to_numpy(softmax(loaded.model.predict(x)))


def _post(client, body, ctype, query=""):
    return client.post(f"/api/predict{query}", content=body, headers={"content-type": ctype})


# ----------------------------------------------------------------------------- predict


def test_predict_npy_is_the_models_softmax(served, digits):
    client, loaded, _, _ = served
    x, t = digits
    for i in range(5):
        r = _post(client, _npy(x[i, 0]), "application/x-npy")
        assert r.status_code == 200, r.text
        got = r.json()
        p = _softmax(loaded, x[i : i + 1])[0]
        np.testing.assert_allclose(got["probabilities"], p, rtol=1e-5, atol=1e-7)
        assert got["class"] == int(np.argmax(p))
        assert got["name"] == loaded.class_names[got["class"]]
    # a model trained 2 epochs gets most of these right: the answers follow the images
    answers = [_post(client, _npy(x[i, 0]), "application/x-npy").json()["class"] for i in range(40)]
    assert np.mean(np.array(answers) == t[:40]) >= 0.7, answers
    assert len(set(answers)) >= 5


def test_png_jpeg_and_multipart_read_like_xpconv_predict(served, digits, tmp_path):
    """The same bytes give the same answer by Content-Type, as a multipart field, and
    through read_image on a file (what ``xpconv predict`` runs)."""
    client, loaded, _, _ = served
    x, _ = digits
    img = np.round(x[3, 0] * 255).astype(np.uint8)
    scan = np.asarray(Image.fromarray(255 - img).resize((64, 64), Image.NEAREST))  # dark ink on white, larger
    notes_of = {}
    for data, ctype, name in ((_png(img), "image/png", "d.png"), (_png(scan), "image/png", "scan.png"),
                              (_png(scan, "JPEG"), "image/jpeg", "scan.jpg"), (_npy(x[3]), "application/x-npy", "d.npy")):
        (tmp_path / name).write_bytes(data)
        items, notes = read_image(tmp_path / name, loaded.input_dim)
        expected = _softmax(loaded, items[0][1][None])[0]
        by_type = _post(client, data, ctype)
        by_form = client.post("/api/predict", files={"image": (name, data, "application/octet-stream")})
        by_form_type = client.post("/api/predict", files={"image": ("upload", data, ctype)})
        for r in (by_type, by_form, by_form_type):
            assert r.status_code == 200, (name, r.text)
            np.testing.assert_allclose(r.json()["probabilities"], expected, rtol=1e-5, atol=1e-7)
            assert r.json().get("notes", []) == notes
        notes_of[name] = notes
    assert notes_of["scan.png"] == ["resized 64x64 -> 8x8", "inverted (light background)"] and notes_of["d.png"] == []


def test_feature_maps_are_the_first_conv_layers_output(served, digits):
    client, loaded, _, _ = served
    x, _ = digits
    r = _post(client, _npy(x[0]), "application/x-npy", "?features=1")
    f = r.json()["features"]
    conv, relu = loaded.model.layers[0], loaded.model.layers[1]
    expected = to_numpy(relu.forward(conv.forward(x[:1], False), False))[0]
    assert f["shape"] == list(expected.shape) and f["layer"] == "Conv1 + ReLU"
    maps = np.frombuffer(base64.b64decode(f["data"]), dtype=np.uint8).reshape(f["shape"]).astype(np.float64)
    np.testing.assert_allclose(f["peak"], expected.reshape(len(expected), -1).max(axis=1), rtol=1e-5, atol=1e-7)
    for k in range(len(expected)):
        if expected[k].max() > 0:
            np.testing.assert_allclose(maps[k] / 255, expected[k] / expected[k].max(), atol=0.5 / 255 + 1e-6)
        else:
            assert not maps[k].any()
    assert "features" not in _post(client, _npy(x[0]), "application/x-npy").json()


# ----------------------------------------------------------------------------- hostile uploads


def _bomb_png() -> bytes:
    """A small PNG whose header declares 5000x5000 pixels (over images.MAX_PIXELS)."""
    return _png(np.zeros((5000, 5000), dtype=np.uint8))


def _npy_object() -> bytes:
    b = io.BytesIO()
    np.save(b, np.array([None, 1], dtype=object), allow_pickle=True)
    return b.getvalue()


@pytest.mark.parametrize("body, ctype, status, reason", [
    (b"not an image at all", "image/png", 400, "not an image xpconv reads"),
    (_png(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))[:2000], "image/png", 400, "the image data ends early"),
    (None, "image/png", 400, "decompression bomb|expected at most 16,000,000 pixels"),
    (_npy(np.zeros((8, 8), np.float32))[:-10], "application/x-npy", 400, "the header promises"),
    (None, "application/x-npy", 400, "expected integers or floats"),
    (b"PK\x03\x04zipzipzip", "application/x-npy", 400, "zip archive"),
    (_npy(np.zeros((5, 5), np.float32)), "application/x-npy", 400, r"shape \(1, 1, 5, 5\); this model takes \(1, 8, 8\)"),
    (_npy(np.full((8, 8), np.nan, np.float32)), "application/x-npy", 400, "expected finite values"),
    (_npy(np.zeros((3, 1, 8, 8), np.float32)), "application/x-npy", 400, "expected one image, got an array of 3 images"),
    (b"", "image/png", 400, "empty body"),
    (b"GIF89a", "image/gif", 415, "expected an image as image/png, image/jpeg or application/x-npy"),
    (b"x", "", 415, "got no Content-Type"),
], ids=["garbage", "truncated-png", "pixel-bomb", "truncated-npy", "pickled-npy", "npz", "wrong-shape", "nan", "several", "empty",
        "gif", "no-content-type"])
def test_hostile_uploads_are_one_line_4xx(served, body, ctype, status, reason):
    client = served[0]
    if body is None:
        body = _bomb_png() if ctype == "image/png" else _npy_object()
    r = _post(client, body, ctype)
    assert r.status_code == status, r.text
    message = r.json()["error"]
    assert re.search(reason, message), message
    assert "\n" not in message and "xpconv-serve-" not in message  # one line; the temporary path is not shown
    assert client.get("/api/model").status_code == 200  # still serving


def test_malformed_multipart_is_400(served):
    client = served[0]
    r = client.post("/api/predict", files={"other": ("x.png", b"abc", "image/png")})
    assert r.status_code == 400 and "expected a multipart file field 'image'" in r.json()["error"]
    r = client.post("/api/predict", content=b"--xyz\r\nbroken", headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 400, r.text
    r = client.post("/api/predict", files={"image": ("x.gif", b"GIF89a", "image/gif")})
    assert r.status_code == 415


def test_uploads_over_the_cap_are_413_without_being_read_whole(served):
    client = served[0]
    r = _post(client, b"\0" * (MAX_UPLOAD + 1), "image/png")
    assert r.status_code == 413 and f"expected at most {MAX_UPLOAD:,} bytes" in r.json()["error"]
    r = client.post("/api/predict", content=b"\0" * 100, headers={"content-type": "image/png", "content-length": str(MAX_UPLOAD + 1)})
    assert r.status_code == 413  # from the header alone
    assert _post(client, _npy(np.zeros((8, 8), np.float32)), "application/x-npy").status_code == 200

    # a chunked body (no Content-Length) of 100 MiB, offered 1 MiB at a time straight to the
    # ASGI app (the TestClient would gather it first): the app stops asking after the cap
    pulled, answer = [], []

    async def receive():
        pulled.append(1)
        return {"type": "http.request", "body": b"\0" * (1 << 20), "more_body": len(pulled) < 100}

    async def send(message):
        answer.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/predict", "raw_path": b"/api/predict", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"image/png"), (b"transfer-encoding", b"chunked")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(client.app(scope, receive, send))
    assert answer[0]["status"] == 413
    assert len(pulled) <= MAX_UPLOAD // (1 << 20) + 1, f"the app read {len(pulled)} MiB"


# ----------------------------------------------------------------------------- runs


def test_runs_and_their_metrics(served):
    client, _, runs, out = served
    doc = client.get("/api/runs").json()
    assert [r["name"] for r in doc["runs"]] == ["digits2"] and doc["runs"][0]["writing"] is False
    m = client.get("/api/runs/digits2/metrics").json()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert m["records"] == lines and [r["epoch"] for r in lines] == [1, 2]
    assert m["config"]["dataset"] == "digits" and m["config"]["lr"] > 0


def test_a_line_still_being_written_is_left_for_the_next_poll(served, tmp_path):
    _, loaded, _, out = served
    runs = tmp_path / "runs"
    (runs / "live").mkdir(parents=True)
    first = (out / "metrics.jsonl").read_text().splitlines()[0]
    (runs / "live" / "metrics.jsonl").write_text(first + "\n" + first[:20])
    client = TestClient(create_app(loaded, runs))
    assert [r["epoch"] for r in client.get("/api/runs/live/metrics").json()["records"]] == [1]


def test_run_names_cannot_leave_the_runs_folder(served, tmp_path):
    _, loaded, _, out = served
    runs = tmp_path / "runs"
    runs.mkdir()
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "metrics.jsonl").write_text('{"epoch": 1, "secret": true}\n')
    (runs / "link").symlink_to(outside, target_is_directory=True)
    (runs / "fifo").mkdir()
    os.mkfifo(runs / "fifo" / "metrics.jsonl")  # never opened: reading it would block
    client = TestClient(create_app(loaded, runs))
    assert client.get("/api/runs").json()["runs"] == []
    for name in ("link", "..", "%2e%2e", "..%2fsecret", "%2fetc", ".hidden", "a%00b", "fifo%2f.."):
        r = client.get(f"/api/runs/{name}/metrics")
        assert r.status_code == 404, (name, r.text)
        assert "secret" not in r.text.replace(str(tmp_path), "")
    r = client.get("/api/runs/fifo/metrics")
    assert r.status_code == 200 and r.json()["records"] == []


def test_the_server_writes_nothing(served, digits):
    client, _, runs, _ = served
    x, _ = digits

    def snapshot():
        return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(runs.rglob("*"))}

    shm = Path("/dev/shm")
    before, tmp_before = snapshot(), {p.name for p in shm.glob("xpconv-serve-*")} if shm.is_dir() else set()
    for body, ctype in ((_npy(x[0]), "application/x-npy"), (b"junk", "image/png"), (_png(np.zeros((8, 8), np.uint8)), "image/png")):
        _post(client, body, ctype, "?features=1")
    client.get("/api/runs")
    client.get("/api/runs/digits2/metrics")
    assert snapshot() == before
    if shm.is_dir():
        assert {p.name for p in shm.glob("xpconv-serve-*")} == tmp_before  # each upload's temporary copy is gone


def test_without_a_checkpoint_only_runs_work(served):
    runs = served[2]
    client = TestClient(create_app(None, runs))
    assert client.get("/api/model").json() == {"model": None}
    r = _post(client, _npy(np.zeros((8, 8), np.float32)), "application/x-npy")
    assert r.status_code == 503 and "xpconv serve CKPT" in r.json()["error"]
    assert [r["name"] for r in client.get("/api/runs").json()["runs"]] == ["digits2"]


def test_pages_load_nothing_from_other_sites(served):
    client = served[0]
    for path in ("/", "/runs"):
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in r.headers["content-security-policy"]
        assert not re.search(r"(src|href)=\"(https?:)?//", r.text), path
        for asset in re.findall(r"(?:src|href)=\"(/static/[^\"]+)\"", r.text):
            assert client.get(asset).status_code == 200, asset
    assert "<canvas id=\"pad\"" in client.get("/").text
    assert client.get("/static/../app.py").status_code == 404
    assert client.get("/static/app.py").status_code == 404


# ----------------------------------------------------------------------------- the command


def test_without_the_extra_one_line_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now raises ImportError
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err == "xpconv: error: 'xpconv serve' needs uvicorn: pip install 'xpconv[serve]'\n"


def test_another_host_only_when_asked_with_a_warning(served, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr("xpconv.serve.app.run", lambda app, host, port: calls.append((host, port)))
    ckpt = served[3] / "last.safetensors"
    assert cli.main(["serve", str(ckpt), "--runs", str(served[2])]) == 0
    out, err = capsys.readouterr()
    assert calls[-1] == ("127.0.0.1", 8000) and "warning" not in err
    assert out.startswith("xpconv serve: http://127.0.0.1:8000/ ")
    assert cli.main(["serve", str(ckpt), "--host", "0.0.0.0", "--port", "8123"]) == 0
    out, err = capsys.readouterr()
    assert calls[-1] == ("0.0.0.0", 8123)
    assert err.startswith("xpconv: warning: listening on 0.0.0.0: anyone who can reach it there can use the model")
    assert cli.main(["serve", str(served[3] / "nothing.safetensors")]) == 2
    assert "nothing.safetensors" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_command_serves_on_127_0_0_1(served, digits):
    """``xpconv serve CKPT`` as a user runs it: the URL it prints answers /api/predict."""
    _, loaded, runs, out = served
    x, _ = digits
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "xpconv", "serve", str(out / "last.safetensors"), "--runs", str(runs), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=str(runs))
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"xpconv serve: http://127.0.0.1:{port}/"), (line, proc.stderr.read() if proc.poll() is not None else "")
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/api/predict", content=_npy(x[1]), headers={"content-type": "application/x-npy"}, timeout=5)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
                time.sleep(0.1)
        assert r.status_code == 200
        np.testing.assert_allclose(r.json()["probabilities"], _softmax(loaded, x[1:2])[0], rtol=1e-5, atol=1e-7)
        listening = [c for c in _listening(port)]
        assert listening == ["127.0.0.1"], listening
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _listening(port: int) -> list[str]:
    """The local addresses listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            addr, state = cols[1], cols[3]
            host, p = addr.rsplit(":", 1)
            if state == "0A" and int(p, 16) == port:  # 0A: LISTEN
                found.append(".".join(str(int(host[i : i + 2], 16)) for i in (6, 4, 2, 0)) if len(host) == 8 else host)
    return found
