"""The comparison harness: training and inference throughput, side by side.

    python -m benchmarks                          # CPU: xpconv (NumPy) | PyTorch | textbook
    python -m benchmarks --models simple --batch-sizes 100 --repeats 7 --json out.json
    python -m benchmarks --scaling                # batch 1, 10, 100, 1000: samples/s, peak memory
    python -m benchmarks --device cuda            # xpconv on CuPy | PyTorch on CUDA

For each model (the book's SimpleConvNet and DeepConvNet on MNIST-shaped float32
data, 1x28x28, 10 classes) and batch size, every implementation runs

* a **training step**: forward, backward, Adam update (lr 0.001), and
* an **inference** pass (no gradients; dropout off),

and reports samples/s (median over ``--repeats`` repeats, each repeat at least
``--min-time`` seconds of back-to-back steps) and the step's peak memory.  The
implementations are timed in turns, repeat by repeat (the order rotating), so that
load from elsewhere on the machine falls on all of them alike; ratios are computed
pair by pair from the same run, with the range of the per-repeat ratios as the noise.

Implementations:

``xpconv``   xpconv's model on NumPy (CPU) or CuPy (``--device cuda``), xpconv.optim.Adam.
``torch``    the same architecture in torch.nn, built by ``xpconv.interop.to_torch``
             from xpconv's model with its initial weights (so the same initialisation scale), trained
             with torch.optim.Adam (eps 1e-7 as xpconv's); only when torch is installed.
``textbook`` a NumPy implementation written the way the textbook does it: a Python
             loop over filter taps filling a float64 ``np.zeros`` scratch array (im2col
             / col2im), float64 weights, fresh arrays every step (CPU only).

Peak memory: on the CPU, the growth of the process's resident set over its level
just before a step (``/proc/self/clear_refs`` resets the kernel's high-water mark,
``malloc_trim`` hands freed heap back first); on CUDA, torch's
``max_memory_allocated`` and, for CuPy, the most bytes its memory pool had handed out
at once (a memory hook, :class:`CupyPeak`: cached free blocks are not counted, as torch
does not count its cache), both above the level at the step's start.
Where neither works the column says ``-``.

``--json PATH`` writes every number (and the machine, settings and the targets of
the CPU speed goal) as JSON; ``python -m benchmarks`` writes it to benchmarks/results/
by default.  The machine is recorded by :mod:`benchmarks.machine` (from
:mod:`xpconv.info`); the textbook network lives in :mod:`benchmarks.textbook`.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib.util
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from . import machine
from .textbook import TextbookNet

__all__ = ["IMPLS", "MODELS", "format_table", "run_epochs", "run_suite", "write_json"]

MODELS = ("simple", "deep")
INPUT_DIM = (1, 28, 28)
NUM_CLASSES = 10
SUITE_BATCHES = (100, 1000)
SCALING_BATCHES = (1, 10, 100, 1000)
SCHEMA = 1

# the CPU goal (issue "speed on the CPU"): xpconv/torch >= these ratios, >= 8x textbook,
# 20 epochs of 60,000 SimpleConvNet samples in <= 4 minutes
TRAIN_VS_TORCH = {"simple": 1.0, "deep": 0.7}
INFER_VS_TORCH = {"simple": 1.0, "deep": 0.7}
VS_TEXTBOOK = 8.0
EPOCHS, EPOCH_SAMPLES, EPOCH_MINUTES = 20, 60_000, 4.0


# =========================================================================== clocks


class _CpuClock:
    def start(self):
        self._t = time.perf_counter()

    def stop(self) -> float:
        return time.perf_counter() - self._t


class _TorchCudaClock:
    def __init__(self, torch):
        self.torch = torch

    def start(self):
        self.torch.cuda.synchronize()
        self._a = self.torch.cuda.Event(enable_timing=True)
        self._b = self.torch.cuda.Event(enable_timing=True)
        self._a.record()

    def stop(self) -> float:
        self._b.record()
        self._b.synchronize()
        return self._a.elapsed_time(self._b) / 1000.0


class _CupyClock:
    def __init__(self, cupy):
        self.cupy = cupy

    def start(self):
        self.cupy.cuda.get_current_stream().synchronize()
        self._a = self.cupy.cuda.Event()
        self._b = self.cupy.cuda.Event()
        self._a.record()

    def stop(self) -> float:
        self._b.record()
        self._b.synchronize()
        return self.cupy.cuda.get_elapsed_time(self._a, self._b) / 1000.0


# =========================================================================== data


def _data(batch: int, seed: int = 0):
    """MNIST-shaped float32 inputs in [0, 1) and integer labels, on the host."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.random((batch,) + INPUT_DIM, dtype=np.float32)
    t = rng.integers(0, NUM_CLASSES, size=batch)
    return x, t


