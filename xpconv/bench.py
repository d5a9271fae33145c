"""``xpconv bench``: training and inference throughput, side by side.

    xpconv bench                                  # CPU: xpconv (NumPy) | PyTorch | textbook
    xpconv bench --models simple --batch-sizes 100 --repeats 7 --json out.json
    xpconv bench --scaling                        # batch 1, 10, 100, 1000: samples/s, peak memory
    xpconv bench --device cuda                    # xpconv on CuPy | PyTorch on CUDA

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
``torch``    the same architecture in torch.nn, built layer by layer from xpconv's
             model with its initial weights (so the same initialisation scale), trained
             with torch.optim.Adam (eps 1e-7 as xpconv's); only when torch is installed.
``textbook`` a NumPy implementation written the way the textbook does it: a Python
             loop over filter taps filling a float64 ``np.zeros`` scratch array (im2col
             / col2im), float64 weights, fresh arrays every step (CPU only).

Peak memory: on the CPU, the growth of the process's resident set over its level
just before a step (``/proc/self/clear_refs`` resets the kernel's high-water mark,
``malloc_trim`` hands freed heap back first); on CUDA, torch's
``max_memory_allocated`` and the CuPy memory pool's size after freeing its cache.
Where neither works the column says ``-``.

``--json PATH`` writes every number (and the machine, settings and the targets of
the CPU speed goal) as JSON; ``python -m benchmarks`` (in a checkout) writes it to
benchmarks/results/ by default.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

__all__ = ["main", "run_suite", "build_parser"]

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


# =========================================================================== memory


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


_LIBC: Any = None


def _malloc_trim() -> None:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


class _HostMemory:
    """Peak resident-set growth of one call (Linux), in bytes; None elsewhere."""

    def __init__(self):
        self.works = self._reset() is not None

    @staticmethod
    def _reset() -> int | None:
        gc.collect()
        _malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM to the current VmRSS
        except OSError:
            return None
        return _proc_status_kib("VmRSS")

    def peak(self, fn: Callable[[], Any]) -> int | None:
        if not self.works:
            fn()
            return None
        base = self._reset()
        fn()
        hwm = _proc_status_kib("VmHWM")
        if base is None or hwm is None:
            return None
        return max(0, hwm - base) * 1024


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
    from .models import build_model

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
        from .backend import asarray_in, get_namespace
        from .optim import Adam

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
        pool = self.cupy.get_default_memory_pool()
        self.cupy.cuda.get_current_stream().synchronize()
        pool.free_all_blocks()
        base = pool.used_bytes()
        fn()
        self.cupy.cuda.get_current_stream().synchronize()
        return max(0, pool.total_bytes() - base)  # the pool keeps what the step needed at once


def _torch_modules(net, torch, device):
    """torch.nn.Sequential with the layers of an xpconv Sequential and its weights."""
    from . import layers as L
    from .backend import to_numpy

    nn = torch.nn
    mods = []
    flat = False

    def param(a):
        return nn.Parameter(torch.from_numpy(to_numpy(a).copy()).to(device=device, dtype=torch.float32))

    for layer in net.layers:
        if isinstance(layer, L.Convolution):
            FN, C, FH, FW = (int(s) for s in layer.W.shape)
            m = nn.Conv2d(C, FN, (FH, FW), stride=layer.stride, padding=layer.pad)
            m.weight, m.bias = param(layer.W), param(layer.b)
        elif isinstance(layer, L.Pooling):
            m = nn.MaxPool2d((layer.pool_h, layer.pool_w), stride=layer.stride, padding=layer.pad)
        elif isinstance(layer, L.AvgPooling):
            m = nn.AvgPool2d((layer.pool_h, layer.pool_w), stride=layer.stride, padding=layer.pad)
        elif isinstance(layer, L.Relu):
            m = nn.ReLU()
        elif isinstance(layer, L.Dropout):
            m = nn.Dropout(layer.dropout_ratio)
        elif isinstance(layer, L.Affine):
            if not flat:
                mods.append(nn.Flatten())
                flat = True
            D, M = (int(s) for s in layer.W.shape)
            m = nn.Linear(D, M)
            m.weight, m.bias = param(to_numpy(layer.W).T), param(layer.b)
        else:
            raise ValueError(f"xpconv bench: no torch counterpart for layer {type(layer).__name__}")
        mods.append(m)
    return nn.Sequential(*mods).to(device)


class _TorchCase(_Case):
    impl = "torch"

    def __init__(self, model, batch, device, host_mem):
        import torch

        self.torch = torch
        self.dev = "cuda" if device == "cuda" else "cpu"
        self.label = f"torch ({self.dev})"
        self.module = _torch_modules(_xpconv_model(model, "numpy"), torch, self.dev)
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


# --------------------------------------------------------------------------- textbook baseline


def _tb_out(H, W, FH, FW, S, P):
    return (H + 2 * P[0] - FH) // S[0] + 1, (W + 2 * P[1] - FW) // S[1] + 1


def _tb_im2col(x, FH, FW, S, P, np):
    """The textbook im2col: a float64 zero scratch array filled tap by tap."""
    N, C, H, W = x.shape
    OH, OW = _tb_out(H, W, FH, FW, S, P)
    img = np.pad(x, [(0, 0), (0, 0), (P[0], P[0]), (P[1], P[1])], "constant")
    col = np.zeros((N, C, FH, FW, OH, OW))  # float64, as np.zeros gives by default
    for i in range(FH):
        for j in range(FW):
            col[:, :, i, j, :, :] = img[:, :, i : i + S[0] * OH : S[0], j : j + S[1] * OW : S[1]]
    return col.transpose(0, 4, 5, 1, 2, 3).reshape(N * OH * OW, -1)


def _tb_col2im(col, shape, FH, FW, S, P, np):
    N, C, H, W = shape
    OH, OW = _tb_out(H, W, FH, FW, S, P)
    col = col.reshape(N, OH, OW, C, FH, FW).transpose(0, 3, 4, 5, 1, 2)
    img = np.zeros((N, C, H + 2 * P[0] + S[0] - 1, W + 2 * P[1] + S[1] - 1))
    for i in range(FH):
        for j in range(FW):
            img[:, :, i : i + S[0] * OH : S[0], j : j + S[1] * OW : S[1]] += col[:, :, i, j, :, :]
    return img[:, :, P[0] : H + P[0], P[1] : W + P[1]]


class _TBConv:
    def __init__(self, W, b, S, P, np):
        self.W, self.b, self.S, self.P, self.np = W, b, S, P, np

    def forward(self, x, train):
        FN, C, FH, FW = self.W.shape
        N, _, H, W = x.shape
        OH, OW = _tb_out(H, W, FH, FW, self.S, self.P)
        col = _tb_im2col(x, FH, FW, self.S, self.P, self.np)
        col_W = self.W.reshape(FN, -1).T
        out = (col @ col_W + self.b).reshape(N, OH, OW, -1).transpose(0, 3, 1, 2)
        self.x_shape, self.col, self.col_W = x.shape, col, col_W
        return out

    def backward(self, dout):
        FN, C, FH, FW = self.W.shape
        dout = dout.transpose(0, 2, 3, 1).reshape(-1, FN)
        self.db = dout.sum(axis=0)
        self.dW = (self.col.T @ dout).transpose(1, 0).reshape(FN, C, FH, FW)
        dcol = dout @ self.col_W.T
        return _tb_col2im(dcol, self.x_shape, FH, FW, self.S, self.P, self.np)


class _TBPool:
    def __init__(self, ph, pw, S, P, np):
        self.ph, self.pw, self.S, self.P, self.np = ph, pw, S, P, np

    def forward(self, x, train):
        N, C, H, W = x.shape
        OH, OW = _tb_out(H, W, self.ph, self.pw, self.S, self.P)
        col = _tb_im2col(x, self.ph, self.pw, self.S, self.P, self.np).reshape(-1, self.ph * self.pw)
        self.arg_max = self.np.argmax(col, axis=1)
        self.x_shape = x.shape
        return self.np.max(col, axis=1).reshape(N, OH, OW, C).transpose(0, 3, 1, 2)

    def backward(self, dout):
        np = self.np
        dout = dout.transpose(0, 2, 3, 1)
        size = self.ph * self.pw
        dmax = np.zeros((dout.size, size))
        dmax[np.arange(self.arg_max.size), self.arg_max.flatten()] = dout.flatten()
        dcol = dmax.reshape(dout.shape + (size,)).reshape(dout.shape[0] * dout.shape[1] * dout.shape[2], -1)
        return _tb_col2im(dcol, self.x_shape, self.ph, self.pw, self.S, self.P, np)


class _TBRelu:
    def forward(self, x, train):
        self.mask = x <= 0
        out = x.copy()
        out[self.mask] = 0
        return out

    def backward(self, dout):
        dout[self.mask] = 0
        return dout


class _TBAffine:
    def __init__(self, W, b):
        self.W, self.b = W, b

    def forward(self, x, train):
        self.x_shape = x.shape
        self.x = x.reshape(x.shape[0], -1)
        return self.x @ self.W + self.b

    def backward(self, dout):
        dx = dout @ self.W.T
        self.dW = self.x.T @ dout
        self.db = dout.sum(axis=0)
        return dx.reshape(*self.x_shape)


class _TBDropout:
    def __init__(self, ratio, np):
        self.ratio, self.np = ratio, np

    def forward(self, x, train):
        if train:
            self.mask = self.np.random.rand(*x.shape) > self.ratio
            return x * self.mask
        return x * (1.0 - self.ratio)

    def backward(self, dout):
        return dout * self.mask


class _TextbookNet:
    """The model's layers rebuilt textbook-style, float64 weights."""

    def __init__(self, net, np):
        from . import layers as L
        from .backend import to_numpy

        self.np = np
        self.layers = []
        for layer in net.layers:
            if isinstance(layer, L.Convolution):
                tl = _TBConv(to_numpy(layer.W).astype(np.float64), to_numpy(layer.b).astype(np.float64), layer.stride, layer.pad, np)
            elif isinstance(layer, L.Pooling):
                tl = _TBPool(layer.pool_h, layer.pool_w, layer.stride, layer.pad, np)
            elif isinstance(layer, L.Relu):
                tl = _TBRelu()
            elif isinstance(layer, L.Affine):
                tl = _TBAffine(to_numpy(layer.W).astype(np.float64), to_numpy(layer.b).astype(np.float64))
            elif isinstance(layer, L.Dropout):
                tl = _TBDropout(layer.dropout_ratio, np)
            else:
                raise ValueError(f"xpconv bench: no textbook counterpart for layer {type(layer).__name__}")
            self.layers.append(tl)
        self.params = [(tl, a) for tl in self.layers if isinstance(tl, (_TBConv, _TBAffine)) for a in ("W", "b")]
        self.m = [np.zeros_like(getattr(tl, a)) for tl, a in self.params]
        self.v = [np.zeros_like(getattr(tl, a)) for tl, a in self.params]
        self.iter = 0

    def predict(self, x, train=False):
        for layer in self.layers:
            x = layer.forward(x, train)
        return x

    def train_step(self, x, t, lr=0.001, beta1=0.9, beta2=0.999):
        np = self.np
        y = self.predict(x, True)
        y = y - y.max(axis=1, keepdims=True)
        p = np.exp(y)
        p /= p.sum(axis=1, keepdims=True)
        N = x.shape[0]
        _loss = -np.sum(np.log(p[np.arange(N), t] + 1e-7)) / N
        dout = p.copy()
        dout[np.arange(N), t] -= 1
        dout /= N
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        self.iter += 1
        lr_t = lr * np.sqrt(1.0 - beta2**self.iter) / (1.0 - beta1**self.iter)
        for (tl, a), m, v in zip(self.params, self.m, self.v):
            g = getattr(tl, "d" + a)
            m += (1 - beta1) * (g - m)
            v += (1 - beta2) * (g**2 - v)
            getattr(tl, a)[...] -= lr_t * m / (np.sqrt(v) + 1e-7)
        return _loss


