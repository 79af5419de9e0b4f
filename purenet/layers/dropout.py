"""Inverted dropout."""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from purenet._checks import check_hyperparameter, is_concrete
from purenet.layers.base import Array, PyTree, as_shape

__all__ = ["Dropout"]


@dataclasses.dataclass(frozen=True)
class Dropout:
    """Inverted dropout: in training each unit is dropped with probability `rate`.

    With a mask m_i ~ Bernoulli(1 - rate) drawn from the key,

        y_i = m_i x_i / (1 - rate)          dL/dx_i = m_i dL/dy_i / (1 - rate)

    so E[y] = x and evaluation (train=False) is the identity. `rate` is the
    probability of *dropping* (stax had it backwards: jax#849). Training needs
    an explicit `key`; each Dropout layer in a Sequential draws from its own
    key (folded in by position), so masks are independent across layers.

    Args:
        rate: the probability of dropping a unit, in [0, 1); 0 makes the
            layer the identity.

    Raises:
        ValueError: if a concrete `rate` is NaN or outside [0, 1) (and, in
            `forward` with train=True, if no `key` is given while the rate
            is not a concrete 0).
    """
    piecewise_linear = True  # no second-order term: pn.stats.hessian_diagonal passes through

    positionwise = True  # identity when decoding (evaluation)

    rate: float

    def __post_init__(self) -> None:
        check_hyperparameter("Dropout rate", self.rate, 0.0, 1.0)

    def init(self, key: Array, in_shape: Any, dtype: Any = None) -> tuple[PyTree, PyTree, tuple[int, ...]]:
        del key, dtype
        return {}, {}, as_shape(in_shape)

    def forward(self, params: PyTree, state: PyTree, x: Array, train: bool = False,
                key: Array | None = None) -> tuple[Array, PyTree, Array | None]:
        del params
        if not train or (is_concrete(self.rate) and self.rate == 0):
            return x, state, None
        if key is None:
            raise ValueError(
                "Dropout in training needs a random key: pass key=jax.random.key(...) "
                "to pn.forward / pn.loss / pn.value_and_grad (or train=False to evaluate)"
            )
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(key, keep, jnp.shape(x))
        return jnp.where(mask, x / keep, jnp.zeros_like(x)), state, mask

    def backward(self, params: PyTree, mask: Array | None, dy: Array) -> tuple[PyTree, Array]:
        del params
        if mask is None:
            return {}, dy
        return {}, jnp.where(mask, dy / (1.0 - self.rate), jnp.zeros_like(dy))

