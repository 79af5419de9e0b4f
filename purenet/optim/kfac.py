"""K-FAC (Martens & Grosse, 2015): gradients preconditioned by Kronecker-factored curvature.

For a Dense layer (and Conv2D, on its patches: KFC, Grosse & Martens, 2016)
the empirical Fisher of the weights [W; b] is approximated as A (x) G, with
A = E[a a^T] over the layer's bias-augmented inputs and G = E[dy dy^T] over
its per-example output gradients (`pn.stats.kfac_factors` states the
scaling). Its inverse applied to the gradient is two small solves:

    (A (x) G)^-1 vec([dW; db]) = A^-1 [dW; db] G^-1

Factors flow in explicitly, so the step stays a pure function of its
arguments: the train step computes them with the gradient, from the same
forward and backward pass, and passes them to `step`:

    opt = pn.optim.kfac(net, learning_rate=0.05)
    opt_state = opt.init(params)
    value, grads, factors, state = pn.stats.kfac_value_and_grad(net, opt_state.params, state, x, y)
    opt_state = opt.step(opt_state, grads, factors)

`pn.fit` does this by itself when given a KFAC optimizer. Each step
    1. averages the factors:  F <- ema F + (1 - ema) F_batch  (the first step takes F_batch),
    2. every `inverse_every` steps (the first included) inverts the damped factors,
       with Tikhonov damping split between them (Martens & Grosse, 2015, sec. 6.3):
           pi = sqrt((tr A / dim A) / (tr G / dim G)),
           (A + pi sqrt(damping) I)^-1,   (G + sqrt(damping) / pi I)^-1,
    3. preconditions each Dense / Conv2D gradient with the stored inverses
       (other parameters, such as LayerNorm's, keep their plain gradient),
    4. hands the result to the inner optimizer (momentum SGD by default).
"""
import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from purenet._checks import check_hyperparameter
from purenet.layers.base import KFACFactors
from purenet.optim.base import OptState


class KFACState(NamedTuple):
    """K-FAC's slot: the running factors and the inverses of their damped versions."""

    factors: Any   # tree like params, KFACFactors(A, G) per Dense / Conv2D layer, None elsewhere
    inverses: Any  # the same structure, KFACFactors(A_damped^-1, G_damped^-1)


def _is_factors(t):
    return t is None or isinstance(t, KFACFactors)


def _damped_inverses(f, damping):
    eye_a, eye_g = jnp.eye(f.A.shape[0], dtype=f.A.dtype), jnp.eye(f.G.shape[0], dtype=f.G.dtype)
    tiny = jnp.finfo(f.A.dtype).tiny
    mean_a = jnp.maximum(jnp.trace(f.A) / f.A.shape[0], tiny)
    mean_g = jnp.maximum(jnp.trace(f.G) / f.G.shape[0], tiny)
    pi = jnp.sqrt(mean_a / mean_g)
    root = jnp.sqrt(jnp.asarray(damping, f.A.dtype))
    return KFACFactors(jnp.linalg.inv(f.A + pi * root * eye_a), jnp.linalg.inv(f.G + root / pi * eye_g))


def _precondition(inverse, grads):
    """A^-1 [dW; db] G^-1 for one layer's gradient dict (W of any shape (..., out))."""
    if inverse is None:
        return grads
    W = grads["W"]
    rows = [W.reshape(-1, W.shape[-1])]
    if "b" in grads:
        rows.append(grads["b"][None, :])
    m = jnp.concatenate(rows, axis=0) if len(rows) > 1 else rows[0]
    m = inverse.A.astype(m.dtype) @ m @ inverse.G.astype(m.dtype)
    out = dict(grads, W=m[: rows[0].shape[0]].reshape(W.shape))
    if "b" in grads:
        out["b"] = m[-1]
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class KFAC:
    """K-FAC preconditioning in front of an inner optimizer; see the module docstring.

    net: the network (to find its Dense and Conv2D layers); inner: any
    optimizer (its learning rate is the step size); damping > 0; ema in
    [0, 1); inverse_every >= 1 steps. opt_state.slots[0] is a KFACState,
    the rest are the inner optimizer's.
    """

    net: Any
    inner: Any
    damping: float = 1.0
    ema: float = 0.95
    inverse_every: int = 10

    def __post_init__(self):
        check_hyperparameter("damping", self.damping, 0.0, None, low_open=True)
        check_hyperparameter("ema", self.ema, 0.0, 1.0)
        if isinstance(self.inverse_every, bool) or not isinstance(self.inverse_every, int) or self.inverse_every < 1:
            raise ValueError(f"inverse_every must be a positive int, got {self.inverse_every!r}")

    @property
    def learning_rate(self):
        return self.inner.learning_rate

    def init(self, params):
        from purenet.stats import kfac_zeros

        zeros = kfac_zeros(self.net, params)
        state = self.inner.init(params)
        return state._replace(slots=(KFACState(zeros, zeros),) + tuple(state.slots))

    def step(self, state, grads, factors=None):
        """The next OptState from the gradient and this batch's factors (`pn.stats.kfac_factors`)."""
        if factors is None:
            raise TypeError("K-FAC's step needs this batch's factors: opt.step(opt_state, grads, factors) with "
                            "factors from pn.stats.kfac_value_and_grad or pn.stats.kfac_factors")
        slot = state.slots[0]
        if jax.tree_util.tree_structure(factors) != jax.tree_util.tree_structure(slot.factors):
            raise ValueError("the factors do not match this optimizer's network: compute them with the net "
                             "that pn.optim.kfac was given")
        weight = jnp.where(state.count == 0, 0.0, self.ema)
        running = jax.tree_util.tree_map(lambda old, new: weight.astype(new.dtype) * old
                                         + (1 - weight).astype(new.dtype) * new, slot.factors, factors)
        inverses = jax.lax.cond(
            state.count % self.inverse_every == 0,
            lambda f: jax.tree_util.tree_map(lambda t: None if t is None else _damped_inverses(t, self.damping),
                                             f, is_leaf=_is_factors),
            lambda f: slot.inverses, running)
        direction = jax.tree_util.tree_map(_precondition, inverses, grads, is_leaf=_is_factors)
        inner = self.inner.step(OptState(state.params, state.count, tuple(state.slots[1:]), state.learning_rate),
                                direction)
        return inner._replace(slots=(KFACState(running, inverses),) + tuple(inner.slots))


def kfac(net, learning_rate, momentum=0.9, damping=1.0, ema=0.95, inverse_every=10):
    """K-FAC with momentum SGD as the inner optimizer (plain SGD for momentum=0): KFAC(net, inner, ...)."""
    from purenet.optim.alias import momentum as momentum_sgd
    from purenet.optim.alias import sgd

    inner = sgd(learning_rate) if momentum == 0 else momentum_sgd(learning_rate, momentum)
    return KFAC(net, inner, damping, ema, inverse_every)


__all__ = ["KFAC", "KFACState", "kfac"]
