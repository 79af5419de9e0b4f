"""Bridges to optax, which stays optional: imported only when these are called.

    tx = to_optax(pn.optim.adam(1e-3))      # a purenet optimizer as an optax GradientTransformation
    opt = from_optax(optax.lion(1e-4))      # an optax transformation as a purenet optimizer
"""
from typing import TYPE_CHECKING

from purenet.optim import tree
from purenet.optim.base import Optimizer, Transform

if TYPE_CHECKING:
    import optax

__all__ = ["from_optax", "to_optax"]


def to_optax(opt: Optimizer) -> "optax.GradientTransformation":
    """Wrap a purenet optimizer as an optax GradientTransformation.

    The optax state is purenet's OptState; `update` steps from the params it
    is given and returns the difference as the updates (`optax.apply_updates`
    then lands on purenet's new params, up to rounding). `update` has no
    per-step arguments to pass, so an optimizer with `extra_args` (K-FAC's
    factors) is refused.

    Args:
        opt: the purenet optimizer.

    Returns:
        An `optax.GradientTransformation` whose `init` is `opt.init` and whose
            `update(grads, state, params)` raises ValueError when `params` is None.

    Raises:
        ValueError: if `opt` needs per-step arguments beside the gradient (`opt.extra_args`).
    """
    import optax

    if opt.extra_args:
        raise ValueError(f"to_optax cannot wrap an optimizer whose step needs {opt.extra_args} beside the "
                         f"gradient (optax's update passes none): step it with purenet's own loop (pn.fit)")

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("to_optax(...).update needs params (purenet steps from them)")
        new = opt.step(state._replace(params=params), grads)
        return tree.map(lambda n, p: n - p, new.params, params), new

    return optax.GradientTransformation(opt.init, update)


def from_optax(tx: "optax.GradientTransformation") -> Optimizer:
    """Wrap an optax GradientTransformation as a purenet optimizer.

    optax's updates already carry the learning rate and sign, so the purenet
    rate is 1 and the direction is minus optax's updates; the state's
    `learning_rate` then reads 1.0.

    Args:
        tx: the optax transformation (an `optax.GradientTransformation`); its
            state is the optimizer's one slot.

    Returns:
        An `Optimizer` of one transform, with learning rate 1.0 and no guard.
    """

    def update(g, slots, params, count):
        updates, slots = tx.update(g, slots, params)
        return tree.map(lambda u: -u, updates), slots

    return Optimizer((Transform(tx.init, update),), 1.0)
