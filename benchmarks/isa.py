"""The suite on instruction sets the machine has and ones it stands in for, side by side.

    python -m benchmarks.isa                                   # every cell, both models, batch 100 and 1000
    python -m benchmarks.isa --cells host,avx2 --models deep --batch-sizes 100 --repeats 5

Each cell runs ``python -m benchmarks`` (xpconv and PyTorch interleaved repeat by repeat,
ratios pair by pair) in a fresh process with the compile targets forced:

* Numba's through ``NUMBA_CPU_NAME`` and ``NUMBA_CPU_FEATURES`` (the feature string names
  the vector features, so the CPU name's own set is what LLVM compiles for; xpconv's kernels
  then choose their register blocks and vector width for that target, as on such a machine);
* PyTorch's through ``ATEN_CPU_CAPABILITY`` (its own kernels' dispatch level: ``avx2``,
  ``avx512``) and ``ONEDNN_MAX_CPU_ISA`` (oneDNN's, which runs its convolutions: ``AVX2``,
  ``AVX512_CORE``, ``AVX512_CORE_VNNI``).

A cell can only stand in for an instruction set the host can execute (an AVX-512 host runs
every cell; an AVX2 host only ``host`` and ``avx2``); the clock, caches and core stay the host's.
The machine's peak is measured here too: the best sgemm GFLOP/s (NumPy's BLAS and PyTorch,
2048 x 2048 float32) on one core and on all, and every cell's training rate is given as
GFLOP/s (the convolutions' and affine layers' multiply-adds x 2: forward, dW, and dx for
every layer but the first) and as a fraction of the peak of the cores used.

The result (every cell's JSON, the peaks, the load) goes to benchmarks/results/cpu-isa.json;
the table printed is the one in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .harness import write_json

RESULTS = Path(__file__).resolve().parent / "results"

_AVX2 = "+avx,+avx2,+fma,+f16c,+bmi,+bmi2,-avx512f"
_SKX = _AVX2.replace(",-avx512f", "") + ",+avx512f,+avx512bw,+avx512dq,+avx512vl,+avx512cd"
#: cell -> (what it stands for, environment set for its process)
CELLS: dict[str, tuple[str, dict[str, str]]] = {
    "host": ("the host's own targets (LLVM's host CPU, PyTorch's best level)", {}),
    "avx2": ("AVX2 + FMA only (Numba: haswell; PyTorch: avx2)",
             {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": _AVX2, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}),
    "skylake-avx512": ("AVX-512 F/BW/DQ/VL (Numba: skylake-avx512; PyTorch: avx512)",
                       {"NUMBA_CPU_NAME": "skylake-avx512", "NUMBA_CPU_FEATURES": _SKX, "ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}),
    "icelake-server": ("AVX-512 + VBMI/VNNI (Numba: icelake-server; PyTorch: avx512)",
                       {"NUMBA_CPU_NAME": "icelake-server", "NUMBA_CPU_FEATURES": _SKX + ",+avx512vbmi,+avx512vnni",
                        "ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}),
    # the same AVX-512 targets with Numba's target as Numba sets it (LLVM's 256-bit preference kept)
    "skylake-avx512-numba": ("skylake-avx512 with XPCONV_NUMBA_TARGET=numba (LLVM prefers 256-bit vectors)",
                             {"NUMBA_CPU_NAME": "skylake-avx512", "NUMBA_CPU_FEATURES": _SKX, "ATEN_CPU_CAPABILITY": "avx512",
                              "ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "XPCONV_NUMBA_TARGET": "numba"}),
    "nonumba": ("the NumPy kernels (XPCONV_NUMBA=0: where no Numba wheel exists)", {"XPCONV_NUMBA": "0"}),
}
DEFAULT_CELLS = ("host", "avx2", "skylake-avx512", "icelake-server")


def sgemm_peak(n: int = 2048, seconds: float = 1.0) -> dict[str, float]:
    """The best float32 matrix-product rate, GFLOP/s, of NumPy's BLAS and of PyTorch, on one
    thread and on all (``os.cpu_count()``)."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.T.copy()

    def best(fn) -> float:
        fn()
        t_end, rate = time.perf_counter() + seconds, 0.0
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            fn()
            rate = max(rate, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
        return rate

    out = {}
    for threads, key in ((1, "1 core"), (os.cpu_count() or 1, "all cores")):
        with threadpool_limits(limits=threads, user_api="blas"):
            rate = best(lambda: a @ b)
        try:
            import torch

            old = torch.get_num_threads()
            torch.set_num_threads(threads)
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            rate = max(rate, best(lambda ta=ta, tb=tb: ta @ tb))
            torch.set_num_threads(old)
        except ImportError:
            pass
        out[key] = rate
    return out


def train_flops(model: str) -> float:
    """Floating-point operations of one training sample: 2 x the multiply-adds of every
    convolution and affine layer, x 3 (forward, dW, dx) less the first layer's dx."""
    import torch

    from xpconv.interop import to_torch

    from .harness import INPUT_DIM, _xpconv_model

    net = to_torch(_xpconv_model(model, "numpy"))
    macs: list[float] = []

    def hook(mod, inp, out):
        if isinstance(mod, torch.nn.Conv2d):
            macs.append(out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1])
        else:
            macs.append(out.numel() * mod.in_features)

    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
            m.register_forward_hook(hook)
    with torch.no_grad():
        net(torch.zeros((1, *INPUT_DIM)))
    return 2 * (3 * sum(macs) - macs[0])


