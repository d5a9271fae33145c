"""How often a float32 training run changes visibly when only a summation order changes.

PYTHONPATH=$PWD python benchmarks/prototypes/float32_tipping.py [SEEDS] [EPOCHS]

``xpconv train`` on the bundled digits (the CLI's SimpleConvNet recipe, float32) for each
seed, four times: Numba's dW through the full dz buffer or straight from the pool's routing
(``numba_ops.DIRECT_POOL``), each on 1 and on 2 Numba threads (a different chunking of the
dW and db sums).  Printed per seed: the largest relative difference of the final
checkpoints (weights and optimizer state, max|a - b| / max|b| per array) between 1 and 2
threads for each path, and between the paths on 1 thread.  A difference near 1e-5 is
rounding; one near 1e-2 means a ReLU or max-pool choice tipped somewhere and grew.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

RUN = "import sys; from xpconv.kernels import numba_ops; numba_ops.DIRECT_POOL = sys.argv.pop(1) == '1'; from xpconv.cli import main; sys.exit(main())"


def train(out: Path, seed: int, direct: int, threads: int, epochs: int) -> dict:
    env = {**os.environ, "NUMBA_NUM_THREADS": str(threads), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", RUN, str(direct), "train", "--device", "cpu", "--no-plots", "-q",
           "--epochs", str(epochs), "--seed", str(seed), "--out", str(out)]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return load_file(out / "last.safetensors")


def diff(a: dict, b: dict) -> float:
    keys = [k for k in b if b[k].dtype.kind == "f" and b[k].size]
    return max(float(np.max(np.abs(a[k] - b[k])) / max(float(np.max(np.abs(b[k]))), 1e-30)) for k in keys)


def main() -> None:
    seeds = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    tipped = {"full": 0, "direct": 0}
    print("seed | full dz, 1 vs 2 threads | pool-routed, 1 vs 2 threads | full vs pool-routed, 1 thread")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):
            r = {(d, t): train(Path(tmp) / f"{seed}-{d}-{t}", seed, d, t, epochs) for d in (0, 1) for t in (1, 2)}
            full, direct, across = diff(r[0, 1], r[0, 2]), diff(r[1, 1], r[1, 2]), diff(r[1, 1], r[0, 1])
            tipped["full"] += full > 1e-4
            tipped["direct"] += direct > 1e-4
            print(f"{seed} | {full:.1e} | {direct:.1e} | {across:.1e}", flush=True)
    print(f"1 vs 2 threads above 1e-4: full dz {tipped['full']} of {seeds} seeds, pool-routed {tipped['direct']} of {seeds}")


if __name__ == "__main__":
    main()
