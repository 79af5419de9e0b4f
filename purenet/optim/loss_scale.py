"""Dynamic loss scaling for float16: the scale is a slot of the optimizer state.

float16 holds 6e-5 .. 65504 (subnormals down to 6e-8): small gradients
flush to zero unless the seed gradient dL/dout is multiplied by a scale S
before the backward (every gradient is linear in the seed, so each is
S times larger) and the gradients are divided by S after it. Too large an
S overflows instead. The dynamic scale (Micikevicius et al., 2018, "Mixed
Precision Training") keeps S as large as the gradients allow:

    a step with a non-finite gradient:  skipped;  S <- max(S / factor, minimum),  n <- 0
    a finite step:                      n <- n + 1;  if n = growth_interval:  S <- factor * S,  n <- 0

(n: finite steps since S last changed; S never grows to inf.) The optimizer
decides which steps are skipped (the "skip" guard of `apply_if_finite`) and
the shrink rides on that decision (`Transform.on_skip`), so the scale and
the skip always agree, wherever the transform sits in the chain:

    opt = pn.optim.chain(pn.optim.dynamic_loss_scale(), pn.optim.adam(1e-3))   # guard "skip" implied
    fit(net, opt, data, precision=pn.Precision(compute="float16"), ...)       # step reads S from the state

`pn.Precision(compute="float16", loss_scale="dynamic")` does the chaining
for `fit` and `train`. The training step reads S with `current_loss_scale`
and hands it to the gradient function (`loss_scale=`).
"""
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from purenet._checks import check_hyperparameter, is_concrete
from purenet.optim.base import Transform

__all__ = ["LossScale", "current_loss_scale", "dynamic_loss_scale", "grow", "shrink"]


class LossScale(NamedTuple):
    """The slot of `dynamic_loss_scale`: the scale S and the finite steps since it last changed.

    Attributes:
        scale: S, a float32 scalar: the factor the seed gradient is multiplied by.
        good_steps: n, an int32 scalar: the finite steps since S last changed.
    """

    scale: jnp.ndarray
    good_steps: jnp.ndarray


def grow(slot: LossScale, growth_interval: int, factor: float) -> LossScale:
    """After a finite step: count it; at `growth_interval` finite steps multiply S by `factor`.

    S stays as it is when `factor * S` would overflow float32; the count
    restarts either way.

    Args:
        slot: the current `LossScale`.
        growth_interval: finite steps between growths (>= 1).
        factor: the growth factor (> 1).

    Returns:
        The next `LossScale`, in the slot's dtypes.
    """
    good = slot.good_steps + 1
    bigger = slot.scale * factor
    due = good >= growth_interval
    scale = jnp.where(due & jnp.isfinite(bigger), bigger, slot.scale)
    return LossScale(scale.astype(slot.scale.dtype), jnp.where(due, 0, good).astype(slot.good_steps.dtype))


def shrink(slot: LossScale, factor: float, minimum: float) -> LossScale:
    """After an overflow: divide S by `factor` (not below `minimum`) and restart the count.

    Args:
        slot: the current `LossScale`.
        factor: the shrink factor (> 1).
        minimum: the floor S never shrinks below.

    Returns:
        The next `LossScale`, with `good_steps` 0.
    """
    scale = jnp.maximum(slot.scale / factor, minimum).astype(slot.scale.dtype)
    return LossScale(scale, jnp.zeros_like(slot.good_steps))


def _check_float32(name: str, value, low: float = 0.0) -> None:
    """A concrete scalar must lie in (low, inf) and stay finite and above low in float32 (S's dtype)."""
    check_hyperparameter(name, value, low, None, low_open=True)
    if not is_concrete(value) or np.ndim(value) != 0:
        return
    v = float(value)
    with np.errstate(over="ignore"):
        as32 = np.float32(v)
    if not (np.isfinite(as32) and as32 > low):
        raise ValueError(f"{name} must be a finite float32 above {low}, got {v} ({as32} in float32)")


def dynamic_loss_scale(initial: float = 2.0 ** 15, growth_interval: int = 2000, factor: float = 2.0,
                       minimum: float = 1.0) -> Transform:
    """A Transform that keeps the dynamic loss scale (see the module docstring).

    Gradients pass through unchanged (they arrive unscaled). `initial`,
    `factor` and `minimum` must stay finite (and `initial`, `minimum`
    positive, `factor` > 1) in float32, S's dtype. The optimizer must use
    the "skip" guard (`chain` implies it).

    Args:
        initial: S before the first step.
        growth_interval: finite steps between growths, an int in `[1, 2**31)`.
        factor: the growth and shrink factor, > 1 (a power of two keeps
            scaling exact).
        minimum: the floor S never shrinks below, > 0.

    Returns:
        A `Transform` whose slot is a `LossScale` and which has `on_skip` (the shrink).

    Raises:
        ValueError: if `initial` or `minimum` is not positive, `factor` is not
            above 1, any of them is NaN or not finite in float32, or
            `growth_interval` is not an int in `[1, 2**31)`.
    """
    _check_float32("dynamic_loss_scale initial", initial)
    _check_float32("loss scale factor", factor, low=1.0)
    _check_float32("minimum loss scale", minimum)
    if (isinstance(growth_interval, (bool, np.bool_)) or not isinstance(growth_interval, (int, np.integer))
            or not 1 <= growth_interval < 2 ** 31):
        raise ValueError(f"dynamic_loss_scale growth_interval must be a positive integer (steps) below 2**31, "
                         f"got {growth_interval!r}")

    def init(params):
        return LossScale(jnp.asarray(initial, jnp.float32), jnp.zeros((), jnp.int32))

    def update(d, slot, params, count):
        return d, grow(slot, int(growth_interval), factor)

    return Transform(init, update, on_skip=lambda slot: shrink(slot, factor, minimum))


def current_loss_scale(opt_state: Any) -> jnp.ndarray | None:
    """The scale S a `dynamic_loss_scale` slot of opt_state holds (a float32 scalar), or None.

    Args:
        opt_state: an optimizer state (`OptState`); anything without `slots` has none.

    Returns:
        S, a float32 scalar, or None when the optimizer keeps no dynamic loss scale.

    Raises:
        ValueError: if the state holds more than one `LossScale` slot.
    """
    scales = [slot.scale for slot in getattr(opt_state, "slots", ()) if isinstance(slot, LossScale)]
    if len(scales) > 1:
        raise ValueError(f"the optimizer keeps {len(scales)} dynamic loss scales; chain one "
                         f"pn.optim.dynamic_loss_scale (Precision(loss_scale='dynamic') adds one itself)")
    return scales[0] if scales else None
