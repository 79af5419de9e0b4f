"""Data augmentation as pure functions  augment(key, x, y) -> (x, y).

They act on a batch and are applied per mini-batch inside the training scan.
Labels pass through unchanged except for mixup, which is why every
augmentation takes and returns both. `compose` chains them, each drawing
from its own key.

An augmentation that mixes examples (row i of its output depends on other
rows: mixup) says so with the attribute `mixes_examples = True` (set it on
your own function with `mixing(fn)`); `mixes_examples(augment)` reads it.
DP-SGD refuses such an augmentation: one example would reach two rows, so
its influence on the clipped sum is no longer bounded by the clip norm.
"""
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from purenet._checks import check_hyperparameter

__all__ = ["Augment", "compose", "gaussian_noise", "mixes_examples", "mixing", "mixup", "random_translation"]

# An augmentation: (key, x, y) -> (x, y), on a batch.
Augment = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def mixing(augment: Augment) -> Augment:
    """Mark `augment` as one that mixes examples (row i of its output reads other rows).

    DP-SGD refuses a mixing augmentation (see the module docstring); mark your
    own function with this when its output rows read other rows.

    Args:
        augment: an augmentation `(key, x, y) -> (x, y)`; it gets the attribute
            `mixes_examples = True`.

    Returns:
        `augment` itself, marked.
    """
    augment.mixes_examples = True  # type: ignore[attr-defined]
    return augment


def mixes_examples(augment: Augment | None) -> bool:
    """Whether `augment` mixes examples (mixup; anything marked with `mixing`, or composed of one).

    Args:
        augment: an augmentation, or None (no augmentation).

    Returns:
        True when `augment` carries `mixes_examples = True`, else False (None included).
    """
    return bool(getattr(augment, "mixes_examples", False))


def gaussian_noise(std: float) -> Augment:
    """Additive Gaussian noise, `x + std * N(0, 1)` elementwise; labels unchanged.

    Args:
        std: the noise's standard deviation, a finite float >= 0.

    Returns:
        An augmentation `(key, x, y) -> (x, y)`: x of any shape (batch, ...),
            noise drawn from `key` in x's dtype.

    Raises:
        ValueError: if `std` is negative, NaN or infinite.
    """
    check_hyperparameter("gaussian_noise std", std, 0.0, None)

    def augment(key, x, y):
        return x + std * jax.random.normal(key, x.shape, x.dtype), y

    return augment


def random_translation(image_shape: Sequence[int], max_shift: int) -> Augment:
    """Shift each image by (dy, dx), integers drawn uniformly from [-max_shift, max_shift].

    Rows of x are images of `image_shape` ((H, W) or (H, W, C)), flattened
    or not. Pixel (i, j) moves to (i + dy, j + dx); pixels shifted in are
    zero. Each image draws its own shift.

    Args:
        image_shape: the shape of one image, (H, W) or (H, W, C).
        max_shift: the largest shift in pixels along each axis, an int >= 0.

    Returns:
        An augmentation `(key, x, y) -> (x, y)`: x of shape
            `(batch, prod(image_shape))` or `(batch, *image_shape)`, returned in
            the same shape; y unchanged.

    Raises:
        ValueError: if `max_shift` is negative; the augmentation raises a
            ValueError when the rows of x are not images of `image_shape`.
    """
    image_shape = tuple(image_shape)
    m = int(max_shift)
    if m < 0:
        raise ValueError(f"random_translation max_shift must be >= 0, got {max_shift}")

    def shift_one(image, dy, dx):
        pad = [(m, m), (m, m)] + [(0, 0)] * (image.ndim - 2)
        padded = jnp.pad(image, pad)
        start = (m - dy, m - dx) + (0,) * (image.ndim - 2)
        return jax.lax.dynamic_slice(padded, start, image.shape)

    def augment(key, x, y):
        n = x.shape[0]
        if x.shape[1:] not in ((math.prod(image_shape),), image_shape):
            raise ValueError(f"random_translation: rows of shape {x.shape[1:]} are not images of shape {image_shape}")
        shifts = jax.random.randint(key, (n, 2), -m, m + 1)
        images = x.reshape((n,) + image_shape)
        moved = jax.vmap(shift_one)(images, shifts[:, 0], shifts[:, 1])
        return moved.reshape(x.shape), y

    return augment


def mixup(alpha: float, num_classes: int) -> Augment:
    """Mixup (Zhang et al., 2018): convex combinations of pairs of examples and of their labels.

    With lam ~ Beta(alpha, alpha) per batch and a random pairing perm of the
    batch,

        x <- lam x + (1 - lam) x[perm],   y <- lam t + (1 - lam) t[perm],

    where t is y as one-hot distributions over `num_classes` (integer labels
    are converted). Use it with loss="cross_entropy". The result is marked
    with `mixing`: DP-SGD refuses it.

    Args:
        alpha: the Beta distribution's parameter, > 0 (small values keep lam
            near 0 or 1).
        num_classes: the number of classes k, for the one-hot targets.

    Returns:
        A mixing augmentation `(key, x, y) -> (x, t)`: x (batch, ...) mixed;
            y integer labels (batch,) or distributions (batch, k), returned as
            mixed distributions (batch, k) in x's dtype.

    Raises:
        ValueError: if `alpha` is not a finite number > 0.
    """
    check_hyperparameter("mixup alpha", alpha, 0.0, None, low_open=True)

    def augment(key, x, y):
        k_lam, k_perm = jax.random.split(key)
        lam = jax.random.beta(k_lam, alpha, alpha).astype(x.dtype)
        perm = jax.random.permutation(k_perm, x.shape[0])
        t = jax.nn.one_hot(y, num_classes, dtype=x.dtype) if jnp.ndim(y) == 1 else jnp.asarray(y, x.dtype)
        return lam * x + (1 - lam) * x[perm], lam * t + (1 - lam) * t[perm]

    return mixing(augment)


def compose(*augments: Augment) -> Augment:
    """Apply augmentations in order, each with its own key.

    Augmentation i draws from `fold_in(key, i)`.

    Args:
        *augments: the augmentations `(key, x, y) -> (x, y)`, applied first to last.

    Returns:
        One augmentation `(key, x, y) -> (x, y)`, marked with `mixing` when any
            of `augments` mixes examples.
    """

    def augment(key, x, y):
        for i, aug in enumerate(augments):
            x, y = aug(jax.random.fold_in(key, i), x, y)
        return x, y

    return mixing(augment) if any(map(mixes_examples, augments)) else augment
