# ruff: noqa: B023  (timed lambdas run inside their own loop iteration)
"""Prototype: the NumPy kernels' batch-slice size (CHUNK_BYTES) on DeepConvNet's layers.
Sum over the six layers of forward and backward, ms, as deep_layers.py (1 BLAS thread,
process time, best of 5), for N = 100 and 1000."""
import sys

import deep_layers as D
import numpy as np
from threadpoolctl import threadpool_limits

from xpconv.kernels import numpy_ops as K


def totals(N):
    rng = np.random.default_rng(0)
    f = bw = 0.0
    for i, (C, H, W, FN, pad, pool) in enumerate(D.LAYERS):
        x = rng.standard_normal((N, C, H, W)).astype(np.float32)
        Wt = (rng.standard_normal((FN, C, 3, 3)) * 0.2).astype(np.float32)
        b = rng.standard_normal(FN).astype(np.float32)
        kern = K.Conv2dReluMaxPool2d() if pool else K.Conv2d()
        fwd = (lambda: kern.forward(x, Wt, b, 1, pad, 2, 2, 2)) if pool else (lambda: kern.forward(x, Wt, b, 1, pad, relu=True))
        out, st = fwd()
        dout = rng.standard_normal(out.shape).astype(np.float32)
        f += D.best(fwd, 5)
        bw += D.best(lambda: kern.backward(dout, st, need_dx=i > 0), 5)
    return f, bw


with threadpool_limits(1):
    for N in [int(a) for a in sys.argv[1:]] or [100]:
        for cb in (1 << 20, 2 << 20, 4 << 20, 8 << 20, 16 << 20):
            K.CHUNK_BYTES = cb
            f, bw = totals(N)
            print(f"N={N} CHUNK_BYTES={cb >> 20} MiB: fwd {f:.1f} ms, bwd {bw:.1f} ms, per sample {(f + bw) / N * 1e3:.0f} us")