def _xpconv_model(model: str, xp: str):
    from xpconv.models import build_model

    return build_model(model, xp=xp, dtype="float32", seed=0)


# =========================================================================== cases


class _Case:
    """One implementation of one model at one batch size, ready to step.

    ``step(mode)`` returns a no-argument callable running one training step or one
    inference pass over the batch; ``clock`` times a run of them; ``peak(fn)`` is
    fn's peak memory in bytes (or None)."""

    impl = "?"
    label = "?"

    def step(self, mode: str) -> Callable[[], Any]:
        raise NotImplementedError

    def peak(self, fn) -> int | None:
        fn()
        return None

    def close(self) -> None:
        pass


class _XpconvCase(_Case):
    impl = "xpconv"

    def __init__(self, model, batch, device, host_mem):
        from xpconv.backend import asarray_in, get_namespace
        from xpconv.optim import Adam

        self.ns_name = "cupy" if device == "cuda" else "numpy"
        self.label = f"xpconv ({self.ns_name})"
        xp = get_namespace(self.ns_name)
        self.net = _xpconv_model(model, self.ns_name)
        self.net.eval_batch_size = max(self.net.eval_batch_size, batch)  # one pass over the batch
        xh, th = _data(batch)
        self.x = asarray_in(xh, xp)
        self.t = asarray_in(th, xp)
        self.opt = Adam(lr=0.001)
        self.host_mem = host_mem
        if device == "cuda":
            import cupy

            self.cupy = cupy
            self.clock = _CupyClock(cupy)
        else:
            self.cupy = None
            self.clock = _CpuClock()

    def step(self, mode):
        net, opt, x, t = self.net, self.opt, self.x, self.t
        if mode == "train":

            def train():
                opt.update(net.params, net.gradient(x, t))

            return train
        return lambda: net.predict(x)

    def peak(self, fn):
        if self.cupy is None:
            return self.host_mem.peak(fn)
        return CupyPeak(self.cupy).measure(fn)


class CupyPeak:
    """Peak bytes in use from CuPy's memory pool while a function runs, above the level
    at its start: a ``cupy.cuda.memory_hook.MemoryHook`` adds each allocation's size and
    subtracts each free (the pool's cached free blocks are not counted, as torch's
    ``max_memory_allocated`` does not count its cache)."""

    def __init__(self, cupy):
        from cupy.cuda import memory_hook

        outer = self

        class Hook(memory_hook.MemoryHook):
            name = "xpconv-peak"

            def malloc_postprocess(self, **kw):
                outer.used += kw["mem_size"]
                outer.peak = max(outer.peak, outer.used)

            def free_postprocess(self, **kw):
                outer.used -= kw["mem_size"]

        self.cupy, self.Hook = cupy, Hook
        self.used = self.peak = 0

    def measure(self, fn) -> int:
        self.cupy.cuda.get_current_stream().synchronize()
        self.used = self.peak = 0
        with self.Hook():
            fn()
            self.cupy.cuda.get_current_stream().synchronize()
        return self.peak


