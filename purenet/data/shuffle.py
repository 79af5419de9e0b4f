"""The epoch shuffle: a random permutation of arange(n) that is cheap to compile.

`jax.random.permutation` draws sort keys with threefry, whose unrolled rounds
cost more XLA compile time on a small CPU than everything else in a
digits-size training epoch (measured in benchmarks/README.md, "Reading
against the targets"). Shuffling mini-batches needs a permutation
that looks random, not cryptographic bits, so here each index is hashed and
the hashes are sorted:

    h_i = f(f(... f(f(i xor w_1) xor w_2) ... xor w_k) xor salt),   order = argsort(h)

where w_1..w_k are the key's 32-bit words and f is murmur3's finaliser

    f(h) = h3 xor (h3 >> 16),  h3 = (h2 xor (h2 >> 13)) * 0xC2B2AE35,
    h2 = (h xor (h >> 16)) * 0x85EBCA6B       (all mod 2^32).

f is a bijection of the 32-bit integers (xor-shifts and odd multipliers are
invertible) with full avalanche, so for n <= 2^32 the h_i are distinct: the
result is always an exact permutation, with no ties for argsort to break,
and every key bit and salt bit moves every output position.
"""
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["key_words", "permutation"]


def _mix(h):
    """murmur3 fmix32: a bijection of uint32 in which every input bit flips each output bit with p ~ 1/2."""
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def key_words(key: jax.Array) -> jax.Array:
    """One key's raw 32-bit words (a typed key of any impl, or a legacy uint32 key).

    Args:
        key: one PRNG key: a typed key (`jax.random.key`, shape ()) or a legacy
            uint32 key (`jax.random.PRNGKey`, shape (words,)).

    Returns:
        The key's data, uint32 of shape (words,) (2 for threefry).

    Raises:
        TypeError: if `key` is neither a typed key nor a uint32 array.
        ValueError: if `key` holds several keys (a batch of keys).
    """
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    if not typed and key.dtype != jnp.uint32:
        raise TypeError(f"expected a PRNG key (jax.random.key), got an array of dtype {key.dtype}")
    if key.ndim != (0 if typed else 1):
        raise ValueError(f"expected one PRNG key, got an array of {key.shape} keys: "
                         "vmap over keys for one permutation each")
    return jax.random.key_data(key) if typed else key


def permutation(key: jax.Array, n: int, salt: int | np.integer | jax.Array = 0) -> jax.Array:
    """A shuffled arange(n) (int32) determined by (key, salt).

    `salt` (an int or traced integer, e.g. the epoch) gives independent
    permutations from one key without a threefry fold_in.

    Args:
        key: one PRNG key, typed or legacy uint32 (see `key_words`).
        n: the length, a static int in [0, 2^31).
        salt: an integer mixed in after the key (a Python int is taken mod
            2^32; an array or traced value is cast to uint32), e.g. the epoch.

    Returns:
        A permutation of arange(n), int32 of shape (n,).

    Raises:
        ValueError: if `n` is outside [0, 2^31), or `key` holds several keys.
        TypeError: if `key` is not a PRNG key.
    """
    if not 0 <= n <= 2**31 - 1:
        raise ValueError(f"permutation length must be in [0, 2^31), got {n}")
    h = jnp.arange(n, dtype=jnp.uint32)
    for word in key_words(key):
        h = _mix(h ^ word)
    if isinstance(salt, int):  # any Python int, as its value mod 2^32
        salt = np.uint32(salt % 2**32)
    h = _mix(h ^ jnp.asarray(salt).astype(jnp.uint32))
    return jnp.argsort(h).astype(jnp.int32)
