"""Shared bits of the example scripts: fast mode, figure saving, the MNIST split, the MNIST figures.

No JAX import at module level: benchmarks/torch_cnn.py (the PyTorch twins) draws the same figures.
"""
import os

FAST = os.environ.get("PURENET_FAST") == "1"  # CI's fast mode: fewer epochs, same code


def epochs(default, fast=2):
    return fast if FAST else default


def save(fig, path, tight=True):
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def add_cache_option(parser):
    """`--cache [DIR]`: keep the compiled programs on disk, so a second run skips XLA's compilation."""
    parser.add_argument("--cache", nargs="?", const="", metavar="DIR",
                        help="persistent compilation cache (default directory: ~/.cache/purenet/xla)")


def use_cache(args):
    """Switch on the persistent compilation cache when `--cache` was given (pn.enable_compilation_cache)."""
    if args.cache is not None:
        import purenet as pn

        print(f"compilation cache: {pn.enable_compilation_cache(args.cache or None)}")


def mnist_split(folder, part, seed, n_train, n_test):
    """(x, y, train, held_out): MNIST images (N, 28, 28, 1) from the IDX files in `folder` and the
    indices of a seeded split; without the files, exit saying how to point the example at them."""
    import numpy as np

    import purenet as pn

    try:
        x, y = pn.datasets.mnist(folder, part=part, shape="image")
    except FileNotFoundError as e:
        raise SystemExit(f"{e}\nDownload the MNIST IDX files and pass --data FOLDER (or set PURENET_MNIST).")
    order = np.random.default_rng(seed).permutation(len(x))
    return x, y, order[:n_train], order[n_train:n_train + n_test]


def lenet_figure(history, confusion, filters, accuracy, out, framework="purenet"):
    """The LeNet example's figure: training and held-out loss, held-out accuracy, the confusion matrix
    (log scale) and the first layer's 16 filters.

    Args:
        history: per-epoch numpy arrays "loss", "val_loss" and "val_accuracy".
        confusion: the (10, 10) confusion matrix, rows the true digits.
        filters: the first layer's kernels as (5, 5, 16).
        accuracy: the held-out accuracy, for the title.
        out: the image file to write.
        framework: the name in the title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig = plt.figure(figsize=(15, 4.2))
    ax1, ax2, ax3 = (fig.add_gridspec(1, 3, left=0.06, right=0.72, wspace=0.35, bottom=0.12, top=0.85).subplots())
    epochs_run = np.arange(1, len(history["loss"]) + 1)
    ax1.plot(epochs_run, history["loss"], "o-", label="training")
    ax1.plot(epochs_run, history["val_loss"], "o-", label="held out")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("cross-entropy"), ax1.set_yscale("log"), ax1.legend()
    ax2.plot(epochs_run, history["val_accuracy"], "o-"), ax2.set_xlabel("epoch"), ax2.set_ylabel("held-out accuracy")
    ax3.imshow(np.log1p(confusion), cmap="Blues"), ax3.set_xlabel("predicted"), ax3.set_ylabel("true")
    ax3.set_title("confusion (log scale)")
    grid = fig.add_gridspec(4, 4, left=0.78, right=0.98, top=0.85, bottom=0.1, wspace=0.1, hspace=0.1)
    for f in range(16):
        ax = fig.add_subplot(grid[f // 4, f % 4])
        ax.imshow(filters[:, :, f], cmap="RdBu"), ax.set_xticks([]), ax.set_yticks([])
    fig.text(0.83, 0.88, "first-layer filters")
    fig.suptitle(f"{framework} LeNet on real MNIST: {accuracy:.2%} held-out accuracy")
    save(fig, out, tight=False)


def reconstruction_figure(held_out, rebuilt, mse, out, framework="purenet", shown=10):
    """The autoencoder example's figure: the first `shown` held-out digits over their reconstructions.

    Args:
        held_out: the held-out images, (n, 28, 28, 1) in [0, 1].
        rebuilt: their reconstructions, the same shape.
        mse: the held-out mean squared error per pixel, for the title.
        out: the image file to write.
        framework: the name in the title.
        shown: how many digits to draw.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, shown, figsize=(1.3 * shown, 3))
    for i in range(shown):
        for row, images in enumerate((held_out, rebuilt)):
            axes[row, i].imshow(images[i, :, :, 0], cmap="gray", vmin=0, vmax=1)
            axes[row, i].set_xticks([]), axes[row, i].set_yticks([])
    axes[0, 0].set_ylabel("held out"), axes[1, 0].set_ylabel("rebuilt")
    fig.suptitle(f"{framework} conv autoencoder on real MNIST: held-out MSE {mse:.4f} per pixel")
    save(fig, out)
