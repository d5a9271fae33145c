"""One MNIST-shaped epoch on the GPU: xpconv (CuPy) against PyTorch (CUDA), same run.

    python benchmarks/gpu/epoch.py                          # SimpleConvNet, batch 1000, 3 epochs each
    python benchmarks/gpu/epoch.py --models simple,deep --batches 100,1000 --profile --json out.json

Needs a CUDA device, CuPy and (for the comparison) torch with CUDA.  The issue's
epoch target -- one 60,000-sample epoch of SimpleConvNet at batch 1000 in <= 1 s on
an H100 -- is measured here the way a user trains:

``xpconv trainer``  ``xpconv.training.Trainer`` over 60,000 random MNIST-shaped samples
                    resident on the GPU (Adam, lr 0.001; no per-epoch evaluation;
                    the loss read every 10 steps, as the Trainer does), wall time of
                    ``train_epoch`` (it ends with a host read, so the GPU is done).
``xpconv loop``     the same steps without the Trainer: a device permutation, ``take``
                    of each batch, ``gradient`` + ``Adam.update``, one sync at the end.
``torch``           the same architecture in torch.nn (Conv2d/ReLU/MaxPool2d/Linear,
                    cross-entropy, torch.optim.Adam eps 1e-7), the same loop, the loss
                    read every 10 steps; TF32 off (``allow_tf32`` False for cuDNN and
                    matmul), so both sides compute in float32.  ``torch tf32`` repeats
                    it with PyTorch's default (cuDNN convolutions in TF32) for reference.

Epoch 1 of each is a warm-up (NVRTC compiles, cuBLAS/cuDNN set-up, the memory pools
grow); the table gives the median of the rest.  ``peak MiB`` is the most GPU memory
one training step holds beyond what was allocated before it: torch's
``max_memory_allocated`` and, for CuPy, a memory hook counting the pool's
allocations in use (both "allocated", not "reserved").

``--profile`` records 5 training steps of each implementation at the largest batch
with ``torch.profiler`` (CUPTI sees CuPy's kernels too: one process, one context) and
prints the kernels by GPU time and the number of kernel launches per step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from benchmarks.harness import CupyPeak  # noqa: E402  (one definition: `python -m benchmarks` measures alike)

EPOCH_SAMPLES = 60_000
INPUT_DIM = (1, 28, 28)
CLASSES = 10
LOG_EVERY = 10


# ------------------------------------------------------------------ data


def host_data(n: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.random((n, *INPUT_DIM), dtype=np.float32), rng.integers(0, CLASSES, size=n).astype(np.int64)


# ------------------------------------------------------------------ xpconv


def xpconv_setup(model: str, batch: int, x_host, t_host, ns: str = "cupy"):
    """(net, optimizer, step(xb, tb), epoch(seed), x, t) with the data resident in ``ns``."""
    import numpy as np

    from xpconv import backend
    from xpconv.models import build_model
    from xpconv.optim import Adam

    xp = backend.get_namespace(ns)
    if ns == "cupy":
        import cupy

        sync = cupy.cuda.get_current_stream().synchronize
    else:
        sync = lambda: None  # noqa: E731
    net = build_model(model, xp=ns, dtype="float32", seed=0)
    x, t = backend.asarray_in(x_host, xp), backend.asarray_in(t_host, xp)
    opt = Adam(lr=0.001)

    def step(xb, tb):
        grads = net.gradient(xb, tb)
        opt.update(net.params, grads)
        return net.last_layer.loss

    def epoch(seed: int):
        perm = backend.asarray_in(np.random.default_rng(seed).permutation(int(x.shape[0])), xp)
        losses = []
        for i, s in enumerate(range(0, int(x.shape[0]) - batch + 1, batch), 1):
            idx = perm[s : s + batch]
            loss = step(xp.take(x, idx, axis=0), xp.take(t, idx, axis=0))
            if i % LOG_EVERY == 0:
                losses.append(float(loss))
        sync()
        return losses

    return net, opt, step, epoch, x, t


def xpconv_trainer_epochs(model: str, batch: int, epochs: int, x_host, t_host, ns: str = "cupy") -> list[float]:
    from xpconv.models import build_model
    from xpconv.training import Trainer

    net = build_model(model, xp=ns, dtype="float32", seed=0)
    tr = Trainer(net, x_host, t_host, x_host[:batch], t_host[:batch], epochs=epochs, mini_batch_size=batch,
                 optimizer="Adam", optimizer_param={"lr": 0.001}, evaluate_sample_num_per_epoch=0,
                 verbose=False, log_every=LOG_EVERY, resident=True)
    if ns == "cupy" and not tr.resident:
        raise RuntimeError("the Trainer did not keep the data on the GPU")
    return [float(tr.train_epoch(e)["seconds"]) for e in range(1, epochs + 1)]


# ------------------------------------------------------------------ torch


def torch_setup(model: str, batch: int, x_host, t_host, tf32: bool, device: str = "cuda"):
    import torch

    if device == "cuda":
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
    nn = torch.nn
    if model == "simple":
        layers = [nn.Conv2d(1, 30, 5), nn.ReLU(), nn.MaxPool2d(2, 2), nn.Flatten(), nn.Linear(30 * 12 * 12, 100), nn.ReLU(), nn.Linear(100, 10)]
    elif model == "deep":
        layers, c = [], 1
        for i, (f, p) in enumerate([(16, 1), (16, 1), (32, 1), (32, 2), (64, 1), (64, 1)]):
            layers += [nn.Conv2d(c, f, 3, padding=p), nn.ReLU()]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2, 2))
            c = f
        layers += [nn.Flatten(), nn.Linear(64 * 4 * 4, 50), nn.ReLU(), nn.Dropout(0.5), nn.Linear(50, 10), nn.Dropout(0.5)]
    else:
        raise SystemExit(f"unknown model {model!r}")
    torch.manual_seed(0)
    net = nn.Sequential(*layers).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=0.001, eps=1e-7)
    x = torch.from_numpy(x_host).to(device)
    t = torch.from_numpy(t_host).to(device)
    F = torch.nn.functional

    def step(xb, tb):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(xb), tb)
        loss.backward()
        opt.step()
        return loss.detach()

    def epoch(seed: int):
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        perm = torch.randperm(x.shape[0], device=device, generator=g)
        losses = []
        for i, s in enumerate(range(0, x.shape[0] - batch + 1, batch), 1):
            idx = perm[s : s + batch]
            loss = step(x[idx], t[idx])
            if i % LOG_EVERY == 0:
                losses.append(float(loss))
        if device == "cuda":
            torch.cuda.synchronize()
        return losses

    return net, opt, step, epoch, x, t


def torch_peak(torch, fn) -> int:
    """Most bytes torch's caching allocator had allocated during ``fn`` beyond its level before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    stats = torch.cuda.memory_stats
    before = stats()["allocated_bytes.all.current"]
    fn()
    torch.cuda.synchronize()
    return max(0, stats()["allocated_bytes.all.peak"] - before)


