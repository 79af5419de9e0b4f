"""Optimizers around optimizers: freezing parameters, and a moving average of them.

    opt = pn.optim.masked(pn.optim.adamw(1e-3), trainable)   # trainable: a tree of bools like params
    opt = pn.optim.ema(pn.optim.adam(1e-3), decay=0.999)     # evaluate with pn.optim.ema_params(opt_state)
"""
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from purenet._checks import check_hyperparameter
from purenet.optim import tree
from purenet.layers.base import PyTree
from purenet.optim.base import Optimizer, Transform, find_slot

__all__ = ["EMAState", "ema", "ema_params", "has_ema", "masked"]


def _leaf_mask(params, trainable):
    """`trainable` (a tree of bools, or a function of params returning one) checked against params."""
    mask = trainable(params) if callable(trainable) else trainable
    tree.check_matching(params, jax.tree_util.tree_map(lambda p, m: jnp.zeros_like(p), params, mask),
                        what="the trainable mask")
    return mask


def masked(opt: Optimizer, trainable: PyTree | Callable[[PyTree], PyTree]) -> Optimizer:
    """Train only the leaves where `trainable` is True; the others stay bit-identical.

    The frozen leaves' gradients are zeroed before the chain (so global-norm
    clipping sees the trainable ones alone) and their update directions after
    it (so weight decay or momentum cannot move them): the trainable leaves
    follow exactly the trajectory of `opt` on the trainable subset.
    `trainable` is a tree of Python bools shaped like params (e.g. built
    with jax.tree_util.tree_map_with_path) or a function params -> that tree.
    A frozen layer's weight gradient is still computed by `value_and_grad`;
    wrap the layer in `pn.Frozen` to skip it.

    Args:
        opt: the optimizer to restrict.
        trainable: a tree of Python bools like params (True: train the leaf),
            or a function params -> that tree.

    Returns:
        An `Optimizer`: `opt`'s transforms between two that zero the frozen
            leaves, with `opt`'s learning rate and guard. Its `step` raises
            ValueError when `trainable` does not match the params' key paths.
    """

    def zero_frozen(d, slots, params, count):
        mask = _leaf_mask(params, trainable)
        return tree.map(lambda d, m: d if m else jnp.zeros_like(d), d, mask), slots

    freeze = Transform(init=lambda params: (), update=zero_frozen)
    return Optimizer((freeze, *opt.transforms, freeze), opt.learning_rate, opt.guard)


class EMAState(NamedTuple):
    """`ema`'s slot: the moving average of the params (a tree like them).

    Attributes:
        average: the averaged params, a tree like params in their dtypes.
    """

    average: Any


def ema(opt: Optimizer, decay: float = 0.999) -> Optimizer:
    """Keep an exponential moving average of the params (Polyak averaging) in the optimizer state.

        avg_0 = params_0,   avg_t = decay avg_{t-1} + (1 - decay) params_t   after step t.

    The average is the slot of type `EMAState`, wherever `ema` sits in a
    chain or wrapper; `ema_params(opt_state)` finds it. It does not change
    training. `fit(..., evaluate_with_ema=True)` validates (and returns) the
    averaged params.

    Args:
        opt: the optimizer whose params to average.
        decay: the average's decay, in [0, 1).

    Returns:
        An `Optimizer`: `opt`'s transforms and one more whose slot is an `EMAState`.

    Raises:
        ValueError: if `decay` is outside [0, 1).
    """
    check_hyperparameter("ema decay", decay, 0.0, 1.0)

    def after(slot, params, count):
        return EMAState(tree.map(lambda a, p: (decay * a + (1 - decay) * p).astype(a.dtype), slot.average, params))

    average = Transform(init=lambda params: EMAState(tree.map(jnp.asarray, params)),
                        update=lambda d, slots, params, count: (d, slots), after=after)
    return Optimizer((*opt.transforms, average), opt.learning_rate, opt.guard)


def has_ema(opt_state: Any) -> bool:
    """Whether the optimizer state keeps a parameter average (`pn.optim.ema`).

    Args:
        opt_state: an optimizer state (`OptState`).

    Returns:
        True when it holds an `EMAState` slot.

    Raises:
        ValueError: if it holds more than one `EMAState` slot.
    """
    return find_slot(opt_state, EMAState) is not None


def ema_params(opt_state: Any) -> PyTree:
    """The moving average of the params kept by `ema`, found by its slot's type through any wrapper.

    Args:
        opt_state: an optimizer state (`OptState`) of an optimizer wrapped in `ema`.

    Returns:
        The averaged params, a tree like params.

    Raises:
        ValueError: if the state keeps no parameter average, or more than one.
    """
    slot = find_slot(opt_state, EMAState)
    if slot is None:
        raise ValueError("this optimizer keeps no parameter average: wrap it in pn.optim.ema(opt, decay) to "
                         "evaluate with the EMA (evaluate_with_ema=True), or evaluate the params themselves")
    return slot.average
