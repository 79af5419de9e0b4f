"""Poisson sampling of DP-SGD's batches with static shapes.

    bound = pn.privacy.poisson_batch_bound(n, q)           # the padded batch's static size
    batch = pn.privacy.poisson_batch(key, n, q, bound)     # rows, 0/1 marks, overflow

Each example joins a step's batch independently with probability q (the
sampling the accountant analyses); the batch is padded to a static size so
that a jitted step compiles once.
"""
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from purenet.privacy.accounting import _count, _real

__all__ = ["OVERFLOW_PROBABILITY", "PoissonBatch", "poisson_batch", "poisson_batch_bound"]

OVERFLOW_PROBABILITY = 1e-9  # per step: the chance a Poisson batch exceeds its static bound

def poisson_batch_bound(n: int, sample_rate: float, overflow: float = OVERFLOW_PROBABILITY) -> int:
    """The static size B of a padded Poisson batch: P(Binomial(n, q) > B) <= overflow.

    Bernstein's inequality for a sum of n Bernoulli(q) with mean m = n q and
    variance v = n q (1 - q) <= m:  P(X > m + t) <= exp(-t^2 / (2 (v + t/3))),
    so with L = ln(1/overflow), t = L/3 + sqrt((L/3)^2 + 2 v L) suffices and
    B = ceil(m + t) (at most n). For n = 60,000 and q = 256/60,000: B = 366,
    1.43x the expected batch; a batch larger than B (probability <= 1e-9 a
    step) keeps its first B examples and counts as an overflow.

    Args:
        n: the number of training examples (an int >= 1).
        sample_rate: q, each example's probability of joining a step's batch, in (0, 1].
        overflow: the allowed probability, per step, that a batch exceeds B, in (0, 1).

    Returns:
        B, the padded batch's static size (an int, at most n).

    Raises:
        ValueError: if `n` is not an int >= 1, or `sample_rate` or `overflow` is out of range.
    """
    n = _count("n", n, 1)
    sample_rate = _real("sample_rate", sample_rate, 0.0, 1.0, True, False)
    overflow = _real("overflow", overflow, 0.0, 1.0, True, True)
    m = n * sample_rate
    v = m * (1 - sample_rate)
    log = math.log(1 / overflow)
    t = log / 3 + math.sqrt((log / 3) ** 2 + 2 * v * log)
    return int(min(n, math.ceil(m + t)))


class PoissonBatch(NamedTuple):
    """One step's Poisson sample as a padded batch of static size B.

    Attributes:
        rows: (B,) int32 example indices, the sampled examples first in increasing order
            (padding points at example 0).
        weight: (B,) float32, 1 for a sampled example, 0 for padding.
        overflow: () int32, how many sampled examples did not fit in B (0 almost surely).
    """

    rows: jax.Array      # (B,) example indices (padding points at example 0)
    weight: jax.Array    # (B,) 1 for a sampled example, 0 for padding
    overflow: jax.Array  # () int32: sampled examples that did not fit in B (0 almost surely)


def poisson_batch(key: jax.Array, n: int, sample_rate: float, bound: int) -> PoissonBatch:
    """Each of n examples joins with probability sample_rate, independently; at most `bound` are kept.

    Args:
        key: the step's PRNG key for the sampling.
        n: the number of training examples (a static int).
        sample_rate: q, each example's probability of joining.
        bound: B, the padded batch's static size (`poisson_batch_bound(n, q)`).

    Returns:
        The `PoissonBatch` (rows, weight, overflow); a sample larger than B keeps its B
            lowest-indexed examples.
    """
    joined = jax.random.bernoulli(key, sample_rate, (n,))
    count = jnp.sum(joined, dtype=jnp.int32)
    (index,) = jnp.nonzero(joined, size=bound, fill_value=0)
    weight = (jnp.arange(bound) < count).astype(jnp.float32)
    return PoissonBatch(index.astype(jnp.int32), weight, jnp.maximum(count - bound, 0))
