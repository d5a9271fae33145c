"""Gradient check: backpropagation against central differences, as in the book's
ch05/gradient_check.py, for the CNNs too.

    python examples/gradient_check.py                      # NumPy
    python examples/gradient_check.py --xp torch           # any namespace xpconv knows
    python examples/gradient_check.py --model deep --probes 20

The network is built in float64 with a few small images; for every parameter array the
loss is perturbed by +-h at some positions (``--probes``, all of them with 0) and
``(L(p + h) - L(p - h)) / 2h`` is compared with ``gradient()``. The relative error
``|a - n| / (|a| + |n|)`` is about 1e-10 when backpropagation is right; the script exits
with status 1 when one exceeds 1e-6.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from xpconv.backend import get_namespace, namespace_name, to_numpy
from xpconv.gradcheck import numerical_gradient, relative_error
from xpconv.models import DeepConvNet, SimpleConvNet, TwoLayerNet

TOLERANCE = 1e-6


def build(model: str, xp):
    if model == "mlp":
        return TwoLayerNet(64, 10, 10, weight_init_std=0.3, xp=xp, dtype="float64", seed=0), (1, 8, 8)
    if model == "deep":
        return DeepConvNet(input_dim=(1, 12, 12), hidden_size=8, dropout_ratio=0.0, xp=xp, dtype="float64", seed=0), (1, 12, 12)
    return SimpleConvNet(
        input_dim=(1, 10, 10), conv_param={"filter_num": 4, "filter_size": 3, "pad": 1, "stride": 1},
        hidden_size=10, output_size=10, weight_init_std=0.3, xp=xp, dtype="float64", seed=0,
    ), (1, 10, 10)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("simple", "deep", "mlp"), default="simple", help="network to check (default: simple)")
    p.add_argument("--xp", default="numpy", help="array namespace: numpy, array_api_strict, torch, cupy (default: numpy)")
    p.add_argument("--probes", type=int, default=12, help="positions probed per parameter array; 0 = every position (default: 12)")
    p.add_argument("--batch", type=int, default=3, help="images in the batch (default: 3)")
    args = p.parse_args(argv)

    xp = get_namespace(args.xp)
    network, input_dim = build(args.model, xp)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((args.batch, *input_dim))
    t = rng.integers(0, 10, args.batch)

    grads = network.gradient(x, t)  # backpropagation

    def loss():
        return network.loss(x, t)

    print(f"{type(network).__name__} on {namespace_name(xp)}, float64, batch of {args.batch}")
    worst = 0.0
    for key, param in network.params.items():
        size = int(np.prod(tuple(param.shape)))
        positions = np.arange(size) if args.probes <= 0 else rng.choice(size, min(size, args.probes), replace=False)
        _, numeric = numerical_gradient(loss, network.params[key], positions)
        analytic = to_numpy(grads[key]).ravel()[positions]
        err = relative_error(analytic, numeric)
        worst = max(worst, err)
        print(f"  {key:>6} {str(tuple(param.shape)):>16}  {len(positions):4d} positions  relative error {err:.2e}")
    ok = worst <= TOLERANCE
    print(f"largest relative error {worst:.2e}: {'OK' if ok else 'FAILED'} (tolerance {TOLERANCE:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
