"""A convolutional autoencoder on real MNIST images, every gradient handwritten.

    encoder: conv 3x3 /2, 16 -> group norm -> relu -> conv 3x3 /2, 8 -> group norm -> relu     (28 -> 14 -> 7)
    decoder: transposed conv 3x3 x2, 16 -> group norm -> relu -> upsample x2 -> conv 3x3, 1 -> sigmoid  (7 -> 28)

The code is 7 x 7 x 8 = 392 numbers for 784 pixels. Trained on the pixel-wise
squared error against its own input. By default it
reads the shared MNIST test set (10,000 images as (28, 28, 1) NHWC images),
trains on 8,000 and holds out the other 2,000; prints the held-out mean
squared error (against predicting every image's mean pixel) and saves a
figure of held-out digits and their reconstructions.

    python examples/mnist_autoencoder.py [--data ../shared/data/mnist] [--epochs 5] [--cache [DIR]]

With --cache the compiled programs are kept on disk (pn.enable_compilation_cache),
so a second run skips XLA's compilation.
"""
import argparse
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import purenet as pn
from _common import FAST, add_cache_option, epochs, mnist_split, reconstruction_figure, use_cache

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def autoencoder():
    return pn.Sequential([
        pn.Conv2D(16, 3, strides=2), pn.GroupNorm(4), pn.ReLU(),
        pn.Conv2D(8, 3, strides=2), pn.GroupNorm(2), pn.ReLU(),
        pn.ConvTranspose2D(16, 3, strides=2), pn.GroupNorm(4), pn.ReLU(),
        pn.Upsample2D(2), pn.Conv2D(1, 3), pn.Sigmoid(),
    ], in_shape=(28, 28, 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("PURENET_MNIST", str(DEFAULT)))
    parser.add_argument("--part", default="test", choices=["test", "train"])
    parser.add_argument("--epochs", type=int, default=epochs(5, fast=1))
    parser.add_argument("--train", type=int, default=8000)
    parser.add_argument("--held-out", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="mnist_autoencoder.png")
    add_cache_option(parser)
    args = parser.parse_args()
    use_cache(args)

    n_train, n_test = (1000, 500) if FAST else (args.train, args.held_out)
    x, _, train, test = mnist_split(args.data, args.part, args.seed, n_train, n_test)
    train, test = x[train], x[test]
    print(f"MNIST from {args.data}: {len(train)} training, {len(test)} held-out images of shape {x.shape[1:]}")

    net = autoencoder()
    steps = args.epochs * (len(train) // args.batch_size)
    opt = pn.optim.adam(pn.schedules.cosine_decay(3e-3, steps, alpha=0.05))
    start = time.perf_counter()
    result = pn.fit(net, opt, (train, train), loss="mse", key=jax.random.key(args.seed), epochs=args.epochs,
                    batch_size=args.batch_size, progress=not FAST)
    seconds = time.perf_counter() - start
    print(f"{args.epochs} epochs in {seconds:.1f} s ({seconds / args.epochs:.2f} s per epoch, compile included)")

    # the held-out images in one program (one compile, one pass)
    recon = np.asarray(jax.jit(lambda p, s, v: pn.forward(net, p, s, v)[0])(result.params, result.state,
                                                                            jnp.asarray(test)))
    mse = float(np.mean((recon - test) ** 2))
    baseline = float(np.mean((test - test.mean(axis=(1, 2, 3), keepdims=True)) ** 2))
    print("training loss by epoch: " + " ".join(f"{v:.4f}" for v in result.history["loss"]))
    print(f"held-out reconstruction error (MSE per pixel): {mse:.5f} (each image's mean pixel: {baseline:.5f})")

    reconstruction_figure(test, recon, mse, args.out)
    if not FAST and mse > 0.5 * baseline:
        raise SystemExit(f"held-out MSE {mse:.4f} is not below half the mean-pixel baseline {baseline:.4f}")


if __name__ == "__main__":
    main()
