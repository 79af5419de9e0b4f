"""A batch in chunks, one after another: the same results with a chunk's working set.

`in_chunks` concatenates per-example rows (per-example norms); `mean_in_chunks`
averages per-chunk means, threading model state through the chunks (DP-SGD's
clipped sums, gradient accumulation). Chunk i draws its randomness from
fold_in(key, i).
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["check_chunk_size", "in_chunks", "mean_in_chunks"]


def check_chunk_size(chunk_size: int | None) -> None:
    """Raise unless chunk_size is None or a positive int."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer (examples per chunk) or None, got {chunk_size!r}")


def _chunks(chunk_size, n):
    """(chunk, number of full chunks); chunk_size=None (or >= n) is one chunk of n."""
    check_chunk_size(chunk_size)
    chunk = n if chunk_size is None else min(chunk_size, n)
    return chunk, n // chunk


def _split(a, chunk, m):
    """The first chunk * m rows of every leaf of `a` as (m, chunk, ...)."""
    return jax.tree_util.tree_map(lambda t: t[:chunk * m].reshape(m, chunk, *t.shape[1:]), a)


def _head(a, k):
    return jax.tree_util.tree_map(lambda t: t[:k], a)


def _rest(a, start):
    return jax.tree_util.tree_map(lambda t: t[start:], a)


def _key(key, i):
    return None if key is None else jax.random.fold_in(key, i)


def in_chunks(fn: Callable[[jax.Array, jax.Array, jax.Array | None], Any], chunk_size: int | None, x: jax.Array,
              y: jax.Array, key: jax.Array | None = None) -> Any:
    """fn(x, y, key) -> rows (a tree of (n, ...) arrays), run `chunk_size` examples at a time.

    The full chunks run one after another in a `lax.map` (chunk i draws its
    randomness from fold_in(key, i)); the remainder, if the batch does not
    divide, runs after them. Only one chunk's working set is live at a time.
    """
    n = x.shape[0]
    chunk, m = _chunks(chunk_size, n)
    if m == 1 and chunk == n:
        return fn(x, y, key)
    rows = jax.lax.map(lambda a: fn(a[0], a[1], _key(key, a[2])), (_split(x, chunk, m), _split(y, chunk, m),
                                                                    jnp.arange(m)))
    rows = jax.tree_util.tree_map(lambda r: r.reshape(chunk * m, *r.shape[2:]), rows)
    if chunk * m == n:
        return rows
    rest = fn(_rest(x, chunk * m), _rest(y, chunk * m), _key(key, m))
    return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), rows, rest)


def mean_in_chunks(fn: Callable[[Any, Any, Any, jax.Array | None], tuple], chunk_size: int | None,
                   state: Any, x: Any, y: Any, key: jax.Array | None = None) -> tuple:
    """fn(state, x, y, key) -> (means, state) over the batch, `chunk_size` examples at a time.

    `means` (a tree) are means over a chunk's examples; the batch's mean is
    their average weighted by chunk sizes. State threads through the chunks
    in order (a `lax.scan`), chunk i draws from fold_in(key, i).
    """
    n = x.shape[0]
    chunk, m = _chunks(chunk_size, n)
    if m == 1 and chunk == n:
        *means, state = fn(state, x, y, key)
        return (*means, state)

    def step(carry, a):
        state, total = carry
        *means, state = fn(state, a[0], a[1], _key(key, a[2]))
        return (state, jax.tree_util.tree_map(jnp.add, total, tuple(means))), None

    first = jax.eval_shape(lambda: fn(state, _head(x, chunk), _head(y, chunk), _key(key, 0))[:-1])
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), first)
    (state, total), _ = jax.lax.scan(step, (state, zeros), (_split(x, chunk, m), _split(y, chunk, m), jnp.arange(m)))
    if chunk * m == n:  # equal chunks: the mean of their means
        return (*jax.tree_util.tree_map(lambda t: t / m, total), state)
    *means, state = fn(state, _rest(x, chunk * m), _rest(y, chunk * m), _key(key, m))
    total = jax.tree_util.tree_map(lambda t, r: (t * chunk + r * (n - chunk * m)) / n, total, tuple(means))
    return (*total, state)