class _TextbookCase(_Case):
    impl = "textbook"
    label = "textbook (numpy, float64 loops)"

    def __init__(self, model, batch, device, host_mem):
        import numpy as np

        self.net = _TextbookNet(_xpconv_model(model, "numpy"), np)
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
        t0 = time.perf_counter()
        peaks[impl] = case.peak(fn)  # first call: warm-up, memory
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


# =========================================================================== machine


def _machine(device: str, threads: int | None) -> dict:
    import numpy as np

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "numpy": np.__version__,
        "threads_requested": threads,
        # thread and kernel settings that change the numbers
        "env": {k: os.environ[k] for k in ("XPCONV_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                          "MKL_NUM_THREADS", "OPENBLAS_CORETYPE") if k in os.environ},
    }
    try:
        info["loadavg_start"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [
            {k: lib.get(k) for k in ("internal_api", "version", "num_threads", "threading_layer", "architecture")}
            for lib in threadpool_info()
            if lib.get("user_api") == "blas"
        ]
    except ImportError:
        info["blas"] = None
    if importlib.util.find_spec("torch") is not None:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if device == "cuda" and torch.cuda.is_available():
            info["torch_cuda_device"] = torch.cuda.get_device_name()
            info["torch_tf32"] = "off (cudnn.allow_tf32 = cuda.matmul.allow_tf32 = False)"
    if device == "cuda" and importlib.util.find_spec("cupy") is not None:
        try:
            import cupy

            info["cupy"] = cupy.__version__
            props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
            name = props.get("name", b"")
            info["cuda_device"] = name.decode() if isinstance(name, bytes) else str(name)
        except Exception as exc:  # report, do not crash the benchmark
            info["cuda_device"] = f"unavailable: {exc}"
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@contextlib.contextmanager
def _threads(n: int | None):
    """BLAS threads of NumPy (threadpoolctl) and torch's intra-op threads set to n."""
    if n is None:
        yield
        return
    torch = None
    if importlib.util.find_spec("torch") is not None:
        import torch

        old = torch.get_num_threads()
        torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    try:
        if threadpool_limits is None:
            yield
        else:
            with threadpool_limits(limits=n, user_api="blas"):
                yield
    finally:
        if torch is not None:
            torch.set_num_threads(old)


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
        from .backend import cuda_status

        ok, why = cuda_status()
        if not ok:
            raise RuntimeError(f"--device cuda: no usable CUDA device for xpconv ({why})")
    impls = _available_impls(device, list(impls), log)
    if not impls:
        raise RuntimeError("no implementation left to benchmark")
    host_mem = _HostMemory()
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
    with _threads(threads):
        result["machine"] = _machine(device, threads)
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
        result["targets"] = _targets(result)
    return result


def run_epochs(epochs: int = EPOCHS, samples: int = EPOCH_SAMPLES, test_samples: int = 10_000,
               batch: int = 100, model: str = "simple", device: str = "cpu", log=print) -> dict:
    """Time a whole training run: xpconv.training.Trainer, ``epochs`` epochs over
    ``samples`` MNIST-shaped synthetic samples in batches of ``batch`` with Adam
    (lr 0.001), scoring train and test accuracy after each epoch as the book's
    Trainer does (on up to 1,000 samples each)."""
    from .training import Trainer

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


def _targets(result) -> list[dict]:
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


def _load(machine, key):
    v = machine.get(key)
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


# =========================================================================== command line


def _csv(kind):
    def parse(text):
        items = [v.strip() for v in text.replace(",", " ").split() if v.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return [kind(v) for v in items]

    return parse


def _positive_int(text):
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return v


def build_parser(prog: str = "xpconv bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Training-step and inference throughput of SimpleConvNet/DeepConvNet: "
        "xpconv, PyTorch and a textbook NumPy baseline side by side.",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: xpconv on NumPy vs torch CPU vs textbook; cuda: xpconv on CuPy vs torch CUDA")
    p.add_argument("--models", type=_csv(str), default=list(MODELS), help="comma-separated: simple,deep (default both)")
    p.add_argument("--batch-sizes", type=_csv(_positive_int), default=None,
                   help=f"comma-separated (default {','.join(map(str, SUITE_BATCHES))}; with --scaling "
                   f"{','.join(map(str, SCALING_BATCHES))})")
    p.add_argument("--impls", type=_csv(str), default=None,
                   help="comma-separated subset of xpconv,torch,textbook (default all; with --scaling xpconv,torch)")
    p.add_argument("--modes", type=_csv(str), default=["train", "infer"], help="train,infer (default both)")
    p.add_argument("--repeats", type=_positive_int, default=None, help="timed repeats per cell; the median is reported (default 5)")
    p.add_argument("--min-time", type=float, default=None, help="seconds per repeat at least (default 0.5)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="BLAS threads for NumPy and intra-op threads for torch (default: the libraries' own)")
    p.add_argument("--scaling", action="store_true", help="throughput and peak memory against batch size 1, 10, 100, 1000")
    p.add_argument("--quick", action="store_true", help="a fast smoke run: 2 repeats of >= 0.02 s (numbers are rough)")
    p.add_argument("--epochs-run", type=int, nargs="?", const=EPOCHS, default=None, metavar="E",
                   help=f"also time a whole Trainer run of SimpleConvNet: E epochs (default {EPOCHS}) over "
                   f"--epoch-samples synthetic samples, batch 100, Adam")
    p.add_argument("--epoch-samples", type=_positive_int, default=EPOCH_SAMPLES, help=f"samples per epoch of --epochs-run (default {EPOCH_SAMPLES:,})")
    p.add_argument("--json", metavar="PATH", default=None, help="write every number as JSON to PATH")
    return p


def main(argv=None, prog: str = "xpconv bench") -> int:
    args = build_parser(prog).parse_args(argv)
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        print(f"{prog}: unknown model(s) {bad}; expected some of {', '.join(MODELS)}", file=sys.stderr)
        return 2
    impls = args.impls or (["xpconv", "torch"] if args.scaling else list(IMPLS))
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        print(f"{prog}: unknown implementation(s) {bad}; expected some of {', '.join(IMPLS)}", file=sys.stderr)
        return 2
    bad = [m for m in args.modes if m not in ("train", "infer")]
    if bad:
        print(f"{prog}: unknown mode(s) {bad}; expected train and/or infer", file=sys.stderr)
        return 2
    batches = args.batch_sizes or list(SCALING_BATCHES if args.scaling else SUITE_BATCHES)
    repeats = args.repeats or (2 if args.quick else 5)
    min_time = args.min_time if args.min_time is not None else (0.02 if args.quick else 0.5)
    if min_time < 0:
        print(f"{prog}: --min-time must be >= 0, got {min_time}", file=sys.stderr)
        return 2

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    try:
        result = run_suite(device=args.device, models=args.models, batch_sizes=batches, impls=impls,
                           repeats=repeats, min_time=min_time, threads=args.threads, modes=args.modes,
                           scaling=args.scaling, log=log)
    except RuntimeError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if args.epochs_run:
        with _threads(args.threads):
            result["epochs_run"] = run_epochs(args.epochs_run, args.epoch_samples, test_samples=min(10_000, args.epoch_samples),
                                              device=args.device, log=log)
        if "targets" in result:
            result["targets"] = _targets(result)
    result["command"] = " ".join([prog] + list(sys.argv[1:] if argv is None else argv))
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
