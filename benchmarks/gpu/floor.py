"""The floor of one training step on paper: FLOPs and bytes moved per sample.

    python benchmarks/gpu/floor.py                       # SimpleConvNet and DeepConvNet, H100 ceilings
    python benchmarks/gpu/floor.py --tflops 67 --tbps 3.0 --batch 1000

Walks the layers of xpconv's models (built on NumPy, batch 1, for their shapes) as
the CuPy path runs them (``layers.fuse``: Convolution+ReLU[+max Pooling] as one
block) and counts, per sample of a float32 training step (forward, backward, Adam):

* FLOPs of the matrix products (2*M*N*K each; elementwise work is left out: it is
  far below the products and bound by memory anyway).  The first convolution
  computes no dx (``need_dx=False``), as the CuPy path does.
* bytes **as implemented** by xpconv/kernels/cupy_ops.py: im2col materialises col
  (P*K per sample) and the products read it; the fused bias/ReLU/max-pool kernel
  reads the NHWC rows once and writes the pooled output and an int32 argmax; the
  backward rebuilds col from the kept input (no im2col matrix is held between
  forward and backward), gathers into NHWC rows, cuBLAS reads them for dW, a column sum for db,
  and dcol -> col2im for dx.  Affine/ReLU/softmax/Adam run as generic CuPy
  elementwise code (one pass per array operation: counted per operation).
* bytes of an **ideal** fused step: every activation written once and read once
  per pass, the input of each layer read again for its dW, weights amortised over
  the batch, Adam one pass over (p, g, m, v).

The floor of a step is max(FLOPs / compute ceiling, bytes / bandwidth ceiling);
an epoch of 60,000 samples is 60,000 / batch steps.  The ceilings default to one
H100 (SXM): 67 TFLOP/s float32 without tensor cores (CuPy's cuBLAS does not use
TF32 unless CUPY_TF32=1) and 3.0 TB/s device-to-device (measured on this
workplace's H100, bytes read + written).  Kernel launches are not in this floor:
at batch 100 they, not FLOPs or bytes, set the time (see README.md).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

F32 = 4  # bytes of float32 and of the int32 argmax


def _numel(shape) -> int:
    return math.prod(int(s) for s in shape)


def walk(model: str) -> dict:
    """Per-sample FLOPs, bytes (implemented and ideal) and parameters of one training step."""
    import numpy as np

    from xpconv import layers as L
    from xpconv.models import build_model

    net = build_model(model, xp="numpy", seed=0)
    steps = L.fuse(net.layers)
    x = np.zeros((1, 1, 28, 28), dtype=np.float32)  # MNIST-shaped, as the benchmarks
    rows, flops, impl, ideal = [], 0, 0.0, 0.0
    params = sum(int(p.size) for p in net.params.values())
    first = True
    for step in steps:
        n_in = _numel(x.shape[1:])
        if isinstance(step, L.ConvBlock):
            c = step.conv
            FN, C, FH, FW = (int(s) for s in c.W.shape)
            y = c.forward(x)  # conv output (N, FN, OH, OW)
            OH, OW = int(y.shape[2]), int(y.shape[3])
            P, K = OH * OW, C * FH * FW
            conv_out = P * FN
            out = step.relu.forward(y)
            if step.pool is not None:
                out = step.pool.forward(out)
            n_out = _numel(out.shape[1:])
            f = 2 * P * K * FN * (2 if first else 3)
            # as implemented (elements per sample)
            fwd = (n_in + P * K) + (P * K + conv_out) + conv_out  # im2col; GEMM; bias/relu(/pool) reads y
            fwd += 2 * n_out if step.pool is not None else n_out  # pooled out + argmax, or the NCHW output
            bwd = (2 * n_out + conv_out) if step.pool is not None else (3 * conv_out)  # gather to NHWC rows
            bwd += n_in + P * K  # im2col rebuilt from the kept input (col is not held from forward to backward)
            bwd += (conv_out + P * K) + conv_out  # dW GEMM reads d and col; db column sum
            if not first:
                bwd += (conv_out + P * K) + (P * K + n_in)  # dcol GEMM; col2im
            e_impl = fwd + bwd
            # ideal: read x, write out (+ a 1-byte-per-window argmax/mask, counted as 1/4 element)
            e_ideal = (n_in + n_out + n_out / 4) + (n_out + n_out / 4 + n_in) + (0 if first else n_in)
            name = f"conv{FH}x{FW} {C}->{FN} {OH}x{OW}" + (" +relu+pool" if step.pool is not None else " +relu")
        elif isinstance(step, L.Affine):
            D, M = (int(s) for s in step.W.shape)
            out = step.forward(x)
            n_out = M
            f = 2 * D * M * (2 if first else 3)
            # x@W (read x, write tmp), +b (read tmp, write out); bwd: dx GEMM, dW GEMM, db sum
            e_impl = (D + M) + 2 * M + (M + D) + (D + M) + M
            e_ideal = (D + M) + (M + D + (0 if first else D))
            name = f"affine {D}->{M}"
        elif isinstance(step, L.Relu):
            out = step.forward(x)
            n_out = n_in
            f = 0
            e_impl = 3 * n_in + 3 * n_in  # mask = x > 0, out = x * mask; dout * mask
            e_ideal = 0  # fusable into the neighbouring product's epilogue
            name = "relu"
        elif isinstance(step, L.Dropout):
            out = x
            n_out = n_in
            f = 0
            e_impl = 4 * n_in + 3 * n_in  # random mask, x * mask; dout * mask
            e_ideal = 0
            name = "dropout"
        else:
            raise SystemExit(f"floor.py: no cost model for {type(step).__name__}")
        weights = int(getattr(getattr(step, "conv", step), "W", np.zeros(0)).size)
        rows.append((name, f, e_impl * F32, e_ideal * F32, weights))
        flops += f
        impl += e_impl * F32
        ideal += e_ideal * F32
        x = out
        first = False
    # softmax + cross-entropy on (N, 10): ~12 elementwise/reduction passes fwd, 2 bwd
    classes = _numel(x.shape[1:])
    rows.append(("softmax+CE", 0, 14 * 2 * classes * F32, 2 * classes * F32, 0))
    impl += 14 * 2 * classes * F32
    ideal += 2 * classes * F32
    return {"model": model, "rows": rows, "flops": flops, "bytes_impl": impl, "bytes_ideal": ideal, "params": params}


def adam_bytes(params: int) -> tuple[float, float]:
    """Bytes per step of Adam over ``params`` float32 values: the generic update
    (xpconv.optim.Adam, ~12 array operations, each reading 1-2 arrays and writing one:
    ~30 passes) and an ideal fused one (read p, g, m, v; write p, m, v)."""
    return 30 * params * F32, 7 * params * F32


def report(model: str, batch: int, tflops: float, tbps: float, epoch: int) -> str:
    r = walk(model)
    a_impl, a_ideal = adam_bytes(r["params"])
    lines = [f"## {model}: per sample of a float32 training step (batch {batch}; Adam amortised over the batch)", ""]
    lines.append("| step | MFLOP | KB as implemented | KB ideal |")
    lines.append("| --- | ---: | ---: | ---: |")
    for name, f, bi, bd, _w in r["rows"]:
        lines.append(f"| {name} | {f / 1e6:.3f} | {bi / 1e3:.1f} | {bd / 1e3:.1f} |")
    impl = r["bytes_impl"] + a_impl / batch
    ideal = r["bytes_ideal"] + a_ideal / batch
    lines.append(f"| Adam ({r['params']:,} params) / batch | 0 | {a_impl / batch / 1e3:.1f} | {a_ideal / batch / 1e3:.1f} |")
    lines.append(f"| **total** | **{r['flops'] / 1e6:.3f}** | **{impl / 1e3:.1f}** | **{ideal / 1e3:.1f}** |")
    lines.append("")
    steps = epoch / batch
    t_compute = r["flops"] * epoch / (tflops * 1e12)
    t_impl = impl * epoch / (tbps * 1e12)
    t_ideal = ideal * epoch / (tbps * 1e12)
    lines.append(
        f"Epoch of {epoch:,} samples ({steps:g} steps): {r['flops'] * epoch / 1e9:.0f} GFLOP -> "
        f"{t_compute * 1e3:.1f} ms at {tflops:g} TFLOP/s; {impl * epoch / 1e9:.1f} GB as implemented -> "
        f"{t_impl * 1e3:.1f} ms at {tbps:g} TB/s ({ideal * epoch / 1e9:.1f} GB ideal -> {t_ideal * 1e3:.1f} ms). "
        f"Floor as implemented: {max(t_compute, t_impl) * 1e3:.1f} ms per epoch, "
        f"{max(t_compute, t_impl) / steps * 1e6:.0f} us per step, "
        f"{epoch / max(t_compute, t_impl):,.0f} samples/s."
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="simple,deep")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--tflops", type=float, default=67.0, help="float32 compute ceiling, TFLOP/s (default: H100 SXM, no tensor cores)")
    p.add_argument("--tbps", type=float, default=3.0, help="memory bandwidth ceiling, TB/s read+written (default: H100 as measured here)")
    p.add_argument("--epoch", type=int, default=60_000)
    args = p.parse_args(argv)
    for m in args.models.split(","):
        print(report(m.strip(), args.batch, args.tflops, args.tbps, args.epoch))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
