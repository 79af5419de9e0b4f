"""Composable gradient transforms: gradient -> update direction, with slots.

Each is the math of one idea; the optimizers in `alias` are chains of these.
Conventions follow optax, so trajectories match its aliases exactly.
"""
from typing import Callable, NamedTuple

import jax.numpy as jnp

from purenet._checks import check_hyperparameter
from purenet.optim import tree
from purenet.layers.base import PyTree
from purenet.optim.base import Transform

__all__ = [
    "AdamState", "add_decayed_weights", "clip_by_global_norm", "scale_by_adam", "scale_by_momentum", "scale_by_rms", "scale_by_rss",
]


def _stateless(fn):
    return Transform(init=lambda params: (), update=fn)


def scale_by_momentum(momentum: float = 0.9, nesterov: bool = False) -> Transform:
    """Heavy-ball velocity (Polyak, 1964) or Nesterov's look-ahead (Nesterov, 1983; Sutskever et al., 2013).

        v <- g + momentum * v
        d  = v                       (momentum)
        d  = g + momentum * v        (nesterov, with the new v)

    Velocity starts at zero. This is optax.sgd(..., momentum, nesterov).

    Args:
        momentum: the velocity's decay, in [0, 1).
        nesterov: use Nesterov's look-ahead direction instead of the velocity.

    Returns:
        A `Transform` whose slot is the velocity, a tree like params.

    Raises:
        ValueError: if `momentum` is outside [0, 1).
    """
    check_hyperparameter("momentum", momentum, 0.0, 1.0)

    def update(g, v, params, count):
        v = tree.map(lambda g, v: g + momentum * v, g, v)
        d = tree.map(lambda g, v: g + momentum * v, g, v) if nesterov else v
        return d, v

    return Transform(init=tree.zeros_like, update=update)


def scale_by_rss(initial_accumulator_value: float = 0.1, eps: float = 1e-7) -> Transform:
    """AdaGrad's scaling (Duchi et al., 2011): divide by the root of the summed squares.

        G <- G + g^2              (G starts at initial_accumulator_value)
        d  = g / sqrt(G + eps)    (0 where G = 0)

    Args:
        initial_accumulator_value: where the sum of squares G starts (>= 0).
        eps: added to G inside the square root (>= 0).

    Returns:
        A `Transform` whose slot is G, a tree like params (in at least float32).

    Raises:
        ValueError: if `initial_accumulator_value` or `eps` is negative, NaN or infinite.
    """
    check_hyperparameter("initial_accumulator_value", initial_accumulator_value, 0.0, None)
    check_hyperparameter("eps", eps, 0.0, None)

    def update(g, acc, params, count):
        acc = tree.map(lambda g, a: g * g + a, g, acc)
        d = tree.map(lambda g, a: jnp.where(a > 0, 1.0 / jnp.sqrt(a + eps), 0.0) * g, g, acc)
        return d, acc

    return Transform(init=lambda p: tree.zeros_like(p, initial_accumulator_value), update=update)


def scale_by_rms(decay: float = 0.9, eps: float = 1e-8) -> Transform:
    """RMSProp's scaling (Tieleman & Hinton, 2012): a running mean of squares.

        s <- decay * s + (1 - decay) * g^2     (s starts at 0)
        d  = g / sqrt(s + eps)                 (eps inside the root, as optax)

    Args:
        decay: the running mean's decay, in [0, 1).
        eps: added to s inside the square root (>= 0).

    Returns:
        A `Transform` whose slot is s, a tree like params (in at least float32).

    Raises:
        ValueError: if `decay` is outside [0, 1), or `eps` is negative, NaN or infinite.
    """
    check_hyperparameter("decay", decay, 0.0, 1.0)
    check_hyperparameter("eps", eps, 0.0, None)

    def update(g, s, params, count):
        s = tree.map(lambda g, s: (1 - decay) * g**2 + decay * s, g, s)
        return tree.map(lambda g, s: g / jnp.sqrt(s + eps), g, s), s

    return Transform(init=tree.zeros_like, update=update)


