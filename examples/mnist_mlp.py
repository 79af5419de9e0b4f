"""An MLP on real MNIST images read with pn.datasets.mnist.

By default it reads the shared MNIST test set (10,000 images) and holds out
2,000 of them; point --data at any folder with MNIST IDX files (gzip or raw,
t10k-* or, with --part train, train-*).

    python examples/mnist_mlp.py [--data ../shared/data/mnist] [--epochs 15]
"""
import argparse
import os
import time
from pathlib import Path

import jax
import numpy as np

import purenet as pn
from _common import FAST, epochs, save

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("PURENET_MNIST", str(DEFAULT)))
    parser.add_argument("--part", default="test", choices=["test", "train"])
    parser.add_argument("--epochs", type=int, default=epochs(15))
    parser.add_argument("--held-out", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="mnist_curves.png")
    args = parser.parse_args()

    try:
        x, y = pn.datasets.mnist(args.data, part=args.part)
    except FileNotFoundError as e:
        raise SystemExit(f"{e}\nDownload the MNIST IDX files and pass --data FOLDER (or set PURENET_MNIST).")
    if FAST:
        x, y = x[:3000], y[:3000]
    order = np.random.default_rng(args.seed).permutation(len(x))
    test, train = order[: args.held_out if not FAST else 500], order[args.held_out if not FAST else 500:]
    print(f"MNIST from {args.data}: {len(train)} training, {len(test)} held-out images")

    net = pn.mlp([784, 512, 256, 10], hidden="relu", dropout=0.2)
    steps = args.epochs * (len(train) // 64)
    opt = pn.optim.adam(pn.schedules.cosine_decay(1e-3, steps, alpha=0.05))
    start = time.perf_counter()
    result = pn.fit(net, opt, (x[train], y[train]), key=jax.random.key(args.seed), epochs=args.epochs,
                    batch_size=64, l2=1e-5, validation=(x[test], y[test]),
                    augment=pn.augment.random_translation((28, 28), 2), progress=not FAST)
    print(f"{args.epochs} epochs in {time.perf_counter() - start:.1f} s")
    acc = float(pn.metrics.accuracy(net, result.params, result.state, x[test], y[test]))
    print(f"held-out accuracy: {acc:.4f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(result.history["loss"], label="training"), ax1.plot(result.history["val_loss"], label="held out")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("cross-entropy"), ax1.legend()
    ax2.plot(result.history["val_accuracy"]), ax2.set_xlabel("epoch"), ax2.set_ylabel("held-out accuracy")
    fig.suptitle("purenet: 784-512-256-10 MLP on real MNIST images")
    save(fig, args.out)
    if not FAST and acc < 0.96:
        raise SystemExit(f"held-out accuracy {acc:.4f} is below the 0.96 target")


if __name__ == "__main__":
    main()
