"""Data: datasets read from disk, augmentations, and the shuffles that order an epoch.

    pn.datasets      datasets.py: MNIST (IDX), digits, tiny Shakespeare; seeded splits (numpy only)
    pn.augment       augment.py: pure augmentations (key, x, y) -> (x, y), composable
    pn.shuffle       shuffle.py: a permutation per epoch, the same on every device
"""
from purenet.data import augment, datasets, shuffle

__all__ = ["augment", "datasets", "shuffle"]
