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

Then a table of peak activation memory per model and batch (``memory``): what the
CuPy step keeps from forward to backward plus its largest transient (im2col in slices
of ``xpconv.kernels.COL_BYTES``), against what PyTorch's autograd saves plus its
largest transient.

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


# --------------------------------------------------------------------------- peak activation memory

I32, I64, BOOL = 4, 8, 1  # argmax (xpconv, int32), pool indices (torch, int64), dropout mask (torch, bool)


def _shapes(model: str) -> list[dict]:
    """Per step of ``layers.fuse``: kind, elements per sample in and out, and for a
    convolution block its output before pooling (z), positions P and column width K."""
    import numpy as np

    from xpconv import layers as L
    from xpconv.models import build_model

    net = build_model(model, xp="numpy", seed=0)
    x = np.zeros((1, 1, 28, 28), dtype=np.float32)
    out: list[dict] = []
    for step in L.fuse(net.layers):
        n_in = _numel(x.shape[1:])
        rec: dict = {"n_in": n_in}
        if isinstance(step, L.ConvBlock):
            c = step.conv
            FN, C, FH, FW = (int(s) for s in c.W.shape)
            y = step.relu.forward(c.forward(x))
            rec.update(kind="conv", z=_numel(y.shape[1:]), P=int(y.shape[2]) * int(y.shape[3]), K=C * FH * FW, pool=step.pool is not None)
            x = step.pool.forward(y) if step.pool is not None else y
        elif isinstance(step, L.Affine):
            rec.update(kind="affine")
            x = step.forward(x)
        elif isinstance(step, L.Relu):
            rec.update(kind="relu")
            x = step.forward(x)
        elif isinstance(step, L.Dropout):
            rec.update(kind="dropout")
        else:
            raise SystemExit(f"floor.py: no memory model for {type(step).__name__}")
        rec["n_out"] = _numel(x.shape[1:])
        out.append(rec)
    return out


