"""Gaussian noise for a whole gradient tree, as DP-SGD adds it: N(0, std^2) on every entry.

    noisy = pn.noise.add_gaussian(grads, key, std)

Speed. On the CPU the random bits, not the transform to a normal, are the cost
of a noise draw: jax.random.normal of float32 spends most of its time in
Threefry (measured in benchmarks/README.md, "DP-SGD step"). Its partitionable
form (jax's default) runs one Threefry-2x32 block per 32-bit draw and xors the
block's two output words into one. Here one block gives two draws, both its
words (the words of a block are independent uniform words, which is what jax's
non-partitionable mode and `jax.random.bits` at 64 bits also use): half the
hash work for the same distribution. The uniforms are jax's own construction
(23 mantissa bits on [nextafter(-1, 0), 1)) and the normal its inverse-erf
transform,

    z = sqrt(2) erfinv(u),   u ~ U(-1, 1),

so each entry is standard normal as jax.random.normal's is.

Layout. Entries (..., 2j) and (..., 2j + 1) of a leaf take the two words of
block number  offset + (row, j)  (row-major over the leaf's (..., ceil(C/2))
grid; each leaf's offset follows the previous leaves' blocks), so the
counters are laid out like the leaf: under jit on a mesh the partitioner
hashes each device's own part of a sharded leaf (FSDP: 1/n of the work and
no params-sized buffer), and the values are the same on one device or many.
The hash is Threefry-2x32 with 20 rounds (Salmon et al. 2011), bit for bit
jax's `threefry_2x32`, written out round by round: XLA:CPU fuses the
unrolled rounds into one pass, where jax's lowering loops over them (an XLA
while loop, each iteration a pass over memory). float64 leaves (the
gradient checks' precision) and keys of other PRNG implementations take
jax.random.normal per leaf. Measured in benchmarks/README.md, "DP-SGD step".
"""
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from purenet._keys import is_threefry

__all__ = ["add_gaussian", "standard_normal_like"]

PyTree = Any


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)  # Threefry's key-schedule constant


def _rotate_left(x: jax.Array, r: int) -> jax.Array:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def _threefry_pair(key: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 of the blocks (x0, x1) under the (2,) uint32 key words: five times four rounds of
    x0 += x1, x1 = rotl(x1, r) ^ x0, the key injected after each four. jax.extend.random.threefry_2x32's
    values (a test checks)."""
    schedule = (key[0], key[1], key[0] ^ key[1] ^ _PARITY)
    x0, x1 = x0 + schedule[0], x1 + schedule[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = _rotate_left(x1, r) ^ x0
        x0 = x0 + schedule[(i + 1) % 3]
        x1 = x1 + schedule[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def _uniform_from_words(words: jax.Array) -> jax.Array:
    """float32 u in [nextafter(-1, 0), 1) from uint32 words: jax.random.uniform's construction."""
    unit = jax.lax.bitcast_convert_type(words >> 9 | np.uint32(0x3F800000), jnp.float32) - 1.0  # [0, 1)
    lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
    return jnp.maximum(lo, unit * (1.0 - lo) + lo)


def _normal_from_words(words: jax.Array) -> jax.Array:
    return np.sqrt(2.0).astype(np.float32) * jax.lax.erf_inv(_uniform_from_words(words))


def _grid(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A leaf's block grid: (..., ceil(C / 2)), one Threefry block per pair along the last axis."""
    shape = shape or (1,)
    return shape[:-1] + (-(-shape[-1] // 2),)


def _leaf_normal(words_key: jax.Array, shape: tuple[int, ...], offset: int) -> jax.Array:
    """float32 N(0, 1) of `shape`: entries (..., 2j), (..., 2j + 1) from the words of block offset + (row, j)."""
    grid = _grid(shape)
    blocks = np.uint32(offset) + lax.iota(jnp.uint32, math.prod(grid)).reshape(grid)
    w0, w1 = _threefry_pair(words_key, blocks, jnp.zeros_like(blocks))
    z = jnp.stack([_normal_from_words(w0), _normal_from_words(w1)], axis=-1)  # (..., ceil(C / 2), 2)
    return z.reshape(grid[:-1] + (-1,))[..., :math.prod(shape[-1:])].reshape(shape)


def standard_normal_like(tree: PyTree, key: jax.Array) -> PyTree:
    """A tree of N(0, 1) draws shaped and typed as `tree`'s leaves, independent across entries.

    Args:
        tree: a tree of floating-point arrays (only their shapes and dtypes are read).
        key: a PRNG key; Threefry keys take the fused path above, other implementations (and
            float64 leaves) `jax.random.normal`.

    Returns:
        A tree like `tree` of standard normal draws.

    Raises:
        ValueError: if the tree's float32-or-narrower leaves need more than 2^32 Threefry
            blocks (about 2^33 entries) in one call.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    key_words, key_rest = jax.random.split(key)
    words_key = jax.random.key_data(key_words) if is_threefry(key_words) else None  # (2,) uint32
    out: list = [None] * len(leaves)
    offset = 0  # blocks used by the leaves before
    for i, leaf in enumerate(leaves):
        if words_key is None or jnp.dtype(leaf.dtype).itemsize > 4:
            continue  # drawn by jax.random.normal below
        if leaf.size == 0:
            out[i] = jnp.zeros(leaf.shape, leaf.dtype)
            continue
        blocks = math.prod(_grid(leaf.shape))
        if offset + blocks > 2**32:
            raise ValueError("standard_normal_like draws at most 2^32 Threefry blocks (about 2^33 entries) in "
                             "one call; this tree needs more: split it and give each part its own key")
        out[i] = _leaf_normal(words_key, leaf.shape, offset).astype(leaf.dtype)
        offset += blocks
    rest = [i for i in range(len(leaves)) if out[i] is None]
    for i, k in zip(rest, jax.random.split(key_rest, max(len(rest), 1))):
        out[i] = jax.random.normal(k, leaves[i].shape, leaves[i].dtype)
    return jax.tree_util.tree_unflatten(treedef, out)


def add_gaussian(tree: PyTree, key: jax.Array, std: Any) -> PyTree:
    """`tree + std * N(0, 1)` on every entry (`standard_normal_like`).

    Args:
        tree: a tree of floating-point arrays (a gradient).
        key: a PRNG key for the noise.
        std: the noise's standard deviation (a scalar, e.g. DP-SGD's
            `noise_multiplier * clip_norm / batch_size`).

    Returns:
        A tree like `tree`, each entry plus independent N(0, std^2) noise.

    Raises:
        ValueError: if the tree is too large for one call (see `standard_normal_like`).
    """
    noise = standard_normal_like(tree, key)
    return jax.tree_util.tree_map(lambda g, z: g + std * z, tree, noise)
