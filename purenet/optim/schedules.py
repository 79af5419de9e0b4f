"""Learning-rate schedules: pure functions step -> rate.

Pass one as `learning_rate` to any optimizer; step t = 0 is the first step.
Those optax also has give its values (to a relative 1e-12, tested at steps 0..1000).
"""
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

__all__ = [
    "constant", "cosine_decay", "exponential_decay", "inverse_time_decay", "join", "linear", "piecewise_constant",
    "polynomial_decay", "Schedule", "warmup_cosine_decay",
]

Schedule = Callable[[jax.Array], jax.Array | float]
"""A learning-rate schedule: step count (an int32 scalar; t = 0 is the first step) -> rate."""


def constant(value: float) -> Schedule:
    """A constant rate: `lr_t = value`.

    Args:
        value: the rate at every step.

    Returns:
        The schedule step -> `value`.
    """
    return lambda step: value


def piecewise_constant(init_value: float, boundaries_and_scales: Mapping[int, float] | None = None) -> Schedule:
    """Step decay: `lr_t = init_value * prod(scales whose boundary b <= t)`.

    Args:
        init_value: the rate before the first boundary.
        boundaries_and_scales: {step: scale}, e.g. {1000: 0.1, 2000: 0.1}: from
            each step on the rate is multiplied by its scale; None for none.

    Returns:
        The schedule step -> rate.

    Raises:
        ValueError: if a scale is negative.
    """
    items = sorted((boundaries_and_scales or {}).items())
    if any(scale < 0 for _, scale in items):
        raise ValueError("piecewise_constant scales must be non-negative")

    def schedule(step):
        v = init_value
        for boundary, scale in items:
            past = jnp.maximum(0.0, jnp.sign(boundary - step))
            v = v * past + (1 - past) * scale * v
        return v

    return schedule


def exponential_decay(init_value: float, transition_steps: int, decay_rate: float, transition_begin: int = 0,
                      staircase: bool = False, end_value: float | None = None) -> Schedule:
    """Exponential decay: `lr_t = init_value * decay_rate ** ((t - begin) / transition_steps)`.

    Held at `init_value` up to `transition_begin`; the exponent is floored
    with `staircase`; `end_value` bounds the decay (a floor when
    `decay_rate` < 1, else a ceiling). As optax, a `transition_steps` <= 0
    or a `decay_rate` of 0 gives the constant `init_value`, and a negative
    `transition_begin` counts as 0.

    Args:
        init_value: the rate at step `transition_begin` and before.
        transition_steps: steps over which the rate is multiplied by `decay_rate`.
        decay_rate: the factor per `transition_steps` steps.
        transition_begin: the step the decay starts from.
        staircase: floor the exponent, so the rate drops once every
            `transition_steps` steps.
        end_value: the bound the rate never passes, or None.

    Returns:
        The schedule step -> rate.
    """
    if transition_steps <= 0 or decay_rate == 0:
        return constant(init_value)
    transition_begin = max(transition_begin, 0)

    def schedule(step):
        since = step - transition_begin
        p = since / transition_steps
        if staircase:
            p = jnp.floor(p)
        value = jnp.where(since <= 0, init_value, init_value * jnp.power(decay_rate, p))
        if end_value is not None:
            value = (jnp.maximum if decay_rate < 1 else jnp.minimum)(value, end_value)
        return value

    return schedule


def inverse_time_decay(init_value: float, decay_steps: int, decay_rate: float, staircase: bool = False) -> Schedule:
    """Inverse time decay: `lr_t = init_value / (1 + decay_rate * t / decay_steps)`.

    Args:
        init_value: the rate at step 0.
        decay_steps: the step scale (> 0).
        decay_rate: how fast the rate falls.
        staircase: floor `t / decay_steps`, so the rate drops once every
            `decay_steps` steps.

    Returns:
        The schedule step -> rate.

    Raises:
        ValueError: if `decay_steps` is not positive.
    """
    if decay_steps <= 0:
        raise ValueError(f"inverse_time_decay needs decay_steps > 0, got {decay_steps}")

    def schedule(step):
        p = step / decay_steps
        if staircase:
            p = jnp.floor(p)
        return init_value / (1 + decay_rate * p)

    return schedule


