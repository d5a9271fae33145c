# ruff: noqa: B023  (timed lambdas run inside their own loop iteration)
"""Prototype: a Numba direct 3x3 convolution (+bias+ReLU) on channel-major (C, N, Hp, Wp)
input, accumulating FB output channels per row in a small buffer so the inner loop is
one contiguous run of OW values (LLVM vectorises it).  Times as deep_layers.py."""

from __future__ import annotations

import numba
import numpy as np
from deep_layers import LAYERS, best


@numba.njit(parallel=True, fastmath=False, cache=True)
def conv_direct(xpad, W, b, out):
    C, N = xpad.shape[:2]
    FN, _, FH, FW = W.shape
    _, _, OH, OW = out.shape
    for n in numba.prange(N):
        acc = np.empty((FN, OW), xpad.dtype)
        for oh in range(OH):
            for f in range(FN):
                for ow in range(OW):
                    acc[f, ow] = b[f]
            for c in range(C):
                for ky in range(FH):
                    row = xpad[c, n, oh + ky]
                    for kx in range(FW):
                        for f in range(FN):
                            w = W[f, c, ky, kx]
                            for ow in range(OW):
                                acc[f, ow] += w * row[ow + kx]
            for f in range(FN):
                for ow in range(OW):
                    v = acc[f, ow]
                    out[f, n, oh, ow] = max(0, v)


def main(N=100):
    from threadpoolctl import threadpool_limits

    from xpconv.kernels import numpy_ops as K
    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    print("| layer | numba direct fwd (+ReLU, no pool) ms | max err |")
    tot = 0.0
    with threadpool_limits(1):
        for i, (C, H, W, FN, pad, pool) in enumerate(LAYERS):
            x = rng.standard_normal((N, C, H, W)).astype(np.float32)
            Wt = (rng.standard_normal((FN, C, 3, 3)) * 0.2).astype(np.float32)
            b = rng.standard_normal(FN).astype(np.float32)
            xp = np.zeros((C, N, H + 2 * pad, W + 2 * pad), np.float32)
            xp[:, :, pad:pad + H, pad:pad + W] = x.transpose(1, 0, 2, 3)
            OH = H + 2 * pad - 2
            out = np.empty((FN, N, OH, OH), np.float32)
            conv_direct(xp, Wt, b, out)
            t = best(lambda: conv_direct(xp, Wt, b, out), 5)
            ref = np.maximum(K.Conv2d().forward(x, Wt, b, 1, pad)[0], 0)
            err = float(np.abs(out.transpose(1, 0, 2, 3) - ref).max())
            tot += t
            print(f"| {i + 1} | {t:.2f} | {err:.1e} |")
    print(f"| all | {tot:.1f} | |")


if __name__ == "__main__":
    main()
