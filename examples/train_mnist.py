"""The book's SimpleConvNet recipe on MNIST (ch07/train_convnet.py): 30 5x5 filters,
hidden layer of 100, Adam with lr=0.001, mini-batches of 100, 20 epochs; about 99% test
accuracy on the full 60,000/10,000 set.

    python examples/train_mnist.py                              # files downloaded to the per-user cache
    python examples/train_mnist.py --data-dir ~/mnist --device cuda
    python examples/train_mnist.py --data-dir ../shared/datasets/mnist --epochs 1 --limit 2000

``--data-dir`` is any folder holding the IDX .gz files; with only the t10k pair the 10,000
test images are split 8,000 / 2,000 (with a warning). ``--epochs`` and ``--limit`` (use the
first N training images) make a quick run. The parameters are saved as
``params.safetensors`` (safe to load: no pickle), as the book saves ``params.pkl``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from xpconv.datasets import load_mnist
from xpconv.models import SimpleConvNet
from xpconv.training import Trainer


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="folder with the MNIST .gz files (default: $XPCONV_DATA_DIR/mnist or the per-user cache)")
    p.add_argument("--epochs", type=int, default=20, help="epochs (default: 20, the book's)")
    p.add_argument("--limit", type=int, default=None, help="train on the first N training images only (a quick run)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="cpu = NumPy, cuda = CuPy (default: auto)")
    p.add_argument("--no-download", action="store_true", help="never download missing files")
    p.add_argument("--out", default=".", help="folder for params.safetensors and curves.png (default: .)")
    args = p.parse_args(argv)

    # images (N, 1, 28, 28) float32 in [0, 1], labels (N,) int
    (x_train, t_train), (x_test, t_test) = load_mnist(
        flatten=False, data_dir=args.data_dir, download=not args.no_download, allow_test_split=True
    )
    if args.limit:
        x_train, t_train = x_train[: args.limit], t_train[: args.limit]

    network = SimpleConvNet(
        input_dim=(1, 28, 28),
        conv_param={"filter_num": 30, "filter_size": 5, "pad": 0, "stride": 1},
        hidden_size=100,
        output_size=10,
        weight_init_std=0.01,
        device=args.device,
        seed=0,
    )
    trainer = Trainer(
        network, x_train, t_train, x_test, t_test,
        epochs=args.epochs, mini_batch_size=100,
        optimizer="Adam", optimizer_param={"lr": 0.001},
        evaluate_sample_num_per_epoch=1000,
    )
    trainer.train()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    network.save_params(out / "params.safetensors")
    acc = network.accuracy(x_test, t_test, batch_size=500)  # the whole test set, in chunks
    print(f"test accuracy on all {len(t_test):,} test images: {acc:.4f}")
    print(f"saved {out / 'params.safetensors'}")

    from xpconv.plotting import plot_curves

    plot_curves(trainer.history, out / "curves.png", trainer.train_loss_list, title="SimpleConvNet on MNIST (book recipe)")
    print(f"learning curves in {out / 'curves.png'}")
    return acc


if __name__ == "__main__":
    main()
