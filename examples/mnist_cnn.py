"""A LeNet-style CNN on real MNIST images, every gradient handwritten.

    conv 5x5, 16 -> relu -> max pool 2 -> conv 5x5, 32 -> relu -> max pool 2
      -> flatten -> dense 128 -> relu -> dense 10 -> softmax

By default it reads the shared MNIST test set (10,000 images as (28, 28, 1)
NHWC images) and trains on 8,000 of them, holding out the other 2,000.
Prints the held-out accuracy and the confusion matrix; plots the curves,
the confusion matrix and the first layer's filters.

    python examples/mnist_cnn.py [--data ../shared/data/mnist] [--epochs 10] [--cache [DIR]]

With --cache the compiled programs are kept on disk (pn.enable_compilation_cache),
so a second run skips XLA's compilation.
"""
import argparse
import os
import time
from pathlib import Path

import jax
import numpy as np

import purenet as pn
from _common import FAST, add_cache_option, epochs, lenet_figure, mnist_split, use_cache

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def lenet():
    return pn.Sequential([
        pn.Conv2D(16, 5), pn.ReLU(), pn.MaxPool2D(2),
        pn.Conv2D(32, 5), pn.ReLU(), pn.MaxPool2D(2),
        pn.Flatten(), pn.Dense(128), pn.ReLU(), pn.Dense(10), pn.Softmax(),
    ], in_shape=(28, 28, 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("PURENET_MNIST", str(DEFAULT)))
    parser.add_argument("--part", default="test", choices=["test", "train"])
    parser.add_argument("--epochs", type=int, default=epochs(10, fast=1))
    parser.add_argument("--train", type=int, default=8000)
    parser.add_argument("--held-out", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="mnist_cnn.png")
    add_cache_option(parser)
    args = parser.parse_args()
    use_cache(args)

    n_train, n_test = (1000, 500) if FAST else (args.train, args.held_out)
    x, y, train, test = mnist_split(args.data, args.part, args.seed, n_train, n_test)
    print(f"MNIST from {args.data}: {len(train)} training, {len(test)} held-out images of shape {x.shape[1:]}")

    net = lenet()
    steps = args.epochs * (len(train) // args.batch_size)
    opt = pn.optim.adam(pn.schedules.cosine_decay(2e-3, steps, alpha=0.05))
    start = time.perf_counter()
    result = pn.fit(net, opt, (x[train], y[train]), key=jax.random.key(args.seed), epochs=args.epochs,
                    batch_size=args.batch_size, validation=(x[test], y[test]), progress=not FAST)
    seconds = time.perf_counter() - start
    print(f"{args.epochs} epochs in {seconds:.1f} s ({seconds / args.epochs:.2f} s per epoch, compile included)")
    confusion = np.asarray(pn.metrics.confusion_matrix(net, result.params, result.state, x[test], y[test], 10))
    acc = float(np.trace(confusion) / confusion.sum())  # the accuracy, from the same pass (one program fewer)
    print("confusion matrix (rows: true digit, columns: predicted)")
    for i, row in enumerate(confusion):
        print(f"  {i}: " + " ".join(f"{v:4d}" for v in row))
    print(f"held-out accuracy: {acc:.4f}")

    lenet_figure(result.history, confusion, np.asarray(result.params[0]["W"])[:, :, 0, :], acc, args.out)
    if not FAST and acc < 0.985:
        raise SystemExit(f"held-out accuracy {acc:.4f} is below the 0.985 target")


if __name__ == "__main__":
    main()
