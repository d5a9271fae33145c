"""First use: how long the compiled kernels take to compile, and ``xpconv train`` from a cold cache.

    python -m benchmarks.coldstart            # writes benchmarks/results/cpu-coldstart.json

Each measurement runs in a fresh process with ``NUMBA_CACHE_DIR`` pointing at an empty folder
(cold) and then again at the folder the cold run filled (warm):

* ``first_step``: a process that builds SimpleConvNet or DeepConvNet (float32, batch 100) and
  times its first training step (the kernels compile) and its second (compiled);
* ``xpconv train``: the whole command with no options (SimpleConvNet on the bundled digits),
  wall-clock from start to exit.

The load average is recorded with each number: on a shared machine they grow with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .harness import write_json

RESULTS = Path(__file__).resolve().parent / "results"

_STEP = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from benchmarks.harness import _xpconv_model, _data
from xpconv import optim
net = _xpconv_model(sys.argv[1], "numpy")
x, t = _data(100)
opt = optim.Adam(lr=0.001)
def step():
    grads = net.gradient(x, t)
    opt.update(net.params, grads)
t1 = time.perf_counter(); step(); t2 = time.perf_counter(); step(); t3 = time.perf_counter()
print(json.dumps({"import_build_s": t1 - t0, "first_step_s": t2 - t1, "second_step_s": t3 - t2}))
"""


def _run(cmd, env) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, r.stdout


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    out: dict = {"command": "python -m benchmarks.coldstart", "cpu_count": os.cpu_count(), "runs": []}
    for what in ("simple", "deep", "train"):
        with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as work:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            for state in ("cold", "warm"):
                load = os.getloadavg()[0]
                if what == "train":
                    cmd = [sys.executable, "-m", "xpconv", "train", "--no-plots", "--out", str(Path(work) / state)]
                    wall, _ = _run(cmd, env)
                    rec = {"what": "xpconv train (bundled digits)", "cache": state, "wall_s": round(wall, 2)}
                else:
                    wall, text = _run([sys.executable, "-c", _STEP, what], env)
                    rec = {"what": f"{what} first training step, batch 100", "cache": state, "wall_s": round(wall, 2),
                           **{k: round(v, 3) for k, v in json.loads(text).items()}}
                rec["loadavg_1min"] = round(load, 2)
                print(rec, flush=True)
                out["runs"].append(rec)
    write_json(out, str(RESULTS / "cpu-coldstart.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
