"""Gaussian noise for a whole gradient tree, as DP-SGD adds it: N(0, std^2) on every entry.

    noisy = pn.noise.add_gaussian(grads, key, std)

Speed. On the CPU the random bits, not the transform to a normal, are the
cost of a noise draw: jax.random.normal of float32 spends ~85% of its time in
threefry. Its partitionable form (jax's default) runs one threefry2x32 block
per 32-bit draw and xors the block's two output words into one. Here one
block gives two draws, both its words: half the hash work for the same
distribution (the words of a threefry block are independent uniform
words, which is what jax's non-partitionable mode and `jax.random.bits` at
64 bits also use). Every float32 / lower-precision leaf is drawn from one
flat stream; the uniforms are jax's own construction (23 mantissa bits on
[nextafter(-1, 0), 1)) and the normal its inverse-erf transform,

    z = sqrt(2) erfinv(u),   u ~ U(-1, 1),

so each entry is standard normal as jax.random.normal's is. float64 leaves
(the gradient checks' precision) and keys of other PRNG implementations
take jax.random.normal per leaf.

The hash is Threefry-2x32 with 20 rounds (Salmon et al. 2011), bit for bit
jax's `threefry_2x32`, written out round by round: XLA:CPU fuses the
unrolled rounds into one pass over the counters, where jax's lowering
loops over them (an XLA while loop, each iteration a pass over memory):
the MLP's DP step went from 1.29x to 1.07x its plain step
(benchmarks/README, DP).
"""
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["add_gaussian", "standard_normal_like"]

PyTree = Any


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)  # Threefry's key-schedule constant


def _rotate_left(x: jax.Array, r: int) -> jax.Array:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def _threefry_2x32(key: jax.Array, count: jax.Array) -> jax.Array:
    """Threefry-2x32 of the (2,) uint32 key words over `count` (even length): the blocks
    (count[i], count[n/2 + i]), their two output words concatenated; jax.extend.random.threefry_2x32's
    values. Five times four rounds of x0 += x1, x1 = rotl(x1, r) ^ x0, the key injected after each four."""
    n = count.shape[0] // 2
    schedule = (key[0], key[1], key[0] ^ key[1] ^ _PARITY)
    x0, x1 = count[:n] + schedule[0], count[n:] + schedule[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = _rotate_left(x1, r) ^ x0
        x0 = x0 + schedule[(i + 1) % 3]
        x1 = x1 + schedule[(i + 2) % 3] + np.uint32(i + 1)
    return jnp.concatenate([x0, x1])


def _uniform_from_words(words: jax.Array) -> jax.Array:
    """float32 u in [nextafter(-1, 0), 1) from uint32 words: jax.random.uniform's construction."""
    unit = jax.lax.bitcast_convert_type(words >> 9 | np.uint32(0x3F800000), jnp.float32) - 1.0  # [0, 1)
    lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
    return jnp.maximum(lo, unit * (1.0 - lo) + lo)


def _threefry_words(key: jax.Array) -> jax.Array | None:
    """The (2,) uint32 key words of a threefry key (typed or raw), None for other implementations."""
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # a raw key: the default implementation's
    return jax.random.key_data(key) if "threefry" in str(jax.random.key_impl(key)) else None


def standard_normal_like(tree: PyTree, key: jax.Array) -> PyTree:
    """A tree of N(0, 1) draws shaped and typed as `tree`'s leaves, independent across entries."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    fast = [i for i, leaf in enumerate(leaves) if jnp.dtype(leaf.dtype).itemsize <= 4 and leaf.size > 0]
    key_flat, key_rest = jax.random.split(key)
    words_key = _threefry_words(key_flat)
    out: list = [None] * len(leaves)
    if fast and words_key is not None:
        total = sum(leaves[i].size for i in fast)
        if total >= 2**32:
            raise ValueError(f"standard_normal_like draws at most 2^32 entries in one call, got {total}")
        half = -(-total // 2048) * 1024  # a whole number of vector lanes per word stream
        words = _threefry_2x32(words_key, jnp.arange(2 * half, dtype=jnp.uint32))
        z = np.sqrt(2.0).astype(np.float32) * jax.lax.erf_inv(_uniform_from_words(words))
        start = 0
        for i in fast:
            leaf = leaves[i]
            out[i] = z[start:start + leaf.size].reshape(leaf.shape).astype(leaf.dtype)
            start += leaf.size
    rest = [i for i in range(len(leaves)) if out[i] is None]
    for i, k in zip(rest, jax.random.split(key_rest, max(len(rest), 1))):
        out[i] = jax.random.normal(k, leaves[i].shape, leaves[i].dtype)
    return jax.tree_util.tree_unflatten(treedef, out)


def add_gaussian(tree: PyTree, key: jax.Array, std: Any) -> PyTree:
    """tree + std * N(0, 1) on every entry (`standard_normal_like`)."""
    noise = standard_normal_like(tree, key)
    return jax.tree_util.tree_map(lambda g, z: g + std * z, tree, noise)
