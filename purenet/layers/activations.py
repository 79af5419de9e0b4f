"""Hidden-layer activations h = g(a), each with its local derivative g'(a).

Each forward caches the least the backward needs (the output for sigmoid and
tanh, a mask for relu), and the backward is dL/da = dL/dh * g'(a).
At the kinks we follow `jax.nn`: relu'(0) = 0 and leaky_relu'(0) = 1.
"""
import dataclasses

import jax
import jax.numpy as jnp

from purenet._checks import check_hyperparameter
from purenet.layers.base import Elementwise


@dataclasses.dataclass(frozen=True)
class Sigmoid(Elementwise):
    """Logistic  h = 1 / (1 + exp(-a)),  h' = h (1 - h).

    Computed without overflow: h(+-1000) is exactly 1 or 0 and h' is 0.
    """

    def apply(self, x):
        y = jax.nn.sigmoid(x)
        return y, y

    def grad(self, y, dy):
        return dy * (y * (1 - y))


@dataclasses.dataclass(frozen=True)
class Tanh(Elementwise):
    """h = tanh(a),  h' = 1 - h^2 = (1 + h)(1 - h).

    The factored form keeps its precision where tanh saturates (1 - h^2
    cancels when h is near +-1); it is also the form jax uses.
    """

    def apply(self, x):
        y = jnp.tanh(x)
        return y, y

    def grad(self, y, dy):
        g = dy * (1 - y)
        return g + g * y


@dataclasses.dataclass(frozen=True)
class ReLU(Elementwise):
    """h = max(a, 0),  h' = 1 if a > 0 else 0 (so relu'(0) = 0)."""

    def apply(self, x):
        return jax.nn.relu(x), x > 0

    def grad(self, positive, dy):
        return jnp.where(positive, dy, jnp.zeros_like(dy))


@dataclasses.dataclass(frozen=True)
class LeakyReLU(Elementwise):
    """h = a if a >= 0 else s a,  h' = 1 if a >= 0 else s (so leaky_relu'(0) = 1)."""

    negative_slope: float = 0.01

    def __post_init__(self):
        check_hyperparameter("negative_slope", self.negative_slope)

    def apply(self, x):
        nonneg = x >= 0
        return jnp.where(nonneg, x, self.negative_slope * x), nonneg

    def grad(self, nonneg, dy):
        return jnp.where(nonneg, dy, self.negative_slope * dy)


@dataclasses.dataclass(frozen=True)
class Identity(Elementwise):
    """The linear activation h = a,  h' = 1."""

    def apply(self, x):
        return x, None

    def grad(self, cache, dy):
        return dy
