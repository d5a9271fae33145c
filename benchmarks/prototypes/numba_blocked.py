# ruff: noqa: B023  (timed lambdas run inside their own loop iteration)
"""Prototype timings of the register-blocked Numba kernels (xpconv/kernels/numba_ops.py)
against the NumPy kernels and torch, per DeepConvNet layer.

python benchmarks/prototypes/numba_blocked.py [N] [R] [threads]

One thread for everything by default (OpenBLAS via threadpoolctl, Numba via
set_num_threads, torch via set_num_threads), CPU time of this process
(time.process_time), best of R; the three implementations take turns repeat by repeat
(interleaved) so that load from elsewhere falls on all of them alike.  Forward: conv +
bias + ReLU (+ the 2x2/2 max-pool on layers 2, 4, 6); backward: dx (all but layer 1),
dW, db.  torch: F.conv2d (+relu, +max_pool2d) forward, autograd backward of the same.
"""

from __future__ import annotations

import sys
import time

import numba
import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from xpconv.kernels import numba_ops as NB
from xpconv.kernels import numpy_ops as K

# (C, H, W, FN, pad, pool?)  DeepConvNet at 1x28x28
LAYERS = [
    (1, 28, 28, 16, 1, False),
    (16, 28, 28, 16, 1, True),
    (16, 14, 14, 32, 1, False),
    (32, 14, 14, 32, 2, True),
    (32, 8, 8, 64, 1, False),
    (64, 8, 8, 64, 1, True),
]


def interleaved(fs, R):
    """Best CPU time (ms) of each callable over R interleaved rounds."""
    ts = [[] for _ in fs]
    for r in range(R):
        order = list(range(len(fs)))
        order = order[r % len(fs) :] + order[: r % len(fs)]
        for i in order:
            t = time.process_time()
            fs[i]()
            ts[i].append(time.process_time() - t)
    return [min(t) * 1e3 for t in ts]


def main(N=100, R=7, threads=1):
    numba.set_num_threads(threads)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    rows = []
    tot = np.zeros(6)
    with threadpool_limits(threads):
        for i, (C, H, W, FN, pad, pool) in enumerate(LAYERS):
            x = rng.standard_normal((N, C, H, W)).astype(np.float32)
            Wt = (rng.standard_normal((FN, C, 3, 3)) * 0.2).astype(np.float32)
            b = (rng.standard_normal(FN) * 0.1).astype(np.float32)
            npk, nbk = (K.Conv2dReluMaxPool2d(), NB.Conv2dReluMaxPool2d()) if pool else (K.Conv2d(), NB.Conv2d())
            if pool:
                fw = [lambda k=k: k.forward(x, Wt, b, 1, pad, 2, 2, 2) for k in (npk, nbk)]
            else:
                fw = [lambda k=k: k.forward(x, Wt, b, 1, pad, relu=True) for k in (npk, nbk)]
            (o1, s1), (o2, s2) = fw[0](), fw[1]()
            err_f = float(np.abs(o1 - o2).max())
            dout = rng.standard_normal(o1.shape).astype(np.float32)
            need_dx = i > 0
            g1 = npk.backward(dout, s1, need_dx=need_dx)
            g2 = nbk.backward(dout, s2, need_dx=need_dx)
            err_b = max(float(np.abs(a - c).max() / (np.abs(a).max() + 1e-30)) for a, c in zip(g1, g2) if a is not None)
            tx = torch.from_numpy(x).requires_grad_(need_dx)
            tW = torch.from_numpy(Wt).requires_grad_(True)
            tb = torch.from_numpy(b).requires_grad_(True)
            tdo = torch.from_numpy(dout)

            def t_fwd():
                with torch.no_grad():
                    y = F.relu(F.conv2d(tx, tW, tb, padding=pad))
                    return F.max_pool2d(y, 2, 2) if pool else y

            def t_fb():
                y = F.relu(F.conv2d(tx, tW, tb, padding=pad))
                y = F.max_pool2d(y, 2, 2) if pool else y
                y.backward(tdo)

            fs = [fw[0], fw[1], t_fwd, lambda: npk.backward(dout, s1, need_dx=need_dx), lambda: nbk.backward(dout, s2, need_dx=need_dx)]
            tf_np, tf_nb, tf_t, tb_np, tb_nb = interleaved(fs, R)
            tfb_t = interleaved([t_fb], R)[0]
            r = (tf_np, tf_nb, tf_t, tb_np, tb_nb, tfb_t - tf_t)
            tot += r
            rows.append((i + 1, f"{C}->{FN} {H}x{W} p{pad}{' +pool' if pool else ''}") + r + (err_f, err_b))
    print(f"N={N}, {threads} thread(s), process time, best of {R} interleaved (ms); torch bwd = (fwd+bwd) - fwd")
    print(
        "| layer | shape | NumPy fwd | Numba fwd | torch fwd | NumPy bwd | Numba bwd | torch bwd | fwd NumPy/Numba | bwd NumPy/Numba | max err fwd | max rel err bwd |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.2f} | {r[7]:.2f} | {r[2] / r[3]:.2f}x | {r[5] / r[6]:.2f}x | {r[8]:.1e} | {r[9]:.1e} |"
        )
    print(
        f"| all | | {tot[0]:.1f} | {tot[1]:.1f} | {tot[2]:.1f} | {tot[3]:.1f} | {tot[4]:.1f} | {tot[5]:.1f} | {tot[0] / tot[1]:.2f}x | {tot[3] / tot[4]:.2f}x | | |"
    )


if __name__ == "__main__":
    a = sys.argv[1:]
    main(int(a[0]) if a else 100, int(a[1]) if len(a) > 1 else 7, int(a[2]) if len(a) > 2 else 1)