class _TorchCase(_Case):
    impl = "torch"

    def __init__(self, model, batch, device, host_mem):
        import torch

        from xpconv.interop import to_torch

        self.torch = torch
        self.dev = "cuda" if device == "cuda" else "cpu"
        self.label = f"torch ({self.dev})"
        # nn.Dropout as a PyTorch user writes it (scaled at training time): the same cost per step
        self.module = to_torch(_xpconv_model(model, "numpy"), device=self.dev, dtype=torch.float32, dropout="inverted")
        xh, th = _data(batch)
        self.x = torch.from_numpy(xh).to(self.dev)
        self.t = torch.from_numpy(th).to(self.dev)
        self.opt = torch.optim.Adam(self.module.parameters(), lr=0.001, eps=1e-7)
        self.host_mem = host_mem
        self.clock = _TorchCudaClock(torch) if self.dev == "cuda" else _CpuClock()
        if self.dev == "cuda":
            # float32 against float32: cuDNN may use TF32 by default, CuPy's cuBLAS does not
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False

    def step(self, mode):
        torch, module, opt, x, t = self.torch, self.module, self.opt, self.x, self.t
        F = torch.nn.functional
        if mode == "train":

            def train():
                module.train()
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(module(x), t).backward()
                opt.step()

            return train

        def infer():
            module.eval()
            with torch.inference_mode():
                return module(x)

        return infer

    def peak(self, fn):
        if self.dev != "cuda":
            return self.host_mem.peak(fn)
        torch = self.torch
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - base)


class _TextbookCase(_Case):
    impl = "textbook"
    label = "textbook (numpy, float64 loops)"

    def __init__(self, model, batch, device, host_mem):
        import numpy as np

        self.net = TextbookNet(_xpconv_model(model, "numpy"), np)
        self.x, self.t = _data(batch)
        self.clock = _CpuClock()
        self.host_mem = host_mem

    def step(self, mode):
        net, x, t = self.net, self.x, self.t
        if mode == "train":
            return lambda: net.train_step(x, t)
        return lambda: net.predict(x, False)

    def peak(self, fn):
        return self.host_mem.peak(fn)


IMPLS = {"xpconv": _XpconvCase, "torch": _TorchCase, "textbook": _TextbookCase}


# =========================================================================== measuring


def _calibrate(case: _Case, fn, min_time: float) -> int:
    """Steps per repeat so that one repeat lasts about ``min_time`` seconds."""
    case.clock.start()
    fn()
    dt = max(case.clock.stop(), 1e-6)
    return max(1, math.ceil(min_time / dt))


def _measure_cell(cases: dict[str, _Case], mode: str, batch: int, repeats: int, min_time: float, log) -> dict[str, dict]:
    """Time ``mode`` for every case in turns; returns impl -> record."""
    fns, steps, peaks, runs = {}, {}, {}, {}
    for impl, case in cases.items():
        fn = case.step(mode)
        fn()  # first call: one-time set-up (kernel compilation and imports, optimizer slots) stays out of the memory
        t0 = time.perf_counter()
        peaks[impl] = case.peak(fn)  # second call: warm, the memory of a step
        first = time.perf_counter() - t0
        # second call: calibration (skipped for steps slower than a repeat anyway)
        steps[impl] = 1 if first >= 2 * min_time > 0 else _calibrate(case, fn, min_time)
        fns[impl] = fn
        runs[impl] = []
    order = list(cases)
    for r in range(repeats):
        rot = order[r % len(order) :] + order[: r % len(order)]
        for impl in rot:
            case, fn, k = cases[impl], fns[impl], steps[impl]
            case.clock.start()
            for _ in range(k):
                fn()
            dt = case.clock.stop()
            runs[impl].append(batch * k / dt)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    out = {}
    for impl in order:
        med = statistics.median(runs[impl])
        out[impl] = {
            "impl": impl,
            "label": cases[impl].label,
            "samples_per_s": med,
            "runs": runs[impl],
            "spread": (max(runs[impl]) - min(runs[impl])) / med if med else None,
            "steps_per_repeat": steps[impl],
            "peak_mem_bytes": peaks[impl],
            "loadavg_1min": load,  # other work on the machine while this cell ran
        }
        log(f"  {mode:5s} {impl:9s} {med:12,.0f} samples/s  (runs {', '.join(f'{v:,.0f}' for v in runs[impl])})")
    return out


