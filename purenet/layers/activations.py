"""Hidden-layer activations h = g(a), each with its local derivative g'(a).

Each forward caches the least the backward needs (the output for sigmoid and
tanh, a mask for relu, the input for the smooth modern ones), and the
backward is dL/da = dL/dh * g'(a). Definitions are `jax.nn`'s (PyTorch's
agree); at the kinks we follow `jax.nn`: relu'(0) = 0, leaky_relu'(0) = 1,
elu'(0) = alpha.

`ACTIVATIONS` maps each name (as `pn.mlp(hidden=...)` takes it) to its
class: adding an activation means adding its class and one entry there.
"""
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from purenet._checks import check_hyperparameter
from purenet.layers.base import Array, Elementwise

__all__ = ["ACTIVATIONS", "ELU", "GELU", "Identity", "LeakyReLU", "ReLU", "SiLU", "Sigmoid", "Softplus", "Tanh"]


@dataclasses.dataclass(frozen=True)
class Sigmoid(Elementwise):
    """Logistic  h = 1 / (1 + exp(-a)),  h' = h (1 - h).

    Computed without overflow: h(+-1000) is exactly 1 or 0 and h' is 0.
    """

    fuses_with = "binary_cross_entropy"  # as the last layer, that loss is computed from the logits

    def apply(self, x: Array) -> tuple[Array, Any]:
        y = jax.nn.sigmoid(x)
        return y, y

    def grad(self, y: Array, dy: Array) -> Array:
        return dy * (y * (1 - y))

    def second_derivative(self, y: Array) -> Array:
        """h'' = h (1 - h) (1 - 2h)."""
        return y * (1 - y) * (1 - 2 * y)

    def activation_stats(self, y: Array) -> tuple[Array | None, Array | None]:
        """(dead, saturated) per unit for diagnostics: saturated where h < 0.01 or h > 0.99."""
        return None, jnp.abs(y - 0.5) > 0.49


@dataclasses.dataclass(frozen=True)
class Tanh(Elementwise):
    """h = tanh(a),  h' = 1 - h^2 = (1 + h)(1 - h).

    The factored form keeps its precision where tanh saturates (1 - h^2
    cancels when h is near +-1); it is also the form jax uses.
    """

    def apply(self, x: Array) -> tuple[Array, Any]:
        y = jnp.tanh(x)
        return y, y

    def grad(self, y: Array, dy: Array) -> Array:
        g = dy * (1 - y)
        return g + g * y

    def second_derivative(self, y: Array) -> Array:
        """h'' = -2 h (1 - h^2)."""
        return -2 * y * ((1 - y) * (1 + y))

    def activation_stats(self, y: Array) -> tuple[Array | None, Array | None]:
        """(dead, saturated) per unit for diagnostics: saturated where |h| > 0.99."""
        return None, jnp.abs(y) > 0.99


@dataclasses.dataclass(frozen=True)
class ReLU(Elementwise):
    """h = max(a, 0),  h' = 1 if a > 0 else 0 (so relu'(0) = 0)."""
    piecewise_linear = True  # no second-order term: pn.stats.hessian_diagonal passes through

    def apply(self, x: Array) -> tuple[Array, Any]:
        return jax.nn.relu(x), x > 0

    def grad(self, positive: Array, dy: Array) -> Array:
        return jnp.where(positive, dy, jnp.zeros_like(dy))

    def activation_stats(self, positive: Array) -> tuple[Array | None, Array | None]:
        """(dead, saturated) per unit for diagnostics: dead where a <= 0."""
        return ~positive, None


@dataclasses.dataclass(frozen=True)
class LeakyReLU(Elementwise):
    """h = a if a >= 0 else s a,  h' = 1 if a >= 0 else s (so leaky_relu'(0) = 1).

    Args:
        negative_slope: s, the slope below zero (default 0.01, as PyTorch and `jax.nn`).

    Raises:
        ValueError: if `negative_slope` is NaN or infinite.
    """
    piecewise_linear = True  # no second-order term: pn.stats.hessian_diagonal passes through

    negative_slope: float = 0.01

    def __post_init__(self) -> None:
        check_hyperparameter("negative_slope", self.negative_slope)

    def apply(self, x: Array) -> tuple[Array, Any]:
        nonneg = x >= 0
        return jnp.where(nonneg, x, self.negative_slope * x), nonneg

    def grad(self, nonneg: Array, dy: Array) -> Array:
        return jnp.where(nonneg, dy, self.negative_slope * dy)

    def activation_stats(self, nonneg: Array) -> tuple[Array | None, Array | None]:
        """(dead, saturated) per unit for diagnostics: dead where a < 0."""
        return ~nonneg, None


@dataclasses.dataclass(frozen=True)
class Identity(Elementwise):
    """The linear activation h = a,  h' = 1."""
    piecewise_linear = True  # no second-order term: pn.stats.hessian_diagonal passes through

    def apply(self, x: Array) -> tuple[Array, Any]:
        return x, None

    def grad(self, cache: Any, dy: Array) -> Array:
        return dy


