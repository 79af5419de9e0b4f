"""Differentially private training of a CNN on real MNIST, with the privacy it bought.

DP-SGD (Abadi et al., 2016) with Poisson sampling: every step each of the
training images joins the batch with probability q = batch / n; each
example's gradient is clipped to norm C (one pass: book-keeping, Bu et al.,
2023), Gaussian noise of std sigma C is added to the sum, and the sum is
divided by the expected batch size. sigma is chosen by the accountant
(`pn.privacy.noise_multiplier_for`, PLD) so that the whole run is
(epsilon, delta)-DP; `fit` records epsilon after every epoch.

    conv 8x8/2, 16 -> tanh -> max pool 2/1 -> conv 4x4/2, 32 -> tanh -> max pool 2/1
      -> flatten -> dense 32 -> tanh -> dense 10 -> softmax       (Papernot et al., 2021)

By default it trains on 8,000 images of the shared MNIST test set and holds
out 2,000, at epsilon = 3 and delta = 1e-5; prints sigma, epsilon and the
held-out accuracy per epoch, and plots accuracy against epsilon.

    python examples/dp_mnist.py [--epsilon 3] [--epochs 15] [--out dp_mnist.png]
"""
import argparse
import os
import time
from pathlib import Path

import jax
import numpy as np

import purenet as pn
from _common import FAST, epochs, mnist_split, save

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def cnn():
    return pn.Sequential([
        pn.Conv2D(16, 8, strides=2, padding="SAME"), pn.Tanh(), pn.MaxPool2D(2, strides=1),
        pn.Conv2D(32, 4, strides=2, padding="VALID"), pn.Tanh(), pn.MaxPool2D(2, strides=1),
        pn.Flatten(), pn.Dense(32), pn.Tanh(), pn.Dense(10), pn.Softmax(),
    ], in_shape=(28, 28, 1))


def run_arguments(doc: str) -> argparse.ArgumentParser:
    """The DP run's options, shared with dp_audit.py (which audits this run)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("PURENET_MNIST", str(DEFAULT)))
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=int, default=epochs(15, fast=1))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main():
    parser = run_arguments(__doc__)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--train", type=int, default=8000)
    parser.add_argument("--held-out", type=int, default=2000)
    parser.add_argument("--out", default="dp_mnist.png")
    args = parser.parse_args()

    n_train, n_test = (1024, 500) if FAST else (args.train, args.held_out)
    x, y, train, test = mnist_split(args.data, "test", args.seed, n_train, n_test)

    q = args.batch_size / n_train
    steps = args.epochs * (n_train // args.batch_size)
    sigma = pn.privacy.noise_multiplier_for(args.epsilon, args.delta, q, steps)
    print(f"MNIST: {n_train} training, {n_test} held-out images; q = {q:.4f}, {steps} steps, clip {args.clip}")
    print(f"noise multiplier for epsilon {args.epsilon} at delta {args.delta}: sigma = {sigma:.4f} (PLD)")

    net = cnn()
    dp = pn.DPSGD(clip_norm=args.clip, noise_multiplier=sigma, delta=args.delta)
    start = time.perf_counter()
    result = pn.fit(net, pn.optim.adam(args.lr), (x[train], y[train]), key=jax.random.key(args.seed),
                    epochs=args.epochs, batch_size=args.batch_size, dp=dp, validation=(x[test], y[test]),
                    progress=not FAST)
    seconds = time.perf_counter() - start
    h = result.history
    for e, (eps, acc) in enumerate(zip(h["epsilon"], h["val_accuracy"]), 1):
        print(f"  epoch {e:2d}: epsilon {eps:.3f}, held-out accuracy {acc:.4f}")
    print(f"{args.epochs} epochs in {seconds:.1f} s; Poisson overflows: {int(np.sum(h['poisson_overflow']))}")
    rdp = pn.privacy.epsilon(sigma, q, steps, args.delta, accountant="rdp")
    print(f"final: epsilon {h['epsilon'][-1]:.3f} (PLD; RDP's bound {rdp:.3f}) at delta {args.delta}, "
          f"held-out accuracy {h['val_accuracy'][-1]:.4f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(h["epsilon"], h["val_accuracy"], "o-")
    ax1.set_xlabel(f"epsilon (delta = {args.delta:g})"), ax1.set_ylabel("held-out accuracy")
    ax1.set_title("accuracy against the privacy spent")
    ax2.plot(np.arange(1, len(h["loss"]) + 1), h["loss"], "o-", label="training (sampled batches)")
    ax2.plot(np.arange(1, len(h["loss"]) + 1), h["val_loss"], "o-", label="held out")
    ax2.set_xlabel("epoch"), ax2.set_ylabel("cross-entropy"), ax2.legend()
    fig.suptitle(f"DP-SGD CNN on MNIST: {h['val_accuracy'][-1]:.2%} at epsilon {h['epsilon'][-1]:.2f}")
    save(fig, args.out)
    if not FAST and h["epsilon"][-1] > args.epsilon + 1e-9:
        raise SystemExit(f"epsilon {h['epsilon'][-1]:.4f} exceeds the target {args.epsilon}")


if __name__ == "__main__":
    main()