def polynomial_decay(init_value: float, end_value: float, power: float, transition_steps: int,
                     transition_begin: int = 0) -> Schedule:
    """Polynomial decay: `lr_t = (init - end) * (1 - s / T) ** power + end`, `s = clip(t - begin, 0, T)`.

    As optax, a `transition_steps` <= 0 gives the constant `init_value`, and
    a negative `transition_begin` counts as 0.

    Args:
        init_value: init, the rate up to `transition_begin`.
        end_value: end, the rate from `transition_begin + transition_steps` on.
        power: the polynomial's exponent (1: linear).
        transition_steps: T, the steps the decay takes.
        transition_begin: begin, the step the decay starts from.

    Returns:
        The schedule step -> rate.
    """
    if transition_steps <= 0:
        return constant(init_value)
    transition_begin = max(transition_begin, 0)

    def schedule(step):
        s = jnp.clip(step - transition_begin, 0, transition_steps)
        return (init_value - end_value) * ((1 - s / transition_steps) ** power) + end_value

    return schedule


def linear(init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0) -> Schedule:
    """A linear ramp from `init_value` to `end_value`: `polynomial_decay` with power 1.

    Args:
        init_value: the rate up to `transition_begin`.
        end_value: the rate from `transition_begin + transition_steps` on.
        transition_steps: the steps the ramp takes.
        transition_begin: the step the ramp starts from.

    Returns:
        The schedule step -> rate.
    """
    return polynomial_decay(init_value, end_value, 1, transition_steps, transition_begin)


def cosine_decay(init_value: float, decay_steps: float, alpha: float = 0.0, exponent: float = 1.0) -> Schedule:
    """SGDR's cosine annealing (Loshchilov & Hutter, 2017), for `s = min(t, T)`:

        lr_t = init_value * ((1 - alpha) * (0.5 (1 + cos(pi s / T))) ** exponent + alpha)

    Args:
        init_value: the rate at step 0.
        decay_steps: T, the steps the decay takes (> 0); the rate stays at
            `alpha * init_value` after them.
        alpha: the final rate as a fraction of `init_value`.
        exponent: the power the cosine factor is raised to.

    Returns:
        The schedule step -> rate.

    Raises:
        ValueError: if `decay_steps` is not positive.
    """
    if not decay_steps > 0:
        raise ValueError(f"cosine_decay needs decay_steps > 0, got {decay_steps}")
    decay_steps = float(decay_steps)

    def schedule(step):
        s = jnp.minimum(float(step) if isinstance(step, int) else step, decay_steps)
        cosine = 0.5 * (1 + jnp.cos(jnp.pi * s / decay_steps))
        return init_value * ((1 - alpha) * cosine**exponent + alpha)

    return schedule


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Run `schedules[i]` from `boundaries[i-1]` on, each seeing steps counted from its boundary.

    Args:
        schedules: the schedules, in the order they run.
        boundaries: the steps where each next schedule takes over, increasing,
            one fewer than `schedules`.

    Returns:
        The schedule step -> rate.

    Raises:
        ValueError: if there is not exactly one boundary fewer than schedules.
    """
    if len(boundaries) != len(schedules) - 1:
        raise ValueError("join needs exactly one boundary fewer than schedules")

    def schedule(step):
        value = schedules[0](step)
        for boundary, next_schedule in zip(boundaries, schedules[1:]):
            value = jnp.where(step < boundary, value, next_schedule(step - boundary))
        return value

    return schedule


def warmup_cosine_decay(init_value: float, peak_value: float, warmup_steps: int, decay_steps: int,
                        end_value: float = 0.0, exponent: float = 1.0) -> Schedule:
    """Linear warm-up from `init_value` to `peak_value`, then cosine decay to `end_value`.

    The warm-up takes `warmup_steps`; `end_value` is reached at step
    `decay_steps` (counted from 0, warm-up included), as in optax.

    Args:
        init_value: the rate at step 0.
        peak_value: the rate at the end of the warm-up.
        warmup_steps: the warm-up's steps.
        decay_steps: the step `end_value` is reached at, warm-up included
            (> `warmup_steps`).
        end_value: the rate after `decay_steps`.
        exponent: the power the cosine factor is raised to.

    Returns:
        The schedule step -> rate.

    Raises:
        ValueError: if `decay_steps` is not larger than `warmup_steps`.
    """
    alpha = 0.0 if peak_value == 0.0 else end_value / peak_value
    return join(
        [linear(init_value, peak_value, warmup_steps),
         cosine_decay(peak_value, decay_steps - warmup_steps, alpha, exponent)],
        [warmup_steps],
    )
