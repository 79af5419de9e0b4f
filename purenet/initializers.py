"""Weight initializers, drawn exactly as `jax.nn.initializers` of the same name.

(Except "normal": here N(0, 1), where JAX's `normal()` defaults to a
standard deviation of 0.01.)

For a weight of shape (fan_in, fan_out) and a scale s, variance scaling draws
with variance  s / fan,  where fan is fan_in or (fan_in + fan_out) / 2. A
convolution kernel (kh, kw, in, out) has a receptive field of kh kw inputs
per channel: fan_in = kh kw in, fan_out = kh kw out, as in JAX.

    xavier_uniform  s=1, fan_avg, U(-sqrt(3 var), sqrt(3 var))      Glorot & Bengio, 2010
    xavier_normal   s=1, fan_avg, truncated normal
    he_normal       s=2, fan_in,  truncated normal                  He et al., 2015
    he_uniform      s=2, fan_in,  uniform
    lecun_normal    s=1, fan_in,  truncated normal                  LeCun et al., 1998
    normal          N(0, 1) per weight (the "naive" initialisation, for studies)
    zeros           all zeros

The truncated normal is cut at two standard deviations and rescaled by
1/0.8796... so that its variance is exactly `var`, as in JAX.
"""
import math
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from purenet._keys import is_threefry

__all__ = ["INITIALIZERS", "default_float", "get"]

_TRUNCATED_STD = 0.87962566103423978  # std of a unit normal truncated to [-2, 2]


@partial(jax.jit, static_argnames=("distribution", "size", "dtype"))
def _flat_draw(key: jax.Array, scale: jax.Array, distribution: str, size: int, dtype: Any) -> jax.Array:
    if distribution == "uniform":
        z = jax.random.uniform(key, (size,), dtype, -1)
    elif distribution == "truncated_normal":
        z = jax.random.truncated_normal(key, -2, 2, (size,), dtype)
    else:
        z = jax.random.normal(key, (size,), dtype)
    return z * scale


def _bucket(n: int, key: jax.Array) -> int:
    """The size drawn for n entries: the next power of two (at least 1024; a multiple of 2^20 past
    it) where a draw's first n entries are the n-entry draw's (partitionable threefry, JAX's
    default), so weights of different sizes share one compiled program; else n itself."""
    if not (is_threefry(key) and getattr(jax.config, "jax_threefry_partitionable")):
        return n
    if n > 2**20:
        return -(-n // 2**20) * 2**20
    return max(1024, 1 << (n - 1).bit_length())


def _draw(key: jax.Array, scale: jax.Array, distribution: str, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """scale * a draw of `distribution` of `shape`, taken as the first entries of a flat draw: the
    same values as drawing the shape itself, but XLA:CPU compiles a flat program far faster than a
    small 4-D kernel's, such as (3, 3, 8, 16), and sizes share programs (`_bucket`) (measured in
    benchmarks/README.md, "Whole processes: the CNN and the autoencoder")."""
    n = math.prod(shape)
    flat = _flat_draw(key, scale, distribution, _bucket(n, key), jnp.dtype(dtype))
    return flat[:n].reshape(shape)


def _variance_scaling(scale, mode, distribution):
    def init(key, shape, dtype):
        if len(shape) < 2:
            raise ValueError(f"variance-scaling initializers need a weight of at least 2 dimensions (fan_in, "
                             f"fan_out), got shape {tuple(shape)}; for a bias or a scale use 'zeros' or 'normal'")
        receptive = math.prod(shape[:-2])
        fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
        fan = fan_in if mode == "fan_in" else (fan_in + fan_out) / 2
        variance = jnp.array(scale / max(1.0, fan), dtype=dtype)
        if distribution == "uniform":
            return _draw(key, jnp.sqrt(3 * variance), "uniform", tuple(shape), jnp.dtype(dtype))
        stddev = jnp.sqrt(variance) / jnp.array(_TRUNCATED_STD, dtype)
        return _draw(key, stddev, "truncated_normal", tuple(shape), jnp.dtype(dtype))

    return init


def _normal(key, shape, dtype):
    return _draw(key, jnp.ones((), dtype), "normal", tuple(shape), jnp.dtype(dtype))


def _zeros(key, shape, dtype):
    del key
    return jnp.zeros(shape, dtype)


# An initializer draws a weight: (key, shape, dtype) -> array of that shape and dtype.
INITIALIZERS: dict[str, Callable[[jax.Array, tuple[int, ...], Any], jax.Array]] = {
    "xavier_uniform": _variance_scaling(1.0, "fan_avg", "uniform"),
    "xavier_normal": _variance_scaling(1.0, "fan_avg", "truncated_normal"),
    "he_normal": _variance_scaling(2.0, "fan_in", "truncated_normal"),
    "he_uniform": _variance_scaling(2.0, "fan_in", "uniform"),
    "lecun_normal": _variance_scaling(1.0, "fan_in", "truncated_normal"),
    "normal": _normal,
    "zeros": _zeros,
}


def get(name: str) -> Callable[[jax.Array, tuple[int, ...], Any], jax.Array]:
    """The initializer `(key, shape, dtype) -> array` called `name`.

    Args:
        name: a key of `INITIALIZERS`: "xavier_uniform", "xavier_normal",
            "he_normal", "he_uniform", "lecun_normal", "normal" or "zeros".

    Returns:
        The function `init(key, shape, dtype)` that draws an array of that
            shape and dtype. The variance-scaling ones need a shape of rank >= 2
            (fan_in, fan_out last) and raise a ValueError otherwise.

    Raises:
        ValueError: if `name` names no initializer.
    """
    try:
        return INITIALIZERS[name]
    except KeyError:
        raise ValueError(
            f"unknown initializer {name!r}; choose one of {sorted(INITIALIZERS)}"
        ) from None


def default_float() -> np.dtype:
    """JAX's default float dtype: float64 under jax_enable_x64, else float32.

    Returns:
        The dtype `jnp.float64` canonicalises to (a NumPy dtype).
    """
    return jax.dtypes.canonicalize_dtype(jnp.float64)
