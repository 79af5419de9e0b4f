"""The gradient noise scale over training on MNIST, and what it says about the batch size.

McCandlish et al. (2018) measure how noisy the gradient is relative to its
size with the simple noise scale

    B_simple = tr(S) / |G|^2       (S: the per-example gradients' covariance, G: their mean)

and show that it predicts the critical batch size: with batch B, training
needs about S_min (1 + B_noise / B) steps and E_min (1 + B / B_noise)
examples, so batches well below B_noise waste steps (each is mostly noise)
and batches well above it waste examples (doubling B no longer halves the
steps). pn.fit(..., statistics=probe) records B_simple on a probe batch every
epoch, from per-example gradient norms and the batch gradient (no
per-example gradient formed: pn.stats.gradient_noise).

By default it reads the shared MNIST test set (10,000 images; 2,000 held out).

    python examples/noise_scale.py [--data ../shared/data/mnist] [--epochs 12] [--out noise_scale.png]
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
    parser.add_argument("--epochs", type=int, default=epochs(12))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--probe", type=int, default=2000, help="examples the noise scale is measured on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="noise_scale.png")
    args = parser.parse_args()

    try:
        x, y = pn.datasets.mnist(args.data, part="test")
    except FileNotFoundError as e:
        raise SystemExit(f"{e}\nDownload the MNIST IDX files and pass --data FOLDER (or set PURENET_MNIST).")
    held_out = 500 if FAST else 2000
    if FAST:
        x, y = x[:2500], y[:2500]
    x = x.reshape(len(x), -1)
    order = np.random.default_rng(args.seed).permutation(len(x))
    test, train = order[:held_out], order[held_out:]
    probe_rows = train[: min(args.probe, len(train))]
    print(f"MNIST: {len(train)} training images, {len(test)} held out; noise scale on {len(probe_rows)} of them")

    net = pn.mlp([784, 256, 10])
    start = time.perf_counter()
    result = pn.fit(net, pn.optim.momentum(args.lr, 0.9), (x[train], y[train]), key=jax.random.key(args.seed),
                    epochs=args.epochs, batch_size=args.batch_size, validation=(x[test], y[test]),
                    statistics=(x[probe_rows], y[probe_rows]))
    h = result.history
    print(f"trained {args.epochs} epochs in {time.perf_counter() - start:.1f} s; held-out accuracy "
          f"{h['val_accuracy'][-1]:.4f}")
    for e in range(args.epochs):
        print(f"  epoch {e + 1:>2}: loss {h['loss'][e]:.4f}, |G|^2 {h['grad_sq_norm'][e]:.3g}, "
              f"tr(S) {h['trace_cov'][e]:.3g}, B_simple {h['noise_scale'][e]:.0f}")
    b_first, b_last = float(h["noise_scale"][0]), float(h["noise_scale"][-1])
    trend = "grows" if b_last > b_first else "falls"
    print(f"B_simple {trend} from {b_first:.0f} to {b_last:.0f} over training (the batch size beyond which "
          f"larger batches stop paying off {trend} with it); the batch of {args.batch_size} is {'below' if args.batch_size < b_last else 'above'} "
          f"it at the end")
    for b in (16, 64, 256, 1024, 4096):
        print(f"  batch {b:>4}: {1 + b_last / b:6.2f} x the minimum steps, {1 + b / b_last:6.2f} x the minimum "
              f"examples (with B_noise ~ B_simple = {b_last:.0f})")
    plot(args, h)


def plot(args, h):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs_axis = np.arange(1, len(h["loss"]) + 1)
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 3.8))
    a1.plot(epochs_axis, h["noise_scale"], marker="o", color="tab:purple")
    a1.set_xlabel("epoch"), a1.set_ylabel("B_simple = tr(S) / |G|^2"), a1.set_title("gradient noise scale")
    a1.axhline(args.batch_size, ls="--", color="gray", label=f"batch size {args.batch_size}")
    a1.legend()
    a2.semilogy(epochs_axis, h["grad_sq_norm"], marker="o", label="|G|^2 (signal)")
    a2.semilogy(epochs_axis, h["trace_cov"], marker="o", label="tr(S) (noise)")
    a2.semilogy(epochs_axis, h["loss"], marker=".", ls=":", label="training loss")
    a2.set_xlabel("epoch"), a2.set_title("signal and noise of the gradient"), a2.legend()
    b = np.logspace(0, 4.5, 100)
    noise = float(h["noise_scale"][-1])
    a3.loglog(b, 1 + noise / b, label="steps / S_min = 1 + B_noise / B")
    a3.loglog(b, 1 + b / noise, label="examples / E_min = 1 + B / B_noise")
    a3.axvline(noise, ls=":", color="gray", label=f"B_noise ~ B_simple = {noise:.0f} (last epoch)")
    a3.axvline(args.batch_size, ls="--", color="gray", label=f"batch size {args.batch_size}")
    a3.set_xlabel("batch size B"), a3.set_title("the predicted trade-off (McCandlish et al.)", fontsize=10)
    a3.legend(fontsize=7)
    save(fig, args.out)


if __name__ == "__main__":
    main()