# ------------------------------------------------------------------ timing


def timed_epochs(epoch_fn, epochs: int) -> list[float]:
    out = []
    for e in range(1, epochs + 1):
        t0 = time.perf_counter()
        epoch_fn(e)  # ends with a synchronize (and host reads of the loss)
        out.append(time.perf_counter() - t0)
    return out


def summarise(name, model, batch, seconds, peak, samples: int = EPOCH_SAMPLES) -> dict:
    rest = seconds[1:] or seconds
    med = statistics.median(rest)
    steps = samples // batch
    return {"impl": name, "model": model, "batch": batch, "epochs": seconds, "epoch_s": med,
            "step_ms": med / steps * 1e3, "samples_per_s": steps * batch / med, "peak_bytes": peak}


def profile(label: str, step, xb, tb, torch, steps: int = 5) -> dict:
    from torch.profiler import ProfilerActivity, profile as tprofile

    for _ in range(3):
        step(xb, tb)
    torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(xb, tb)
        torch.cuda.synchronize()
    rows = []
    launches = 0
    for e in prof.key_averages():
        dev_us = getattr(e, "device_time_total", None)
        if dev_us is None:
            dev_us = getattr(e, "cuda_time_total", 0)
        is_kernel = str(getattr(e, "device_type", "")).endswith("CUDA")
        if is_kernel and dev_us > 0:
            launches += e.count
            rows.append((dev_us / steps, e.count / steps, e.key))
    rows.sort(reverse=True)
    print(f"\n### profile: {label}, per step ({steps} steps): {launches / steps:.0f} kernel launches, "
          f"{sum(r[0] for r in rows):.0f} us of kernel time")
    print("| us/step | launches/step | kernel |\n| ---: | ---: | --- |")
    for us, n, key in rows[:20]:
        print(f"| {us:.1f} | {n:g} | {key[:90]} |")
    return {"label": label, "launches_per_step": launches / steps, "kernel_us_per_step": sum(r[0] for r in rows),
            "top": [{"us_per_step": r[0], "launches_per_step": r[1], "kernel": r[2]} for r in rows[:20]]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="simple")
    p.add_argument("--batches", default="1000")
    p.add_argument("--epochs", type=int, default=3, help="epochs per implementation; the first is a warm-up (default 3)")
    p.add_argument("--samples", type=int, default=EPOCH_SAMPLES, help=f"samples per epoch (default {EPOCH_SAMPLES:,})")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: the same flow on NumPy and torch's CPU, to check this script without a GPU "
                   "(no peak memory, no profile; the numbers mean nothing)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    ns = "cupy" if cuda else "numpy"

    cupy = None
    if cuda:
        import cupy

    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None and cuda and not torch.cuda.is_available():
            torch = None
    tdev = "cuda" if cuda else "cpu"
    profiling = args.profile and cuda and torch is not None
    x_host, t_host = host_data(args.samples)
    peak = CupyPeak(cupy) if cuda else None
    results, profiles, errors = [], [], []
    models = [m.strip() for m in args.models.split(",")]
    batches = [int(b) for b in args.batches.split(",")]

    def add(impl, model, batch, seconds, peak_bytes):  # printed at once: a run cut short keeps what it got
        r = summarise(impl, model, batch, seconds, peak_bytes, args.samples)
        results.append(r)
        pk = f"{r['peak_bytes'] / 2**20:.0f} MiB" if r["peak_bytes"] is not None else "-"
        print(f"{r['model']} b{r['batch']} {r['impl']}: epochs {[round(s, 3) for s in r['epochs']]} s -> "
              f"{r['epoch_s']:.3f} s/epoch, {r['samples_per_s']:,.0f} samples/s, peak {pk}", flush=True)

    def profiled(label, step, xb, tb):
        try:
            profiles.append(profile(label, step, xb, tb, torch))
        except Exception as exc:  # a profiler that cannot read the GPU must not cost the timings
            errors.append(f"profile {label}: {type(exc).__name__}: {exc}")

    for model in models:
        for batch in batches:
            net, _opt, step, epoch, x, t = xpconv_setup(model, batch, x_host, t_host, ns)
            xb, tb = x[:batch], t[:batch]
            loop = timed_epochs(epoch, args.epochs)
            add("xpconv loop", model, batch, loop, peak.measure(lambda: step(xb, tb)) if peak else None)
            if profiling and batch == max(batches):
                profiled(f"xpconv {model} b{batch}", step, xb, tb)
            del net, step, epoch, x, t, xb, tb
            try:
                add("xpconv trainer", model, batch, xpconv_trainer_epochs(model, batch, args.epochs, x_host, t_host, ns), None)
            except Exception as exc:  # the Trainer is another issue's code: report, go on
                errors.append(f"xpconv trainer {model} b{batch}: {type(exc).__name__}: {exc}")
            if cuda:
                cupy.get_default_memory_pool().free_all_blocks()
            if torch is None:
                continue
            for tf32 in (False, True) if cuda else (False,):
                _net, _opt, step, epoch, x, t = torch_setup(model, batch, x_host, t_host, tf32, tdev)
                xb, tb = x[:batch], t[:batch]
                secs = timed_epochs(epoch, args.epochs)
                add("torch tf32" if tf32 else "torch", model, batch, secs, torch_peak(torch, lambda: step(xb, tb)) if cuda else None)
                if profiling and not tf32 and batch == max(batches):
                    profiled(f"torch {model} b{batch}", step, xb, tb)
                del _net, step, epoch, x, t, xb, tb
                if cuda:
                    torch.cuda.empty_cache()
            if cuda:  # PyTorch's defaults back
                torch.backends.cudnn.allow_tf32 = True
                torch.backends.cuda.matmul.allow_tf32 = False

    print(f"\n## one {args.samples:,}-sample epoch, median of epochs 2..N (epoch 1 warms up)\n")
    print("| model | batch | impl | epoch s | ms/step | samples/s | peak MiB | vs torch |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    ref = {(r["model"], r["batch"]): r for r in results if r["impl"] == "torch"}
    for r in results:
        t = ref.get((r["model"], r["batch"]))
        ratio = f"{r['samples_per_s'] / t['samples_per_s']:.2f}x" if t else "-"
        pk = f"{r['peak_bytes'] / 2**20:.0f}" if r["peak_bytes"] is not None else "-"
        print(f"| {r['model']} | {r['batch']} | {r['impl']} | {r['epoch_s']:.3f} | {r['step_ms']:.2f} | "
              f"{r['samples_per_s']:,.0f} | {pk} | {ratio} |")
    for e in errors:
        print(f"\nERROR {e}")
    if args.json:
        info = {"python": platform.python_version(), "device": args.device, "samples": args.samples}
        if cuda:
            info.update(cupy=cupy.__version__, gpu=cupy.cuda.runtime.getDeviceProperties(0)["name"].decode())
        if torch is not None:
            info["torch"] = torch.__version__
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": results, "profiles": profiles, "errors": errors}, f, indent=1)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
