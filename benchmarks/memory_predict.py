"""Peak memory (RSS of the whole process) of predicting MNIST images with SimpleConvNet:
xpconv's chunked ``predict`` against the book's all-at-once forward pass.

    python benchmarks/memory_predict.py                         # table + benchmarks/results/memory_predict.json
    python benchmarks/memory_predict.py --data-dir ~/mnist --book-sizes 500 1000 2000 4000
    python benchmarks/memory_predict.py --book-full             # also run the book's way on all 10,000 (needs ~7 GB)

Every measurement runs in a fresh subprocess that imports xpconv, reads the 10,000 MNIST test
images (t10k IDX file; random images of the same shape when the file is missing), builds the
book's SimpleConvNet (30 5x5 filters, hidden 100) and predicts; the process's peak RSS
(``VmHWM``) is read at the end, its RSS before predicting (``VmRSS``) too.

* chunked: ``network.predict(x)`` -- xpconv streams ``eval_batch_size`` (500) images at a
  time, so the peak does not grow with the number of images;
* whole: xpconv's layers on the whole batch at once (``eval_batch_size`` set to N);
* book: the book's algorithm on the whole batch at once (its im2col with a float64 6-D
  buffer and a transposed copy, float64 weights, every layer keeping its backward cache),
  re-implemented in :func:`book_predict` for this measurement. Its peak grows linearly
  with N, so by default it is measured at a few sizes and extrapolated to 10,000 with a
  least-squares line (``--book-full`` measures it, under an address-space cap of
  ``--cap-gb`` so a small machine is not pushed into swap).

The target of the issue: the chunked run on 10,000 images peaks under 300 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_MB = 300.0
N_TOTAL = 10_000


# --------------------------------------------------------------------------- child


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB -> MiB
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(mode: str, n: int, data_dir: str | None, chunk: int) -> dict:
    import numpy as np

    from xpconv.models import SimpleConvNet

    source = "synthetic"
    images = None
    if data_dir:
        path = Path(data_dir) / "t10k-images-idx3-ubyte.gz"
        if path.exists():
            from xpconv.datasets import read_idx

            images = read_idx(path)  # (10000, 28, 28) uint8
            source = str(path)
    if images is None:
        images = np.random.default_rng(0).integers(0, 256, (N_TOTAL, 28, 28), dtype=np.uint8)
    x = (images[:n].astype(np.float32) / 255.0).reshape(n, 1, 28, 28)  # the book's normalized NCHW input
    del images

    net = SimpleConvNet(input_dim=(1, 28, 28), conv_param={"filter_num": 30, "filter_size": 5, "pad": 0, "stride": 1},
                        hidden_size=100, output_size=10, weight_init_std=0.01, xp="numpy", seed=0)
    net.eval_batch_size = chunk if mode == "chunked" else n
    params = {k: np.asarray(v) for k, v in net.params.items()}
    before = _status_mb("VmRSS")
    t0 = time.perf_counter()
    if mode == "book":
        y, _cache = book_predict(params, x)
    else:
        y = net.predict(x)
    seconds = time.perf_counter() - t0
    labels = np.asarray(y).argmax(axis=1)
    return {
        "mode": mode,
        "n": n,
        "chunk": net.eval_batch_size,
        "rss_before_predict_mb": round(before, 1),
        "peak_rss_mb": round(_status_mb("VmHWM"), 1),
        "seconds": round(seconds, 3),
        "labels_checksum": int((labels * np.arange(1, n + 1)).sum() % 1_000_003),
        "data": source,
    }


# --------------------------------------------------------------------------- the book's way


def _book_im2col(img, fh, fw, stride, pad):
    """im2col the way the book writes it: a float64 (N, C, FH, FW, OH, OW) buffer filled
    by slices, then transposed and reshaped (a second full copy) to (N*OH*OW, C*FH*FW)."""
    import numpy as np

    N, C, H, W = img.shape
    oh, ow = (H + 2 * pad - fh) // stride + 1, (W + 2 * pad - fw) // stride + 1
    img = np.pad(img, [(0, 0), (0, 0), (pad, pad), (pad, pad)], "constant")
    col = np.zeros((N, C, fh, fw, oh, ow))  # the book gives no dtype: float64
    for y in range(fh):
        for x in range(fw):
            col[:, :, y, x, :, :] = img[:, :, y : y + stride * oh : stride, x : x + stride * ow : stride]
    return col.transpose(0, 4, 5, 1, 2, 3).reshape(N * oh * ow, -1)


def book_predict(params, x):
    """SimpleConvNet's predict as the book's layers run it on the whole batch: float64
    weights (the book draws them with np.random.randn), and every layer keeps what its
    backward pass would need (Convolution: x, col, col_W; Relu: mask; Pooling: x,
    arg_max; Affine: x) for as long as the network lives. Returns (scores, the kept arrays)."""
    import numpy as np

    W1, b1, W2, b2, W3, b3 = (params[k].astype(np.float64) for k in ("W1", "b1", "W2", "b2", "W3", "b3"))
    kept = []
    N = x.shape[0]
    # Convolution
    FN, C, FH, FW = W1.shape
    oh, ow = x.shape[2] - FH + 1, x.shape[3] - FW + 1
    col = _book_im2col(x, FH, FW, 1, 0)
    col_W = W1.reshape(FN, -1).T
    out = (np.dot(col, col_W) + b1).reshape(N, oh, ow, -1).transpose(0, 3, 1, 2)
    kept += [x, col, col_W]
    # Relu
    mask = out <= 0
    out = out.copy()
    out[mask] = 0
    kept.append(mask)
    # Pooling 2x2, stride 2
    pcol = _book_im2col(out, 2, 2, 2, 0).reshape(-1, 4)
    arg_max = np.argmax(pcol, axis=1)
    pooled = np.max(pcol, axis=1).reshape(N, oh // 2, ow // 2, FN).transpose(0, 3, 1, 2)
    kept += [out, arg_max]
    del pcol
    # Affine - Relu - Affine
    h = pooled.reshape(N, -1)
    a = np.dot(h, W2) + b2
    kept.append(h)
    m2 = a <= 0
    a = a.copy()
    a[m2] = 0
    kept += [m2, a]
    return np.dot(a, W3) + b3, kept


# --------------------------------------------------------------------------- parent


def measure(mode: str, n: int, data_dir, chunk: int, cap_gb: float | None) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(n), "--chunk", str(chunk)]
    if data_dir:
        cmd += ["--data-dir", str(data_dir)]
    preexec = None
    if cap_gb:
        import resource

        limit = int(cap_gb * 2**30)

        def preexec():
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=preexec, timeout=1800)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"mode": mode, "n": n, "error": f"exit {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fit_line(points):
    """Least-squares (slope, intercept) of peak MB against n."""
    n = len(points)
    sx = sum(p[0] for p in points)
    sy = sum(p[1] for p in points)
    sxx = sum(p[0] * p[0] for p in points)
    sxy = sum(p[0] * p[1] for p in points)
    slope = (n * sxy - sx * sy) / (n * sxx - sx * sx)
    return slope, (sy - slope * sx) / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("XPCONV_BENCH_MNIST", str(ROOT.parent / "shared" / "datasets" / "mnist")),
                   help="folder holding t10k-images-idx3-ubyte.gz (default: ../shared/datasets/mnist)")
    p.add_argument("--chunk", type=int, default=500, help="eval_batch_size of the chunked runs (default: 500)")
    p.add_argument("--chunked-sizes", type=int, nargs="+", default=[1000, 10_000], help="N for the chunked runs")
    p.add_argument("--whole-sizes", type=int, nargs="*", default=[1000, 10_000], help="N for xpconv's layers on the whole batch at once")
    p.add_argument("--book-sizes", type=int, nargs="+", default=[250, 500, 1000, 2000], help="N for the book's layers, all at once")
    p.add_argument("--book-full", action="store_true", help="also run the all-at-once predict on 10,000 images")
    p.add_argument("--cap-gb", type=float, default=12.0, help="address-space cap of the all-at-once runs (default: 12)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory_predict.json"), help="JSON result file")
    p.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.data_dir, args.chunk)))
        return 0

    runs = [measure("chunked", n, args.data_dir, args.chunk, None) for n in args.chunked_sizes]
    runs += [measure("whole", n, args.data_dir, args.chunk, args.cap_gb) for n in args.whole_sizes]
    book_sizes = list(args.book_sizes) + ([N_TOTAL] if args.book_full else [])
    runs += [measure("book", n, args.data_dir, args.chunk, args.cap_gb) for n in book_sizes]

    ok_book = [(r["n"], r["peak_rss_mb"]) for r in runs if r["mode"] == "book" and "error" not in r and r["n"] < N_TOTAL]
    measured_full = next((r for r in runs if r["mode"] == "book" and r["n"] == N_TOTAL), None)
    estimate = None
    if len(ok_book) >= 2:
        slope, intercept = fit_line(ok_book)
        estimate = {"n": N_TOTAL, "peak_rss_mb": round(slope * N_TOTAL + intercept, 0), "mb_per_image": round(slope, 4),
                    "intercept_mb": round(intercept, 1), "from_sizes": [n for n, _ in ok_book]}
    # the same predictions both ways (where both ran on the same N)
    by = {(r["mode"], r["n"]): r for r in runs if "error" not in r}
    same = {f"{other} n={n}": by[("chunked", n)]["labels_checksum"] == by[(other, n)]["labels_checksum"]
            for (mode, n) in by if mode == "chunked" for other in ("whole", "book") if (other, n) in by}

    print(f"Peak RSS of a process predicting MNIST with SimpleConvNet (NumPy, {platform.machine()}, "
          f"{os.cpu_count()} CPUs); data: {next((r['data'] for r in runs if 'data' in r), '?')}")
    print(f"{'predict':<28} {'images':>7} {'RSS before':>11} {'peak RSS':>10} {'seconds':>8}")
    for r in runs:
        what = {"chunked": f"xpconv predict, chunks of {args.chunk}", "whole": "xpconv layers, all at once",
                "book": "book's layers, all at once"}[r["mode"]]
        if "error" in r:
            print(f"{what:<28} {r['n']:>7,} {'':>11} {'failed':>10}   {r['error']}")
            continue
        print(f"{what:<28} {r['n']:>7,} {r['rss_before_predict_mb']:>8.0f} MB {r['peak_rss_mb']:>7.0f} MB {r['seconds']:>8.2f}")
    if estimate:
        print(f"{'book, all at once: line fit':<28} {N_TOTAL:>7,} {'':>11} {estimate['peak_rss_mb']:>7.0f} MB"
              f"   estimate: {estimate['intercept_mb']:.0f} MB + {estimate['mb_per_image'] * 1000:.0f} MB per 1,000 images")
    chunked_full = by.get(("chunked", N_TOTAL))
    verdict = None
    if chunked_full:
        verdict = chunked_full["peak_rss_mb"] < TARGET_MB
        print(f"target: chunked predict of {N_TOTAL:,} images under {TARGET_MB:.0f} MB peak RSS -> "
              f"{chunked_full['peak_rss_mb']:.0f} MB: {'met' if verdict else 'MISSED'}")
    if same:
        print("same predicted labels as the chunked run: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in same.items()))

    result = {
        "benchmark": "memory_predict",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "model": "SimpleConvNet(input_dim=(1, 28, 28), 30 filters 5x5, hidden 100), float32, NumPy",
        "target_mb": TARGET_MB,
        "runs": runs,
        "book_estimate": estimate,
        "chunked_10000_under_target": verdict,
        "book_measured_10000": measured_full,
        "same_labels": same,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {out}")
    return 0 if verdict in (None, True) else 1


if __name__ == "__main__":
    sys.exit(main())
