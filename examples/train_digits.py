"""Train a small CNN on the bundled UCI handwritten digits (8x8, 1,797 images) -- no
network, no GPU, a few seconds on a laptop.

    python examples/train_digits.py                 # 20 epochs, ~99% test accuracy
    python examples/train_digits.py --epochs 3 --out runs/digits --device cuda

The same as ``xpconv train`` with its defaults, written out with the library's pieces:
``load_digits`` (a fixed 80/20 split seeded with 0), ``SimpleConvNet`` with 3x3 filters
padded to keep the 8x8 size, and the book's ``Trainer`` with AdaGrad, holding out 10% of
the training images for validation (``best.safetensors`` is the best validation epoch).
"""

from __future__ import annotations

import argparse

from xpconv.datasets import load_digits
from xpconv.models import SimpleConvNet
from xpconv.training import Run, Trainer


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=20, help="epochs (default: 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the sample order (default: 0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="cpu = NumPy, cuda = CuPy (default: auto)")
    p.add_argument("--out", default=None, help="folder for checkpoints, metrics.json and the plots (default: none)")
    args = p.parse_args(argv)

    (x_train, t_train), (x_test, t_test) = load_digits(normalize=True, flatten=False)  # (N, 1, 8, 8) float32 in [0, 1]

    network = SimpleConvNet(
        input_dim=(1, 8, 8),
        conv_param={"filter_num": 30, "filter_size": 3, "pad": 1, "stride": 1},
        hidden_size=100,
        output_size=10,
        weight_init_std=0.1,
        device=args.device,
        seed=args.seed,
    )
    trainer = Trainer(
        network, x_train, t_train, x_test, t_test,
        epochs=args.epochs, mini_batch_size=50,
        optimizer="AdaGrad", optimizer_param={"lr": 0.05},
        seed=args.seed, run=Run(out_dir=args.out), val_split=0.1,
    )
    trainer.train()

    if args.out:
        from xpconv.plotting import save_run_plots

        save_run_plots(args.out, network, trainer.history, x_test, t_test,
                       train_loss_list=trainer.train_loss_list, input_dim=(1, 8, 8), title="SimpleConvNet on digits")
        print(f"checkpoints, metrics.json and plots in {args.out}")
    return trainer.test_acc_list[-1]


if __name__ == "__main__":
    main()
