"""The Starlette app of ``xpconv serve``: two static pages and a small read-only JSON API.

Safety rules, each enforced here:

* a request body over :data:`MAX_UPLOAD` bytes is answered 413 as soon as its
  ``Content-Length`` (or the bytes read so far) pass the cap; it is never read whole;
* an upload is decoded only by :func:`xpconv.images.read_image`, the bounded reader of
  ``xpconv predict``; what it refuses is a 400 with its one-line reason;
* a run name is one plain path component, and the folder it names must resolve inside
  ``--runs`` (a symbolic link that leads out is refused); files are ``stat``-ed before
  they are opened, so a FIFO or device named ``metrics.jsonl`` is never read;
* the app writes no file of its own: the image reader takes a path, so an upload is
  held for the length of the request in a private temporary file (``0600`` in a ``0700``
  folder, on ``/dev/shm`` where there is one) that is removed before the answer goes out;
* the only model is the one given to :func:`create_app`; no request names a file to load.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .._io import stat_regular
from ..backend import asarray_in, to_numpy
from ..images import ImageError, read_image
from ..layers import Convolution, Relu
from ..ops import softmax
from ..training.callbacks import _clean  # JSON with NaN/inf as None, as metrics.json is written

__all__ = ["MAX_UPLOAD", "Loaded", "create_app", "run", "warm_up"]

#: the largest request body accepted (bytes); a larger one is answered 413 unread
MAX_UPLOAD = 8 * 1024 * 1024
#: the largest metrics.jsonl returned (bytes); a run's file is far smaller
MAX_METRICS = 32 * 1024 * 1024
#: the most runs listed
MAX_RUNS = 1000
#: a run name: one path component of plain characters
RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=@-]{0,199}")

#: Content-Type -> the file suffix the image reader decides by
SUFFIXES = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/jpg": ".jpg",
    "application/x-npy": ".npy",
    "application/npy": ".npy",
}
STATIC = resources.files(__package__) / "static"
PAGES = {"/": "index.html", "/runs": "runs.html"}
ASSETS = {"draw.js": "text/javascript", "runs.js": "text/javascript", "style.css": "text/css"}
# read_image swaps Pillow's process-wide pixel limit while it opens a file: one at a time
_READ_LOCK = threading.Lock()
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'"


@dataclass
class Loaded:
    """The one model the server answers with (what ``xpconv predict`` loads)."""

    label: str
    model: Any
    input_dim: tuple[int, int, int]
    class_names: list[str] | None = None
    dataset: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def preprocess(self) -> dict[str, Any]:
        """How the page turns strokes into an input like the training data's.

        MNIST and Fashion-MNIST (and any other 28x28 grey images): the strokes' bounding
        box scaled to fit 20x20 (aspect kept), placed so that the centre of mass is the
        image's centre; the UCI 8x8 digits were drawn to fill their box, so there the
        box fills the whole image and is centred."""
        if self.dataset == "digits":
            return {"fit": 1.0, "center": "box"}
        return {"fit": 20 / 28, "center": "mass"}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, cap: int) -> bytes:
    """The request body, or :class:`_TooLarge` as soon as it passes ``cap`` bytes."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise HTTPException(400, f"expected a Content-Length of digits, got {length[:40]!r}")
        if int(length) > cap:
            raise _TooLarge(int(length))
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > cap:
            raise _TooLarge(len(buf))
    return bytes(buf)


def _content_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def _suffix_of(content_type: str, filename: str | None) -> str:
    """The suffix the image reader decides by: the Content-Type's, else a file name's."""
    if content_type in SUFFIXES:
        return SUFFIXES[content_type]
    ext = Path(filename or "").suffix.lower()
    if ext in (".png", ".jpg", ".jpeg", ".npy"):
        return ext
    got = content_type or "no Content-Type"
    raise HTTPException(415, f"expected an image as image/png, image/jpeg or application/x-npy (or a multipart field 'image'), got {got[:80]}")


async def _upload(request: Request) -> tuple[bytes, str]:
    """(bytes, suffix) of the uploaded image: the body itself or the multipart field ``image``."""
    body = await _read_body(request, MAX_UPLOAD)
    ctype = _content_type(request.headers.get("content-type"))
    if ctype != "multipart/form-data":
        if not body:
            raise HTTPException(400, "expected an image in the request body, got an empty body")
        return body, _suffix_of(ctype, None)

    async def stream():
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=1, max_fields=8, max_part_size=64 * 1024).parse()
    except MultiPartException as exc:
        raise HTTPException(400, f"a malformed multipart body ({str(exc)[:120]})") from None
    try:
        part = form.get("image")
        if part is None or isinstance(part, str):
            raise HTTPException(400, f"expected a multipart file field 'image', got fields {sorted(form.keys())[:8]}")
        data = await part.read()
        return data, _suffix_of(_content_type(part.content_type), part.filename)
    finally:
        await form.close()


