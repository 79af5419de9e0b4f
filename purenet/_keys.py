"""PRNG keys: which implementation a key belongs to, for code whose draws rely on threefry's properties
(`purenet.privacy.noise` hashes with it itself; `purenet.initializers` relies on its partitionable prefixes)."""
import jax


def is_threefry(key: jax.Array) -> bool:
    """Whether `key` (typed, or raw uint32 data of the default implementation) is a threefry key."""
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # a raw key: the default implementation's
    return "threefry" in str(jax.random.key_impl(key))
