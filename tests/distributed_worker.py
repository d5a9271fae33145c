"""One rank of the data-parallel tests (tests/test_distributed.py launches it with
``mpiexec -n K``, or as a plain single process for the reference).

Trains tiny SimpleConvNet and DeepConvNet (dropout) models, float32 and float64,
for --steps global steps of --batch samples with Adam, on synthetic 8x8 data;
rank 0 writes the final parameters to OUT (npz, keys "<model>_<dtype>/<param>")
plus "in_sync" (1.0 when every rank ended with bit-identical parameters).

Each rank starts from a different seed (seed + rank), so the result also proves
that rank 0's initial parameters are broadcast.  --save-at S CKPT writes a
checkpoint (parameters, optimizer state, step) after global step S; --resume CKPT
continues from one, on however many ranks this run has.  --fail-rank/--fail-step/
--fail-mode inject a fault (raise, exit: os._exit(3), kill: SIGKILL).  --device cuda
trains CuPy models, one GPU per rank, reduced with NCCL (or --backend mpi: staged
through the host); --xp torch trains torch CPU models (reduced through NumPy buffers).
"""

from __future__ import annotations

import argparse
import os
import signal

import numpy as np

from xpconv import distributed
from xpconv.backend import Generator, asarray_in
from xpconv.models import DeepConvNet, SimpleConvNet
from xpconv.optim import Adam

N_SAMPLES = 48
CONFIGS = [("simple", "float32"), ("simple", "float64"), ("deep", "float32"), ("deep", "float64")]


def build(kind: str, dtype: str, seed: int, xp: str = "numpy"):
    if kind == "simple":
        return SimpleConvNet((1, 8, 8), {"filter_num": 4, "filter_size": 3}, hidden_size=16, output_size=4,
                             weight_init_std=0.3, xp=xp, dtype=dtype, seed=seed)
    convs = [{"filter_num": 4, "filter_size": 3, "pad": p, "stride": 1} for p in (1, 1, 1, 2, 1, 1)]
    return DeepConvNet((1, 8, 8), conv_params=convs, hidden_size=12, output_size=4, dropout_ratio=0.3,
                       xp=xp, dtype=dtype, seed=seed)


def data():
    g = Generator(123)
    x = g.normal((N_SAMPLES, 1, 8, 8), xp="numpy", dtype="float64")
    t = g.integers(0, 4, size=N_SAMPLES)
    return x, t


def save_checkpoint(path, nets, opts, step):
    arrays = {"step": np.asarray(step)}
    for name, net in nets.items():
        for k, v in net.state_arrays().items():
            arrays[f"{name}/{k}"] = v
        state = opts[name].state_dict()
        arrays[f"{name}/opt.iter"] = np.asarray(state["iter"])
        for slot, values in state["slots"].items():
            for k, v in values.items():
                arrays[f"{name}/opt.{slot}.{k}"] = np.asarray(v)
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_checkpoint(path, nets, opts):
    with np.load(path, allow_pickle=False) as z:
        for name, net in nets.items():
            net.load_params({k.split("/", 1)[1]: z[k] for k in z.files if k.startswith(name + "/") and "/opt." not in k})
            slots = {}
            for k in z.files:
                if k.startswith(name + "/opt.") and k != f"{name}/opt.iter":
                    _, slot, param = k.split("/", 1)[1].split(".", 2)
                    slots.setdefault(slot, {})[param] = np.array(z[k])
            opts[name].load_state_dict({"type": "Adam", "iter": int(z[f"{name}/opt.iter"]), "slots": slots})
        return int(z["step"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-at", nargs=2, metavar=("STEP", "CKPT"))
    ap.add_argument("--resume")
    ap.add_argument("--fail-rank", type=int, default=-1)
    ap.add_argument("--fail-step", type=int, default=0)
    ap.add_argument("--fail-mode", choices=["raise", "exit", "kill"], default="raise")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--backend", choices=["auto", "mpi", "nccl"], default="auto")
    ap.add_argument("--xp", choices=["numpy", "torch", "array_api_strict"], help="CPU models of this namespace (default: numpy)")
    args = ap.parse_args()

    comm = distributed.setup(device=args.device, backend=args.backend)
    x, t = data()
    xp = "cupy" if comm.device == "cuda" else (args.xp or "numpy")
    nets = {f"{k}_{d}": build(k, d, args.seed + comm.rank, xp) for k, d in CONFIGS}
    # the data in each model's namespace (host NumPy arrays stay as they are)
    on = {name: (x, t) if xp == "numpy" else (asarray_in(x, net.xp, dtype=net.dtype), asarray_in(t, net.xp))
          for name, net in nets.items()}
    opts = {name: distributed.DistributedOptimizer(Adam(lr=0.01), comm) for name in nets}
    step = 0
    if args.resume:
        step = load_checkpoint(args.resume, nets, opts)
    for net in nets.values():
        comm.broadcast_params(net.params)

    steps_per_epoch = N_SAMPLES // args.batch
    while step < args.steps:
        epoch, skip = divmod(step, steps_per_epoch)
        for i, idx in enumerate(distributed.global_batches(N_SAMPLES, args.batch, seed=args.seed, epoch=epoch)):
            if i < skip:
                continue
            if comm.rank == args.fail_rank and step == args.fail_step:
                if args.fail_mode == "raise":
                    raise RuntimeError(f"injected failure at step {step}")
                if args.fail_mode == "exit":
                    os._exit(3)
                os.kill(os.getpid(), signal.SIGKILL)
            idx = comm.shard(idx)
            if xp != "numpy":
                idx = asarray_in(idx, next(iter(nets.values())).xp)
            for name, net in nets.items():
                comm.seed_dropout(net, args.seed, step)
                xn, tn = on[name]
                grads = net.gradient(xn[idx], tn[idx])
                opts[name].update(net.params, grads)
            step += 1
            if args.save_at and step == int(args.save_at[0]) and comm.is_root:
                save_checkpoint(args.save_at[1], nets, opts, step)
            if step == args.steps:
                break

    in_sync = all(comm.params_in_sync(net.params) for net in nets.values())
    acc = {name: comm.evaluate(net, *on[name], batch_size=7) for name, net in nets.items()}
    if comm.is_root:
        out = {f"{name}/{k}": v for name, net in nets.items() for k, v in net.state_arrays().items()}
        out.update({f"{name}/accuracy": np.asarray(a) for name, a in acc.items()})
        out["in_sync"] = np.asarray(float(in_sync))
        out["size"] = np.asarray(comm.size)
        out["backend"] = np.asarray(comm.backend)
        np.savez(args.out, **out)


if __name__ == "__main__":
    main()