class AdamState(NamedTuple):
    """Adam's slot: the running moments m (of g) and v (of `g**2`), each a tree like params.

    Attributes:
        m: the first moment's running mean, a tree like params (in at least float32).
        v: the second moment's running mean, a tree like params (in at least float32).
    """

    m: PyTree
    v: PyTree


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Transform:
    """Adam's scaling (Kingma & Ba, 2015), for step t = count + 1:

        m <- b1 m + (1 - b1) g          mhat = m / (1 - b1^t)
        v <- b2 v + (1 - b2) g^2        vhat = v / (1 - b2^t)
        d  = mhat / (sqrt(vhat) + eps)  (eps outside the root)

    Its slot is an AdamState(m, v) (a state saved as the dict {"m", "v"} before resumes as well).

    Args:
        b1: the first moment's decay, in [0, 1).
        b2: the second moment's decay, in [0, 1).
        eps: added to `sqrt(vhat)`, outside the root (>= 0).

    Returns:
        A `Transform` whose slot is an `AdamState`.

    Raises:
        ValueError: if `b1` or `b2` is outside [0, 1), or `eps` is negative, NaN or infinite.
    """
    check_hyperparameter("b1", b1, 0.0, 1.0)
    check_hyperparameter("b2", b2, 0.0, 1.0)
    check_hyperparameter("eps", eps, 0.0, None)

    def init(params):
        return AdamState(tree.zeros_like(params), tree.zeros_like(params))

    def update(g, slots, params, count):
        m0, v0 = (slots["m"], slots["v"]) if isinstance(slots, dict) else slots
        m = tree.map(lambda g, m: (1 - b1) * g + b1 * m, g, m0)
        v = tree.map(lambda g, v: (1 - b2) * g**2 + b2 * v, g, v0)
        t = count + 1
        c1, c2 = 1 - b1**t, 1 - b2**t
        d = tree.map(
            lambda m, v: (m / c1.astype(m.dtype)) / (jnp.sqrt(v / c2.astype(v.dtype)) + eps), m, v
        )
        return d, ({"m": m, "v": v} if isinstance(slots, dict) else AdamState(m, v))  # an old state keeps its form

    return Transform(init=init, update=update)


def add_decayed_weights(weight_decay: float = 1e-4,
                        mask: Callable[[PyTree], PyTree] | PyTree | None = None) -> Transform:
    """Decoupled weight decay (Loshchilov & Hutter, 2019): `d <- d + weight_decay * params`.

    Chained before the learning rate, the step becomes `w <- w - lr (d + wd w)`.
    `mask`, if given, is a tree of booleans like params (True where to decay),
    or a function params -> that tree; `pn.decay_mask(net, params)` is the
    roles' choice (trainable weight matrices, not biases, gains or embeddings).

    Args:
        weight_decay: the decay coefficient (>= 0).
        mask: a tree of Python bools like params, a function params -> that
            tree, or None to decay every leaf.

    Returns:
        A stateless `Transform`.

    Raises:
        ValueError: if `weight_decay` is negative, NaN or infinite.
    """
    check_hyperparameter("weight_decay", weight_decay, 0.0, None)

    def update(d, slots, params, count):
        which = (mask(params) if callable(mask) else mask) if mask is not None else tree.map(lambda p: True, params)
        return tree.map(lambda d, p, m: d + weight_decay * p if m else d, d, params, which), slots

    return _stateless(update)


def clip_by_global_norm(max_norm: float) -> Transform:
    """Rescale the whole gradient when its global norm exceeds `max_norm`:

        d = g                          if ||g|| < max_norm
        d = g * max_norm / ||g||       otherwise

    `||g||` is the norm of every leaf's entries together (as optax).

    Args:
        max_norm: the largest global norm a direction keeps (> 0).

    Returns:
        A stateless `Transform`.

    Raises:
        ValueError: if `max_norm` is not positive and finite.
    """
    check_hyperparameter("max_norm", max_norm, 0.0, None, low_open=True)

    def update(g, slots, params, count):
        norm = tree.global_norm(g)
        return tree.map(lambda g: jnp.where(norm < max_norm, g, g / norm.astype(g.dtype) * max_norm), g), slots

    return _stateless(update)
