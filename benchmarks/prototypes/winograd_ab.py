
"""A/B of the fused conv-relu-max-pool forward: Winograd F(2x2,3x3) (numpy_ops.WINOGRAD_MIN_C
= 16) against the im2col GEMM (WINOGRAD_MIN_C = huge) on DeepConvNet's pooled layers,
interleaved, 1 BLAS thread, process time, best of 7 (ms).  python winograd_ab.py [N ...]"""
import sys
import time

import deep_layers as D
import numpy as np
from threadpoolctl import threadpool_limits

from xpconv.kernels import numpy_ops as K

with threadpool_limits(1):
    for N in [int(a) for a in sys.argv[1:]] or [100]:
        rng = np.random.default_rng(0)
        tot = [0.0, 0.0]
        for i, (C, H, W, FN, pad, pool) in enumerate(D.LAYERS):
            if not pool:
                continue
            x = rng.standard_normal((N, C, H, W)).astype(np.float32)
            Wt = (rng.standard_normal((FN, C, 3, 3)) * 0.2).astype(np.float32)
            b = rng.standard_normal(FN).astype(np.float32)
            kern = K.Conv2dReluMaxPool2d()
            ts = {0: [], 1: []}
            for r in range(7):
                for a, minc in ((0, 10**9), (1, 16)):
                    K.WINOGRAD_MIN_C = minc
                    t = time.process_time(); kern.forward(x, Wt, b, 1, pad, 2, 2, 2); ts[a].append(time.process_time() - t)
            g, w = min(ts[0]) * 1e3, min(ts[1]) * 1e3
            tot[0] += g; tot[1] += w
            print(f"N={N} layer {i + 1} {C}->{FN} {H}x{W} p{pad} +pool: GEMM {g:.2f} ms, Winograd {w:.2f} ms ({g / w:.2f}x)")
        print(f"N={N} pooled layers: GEMM {tot[0]:.1f} ms, Winograd {tot[1]:.1f} ms ({tot[0] / tot[1]:.2f}x)")