@dataclasses.dataclass(frozen=True)
class GELU(Elementwise):
    """Gaussian error linear unit (Hendrycks & Gimpel, 2016).

    Exact:  h = a Phi(a) = a/2 (1 + erf(a/sqrt 2)),   h' = Phi(a) + a phi(a),
    with Phi, phi the standard normal's distribution and density.
    approximate=True, the tanh form:  h = a c,  c = (1 + t)/2,
    t = tanh(k (a + 0.044715 a^3)), k = sqrt(2/pi),
    h' = c + a/2 (1 - t^2) k (1 + 3 * 0.044715 a^2).

    Phi is written through erf, as PyTorch writes it, not through erfc as
    `jax.nn.gelu` does: erf is the faster of the two on XLA:CPU
    (benchmarks/README.md, section "GPT train step"), and in a compiled step XLA
    shares the forward's erf(a/sqrt 2) with the backward (one
    activation-sized buffer kept; erfc's form kept three). The two agree to
    float rounding except in the far negative tail: below a ~ -5.4, where
    Phi(a) < 3e-8, 1 + erf rounds to 0 in float32 (erfc keeps the tiny
    values).

    Args:
        approximate: False (the default) for the exact erf form, True for the
            tanh form (GPT-2's "gelu_new", PyTorch's approximate="tanh").
    """

    approximate: bool = False

    def apply(self, x: Array) -> tuple[Array, Any]:
        if self.approximate:
            return jax.nn.gelu(x, approximate=True), x
        return 0.5 * x * (1 + jax.lax.erf(x * math.sqrt(0.5))), x

    def grad(self, x: Array, dy: Array) -> Array:
        if self.approximate:
            k = math.sqrt(2 / math.pi)
            t = jnp.tanh(k * (x + 0.044715 * x**3))
            slope = 0.5 * (1 + t) + 0.5 * x * ((1 - t) * (1 + t)) * k * (1 + 3 * 0.044715 * x**2)
        else:
            z = x * math.sqrt(0.5)
            slope = 0.5 * (1 + jax.lax.erf(z)) + x * jnp.exp(-(z * z)) * (1 / math.sqrt(2 * math.pi))
        return dy * slope

    def second_derivative(self, x: Array) -> Array:
        """Exact: h'' = phi(a) (2 - a^2). Tanh form, with u = k (a + 0.044715 a^3):
        h'' = (1 - t^2) u' + a/2 (1 - t^2) (u'' - 2 t u'^2)."""
        if self.approximate:
            k = math.sqrt(2 / math.pi)
            t = jnp.tanh(k * (x + 0.044715 * x**3))
            du, ddu, sech2 = k * (1 + 3 * 0.044715 * x**2), 6 * k * 0.044715 * x, (1 - t) * (1 + t)
            return sech2 * du + 0.5 * x * sech2 * (ddu - 2 * t * du * du)
        return jnp.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi)) * (2 - x * x)

    def activation_stats(self, x: Array) -> tuple[Array | None, Array | None]:
        """(dead, saturated) per unit for diagnostics: dead where a <= 0 (the flat side)."""
        return x <= 0, None


@dataclasses.dataclass(frozen=True)
class SiLU(Elementwise):
    """Sigmoid linear unit (swish):  h = a s,  s = sigmoid(a),  h' = s + a s (1 - s)."""

    def apply(self, x: Array) -> tuple[Array, Any]:
        return jax.nn.silu(x), x

    def grad(self, x: Array, dy: Array) -> Array:
        s = jax.nn.sigmoid(x)
        return dy * (s + x * s * (1 - s))

    def second_derivative(self, x: Array) -> Array:
        """h'' = s (1 - s) (2 + a (1 - 2 s))."""
        s = jax.nn.sigmoid(x)
        return s * (1 - s) * (2 + x * (1 - 2 * s))

    def activation_stats(self, x: Array) -> tuple[Array | None, Array | None]:
        """(dead, saturated) per unit for diagnostics: dead where a <= 0 (the flat side)."""
        return x <= 0, None


@dataclasses.dataclass(frozen=True)
class ELU(Elementwise):
    """Exponential linear unit (Clevert et al., 2015).

        h = a if a > 0 else alpha (e^a - 1),   h' = 1 if a > 0 else alpha e^a.

    Args:
        alpha: the scale of the negative side, which tends to -alpha (default 1.0).

    Raises:
        ValueError: if `alpha` is NaN or infinite.
    """

    alpha: float = 1.0

    def __post_init__(self) -> None:
        check_hyperparameter("ELU alpha", self.alpha)

    def apply(self, x: Array) -> tuple[Array, Any]:
        return jax.nn.elu(x, self.alpha), x

    def grad(self, x: Array, dy: Array) -> Array:
        positive = x > 0
        return jnp.where(positive, dy, dy * self.alpha * jnp.exp(jnp.where(positive, 0.0, x)))

    def second_derivative(self, x: Array) -> Array:
        """h'' = 0 for a > 0, alpha e^a below."""
        positive = x > 0
        return jnp.where(positive, 0.0, self.alpha * jnp.exp(jnp.where(positive, 0.0, x))).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Softplus(Elementwise):
    """h = log(1 + e^a) (computed as logaddexp(a, 0): no overflow),  h' = sigmoid(a)."""

    def apply(self, x: Array) -> tuple[Array, Any]:
        return jax.nn.softplus(x), x

    def grad(self, x: Array, dy: Array) -> Array:
        return dy * jax.nn.sigmoid(x)

    def second_derivative(self, x: Array) -> Array:
        """h'' = s (1 - s), s = sigmoid(a)."""
        s = jax.nn.sigmoid(x)
        return s * (1 - s)


ACTIVATIONS = {
    "sigmoid": Sigmoid, "tanh": Tanh, "relu": ReLU, "leaky_relu": LeakyReLU,
    "identity": Identity, "linear": Identity,
    "gelu": GELU, "silu": SiLU, "elu": ELU, "softplus": Softplus,
}
