# ruff: noqa: B023  (timed lambdas run inside their own loop iteration)
"""Per-layer prototype timings on DeepConvNet's real shapes (batch N, float32).

python benchmarks/prototypes/deep_layers.py [N]

One BLAS thread (threadpoolctl), CPU time of this process (time.process_time), best
of R runs: on a shared 2-core machine CPU time counts only this process's work, so
other people's load moves it far less than wall time.  Measures, per layer:
  cur_f / cur_b   the registered NumPy kernel's forward / backward (with dx but layer 1)
  gemm            the im2col GEMM alone (FN x K+1 @ K+1 x N*OH*OW) on ready columns
  wino_f          a NumPy Winograd F(2x2,3x3) forward (batched transforms + 16 GEMMs)
  nb_f            the Numba direct kernel forward (if numba is importable)
"""

from __future__ import annotations

import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

from xpconv.kernels import numpy_ops as K

# (C, H, W, FN, pad, pool?)  DeepConvNet at 1x28x28
LAYERS = [(1, 28, 28, 16, 1, False), (16, 28, 28, 16, 1, True), (16, 14, 14, 32, 1, False),
          (32, 14, 14, 32, 2, True), (32, 8, 8, 64, 1, False), (64, 8, 8, 64, 1, True)]

BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64)
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)


def wino_f23(x, W, b, pad):
    """Winograd F(2x2,3x3) conv (stride 1) + bias + ReLU on channel-major x (C,N,H,W)."""
    C, N, H, Wd = x.shape
    FN = W.shape[0]
    OH, OW = H + 2 * pad - 2, Wd + 2 * pad - 2
    TH, TW = -(-OH // 2), -(-OW // 2)
    xp = np.zeros((C, N, 2 * TH + 2, 2 * TW + 2), x.dtype)
    xp[:, :, pad:pad + H, pad:pad + Wd] = x
    U = np.einsum("ij,fcjk,lk->ilfc", G, W.astype(np.float64), G).astype(x.dtype).reshape(16, FN, C)
    out = np.empty((FN, N, OH, OW), x.dtype)
    step = max(1, min(N, (2 << 20) // (16 * C * TH * TW * x.itemsize)))
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        n = n1 - n0
        P = n * TH * TW
        d = [[xp[:, n0:n1, i:i + 2 * TH:2, j:j + 2 * TW:2] for j in range(4)] for i in range(4)]
        T = np.empty((4, 4, C, n, TH, TW), x.dtype)
        for j in range(4):
            np.subtract(d[0][j], d[2][j], out=T[0, j])
            np.add(d[1][j], d[2][j], out=T[1, j])
            np.subtract(d[2][j], d[1][j], out=T[2, j])
            np.subtract(d[1][j], d[3][j], out=T[3, j])
        V = np.empty((4, 4, C, P), x.dtype)
        Tr = T.reshape(4, 4, C, P)
        np.subtract(Tr[:, 0], Tr[:, 2], out=V[:, 0])
        np.add(Tr[:, 1], Tr[:, 2], out=V[:, 1])
        np.subtract(Tr[:, 2], Tr[:, 1], out=V[:, 2])
        np.subtract(Tr[:, 1], Tr[:, 3], out=V[:, 3])
        M = np.matmul(U, V.reshape(16, C, P)).reshape(4, 4, FN, P)
        S = np.empty((2, 4, FN, P), x.dtype)
        np.add(M[0], M[1], out=S[0]); S[0] += M[2]
        np.subtract(M[1], M[2], out=S[1]); S[1] -= M[3]
        Y = np.empty((2, 2, FN, n, TH, TW), x.dtype)
        Yr = Y.reshape(2, 2, FN, P)
        np.add(S[:, 0], S[:, 1], out=Yr[:, 0]); Yr[:, 0] += S[:, 2]
        np.subtract(S[:, 1], S[:, 2], out=Yr[:, 1]); Yr[:, 1] -= S[:, 3]
        Yr += b[:, None]
        np.maximum(Y, 0, out=Y)
        for a in range(2):
            for c in range(2):
                out[:, n0:n1, a::2, c::2] = Y[a, c, :, :, : (OH - a + 1) // 2, : (OW - c + 1) // 2]
    return out


def best(f, R):
    ts = []
    for _ in range(R):
        t = time.process_time(); f(); ts.append(time.process_time() - t)
    return min(ts) * 1e3


def main(N=100, R=5):
    rng = np.random.default_rng(0)
    rows = []
    tot = {"cur_f": 0.0, "cur_b": 0.0, "gemm": 0.0, "wino_f": 0.0}
    with threadpool_limits(1):
        for i, (C, H, W, FN, pad, pool) in enumerate(LAYERS):
            x = rng.standard_normal((N, C, H, W)).astype(np.float32)
            Wt = (rng.standard_normal((FN, C, 3, 3)) * 0.2).astype(np.float32)
            b = rng.standard_normal(FN).astype(np.float32)
            kern = K.Conv2dReluMaxPool2d() if pool else K.Conv2d()
            fwd = (lambda: kern.forward(x, Wt, b, 1, pad, 2, 2, 2)) if pool else (lambda: kern.forward(x, Wt, b, 1, pad, relu=True))
            out, st = fwd()
            dout = rng.standard_normal(out.shape).astype(np.float32)
            cf = best(fwd, R)
            cb = best(lambda: kern.backward(dout, st, need_dx=i > 0), R)
            OH = H + 2 * pad - 2
            cols = rng.standard_normal((C * 9 + 1, N * OH * OH)).astype(np.float32)
            Wa = rng.standard_normal((FN, C * 9 + 1)).astype(np.float32)
            gm = best(lambda: Wa @ cols, R)
            xc = np.ascontiguousarray(x.transpose(1, 0, 2, 3))
            wf = best(lambda: wino_f23(xc, Wt, b, pad), R)
            ref = np.maximum(K.Conv2d().forward(x, Wt, b, 1, pad)[0], 0)
            err = float(np.abs(wino_f23(xc, Wt, b, pad).transpose(1, 0, 2, 3) - ref).max())
            rows.append((i + 1, f"{C}->{FN} {H}x{W} p{pad}{' +pool' if pool else ''}", cf, cb, gm, wf, err))
            for k, v in zip(("cur_f", "cur_b", "gemm", "wino_f"), (cf, cb, gm, wf)):
                tot[k] += v
    print(f"N={N}, 1 BLAS thread, process time, best of {R} (ms)")
    print("| layer | shape | kernel fwd | kernel bwd | im2col GEMM alone | Winograd F(2,3) fwd (+ReLU, no pool) | max err |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.1e} |")
    print(f"| all | | {tot['cur_f']:.1f} | {tot['cur_b']:.1f} | {tot['gemm']:.1f} | {tot['wino_f']:.1f} | |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
