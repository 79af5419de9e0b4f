"""The lecture's optimizers (plus AdamW), named and defaulted as optax's aliases.

Every optimizer steps  w <- w - lr_t * d_t,  with lr_t = learning_rate(t)
for a schedule, and the direction d_t given below (g is the gradient).
"""
import jax

from purenet.optim.base import Optimizer, chain
from purenet.optim.schedules import Schedule
from purenet.optim.transforms import (
    add_decayed_weights, scale_by_adam, scale_by_momentum, scale_by_rms, scale_by_rss,
)

__all__ = ["adagrad", "adam", "adamw", "momentum", "nesterov", "rmsprop", "sgd"]


def sgd(learning_rate: float | jax.Array | Schedule) -> Optimizer:
    """Vanilla gradient descent (Robbins & Monro, 1951): d = g."""
    return chain(learning_rate=learning_rate)


def momentum(learning_rate: float | jax.Array | Schedule, momentum: float = 0.9) -> Optimizer:
    """Momentum gradient descent (Polyak, 1964): v <- g + beta v; d = v (as optax.sgd)."""
    return chain(scale_by_momentum(momentum), learning_rate=learning_rate)


def nesterov(learning_rate: float | jax.Array | Schedule, momentum: float = 0.9) -> Optimizer:
    """Nesterov accelerated gradient (Nesterov, 1983; Sutskever et al., 2013):
    v <- g + beta v; d = g + beta v (as optax.sgd(..., nesterov=True))."""
    return chain(scale_by_momentum(momentum, nesterov=True), learning_rate=learning_rate)


def adagrad(learning_rate: float | jax.Array | Schedule, initial_accumulator_value: float = 0.1,
            eps: float = 1e-7) -> Optimizer:
    """AdaGrad (Duchi et al., 2011): G <- G + g^2; d = g / sqrt(G + eps), G_0 = initial_accumulator_value."""
    return chain(scale_by_rss(initial_accumulator_value, eps), learning_rate=learning_rate)


def rmsprop(learning_rate: float | jax.Array | Schedule, decay: float = 0.9, eps: float = 1e-8) -> Optimizer:
    """RMSProp (Tieleman & Hinton, 2012): s <- decay s + (1 - decay) g^2; d = g / sqrt(s + eps)."""
    return chain(scale_by_rms(decay, eps), learning_rate=learning_rate)


def adam(learning_rate: float | jax.Array | Schedule, b1: float = 0.9, b2: float = 0.999,
         eps: float = 1e-8) -> Optimizer:
    """Adam (Kingma & Ba, 2015): bias-corrected moments, d = mhat / (sqrt(vhat) + eps)."""
    return chain(scale_by_adam(b1, b2, eps), learning_rate=learning_rate)


def adamw(learning_rate: float | jax.Array | Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 1e-4) -> Optimizer:
    """AdamW (Loshchilov & Hutter, 2019): d = mhat / (sqrt(vhat) + eps) + weight_decay * w,
    so the decay is multiplied by the learning rate, as in optax."""
    return chain(scale_by_adam(b1, b2, eps), add_decayed_weights(weight_decay), learning_rate=learning_rate)