def _pair_ratios(records: dict[str, dict], model, batch, mode) -> list[dict]:
    impls = list(records)
    out = []
    for i, a in enumerate(impls):
        for b in impls[i + 1 :]:
            ra, rb = records[a]["runs"], records[b]["runs"]
            per = [x / y for x, y in zip(ra, rb) if y > 0]
            out.append(
                {
                    "model": model,
                    "batch": batch,
                    "mode": mode,
                    "a": a,
                    "b": b,
                    "ratio": records[a]["samples_per_s"] / records[b]["samples_per_s"],
                    "per_repeat_min": min(per) if per else None,
                    "per_repeat_max": max(per) if per else None,
                }
            )
    return out



# =========================================================================== the suite


def _available_impls(device: str, wanted: list[str], log) -> list[str]:
    impls = []
    for impl in wanted:
        if impl == "torch" and importlib.util.find_spec("torch") is None:
            log("torch is not installed: the torch column is left out (pip install torch)")
            continue
        if impl == "torch" and device == "cuda":
            import torch

            if not torch.cuda.is_available():
                log("torch has no CUDA device: the torch column is left out")
                continue
        if impl == "textbook" and device == "cuda":
            log("the textbook baseline runs on the CPU only: left out with --device cuda")
            continue
        impls.append(impl)
    return impls


