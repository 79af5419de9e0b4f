"""Shared bits of the example scripts: fast mode, figure saving, the MNIST split."""
import os

FAST = os.environ.get("PURENET_FAST") == "1"  # CI's fast mode: fewer epochs, same code


def epochs(default, fast=2):
    return fast if FAST else default


def save(fig, path, tight=True):
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


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
