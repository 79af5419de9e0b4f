"""A learning-rate x seed sweep in one vmapped call, plotted as a heat-map.

All members train at once: `pn.sweep` vmaps the pure trainer (every epoch a
lax.scan on device) over the grid, then we plot each member's final test
accuracy and pick the best learning rate by its mean over seeds.

    python examples/sweep_lr_seed.py [--epochs 30] [--out sweep_lr_seed.png]
"""
import argparse
import time

import numpy as np

import purenet as pn
from _common import FAST, epochs, save

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=epochs(30))
    parser.add_argument("--seeds", type=int, default=2 if FAST else 4)
    parser.add_argument("--out", default="sweep_lr_seed.png")
    args = parser.parse_args()

    data = pn.datasets.digits()
    rates = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2] if not FAST else [1e-3, 1e-2]
    grid = {"learning_rate": rates, "seed": list(range(args.seeds))}

    def build(hp):
        return pn.mlp([64, 64, 10]), pn.optim.adam(hp["learning_rate"])

    start = time.perf_counter()
    result = pn.sweep(build, (data.x_train, data.y_train), grid=grid, epochs=args.epochs, batch_size=64,
                      validation=(data.x_test, data.y_test))
    print(f"{len(result)} models x {args.epochs} epochs in one call: {time.perf_counter() - start:.1f} s")

    acc = np.asarray(result.history["val_accuracy"])[:, -1].reshape(len(rates), args.seeds)
    for rate, row in zip(rates, acc):
        print(f"  lr {rate:<7g} test accuracy per seed: " + " ".join(f"{a:.3f}" for a in row)
              + f"   mean {row.mean():.4f}")
    best = int(np.argmax(acc.mean(axis=1)))
    print(f"best learning rate: {rates[best]:g} (mean test accuracy {acc[best].mean():.4f})")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * args.seeds + 3, 0.5 * len(rates) + 2))
    image = ax.imshow(acc, cmap="viridis", aspect="auto")
    ax.set_xticks(range(args.seeds), [str(s) for s in range(args.seeds)])
    ax.set_yticks(range(len(rates)), [f"{r:g}" for r in rates])
    ax.set_xlabel("seed"), ax.set_ylabel("Adam learning rate")
    for i in range(len(rates)):
        for j in range(args.seeds):
            ax.text(j, i, f"{acc[i, j]:.3f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(image, label="test accuracy")
    ax.set_title(f"digits, 64-64-10 MLP, {args.epochs} epochs")
    save(fig, args.out)


if __name__ == "__main__":
    main()