class Server:
    """The state behind the routes: the model (or None) and the runs folder."""

    def __init__(self, loaded: Loaded | None, runs_dir: str | os.PathLike[str]):
        self.loaded = loaded
        self.runs_dir = Path(runs_dir)
        shm = Path("/dev/shm")
        self.tmp_root = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
        self._first_conv = self._find_first_conv(loaded.model) if loaded is not None else None

    # ------------------------------------------------------------------ predict

    @staticmethod
    def _find_first_conv(model) -> tuple[int, bool] | None:
        """(index of the first Convolution in model.layers, whether a ReLU follows it)."""
        layers = list(getattr(model, "layers", []))
        for i, layer in enumerate(layers):
            if isinstance(layer, Convolution):
                return i, i + 1 < len(layers) and isinstance(layers[i + 1], Relu)
        return None

    def _read(self, data: bytes, suffix: str) -> tuple[np.ndarray, list[str]]:
        """One image (C, H, W) through :func:`xpconv.images.read_image` (which takes a path)."""
        assert self.loaded is not None
        folder = tempfile.mkdtemp(prefix="xpconv-serve-", dir=self.tmp_root)  # 0700
        try:
            path = Path(folder) / f"upload{suffix}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            with _READ_LOCK:
                items, notes = read_image(path, self.loaded.input_dim)
        except ImageError as exc:
            # the reader names the file: the temporary path means nothing to the client
            raise HTTPException(400, str(exc).replace(str(path), "upload")) from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if len(items) != 1:
            raise HTTPException(400, f"expected one image, got an array of {len(items)} images")
        return items[0][1], notes

    def _features(self, x) -> dict[str, Any] | None:
        """The first convolution layer's output for x (after its ReLU when one follows),
        each map scaled to 0..255 by its own maximum, as base64 bytes."""
        assert self.loaded is not None
        if self._first_conv is None:
            return None
        idx, relu = self._first_conv
        layers = self.loaded.model.layers
        out = x
        for layer in list(layers)[: idx + 1 + int(relu)]:
            out = layer.forward(out, False)
        maps = to_numpy(out)[0].astype(np.float64)  # (K, h, w)
        if not relu:
            maps = np.abs(maps)
        peak = maps.reshape(maps.shape[0], -1).max(axis=1)
        scaled = np.where(peak[:, None, None] > 0, maps / np.maximum(peak, 1e-30)[:, None, None], 0.0)
        q = np.clip(np.rint(scaled * 255), 0, 255).astype(np.uint8)
        names = list(layers.keys()) if hasattr(layers, "keys") else []
        name = names[idx] if idx < len(names) else f"layer {idx}"
        return {
            "layer": name + (" + ReLU" if relu else " (absolute values)"),
            "shape": list(q.shape),
            "peak": [float(v) for v in peak],
            "data": base64.b64encode(q.tobytes()).decode("ascii"),
        }

    def predict(self, data: bytes, suffix: str, features: bool) -> dict[str, Any]:
        assert self.loaded is not None
        image, notes = self._read(data, suffix)
        model = self.loaded.model
        t0 = time.perf_counter()
        with self.loaded.lock:  # layers keep their last input: one pass at a time
            x = asarray_in(image[None], model.xp, dtype=model.dtype, device=model.device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                p = to_numpy(softmax(model.predict(x)))[0].astype(np.float64)
            feats = self._features(x) if features else None
        if not np.isfinite(p).all():
            raise HTTPException(400, "the image's values gave non-finite scores (expected values in the training data's scale, 0..1)")
        k = int(np.argmax(p))
        answer: dict[str, Any] = {"class": k, "probabilities": [float(v) for v in p]}
        names = self.loaded.class_names
        if names and k < len(names):
            answer["name"] = names[k]
        if notes:
            answer["notes"] = notes
        if feats is not None:
            answer["features"] = feats
        answer["ms"] = round((time.perf_counter() - t0) * 1000, 3)
        return answer

    # ------------------------------------------------------------------ runs

    def _run_folder(self, name: str) -> Path:
        """The folder of run ``name``, which must lie inside the runs folder (else 404)."""
        if not RUN_NAME.fullmatch(name) or name in (".", ".."):
            raise HTTPException(404, f"no run named {name[:80]!r}: expected a folder name of letters, digits and ._+=@-")
        root = self.runs_dir.resolve()
        folder = (root / name).resolve()
        if folder.parent != root or not folder.is_dir():
            raise HTTPException(404, f"no run named {name!r} in {self.runs_dir}")
        return folder

    @staticmethod
    def _regular(path: Path) -> bool:
        try:
            stat_regular(path, "metrics file")
            return True
        except (OSError, ValueError):
            return False

    def runs(self) -> list[dict[str, Any]]:
        root = self.runs_dir
        if not root.is_dir():
            return []
        out: list[dict[str, Any]] = []
        resolved = root.resolve()
        for child in sorted(root.iterdir(), key=lambda p: p.name):
            if len(out) >= MAX_RUNS:
                break
            if not RUN_NAME.fullmatch(child.name):
                continue
            try:
                if child.resolve().parent != resolved or not child.is_dir():
                    continue
            except OSError:
                continue
            jsonl, summary = child / "metrics.jsonl", child / "metrics.json"
            has = [p for p in (jsonl, summary) if self._regular(p)]
            if not has:
                continue
            out.append({
                "name": child.name,
                "modified": max(p.stat().st_mtime for p in has),
                "writing": (child / ".xpconv-run.lock").exists(),
            })
        return out

    def metrics(self, name: str) -> dict[str, Any]:
        folder = self._run_folder(name)
        records: list[dict[str, Any]] = []
        jsonl = folder / "metrics.jsonl"
        if self._regular(jsonl):
            if jsonl.stat().st_size > MAX_METRICS:
                raise HTTPException(413, f"{name}/metrics.jsonl holds {jsonl.stat().st_size:,} bytes; expected at most {MAX_METRICS:,}")
            with open(jsonl, "rb") as f:
                text = f.read(MAX_METRICS + 1)
            # a line is appended whole in one write; a last line without its newline is still being written
            for line in text.split(b"\n")[:-1]:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    records.append(rec)
        config = None
        summary = folder / "metrics.json"
        if self._regular(summary) and summary.stat().st_size <= MAX_METRICS:
            try:
                doc = json.loads(summary.read_bytes())
                config = doc.get("config") if isinstance(doc, dict) else None
                if not records and isinstance(doc, dict) and isinstance(doc.get("epochs"), list):
                    records = [r for r in doc["epochs"] if isinstance(r, dict)]
            except ValueError:
                pass
        return {"name": name, "records": records, "config": config, "writing": (folder / ".xpconv-run.lock").exists()}


def create_app(loaded: Loaded | None, runs_dir: str | os.PathLike[str] = "runs") -> Starlette:
    """The app: ``loaded`` answers ``/api/predict`` (None: the drawing page says there is
    no model), ``runs_dir`` is the folder ``/runs`` shows."""
    server = Server(loaded, runs_dir)

    def static(name: str, media_type: str) -> Response:
        data = (STATIC / name).read_bytes()
        return Response(data, media_type=media_type, headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                                                              "Cache-Control": "no-cache"})

    async def page(request: Request) -> Response:
        return static(PAGES[request.url.path], "text/html; charset=utf-8")

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS:
            return _error(404, f"no file {name[:80]!r}")
        return static(name, ASSETS[name])

    async def model_info(request: Request) -> Response:
        if loaded is None:
            return JSONResponse({"model": None})
        return JSONResponse({
            "model": type(loaded.model).__name__,
            "checkpoint": loaded.label,
            "input_dim": list(loaded.input_dim),
            "class_names": loaded.class_names,
            "dataset": loaded.dataset,
            "preprocess": loaded.preprocess,
            "features": server._first_conv is not None,
        })

    async def predict(request: Request) -> Response:
        if loaded is None:
            return _error(503, "no checkpoint loaded: start the server as 'xpconv serve CKPT'")
        try:
            data, suffix = await _upload(request)
        except _TooLarge as exc:
            return _error(413, f"an upload of {exc.args[0]:,}+ bytes; expected at most {MAX_UPLOAD:,} bytes")
        features = request.query_params.get("features", "0") not in ("0", "", "false", "no")
        answer = await run_in_threadpool(server.predict, data, suffix, features)
        return JSONResponse(answer)

    async def runs(request: Request) -> Response:
        found = await run_in_threadpool(server.runs)
        return JSONResponse({"runs_dir": str(server.runs_dir), "runs": found})

    async def metrics(request: Request) -> Response:
        doc = await run_in_threadpool(server.metrics, request.path_params["name"])
        return JSONResponse(_clean(doc))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, str(exc.detail).splitlines()[0] if exc.detail else "error")

    async def internal_error(request: Request, exc: Exception) -> Response:
        return _error(500, f"internal error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}")

    routes = [
        Route("/", page),
        Route("/runs", page),
        Route("/static/{name}", asset),
        Route("/api/model", model_info),
        Route("/api/predict", predict, methods=["POST"]),
        Route("/api/runs", runs),
        Route("/api/runs/{name}/metrics", metrics),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: internal_error})
    app.state.server = server
    return app


def warm_up(app: Starlette) -> None:
    """One pass on a blank image before the first request: compiled kernels (Numba)
    are built now rather than during someone's first stroke."""
    server: Server = app.state.server
    if server.loaded is None:
        return
    m = server.loaded.model
    x = asarray_in(np.zeros((1, *server.loaded.input_dim), dtype=np.float32), m.xp, dtype=m.dtype, device=m.device)
    with server.loaded.lock:
        m.predict(x)
        server._features(x)


def run(app: Starlette, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "warning") -> None:
    """Serve ``app`` with uvicorn until Ctrl-C (call :func:`warm_up` first)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False,
                limit_concurrency=64, timeout_keep_alive=5, h11_max_incomplete_event_size=64 * 1024)
