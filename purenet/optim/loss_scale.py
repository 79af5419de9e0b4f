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
from typing import NamedTuple

import jax.numpy as jnp

from purenet._checks import check_hyperparameter
from purenet.optim.base import Transform


class LossScale(NamedTuple):
    """The slot of `dynamic_loss_scale`: scale S (float32) and good_steps n (int32),
    the finite steps since S last changed."""

    scale: jnp.ndarray
    good_steps: jnp.ndarray


def grow(slot, growth_interval, factor):
    """After a finite step: count it; at growth_interval finite steps multiply S by factor
    (unless that overflows float32) and restart the count."""
    good = slot.good_steps + 1
    bigger = slot.scale * factor
    due = good >= growth_interval
    scale = jnp.where(due & jnp.isfinite(bigger), bigger, slot.scale)
    return LossScale(scale.astype(slot.scale.dtype), jnp.where(due, 0, good).astype(slot.good_steps.dtype))


def shrink(slot, factor, minimum):
    """After an overflow: divide S by factor (not below minimum) and restart the count."""
    scale = jnp.maximum(slot.scale / factor, minimum).astype(slot.scale.dtype)
    return LossScale(scale, jnp.zeros_like(slot.good_steps))


def dynamic_loss_scale(initial=2.0 ** 15, growth_interval=2000, factor=2.0, minimum=1.0):
    """A Transform that keeps the dynamic loss scale (see the module docstring); gradients pass
    through unchanged (they arrive unscaled).

    initial: S before the first step; growth_interval: finite steps between
    growths; factor (> 1): the growth and shrink factor (a power of two keeps
    scaling exact); minimum: the floor S never shrinks below.
    The optimizer must use the "skip" guard (`chain` implies it).
    """
    check_hyperparameter("initial loss scale", initial, 0.0, None, low_open=True)
    check_hyperparameter("loss scale factor", factor, 1.0, None, low_open=True)
    check_hyperparameter("minimum loss scale", minimum, 0.0, None, low_open=True)
    if isinstance(growth_interval, bool) or int(growth_interval) != growth_interval or growth_interval < 1:
        raise ValueError(f"growth_interval must be a positive integer (steps), got {growth_interval!r}")

    def init(params):
        return LossScale(jnp.asarray(initial, jnp.float32), jnp.zeros((), jnp.int32))

    def update(d, slot, params, count):
        return d, grow(slot, int(growth_interval), factor)

    return Transform(init, update, on_skip=lambda slot: shrink(slot, factor, minimum))


def current_loss_scale(opt_state):
    """The scale S a `dynamic_loss_scale` slot of opt_state holds (a float32 scalar), or None."""
    scales = [slot.scale for slot in getattr(opt_state, "slots", ()) if isinstance(slot, LossScale)]
    if len(scales) > 1:
        raise ValueError(f"the optimizer keeps {len(scales)} dynamic loss scales; chain one "
                         f"pn.optim.dynamic_loss_scale (Precision(loss_scale='dynamic') adds one itself)")
    return scales[0] if scales else None
