"""A bounded load test of ``xpconv serve``: N ``POST /api/predict`` of one 28x28 image
from K concurrent clients against a real server on 127.0.0.1.

    python -m benchmarks.serve_load                       # 2,000 requests, 8 clients, SimpleConvNet 28x28
    python -m benchmarks.serve_load --checkpoint runs/x/best.safetensors --requests 500 --clients 4

The server is ``xpconv serve`` in its own process (uvicorn, one worker), started here and
stopped at the end.  Without ``--checkpoint`` it serves a freshly initialised SimpleConvNet
for (1, 28, 28) MNIST-shaped inputs (the time of a forward pass does not depend on the
weights).  The clients are asyncio tasks sharing one keep-alive ``httpx.AsyncClient``.
Prints, and writes as JSON (``--json``): requests, errors, wall time, throughput, client
latency p50/p90/p99/max, the server's own predict time (the ``ms`` of each answer) p50/p99,
and the machine's load average before and after (the machine may be shared).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_checkpoint(folder: Path) -> Path:
    from xpconv.checkpoint import save_checkpoint
    from xpconv.models import SimpleConvNet

    model = SimpleConvNet(input_dim=(1, 28, 28))
    return save_checkpoint(folder / "simpleconvnet-28x28.safetensors", model,
                           extra={"config": {"input_dim": [1, 28, 28], "dataset": "mnist", "class_names": [str(k) for k in range(10)]}})


def _image() -> bytes:
    x = np.zeros((28, 28), dtype=np.float32)
    x[4:24, 13:16] = 1.0  # a "1"
    b = io.BytesIO()
    np.save(b, x)
    return b.getvalue()


def _pct(values, q) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


async def _load(url: str, body: bytes, requests: int, clients: int) -> tuple[list[float], list[float], list[str], float]:
    import httpx

    latencies: list[float] = []
    server_ms: list[float] = []
    errors: list[str] = []
    todo = iter(range(requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def worker():
            for _ in todo:
                t0 = time.perf_counter()
                try:
                    r = await client.post(url, content=body, headers={"content-type": "application/x-npy"})
                    dt = time.perf_counter() - t0
                    if r.status_code != 200:
                        errors.append(f"HTTP {r.status_code}: {r.text[:100]}")
                        continue
                    answer = r.json()
                    latencies.append(dt * 1000)
                    server_ms.append(float(answer["ms"]))
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")

        # warm the connections (and the server's first request) outside the timed part
        await asyncio.gather(*(client.post(url, content=body, headers={"content-type": "application/x-npy"}) for _ in range(clients)))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return latencies, server_ms, errors, wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint to serve (default: an initialised SimpleConvNet for 1x28x28)")
    p.add_argument("--requests", type=int, default=2000, help="POST /api/predict requests in all (default: 2000)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the result as JSON")
    args = p.parse_args(argv)
    if not (0 < args.requests <= 100_000 and 0 < args.clients <= 256):
        p.error("expected 1..100000 requests and 1..256 clients")

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else _default_checkpoint(Path(tmp))
        port = _free_port()
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        load_before = os.getloadavg()
        server = subprocess.Popen([sys.executable, "-m", "xpconv", "serve", str(ckpt), "--runs", tmp, "--port", str(port)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            line = server.stdout.readline() if server.stdout else ""
            if not line.startswith("xpconv serve: http://127.0.0.1"):
                server.kill()
                print(f"the server did not start: {line}{server.stderr.read() if server.stderr else ''}", file=sys.stderr)
                return 1
            url = f"http://127.0.0.1:{port}/api/predict"
            import httpx

            deadline = time.monotonic() + 30
            while True:
                try:
                    httpx.get(f"http://127.0.0.1:{port}/api/model", timeout=5)
                    break
                except httpx.ConnectError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise
                    time.sleep(0.1)
            lat, srv, errors, wall = asyncio.run(_load(url, _image(), args.requests, args.clients))
        finally:
            server.terminate()
            server.wait(timeout=20)
        load_after = os.getloadavg()

    result = {
        "requests": args.requests, "clients": args.clients, "ok": len(lat), "errors": len(errors), "first_errors": errors[:5],
        "wall_s": round(wall, 3), "requests_per_s": round(len(lat) / wall, 1),
        "latency_ms": {"p50": round(_pct(lat, 50), 2), "p90": round(_pct(lat, 90), 2), "p99": round(_pct(lat, 99), 2),
                       "max": round(max(lat) if lat else float("nan"), 2)},
        "server_predict_ms": {"p50": round(_pct(srv, 50), 3), "p99": round(_pct(srv, 99), 3)},
        "cpu_count": os.cpu_count(), "loadavg_before": [round(v, 2) for v in load_before], "loadavg_after": [round(v, 2) for v in load_after],
        "checkpoint": str(args.checkpoint or "initialised SimpleConvNet (1, 28, 28)"),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
