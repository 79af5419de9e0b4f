"""The softmax output layer."""
import dataclasses

import jax
import jax.numpy as jnp

from purenet.layers.base import Array, Elementwise
from purenet.losses import finite_logits

__all__ = ["Softmax"]


@dataclasses.dataclass(frozen=True)
class Softmax(Elementwise):
    """y_k = exp(a_k) / sum_j exp(a_j) over the last axis (computed stably).

    The Jacobian is dy_k/da_j = y_k (delta_kj - y_j), so its vector product is

        dL/da = y * (dL/dy - sum_k dL/dy_k y_k),

    which holds for any loss on the probabilities (the lecture puts squared
    error on them). Followed by cross-entropy, the network functions skip
    this and use the fused, stable form dL/da = (y - t) / N instead.
    """

    outputs = "probabilities"  # what `generate` and the losses read
    fuses_with = "cross_entropy"  # the network functions compute that loss from the logits instead

    def apply(self, x: Array) -> tuple[Array, Array]:
        y = jax.nn.softmax(finite_logits(x), axis=-1)  # +inf logits give probability 1, not NaN
        return y, y

    def grad(self, y: Array, dy: Array) -> Array:
        # Evaluated as u - y sum(u) with u = y dy: the same rounding as jax's
        # own softmax rule, which matters when a saturated y makes the result
        # a small difference of large terms.
        u = y * dy
        return u - y * jnp.sum(u, axis=-1, keepdims=True)