def run_suite(
    *,
    device: str = "cpu",
    models=MODELS,
    batch_sizes=SUITE_BATCHES,
    impls=("xpconv", "torch", "textbook"),
    repeats: int = 5,
    min_time: float = 0.5,
    threads: int | None = None,
    modes=("train", "infer"),
    scaling: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the benchmark; returns the JSON-ready result dict."""
    if device == "cuda":
        from xpconv.backend import cuda_status

        ok, why = cuda_status()
        if not ok:
            raise RuntimeError(f"--device cuda: no usable CUDA device for xpconv ({why})")
    impls = _available_impls(device, list(impls), log)
    if not impls:
        raise RuntimeError("no implementation left to benchmark")
    host_mem = machine.HostMemory()
    result: dict[str, Any] = {
        "benchmark": "xpconv bench",
        "schema": SCHEMA,
        "kind": "scaling" if scaling else "suite",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "device": device,
            "models": list(models),
            "batch_sizes": [int(b) for b in batch_sizes],
            "impls": impls,
            "modes": list(modes),
            "repeats": int(repeats),
            "min_time_s": float(min_time),
            "threads": threads,
            "dtype": "float32",
            "input_dim": list(INPUT_DIM),
            "optimizer": "Adam(lr=0.001)",
            "memory": "resident-set growth during one step (Linux /proc)" if device == "cpu" else "device allocator peak",
        },
        "results": [],
        "ratios": [],
    }
    with machine.thread_limit(threads):
        result["machine"] = machine.report(device, threads)
        if not host_mem.works and device == "cpu":
            log("peak memory: /proc/self/clear_refs is not available here; memory columns stay empty")
        for model in models:
            for batch in batch_sizes:
                log(f"{model} batch {batch}")
                cases = {impl: IMPLS[impl](model, int(batch), device, host_mem) for impl in impls}
                try:
                    for mode in modes:
                        recs = _measure_cell(cases, mode, int(batch), repeats, min_time, log)
                        for impl, rec in recs.items():
                            result["results"].append({"model": model, "batch": int(batch), "mode": mode, **rec})
                        result["ratios"] += _pair_ratios(recs, model, int(batch), mode)
                finally:
                    for c in cases.values():
                        c.close()
                    del cases
                    gc.collect()
    try:
        result["machine"]["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    if device == "cpu" and not scaling:
        result["targets"] = check_targets(result)
    return result


def run_epochs(epochs: int = EPOCHS, samples: int = EPOCH_SAMPLES, test_samples: int = 10_000,
               batch: int = 100, model: str = "simple", device: str = "cpu", log=print) -> dict:
    """Time a whole training run: xpconv.training.Trainer, ``epochs`` epochs over
    ``samples`` MNIST-shaped synthetic samples in batches of ``batch`` with Adam
    (lr 0.001), scoring train and test accuracy after each epoch as the book's
    Trainer does (on up to 1,000 samples each)."""
    from xpconv.training import Trainer

    x, t = _data(samples, seed=1)
    xt, tt = _data(test_samples, seed=2)
    net = build_model_for_run(model, device)
    trainer = Trainer(net, x, t, xt, tt, epochs=epochs, mini_batch_size=batch, optimizer="Adam",
                      optimizer_param={"lr": 0.001}, evaluate_sample_num_per_epoch=1000,
                      verbose=False)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    trained = epochs * (samples // batch) * batch
    out = {"model": model, "device": device, "epochs": epochs, "samples_per_epoch": samples, "batch": batch,
           "seconds": seconds, "minutes": seconds / 60.0, "train_samples_per_s": trained / seconds,
           "data": "synthetic uniform [0, 1) images, random labels", "includes": "per-epoch accuracy on 1,000 train + 1,000 test samples"}
    log(f"{epochs} epochs x {samples:,} samples ({model}, batch {batch}): {seconds:.1f} s = {seconds / 60:.2f} min")
    return out


def build_model_for_run(model: str, device: str):
    return _xpconv_model(model, "cupy" if device == "cuda" else "numpy")


def _find(result, **key):
    for r in result["results"]:
        if all(r.get(k) == v for k, v in key.items()):
            return r
    return None


def _ratio(result, model, batch, mode, a, b):
    for r in result["ratios"]:
        if (r["model"], r["batch"], r["mode"], r["a"], r["b"]) == (model, batch, mode, a, b):
            return r
    return None


def check_targets(result) -> list[dict]:
    """The CPU goal, checked against this run (targets whose numbers the run lacks are left out)."""
    out = []

    def add(name, want, got, per=None):
        out.append({"target": name, "want": want, "got": got, "met": got >= want,
                    "per_repeat_min": per["per_repeat_min"] if per else None,
                    "per_repeat_max": per["per_repeat_max"] if per else None})

    batches = [b for b in result["settings"]["batch_sizes"] if b in SUITE_BATCHES]  # the goal's batch sizes
    for model in result["settings"]["models"]:
        for batch in batches:
            r = _ratio(result, model, batch, "train", "xpconv", "torch")
            if r and model in TRAIN_VS_TORCH:
                add(f"{model} train b{batch}: xpconv/torch", TRAIN_VS_TORCH[model], r["ratio"], r)
            if batch == 1000:
                r = _ratio(result, model, batch, "infer", "xpconv", "torch")
                if r and model in INFER_VS_TORCH:
                    add(f"{model} infer b{batch}: xpconv/torch", INFER_VS_TORCH[model], r["ratio"], r)
            for mode in result["settings"]["modes"]:
                r = _ratio(result, model, batch, mode, "xpconv", "textbook")
                if r:
                    add(f"{model} {mode} b{batch}: xpconv/textbook", VS_TEXTBOOK, r["ratio"], r)
    run = result.get("epochs_run")
    if run and run["model"] == "simple" and run["epochs"] == EPOCHS and run["samples_per_epoch"] == EPOCH_SAMPLES:
        out.append({"target": f"simple {EPOCHS} epochs x {EPOCH_SAMPLES:,} samples, timed run (minutes; lower is better)",
                    "want": EPOCH_MINUTES, "got": run["minutes"], "met": run["minutes"] <= EPOCH_MINUTES})
    rec = _find(result, model="simple", batch=100, mode="train", impl="xpconv")
    if rec:
        minutes = EPOCHS * EPOCH_SAMPLES / rec["samples_per_s"] / 60.0
        out.append({"target": f"simple {EPOCHS} epochs x {EPOCH_SAMPLES:,} samples at b100 (minutes, estimated from throughput; lower is better)",
                    "want": EPOCH_MINUTES, "got": minutes, "met": minutes <= EPOCH_MINUTES})
    return out


# =========================================================================== output


def _load(m, key):
    v = m.get(key)
    return "?" if not v else f"{v[0]:.2f}"


def _mb(b):
    return "-" if b is None else f"{b / 2**20:,.0f}"


def _fmt_rate(v):
    return "-" if v is None else f"{v:,.0f}"


def _fmt_ratio(r):
    if r is None:
        return "-"
    rng = ""
    if r.get("per_repeat_min") is not None:
        rng = f" [{r['per_repeat_min']:.2f}-{r['per_repeat_max']:.2f}]"
    return f"{r['ratio']:.2f}x{rng}"


def format_table(result: dict) -> str:
    """The results as a Markdown table (one row per model, batch and mode)."""
    s = result["settings"]
    impls = s["impls"]
    m = result.get("machine", {})
    blas = m.get("blas") or []
    blas_txt = ", ".join(f"{b.get('internal_api')} {b.get('version')} x{b.get('num_threads')}" for b in blas) or "?"
    lines = [
        f"xpconv bench ({result['kind']}): device {s['device']}, float32, input {'x'.join(map(str, s['input_dim']))}, "
        f"median of {s['repeats']} repeats (>= {s['min_time_s']:g} s each), samples/s",
        f"machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores; BLAS {blas_txt}; torch {m.get('torch', '-')} "
        f"x{m.get('torch_threads', '-')}; load average {_load(m, 'loadavg_start')} -> {_load(m, 'loadavg_end')}"
        + "".join(f"; {k}={v}" for k, v in (m.get("env") or {}).items()),
        "",
    ]
    pairs = [(a, b) for i, a in enumerate(impls) for b in impls[i + 1 :]]
    head = ["model", "batch", "mode"] + [f"{i} /s" for i in impls] + [f"{a}/{b}" for a, b in pairs] + [f"peak MB {i}" for i in impls]
    if result["kind"] == "scaling":
        head += [f"KB/sample {i}" for i in impls]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" for _ in head) + "|")
    for model in s["models"]:
        for batch in s["batch_sizes"]:
            for mode in s["modes"]:
                recs = {i: _find(result, model=model, batch=batch, mode=mode, impl=i) for i in impls}
                if not any(recs.values()):
                    continue
                row = [model, str(batch), mode]
                row += [_fmt_rate(recs[i]["samples_per_s"] if recs[i] else None) for i in impls]
                row += [_fmt_ratio(_ratio(result, model, batch, mode, a, b)) for a, b in pairs]
                row += [_mb(recs[i]["peak_mem_bytes"] if recs[i] else None) for i in impls]
                if result["kind"] == "scaling":
                    row += [
                        "-" if not recs[i] or recs[i]["peak_mem_bytes"] is None else f"{recs[i]['peak_mem_bytes'] / 1024 / batch:,.0f}"
                        for i in impls
                    ]
                lines.append("| " + " | ".join(row) + " |")
    run = result.get("epochs_run")
    if run:
        lines += ["", f"Trainer run: {run['epochs']} epochs x {run['samples_per_epoch']:,} samples ({run['model']}, "
                  f"batch {run['batch']}, {run['data']}; {run['includes']}): {run['seconds']:.1f} s = "
                  f"{run['minutes']:.2f} min, {run['train_samples_per_s']:,.0f} training samples/s"]
    if result.get("targets"):
        lines += ["", "| target | want | got | met |", "|---|---|---|---|"]
        for t in result["targets"]:
            rng = ""
            if t.get("per_repeat_min") is not None:
                rng = f" [{t['per_repeat_min']:.2f}-{t['per_repeat_max']:.2f}]"
            lines.append(f"| {t['target']} | {t['want']:g} | {t['got']:.2f}{rng} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    """Atomic write: a temporary file in the same folder, fsync, then rename."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".bench-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(result, fh, indent=1)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
