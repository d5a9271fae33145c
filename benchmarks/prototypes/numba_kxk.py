# ruff: noqa: B023  (timed lambdas run inside their own loop iteration)
"""Per-layer timings of the conv kernels: NumPy kernel vs Numba kernel vs torch, float32.

PYTHONPATH=$PWD python benchmarks/prototypes/numba_kxk.py simple|deep [N] [R]

One thread everywhere (threadpoolctl for BLAS, numba.set_num_threads, torch.set_num_threads),
CPU time of this process, best of R runs, the three implementations interleaved in each
round.  Forward: conv + bias + ReLU (+ 2x2/2 max-pool).  Backward: dW, db, and dx for
every layer but the first (need_dx=False there, as in the models).
"""

from __future__ import annotations

import sys
import time

import numba
import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from xpconv.kernels import numba_ops, numpy_ops

# (C, H, W, FN, K, pad, pool?)
SETS = {
    "simple": [(1, 28, 28, 30, 5, 0, True)],
    "deep": [(1, 28, 28, 16, 3, 1, False), (16, 28, 28, 16, 3, 1, True), (16, 14, 14, 32, 3, 1, False),
             (32, 14, 14, 32, 3, 2, True), (32, 8, 8, 64, 3, 1, False), (64, 8, 8, 64, 3, 1, True)],
}


def timed(f):
    t = time.process_time()
    f()
    return time.process_time() - t


def main(which="simple", N=100, R=7):
    rng = np.random.default_rng(0)
    numba.set_num_threads(1)
    torch.set_num_threads(1)
    tot = np.zeros(6)
    print(f"{which}, N={N}, 1 thread, process time, best of {R} interleaved (ms)")
    print("| layer | shape | fwd NumPy | fwd Numba | fwd torch | bwd NumPy | bwd Numba | bwd torch |")
    print("|---|---|---|---|---|---|---|---|")
    with threadpool_limits(1):
        for i, (C, H, W, FN, K, pad, pool) in enumerate(SETS[which]):
            x = rng.standard_normal((N, C, H, W)).astype(np.float32)
            Wt = (rng.standard_normal((FN, C, K, K)) * 0.2).astype(np.float32)
            b = rng.standard_normal(FN).astype(np.float32)
            need_dx = i > 0
            kerns = ((numpy_ops.Conv2dReluMaxPool2d(), numba_ops.Conv2dReluMaxPool2d()) if pool
                     else (numpy_ops.Conv2d(), numba_ops.Conv2d()))
            kerns[1].replaces = kerns[0]

            def fwd(k):
                return k.forward(x, Wt, b, 1, pad, 2, 2, 2) if pool else k.forward(x, Wt, b, 1, pad, relu=True)

            outs = [fwd(k) for k in kerns]
            assert isinstance(outs[1][1], numba_ops._State), "Numba kernel did not cover the layer"
            dout = rng.standard_normal(outs[0][0].shape).astype(np.float32)
            tx = torch.from_numpy(x).requires_grad_(need_dx)
            tW = torch.from_numpy(Wt).requires_grad_(True)
            tb = torch.from_numpy(b).requires_grad_(True)
            td = torch.from_numpy(dout)

            def tfwd():
                y = F.relu(F.conv2d(tx, tW, tb, padding=pad))
                return F.max_pool2d(y, 2, 2) if pool else y

            def tbwd():
                y = tfwd()
                t = time.process_time()
                y.backward(td)
                dt = time.process_time() - t
                tW.grad = tb.grad = tx.grad = None
                return dt

            best = [np.inf] * 6
            for _ in range(R):
                for j, k in enumerate(kerns):
                    best[j] = min(best[j], timed(lambda: fwd(k)))
                with torch.no_grad():
                    best[2] = min(best[2], timed(tfwd))
                for j, k in enumerate(kerns):
                    st = outs[j][1]
                    best[3 + j] = min(best[3 + j], timed(lambda: k.backward(dout, st, need_dx=need_dx)))
                best[5] = min(best[5], tbwd())
            best = np.array(best) * 1e3
            tot += best
            shape = f"{C}->{FN} {H}x{W} {K}x{K} p{pad}{' +pool' if pool else ''}{'' if need_dx else ' (no dx)'}"
            print(f"| {i + 1} | {shape} | " + " | ".join(f"{v:.2f}" for v in best) + " |")
    print("| all | | " + " | ".join(f"{v:.2f}" for v in tot) + " |")


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0] if a else "simple", int(a[1]) if len(a) > 1 else 100, int(a[2]) if len(a) > 2 else 7)
