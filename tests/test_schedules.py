"""Schedules: equal to optax's where optax has them, else their closed form."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import purenet as pn

STEPS = jnp.arange(0, 1001)

PAIRS = {
    "constant": (pn.schedules.constant(0.3), optax.constant_schedule(0.3)),
    "piecewise_constant": (pn.schedules.piecewise_constant(0.1, {200: 0.5, 600: 0.1}),
                           optax.piecewise_constant_schedule(0.1, {200: 0.5, 600: 0.1})),
    "exponential_decay": (pn.schedules.exponential_decay(0.1, 100, 0.7, transition_begin=50),
                          optax.exponential_decay(0.1, 100, 0.7, transition_begin=50)),
    "exponential_staircase_end": (
        pn.schedules.exponential_decay(0.1, 100, 0.5, staircase=True, end_value=0.01),
        optax.exponential_decay(0.1, 100, 0.5, staircase=True, end_value=0.01)),
    "polynomial_decay": (pn.schedules.polynomial_decay(0.1, 0.001, 2.0, 700, 100),
                         optax.polynomial_schedule(0.1, 0.001, 2.0, 700, 100)),
    "linear": (pn.schedules.linear(0.0, 1.0, 300), optax.linear_schedule(0.0, 1.0, 300)),
    "cosine_decay": (pn.schedules.cosine_decay(0.2, 800, alpha=0.05, exponent=1.5),
                     optax.cosine_decay_schedule(0.2, 800, alpha=0.05, exponent=1.5)),
    "warmup_cosine_decay": (pn.schedules.warmup_cosine_decay(0.0, 0.1, 100, 900, 0.001),
                            optax.warmup_cosine_decay_schedule(0.0, 0.1, 100, 900, 0.001)),
    "join": (pn.schedules.join([pn.schedules.constant(0.1), pn.schedules.linear(0.1, 0.0, 500)], [300]),
             optax.join_schedules([optax.constant_schedule(0.1), optax.linear_schedule(0.1, 0.0, 500)], [300])),
}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_schedule_equals_optax_at_steps_0_to_1000(name):
    ours, theirs = PAIRS[name]
    a = jax.vmap(lambda s: jnp.asarray(ours(s), jnp.float64))(STEPS)
    b = jax.vmap(lambda s: jnp.asarray(theirs(s), jnp.float64))(STEPS)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)
    # also eagerly, with Python ints
    for step in (0, 1, 99, 100, 101, 999, 1000):
        np.testing.assert_allclose(ours(step), theirs(step), rtol=1e-12)


def test_inverse_time_decay_closed_form():
    sched = pn.schedules.inverse_time_decay(0.5, 100, 2.0)
    np.testing.assert_allclose([sched(s) for s in (0, 50, 100, 1000)], [0.5, 0.25, 0.5 / 3, 0.5 / 21], rtol=1e-12)
    stairs = pn.schedules.inverse_time_decay(0.5, 100, 2.0, staircase=True)
    np.testing.assert_allclose([stairs(s) for s in (0, 99, 100, 250)], [0.5, 0.5, 0.5 / 3, 0.5 / 5], rtol=1e-12)


def test_schedules_are_pure_and_jittable():
    sched = pn.schedules.warmup_cosine_decay(0.0, 1.0, 10, 100)
    np.testing.assert_allclose(jax.jit(sched)(jnp.int32(10)), 1.0)
    np.testing.assert_allclose(jax.jit(sched)(jnp.int32(100)), 0.0, atol=1e-12)


def test_bad_schedule_arguments_are_errors():
    with pytest.raises(ValueError, match="non-negative"):
        pn.schedules.piecewise_constant(0.1, {10: -1.0})
    with pytest.raises(ValueError, match="decay_steps"):
        pn.schedules.cosine_decay(0.1, 0)
    with pytest.raises(ValueError, match="one boundary fewer"):
        pn.schedules.join([pn.schedules.constant(1.0)], [10])
