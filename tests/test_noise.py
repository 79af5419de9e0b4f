"""The DP noise draw (purenet.noise): standard normal on every entry, whatever the tree and key."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from purenet import noise


def _tree(dtype=jnp.float32):
    return {"W": jnp.zeros((301, 67), dtype), "b": jnp.zeros((67,), dtype), "E": [jnp.zeros((3, 5, 7), dtype)],
            "empty": jnp.zeros((0, 4), dtype)}


def _ks_distance(draws):
    """The Kolmogorov-Smirnov distance of the draws' empirical distribution from N(0, 1)."""
    x = np.sort(draws)
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))  # N(0, 1)'s CDF in float64
    n = x.size
    return max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))


KS_AT_P_0_001 = 1.95  # sqrt(n) D exceeds this with probability 0.001 under the null


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in jax.tree_util.tree_leaves(tree)])


@pytest.mark.parametrize("key", [jax.random.key(0), jax.random.PRNGKey(3), jax.random.key(1, impl="rbg")],
                         ids=["threefry", "raw uint32", "rbg"])
def test_every_entry_is_standard_normal(key):
    z = noise.standard_normal_like(_tree(), key)
    chex.assert_trees_all_equal_shapes_and_dtypes(z, _tree())
    flat = _flat(z)
    assert flat.size == 301 * 67 + 67 + 105
    assert np.sqrt(flat.size) * _ks_distance(flat) < KS_AT_P_0_001  # ~20k draws: a wrong scale or shape fails by far
    assert abs(flat.mean()) < 5 / np.sqrt(flat.size) and abs(flat.std() - 1) < 0.03
    # 2^23 uniform levels: ~25 birthday collisions among 20k draws; a word reused between entries or leaves gives thousands
    assert flat.size - len(np.unique(flat)) < 100


def test_leaves_and_keys_are_independent():
    a = noise.standard_normal_like(_tree(), jax.random.key(0))
    b = noise.standard_normal_like(_tree(), jax.random.key(1))
    w, v = np.ravel(a["W"]), np.ravel(b["W"])
    assert abs(np.corrcoef(w, v)[0, 1]) < 0.03
    # the two words of one Threefry block feed neighbours along the last axis: they must not correlate
    assert abs(np.corrcoef(np.ravel(a["W"][:, 0:66:2]), np.ravel(a["W"][:, 1:66:2]))[0, 1]) < 0.03
    # each leaf has blocks of its own: the bias is not the weight's first row again
    assert abs(np.corrcoef(np.asarray(a["b"]), np.asarray(a["W"][0]))[0, 1]) < 0.5
    assert not np.any(np.asarray(a["b"]) == np.asarray(a["W"][0]))
    np.testing.assert_array_equal(a["W"], noise.standard_normal_like(_tree(), jax.random.key(0))["W"])


def test_odd_sizes_scalars_and_lower_precision():
    for shape in ((1,), (3,), (1023,), (5, 2049), ()):
        z = noise.standard_normal_like({"a": jnp.zeros(shape, jnp.float32)}, jax.random.key(len(shape)))["a"]
        assert z.shape == shape and bool(jnp.all(jnp.isfinite(z)))
    z = noise.standard_normal_like({"a": jnp.zeros((4000,), jnp.bfloat16)}, jax.random.key(0))["a"]
    assert z.dtype == jnp.bfloat16 and abs(float(jnp.std(z.astype(jnp.float32))) - 1) < 0.05


def test_float64_leaves_are_drawn_in_float64():
    z = noise.standard_normal_like(_tree(jnp.float64), jax.random.key(0))
    chex.assert_trees_all_equal_shapes_and_dtypes(z, _tree(jnp.float64))
    flat = _flat(z)
    assert np.sqrt(flat.size) * _ks_distance(flat) < KS_AT_P_0_001
    mixed = noise.standard_normal_like({"a": jnp.zeros(500, jnp.float32), "b": jnp.zeros(500, jnp.float64)}, jax.random.key(0))
    assert mixed["a"].dtype == jnp.float32 and mixed["b"].dtype == jnp.float64


def test_add_gaussian_jit_and_no_jit_agree():
    tree = jax.tree_util.tree_map(lambda a: a + 1.0, _tree())
    eager = noise.add_gaussian(tree, jax.random.key(2), 0.5)
    chex.assert_trees_all_close(eager, jax.jit(noise.add_gaussian)(tree, jax.random.key(2), 0.5))
    delta = _flat(eager) - _flat(tree)
    assert abs(delta.std() - 0.5) < 0.02


@pytest.mark.parametrize("n", [2, 10, 4096])
def test_the_hash_is_jax_threefry_bit_for_bit(n):
    from jax.extend.random import threefry_2x32

    key = jax.random.bits(jax.random.key(n), (2,), jnp.uint32)
    count = jax.random.bits(jax.random.key(n + 1), (n,), jnp.uint32)
    half = n // 2  # jax's convention: blocks (count[i], count[n/2 + i]), their two words concatenated
    ours = jnp.concatenate(noise._threefry_pair(key, count[:half], count[half:]))
    np.testing.assert_array_equal(ours, threefry_2x32(key, count))