def run_cell(cell: str, args, log) -> dict[str, Any]:
    env = dict(os.environ, **CELLS[cell][1])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cell.json"
        cmd = [sys.executable, "-m", "benchmarks", "--models", ",".join(args.models), "--batch-sizes", ",".join(map(str, args.batch_sizes)),
               "--impls", "xpconv,torch", "--modes", ",".join(args.modes), "--repeats", str(args.repeats), "--min-time", str(args.min_time),
               "--json", str(out)] + ([] if args.threads is None else ["--threads", str(args.threads)])
        log(f"[{cell}] {' '.join(f'{k}={v}' for k, v in CELLS[cell][1].items())} {' '.join(cmd[1:])}")
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        result = json.loads(out.read_text())
    result["cell"], result["cell_env"], result["cell_seconds"] = cell, CELLS[cell][1], round(time.perf_counter() - t0, 1)
    return result


def table(result: dict[str, Any]) -> str:
    """The markdown table: one row per (model, batch, mode, cell); "of peak" is the training
    rate over the sgemm peak of the cores used (one core with ``--threads 1``, else all)."""
    peak = result["sgemm_gflops"]
    rows = ["| model | batch | mode | cell | xpconv samples/s | torch samples/s | ratio (per-repeat range) | xpconv GFLOP/s | of peak | load |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    flat = []
    for cell in result["cells"]:
        for r in cell["ratios"]:
            if (r["a"], r["b"]) == ("xpconv", "torch"):
                flat.append((r["model"], r["batch"], r["mode"], cell, r))
    order = {c: i for i, c in enumerate(CELLS)}
    flat.sort(key=lambda t: (t[0], t[1], t[2], order.get(t[3]["cell"], 99)))
    for model, batch, mode, cell, r in flat:
        recs = {rec["impl"]: rec for rec in cell["results"] if (rec["model"], rec["batch"], rec["mode"]) == (model, batch, mode)}
        xs, ts = recs["xpconv"]["samples_per_s"], recs["torch"]["samples_per_s"]
        load = recs["xpconv"].get("loadavg_1min")
        gf = xs * result["train_flops_per_sample"][model] / 1e9 if (xs and mode == "train") else None
        allc = peak["1 core" if result.get("threads") == 1 else "all cores"]
        rng = f"{r['ratio']:.2f}x ({r['per_repeat_min']:.2f}-{r['per_repeat_max']:.2f})"
        rows.append(f"| {model} | {batch} | {mode} | {cell['cell']} | {xs:,.0f} | {ts:,.0f} | {rng} | "
                    f"{'-' if gf is None else f'{gf:.0f}'} | {'-' if gf is None else f'{gf / allc:.0%}'} | {'-' if load is None else f'{load:.1f}'} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.isa", description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", default=",".join(DEFAULT_CELLS), help=f"comma-separated, of {', '.join(CELLS)}")
    p.add_argument("--models", default="deep,simple")
    p.add_argument("--batch-sizes", default="100,1000")
    p.add_argument("--modes", default="train,infer")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-time", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=None, help="threads for xpconv (Numba, BLAS) and torch (default: the libraries' own)")
    p.add_argument("--json", default=str(RESULTS / "cpu-isa.json"))
    args = p.parse_args(argv)
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    bad = [c for c in cells if c not in CELLS]
    if bad:
        print(f"python -m benchmarks.isa: unknown cell(s) {bad}; expected some of {', '.join(CELLS)}", file=sys.stderr)
        return 2
    args.models = args.models.split(",")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.modes = args.modes.split(",")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    result: dict[str, Any] = {"command": " ".join(["python -m benchmarks.isa"] + list(sys.argv[1:] if argv is None else argv)),
                              "loadavg_start": list(os.getloadavg())}
    result["threads"] = args.threads
    result["sgemm_gflops"] = sgemm_peak()
    log(f"sgemm peak GFLOP/s: {result['sgemm_gflops']}")
    result["train_flops_per_sample"] = {m: train_flops(m) for m in args.models}
    result["cells"] = [run_cell(c, args, log) for c in cells]
    result["loadavg_end"] = list(os.getloadavg())
    print(table(result))
    write_json(result, args.json)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