def memory(model: str, batch: int, col_bytes: float) -> dict:
    """Peak bytes of activations in one float32 training step, on paper, for xpconv's
    CuPy path (im2col in batch slices of at most ``col_bytes``) and for PyTorch
    (what autograd saves for backward plus the largest transient of any layer).

    Counted for both: every array a layer keeps from forward to backward (each array
    once, however many layers keep it: ``act<i>`` is the input of step i, the output
    of step i-1) and, at the worst moment of the worst layer, the arrays alive
    besides them.  Not counted: parameters, gradients and optimizer state (the same
    in both), the input batch, cuDNN workspace (torch only; it can be hundreds of MB,
    so leaving it out favours torch) and allocator rounding.

    xpconv keeps each layer's state until the next forward, so its backward peak is
    all kept state plus the layer's transients; torch frees a layer's saved tensors
    after its backward, so its backward peak at layer i counts only layers <= i.
    """
    B, F = batch, F32
    layers = _shapes(model)
    size: dict[str, float] = {}  # key -> bytes of every kept array
    xp_keys: list[list[str]] = []  # per step, what xpconv keeps
    t_keys: list[list[str]] = []  # per step, what torch's autograd saves
    xp_fwd: list[float] = []  # transients of each step's forward and backward
    xp_bwd: list[float] = []
    t_fwd: list[float] = []
    t_bwd: list[float] = []
    for i, r in enumerate(layers):
        n_in, n_out = r["n_in"] * B * F, r["n_out"] * B * F
        size[f"act{i}"], size[f"act{i + 1}"] = n_in, n_out
        if r["kind"] == "conv":
            z = r["z"] * B * F
            per = r["P"] * r["K"] * F
            col = (B if col_bytes == float("inf") else min(B, max(1, int(col_bytes // per)))) * per
            dx = n_in if i > 0 else 0
            if r["pool"]:
                size[f"argmax{i}"] = r["n_out"] * B * I32
                size[f"idx{i}"] = r["n_out"] * B * I64
                size[f"relu{i}"] = z
                xp_keys.append([f"act{i}", f"argmax{i}"])  # input (col rebuilt from it), int32 argmax
                t_keys.append([f"act{i}", f"relu{i}", f"idx{i}"])  # conv input; pool input and int64 indices
                xp_fwd.append(max(col + z, z + n_out + size[f"argmax{i}"]))  # im2col + product; bias/ReLU/pool kernel
                t_fwd.append(2 * z + n_out + size[f"idx{i}"])  # conv out, ReLU out, pool out + indices
                t_bwd.append(n_out + 2 * z + dx)  # dout, grad of ReLU out, grad of conv out, dx
            else:
                xp_keys.append([f"act{i}", f"act{i + 1}"])  # input, and the output as the ReLU's mask
                t_keys.append([f"act{i}", f"act{i + 1}"])  # conv input, ReLU output
                xp_fwd.append(max(col + z, z + n_out))
                t_fwd.append(2 * z)
                t_bwd.append(n_out + z + dx)
            xp_bwd.append(n_out + z + col + dx)  # dout, d rows, col (or its gradient's slice), dx
        elif r["kind"] == "affine":
            xp_keys.append([f"act{i}"])
            t_keys.append([f"act{i}"])
            xp_fwd.append(2 * n_out)  # x @ W, then + b
            t_fwd.append(n_out)
            xp_bwd.append(n_out + n_in)
            t_bwd.append(n_out + n_in)
        elif r["kind"] == "relu":
            xp_keys.append([f"act{i + 1}"])
            t_keys.append([f"act{i + 1}"])
            xp_fwd.append(n_out)
            t_fwd.append(n_out)
            xp_bwd.append(2 * n_out)
            t_bwd.append(2 * n_out)
        else:  # dropout: xpconv's mask has the input's dtype, torch's is bool
            size[f"mask{i}"], size[f"bmask{i}"] = n_in, r["n_in"] * B * BOOL
            xp_keys.append([f"mask{i}"])
            t_keys.append([f"bmask{i}"])
            xp_fwd.append(2 * n_out)
            t_fwd.append(n_out + size[f"bmask{i}"])
            xp_bwd.append(2 * n_out)
            t_bwd.append(2 * n_out)
    size["softmax"] = layers[-1]["n_out"] * B * F  # xpconv's softmax output, torch's log-softmax
    xp_keys[-1].append("softmax")
    t_keys[-1].append("softmax")

    def kept(keys: list[list[str]], upto: int) -> float:
        return sum(size[k] for k in {k for ks in keys[:upto] for k in ks})

    n = len(layers)
    # forward of step i: what steps < i keep, the step's input, its transients
    xp_peak, xp_at = max(
        [(kept(xp_keys, i) + size[f"act{i}"] * (f"act{i}" not in {k for ks in xp_keys[:i] for k in ks}) + xp_fwd[i], f"forward of step {i + 1} ({layers[i]['kind']})") for i in range(n)]
        + [(kept(xp_keys, n) + xp_bwd[i], f"backward of step {i + 1} ({layers[i]['kind']})") for i in range(n)]
    )
    t_peak = max(
        [kept(t_keys, i) + size[f"act{i}"] * (f"act{i}" not in {k for ks in t_keys[:i] for k in ks}) + t_fwd[i] for i in range(n)]
        + [kept(t_keys, i + 1) + t_bwd[i] for i in range(n)]
    )
    return {
        "model": model, "batch": batch, "xp_saved": kept(xp_keys, n), "xp_peak": xp_peak, "xp_at": xp_at,
        "torch_saved": kept(t_keys, n), "torch_peak": t_peak,
    }


def memory_table(models: list[str], batches: list[int], col_bytes: float) -> str:
    lines = [
        f"## Peak activation memory of a float32 training step, on paper (im2col slices of at most {col_bytes / 2**20:g} MiB)",
        "",
        "| model | batch | xpconv kept MB | xpconv peak MB | where | torch saved MB | torch peak MB | xpconv/torch peak | peak without slices MB |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for m in models:
        for b in batches:
            r = memory(m, b, col_bytes)
            whole = memory(m, b, float("inf"))
            lines.append(
                f"| {m} | {b} | {r['xp_saved'] / 1e6:.1f} | {r['xp_peak'] / 1e6:.1f} | {r['xp_at']} | "
                f"{r['torch_saved'] / 1e6:.1f} | {r['torch_peak'] / 1e6:.1f} | {r['xp_peak'] / r['torch_peak']:.2f}x | "
                f"{whole['xp_peak'] / 1e6:.1f} |"
            )
    return "\n".join(lines)


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
    p.add_argument("--memory-batches", default="100,1000", help="batches of the peak-memory table (default 100,1000)")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",")]
    for m in models:
        print(report(m, args.batch, args.tflops, args.tbps, args.epoch))
        print()
    from xpconv.kernels import COL_BYTES, COL_BYTES_MAX

    batches = [int(b) for b in args.memory_batches.split(",")]
    print(f"im2col slices of {COL_BYTES >> 20} MiB (the floor: a device with less than {COL_BYTES >> 14} MiB free):\n")
    print(memory_table(models, batches, COL_BYTES))
    print(f"\nim2col slices of {COL_BYTES_MAX >> 20} MiB (any device with 8 GiB free or more, e.g. an H100):\n")
    print(memory_table(models, batches, COL_BYTES_MAX))
    return 0


if __name__ == "__main__":
    sys.exit(main())
