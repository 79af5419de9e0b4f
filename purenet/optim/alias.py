"""The lecture's optimizers (plus AdamW), named and defaulted as optax's aliases.

Every optimizer steps `w <- w - lr_t * d_t`, with `lr_t = learning_rate(t)`
for a schedule, and the direction `d_t` given below (`g` is the gradient).
"""
import jax

from purenet.optim.base import Optimizer, chain
from purenet.optim.schedules import Schedule
from purenet.optim.transforms import (
    add_decayed_weights, scale_by_adam, scale_by_momentum, scale_by_rms, scale_by_rss,
)

__all__ = ["adagrad", "adam", "adamw", "momentum", "nesterov", "rmsprop", "sgd"]


def sgd(learning_rate: float | jax.Array | Schedule) -> Optimizer:
    """Vanilla gradient descent (Robbins & Monro, 1951): `d = g`.

    Args:
        learning_rate: the step size: a float, a traced scalar, or a schedule
            step -> rate (`pn.schedules`).

    Returns:
        An `Optimizer` with no transforms.

    Raises:
        ValueError: if a concrete `learning_rate` is negative, NaN or infinite.
    """
    return chain(learning_rate=learning_rate)


def momentum(learning_rate: float | jax.Array | Schedule, momentum: float = 0.9) -> Optimizer:
    """Momentum gradient descent (Polyak, 1964): `v <- g + beta v; d = v` (as optax.sgd).

    Args:
        learning_rate: the step size: a float, a traced scalar, or a schedule
            step -> rate (`pn.schedules`).
        momentum: beta, the velocity's decay, in [0, 1).

    Returns:
        An `Optimizer`: `scale_by_momentum(momentum)` then the learning rate.

    Raises:
        ValueError: if `momentum` is outside [0, 1), or a concrete
            `learning_rate` is negative, NaN or infinite.
    """
    return chain(scale_by_momentum(momentum), learning_rate=learning_rate)


def nesterov(learning_rate: float | jax.Array | Schedule, momentum: float = 0.9) -> Optimizer:
    """Nesterov accelerated gradient (Nesterov, 1983; Sutskever et al., 2013).

    `v <- g + beta v; d = g + beta v` with the new `v` (as optax.sgd(..., nesterov=True)).

    Args:
        learning_rate: the step size: a float, a traced scalar, or a schedule
            step -> rate (`pn.schedules`).
        momentum: beta, the velocity's decay, in [0, 1).

    Returns:
        An `Optimizer`: `scale_by_momentum(momentum, nesterov=True)` then the learning rate.

    Raises:
        ValueError: if `momentum` is outside [0, 1), or a concrete
            `learning_rate` is negative, NaN or infinite.
    """
    return chain(scale_by_momentum(momentum, nesterov=True), learning_rate=learning_rate)


def adagrad(learning_rate: float | jax.Array | Schedule, initial_accumulator_value: float = 0.1,
            eps: float = 1e-7) -> Optimizer:
    """AdaGrad (Duchi et al., 2011): `G <- G + g^2; d = g / sqrt(G + eps)`.

    `G_0 = initial_accumulator_value`.

    Args:
        learning_rate: the step size: a float, a traced scalar, or a schedule
            step -> rate (`pn.schedules`).
        initial_accumulator_value: `G_0`, where the sum of squares starts (>= 0).
        eps: added to `G` inside the square root (>= 0).

    Returns:
        An `Optimizer`: `scale_by_rss(initial_accumulator_value, eps)` then the learning rate.

    Raises:
        ValueError: if `initial_accumulator_value` or `eps` is negative or not
            finite, or a concrete `learning_rate` is negative, NaN or infinite.
    """
    return chain(scale_by_rss(initial_accumulator_value, eps), learning_rate=learning_rate)


def rmsprop(learning_rate: float | jax.Array | Schedule, decay: float = 0.9, eps: float = 1e-8) -> Optimizer:
    """RMSProp (Tieleman & Hinton, 2012): `s <- decay s + (1 - decay) g^2; d = g / sqrt(s + eps)`.

    Args:
        learning_rate: the step size: a float, a traced scalar, or a schedule
            step -> rate (`pn.schedules`).
        decay: the running mean's decay, in [0, 1).
        eps: added to `s` inside the square root (>= 0).

    Returns:
        An `Optimizer`: `scale_by_rms(decay, eps)` then the learning rate.

    Raises:
        ValueError: if `decay` is outside [0, 1), `eps` is negative or not
            finite, or a concrete `learning_rate` is negative, NaN or infinite.
    """
    return chain(scale_by_rms(decay, eps), learning_rate=learning_rate)


def adam(learning_rate: float | jax.Array | Schedule, b1: float = 0.9, b2: float = 0.999,
         eps: float = 1e-8) -> Optimizer:
    """Adam (Kingma & Ba, 2015): bias-corrected moments, `d = mhat / (sqrt(vhat) + eps)`.

    Args:
        learning_rate: the step size: a float, a traced scalar, or a schedule
            step -> rate (`pn.schedules`).
        b1: the first moment's decay, in [0, 1).
        b2: the second moment's decay, in [0, 1).
        eps: added to `sqrt(vhat)`, outside the root (>= 0).

    Returns:
        An `Optimizer`: `scale_by_adam(b1, b2, eps)` then the learning rate.

    Raises:
        ValueError: if `b1` or `b2` is outside [0, 1), `eps` is negative or not
            finite, or a concrete `learning_rate` is negative, NaN or infinite.
    """
    return chain(scale_by_adam(b1, b2, eps), learning_rate=learning_rate)


def adamw(learning_rate: float | jax.Array | Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 1e-4) -> Optimizer:
    """AdamW (Loshchilov & Hutter, 2019): `d = mhat / (sqrt(vhat) + eps) + weight_decay * w`.

    The decay is added to the direction, so it is multiplied by the learning
    rate, as in optax. It decays every parameter; chain
    `add_decayed_weights(weight_decay, mask)` yourself to decay some only.

    Args:
        learning_rate: the step size: a float, a traced scalar, or a schedule
            step -> rate (`pn.schedules`).
        b1: the first moment's decay, in [0, 1).
        b2: the second moment's decay, in [0, 1).
        eps: added to `sqrt(vhat)`, outside the root (>= 0).
        weight_decay: the decoupled weight decay coefficient (>= 0).

    Returns:
        An `Optimizer`: `scale_by_adam(b1, b2, eps)`, `add_decayed_weights(weight_decay)`,
            then the learning rate.

    Raises:
        ValueError: if `b1` or `b2` is outside [0, 1), `eps` or `weight_decay`
            is negative or not finite, or a concrete `learning_rate` is
            negative, NaN or infinite.
    """
    return chain(scale_by_adam(b1, b2, eps), add_decayed_weights(weight_decay), learning_rate=learning_rate)
