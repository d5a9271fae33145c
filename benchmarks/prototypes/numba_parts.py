# ruff: noqa: B023  (timed lambdas run inside their own loop iteration)
"""The compiled kernels' parts on DeepConvNet's six layers (batch N, float32, one thread), and
the page faults of a whole training step.

    python benchmarks/prototypes/numba_parts.py [N]          # per layer: forward, dz, dW, dx vs torch
    python benchmarks/prototypes/numba_parts.py --faults     # minor page faults and ms per step

CPU time of this process (time.process_time), best of 7; torch's forward is conv + ReLU under
no_grad, its backward the autograd of conv (input, weight and bias gradients).  Force a target
as benchmarks/isa.py does (NUMBA_CPU_NAME, NUMBA_CPU_FEATURES, ATEN_CPU_CAPABILITY,
ONEDNN_MAX_CPU_ISA) to see another instruction set's code.
"""

from __future__ import annotations

import resource
import sys
import time

import numba
import numpy as np
import torch
from threadpoolctl import threadpool_limits

from xpconv.kernels import numba_ops as nb

# (C, H, W, FN, pad)  DeepConvNet at 1x28x28
LAYERS = [(1, 28, 28, 16, 1), (16, 28, 28, 16, 1), (16, 14, 14, 32, 1), (32, 14, 14, 32, 2), (32, 8, 8, 64, 1), (64, 8, 8, 64, 1)]


def best(f, R=7):
    ts = []
    for _ in range(R):
        t = time.process_time()
        f()
        ts.append(time.process_time() - t)
    return min(ts) * 1e3


def layers(N: int) -> None:
    rng = np.random.default_rng(0)
    tot: dict[str, float] = {}
    for C, H, W, FN, P in LAYERS:
        x = rng.standard_normal((N, C, H, W), dtype=np.float32)
        Wt = rng.standard_normal((FN, C, 3, 3), dtype=np.float32) * 0.1
        b = np.zeros(FN, np.float32)
        out, st = nb.Conv2d().forward(x, Wt, b, 1, P, relu=True)
        dout = rng.standard_normal(out.shape, dtype=np.float32)
        K, Hp, Wp = 3, H + 2 * P, W + 2 * P
        B, FNp, offs = nb._border(K, P), -(-FN // nb.FV) * nb.FV, nb._taps(K, Wp)
        pairs = FNp // (2 * nb.FV) if nb._PAIRS else 0
        d = np.asarray(dout).transpose(1, 0, 2, 3)
        dzf = np.zeros(FN * N * Hp * Wp + nb._slack(Wp, K), np.float32)
        db, idx = np.empty(FN, np.float32), np.zeros((1, 1, 1, 1), np.uint8)
        part = np.zeros((1, FNp, C, offs.shape[0]), np.float32)
        wd = nb._pack(np.ascontiguousarray(st.W4[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)), np.float32)
        Cp, Rs = wd.shape[0] * nb.FB, nb._rows(H, W, Wp)
        dxb, zb = np.empty(Cp * N * Rs * Wp, np.float32), np.zeros(Cp, np.float32)
        t = {"fwd": best(lambda: nb.Conv2d().forward(x, Wt, b, 1, P, relu=True)),
             "dz": best(lambda: nb._dz(d, st.out, idx, True, False, Hp, Wp, B, dzf, db)),
             "dW": best(lambda: nb._dw(dzf, st.xf, N, C, FN, Hp, Wp, Hp - 2, Wp - 2, B, offs, pairs, part)),
             "dx": best(lambda: nb._dx(dzf, N, FN, Hp, Wp, H, W, P, K, B, wd, zb, dxb, Rs * Wp))}
        tx, tw = torch.from_numpy(x).requires_grad_(True), torch.from_numpy(Wt).requires_grad_(True)
        tb = torch.zeros(FN, requires_grad=True)
        to = torch.nn.functional.conv2d(tx, tw, tb, padding=P)
        tg = torch.from_numpy(np.ascontiguousarray(dout))

        def tfw():
            with torch.no_grad():
                torch.relu(torch.nn.functional.conv2d(tx, tw, tb, padding=P))

        t["torch fwd"] = best(tfw)
        t["torch bwd"] = best(lambda: torch.autograd.grad(to, (tx, tw, tb), tg, retain_graph=True))
        gf = 2 * N * (Hp - 2) * (Wp - 2) * FN * C * 9 / 1e6  # MFLOP of one pass
        print(f"C{C:3d} {H}x{W} FN{FN:3d} pad {P}: " + "  ".join(f"{k} {v:6.2f}" for k, v in t.items())
              + f"   dW {gf / t['dW']:5.1f} GFLOP/s")
        for k, v in t.items():
            tot[k] = tot.get(k, 0.0) + v
    print("sum (ms): " + "  ".join(f"{k} {v:.2f}" for k, v in tot.items()))


def faults() -> None:
    from xpconv.models import DeepConvNet
    from xpconv.optim import Adam

    net, opt = DeepConvNet(), Adam(lr=0.001)
    rng = np.random.default_rng(0)
    x, t = rng.random((100, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 100)

    def step():
        opt.update(net.params, net.gradient(x, t))

    for _ in range(3):
        step()
    r0, a = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
    for _ in range(20):
        step()
    r1, b = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
    print(f"DeepConvNet batch 100: {(r1.ru_minflt - r0.ru_minflt) / 20:.0f} minor faults, {(b - a) / 20 * 1e3:.1f} ms CPU, "
          f"{(r1.ru_stime - r0.ru_stime) / 20 * 1e3:.1f} ms system per step")


if __name__ == "__main__":
    numba.set_num_threads(1)
    torch.set_num_threads(1)
    with threadpool_limits(1):
        if "--faults" in sys.argv:
            faults()
        else:
            layers(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
