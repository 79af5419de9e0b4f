"""Optimizers: trajectories equal optax's aliases; pure, jittable, vmappable."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import purenet as pn
from purenet.testing import compare_trees


def objective(p):
    """A non-quadratic function of a nested pytree."""
    return (jnp.sum(jnp.sin(p["a"]) ** 2 + 0.1 * p["a"] ** 4)
            + jnp.sum(jnp.cosh(0.5 * p["b"]["c"])) + jnp.sum(jnp.log1p(p["b"]["d"] ** 2)))


def start(dtype):
    return {"a": jnp.linspace(-2, 2, 5, dtype=dtype),
            "b": {"c": jnp.arange(6, dtype=dtype).reshape(2, 3) - 2, "d": jnp.array([0.7, -1.3], dtype)}}


PAIRS = {
    "sgd": (lambda lr: pn.optim.sgd(lr), lambda lr: optax.sgd(lr)),
    "momentum": (lambda lr: pn.optim.momentum(lr, 0.8), lambda lr: optax.sgd(lr, momentum=0.8)),
    "nesterov": (lambda lr: pn.optim.nesterov(lr, 0.8), lambda lr: optax.sgd(lr, momentum=0.8, nesterov=True)),
    "adagrad": (lambda lr: pn.optim.adagrad(lr, 0.2, 1e-6), lambda lr: optax.adagrad(lr, 0.2, 1e-6)),
    "rmsprop": (lambda lr: pn.optim.rmsprop(lr, 0.95, 1e-7), lambda lr: optax.rmsprop(lr, 0.95, 1e-7)),
    "adam": (lambda lr: pn.optim.adam(lr, 0.85, 0.99, 1e-7), lambda lr: optax.adam(lr, 0.85, 0.99, 1e-7)),
    "adamw": (lambda lr: pn.optim.adamw(lr, weight_decay=0.05), lambda lr: optax.adamw(lr, weight_decay=0.05)),
}
RATES = {
    "constant": lambda: 0.03,
    "schedule": lambda: pn.schedules.warmup_cosine_decay(0.0, 0.05, 10, 100, 0.001),
}


@pytest.mark.parametrize("rate", sorted(RATES))
@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.parametrize("dtype,rtol", [(jnp.float64, 1e-10), (jnp.float32, 1e-5)])
def test_trajectory_equals_optax(name, rate, dtype, rtol):
    ours, theirs = PAIRS[name]
    lr = RATES[rate]()
    opt, tx = ours(lr), theirs(lr)
    grad = jax.jit(jax.grad(objective))

    @jax.jit
    def both(state, p, tx_state):
        state = opt.step(state, grad(state.params))
        updates, tx_state = tx.update(grad(p), tx_state, p)
        return state, optax.apply_updates(p, updates), tx_state

    p0 = start(dtype)
    state, p, tx_state = opt.init(p0), p0, tx.init(p0)
    for _ in range(100):
        state, p, tx_state = both(state, p, tx_state)
        assert max(compare_trees(state.params, p).values()) <= rtol
    assert int(state.count) == 100
    chex.assert_trees_all_equal_shapes_and_dtypes(state.params, p0)
    assert not np.allclose(state.params["a"], p0["a"])


def test_learning_rate_in_state_is_the_rate_used():
    sched = pn.schedules.exponential_decay(0.1, 1, 0.5)
    opt = pn.optim.sgd(sched)
    state = opt.init({"w": jnp.ones(2)})
    np.testing.assert_allclose(state.learning_rate, 0.1)
    rates = []
    for _ in range(4):
        before = state.params["w"]
        state = opt.step(state, {"w": jnp.ones(2)})
        rates.append(float(state.learning_rate))
        np.testing.assert_allclose(before - state.params["w"], state.learning_rate, rtol=1e-12)
    np.testing.assert_allclose(rates, [0.1, 0.05, 0.025, 0.0125])


def test_vmap_over_learning_rates_equals_separate_runs():
    rates = jnp.array([0.01, 0.03, 0.1])

    def run(lr):
        opt = pn.optim.adam(lr)
        state = opt.init(start(jnp.float64))

        def body(s, _):
            return opt.step(s, jax.grad(objective)(s.params)), None

        return jax.lax.scan(body, state, None, length=30)[0].params

    batched = jax.jit(jax.vmap(run))(rates)
    for i, lr in enumerate(rates):
        single = run(float(lr))
        chex.assert_trees_all_close(jax.tree_util.tree_map(lambda v: v[i], batched), single, rtol=1e-12)


def test_jit_compiles_step_once():
    opt = pn.optim.rmsprop(0.01)
    traces = []

    @jax.jit
    def step(state, grads):
        traces.append(1)
        return opt.step(state, grads)

    state = opt.init(start(jnp.float64))
    for _ in range(5):
        state = step(state, jax.grad(objective)(state.params))
    assert len(traces) == 1


def _compiles(fn):
    """fn()'s result and how many programs XLA compiled while it ran."""
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        return fn(), len(events)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_eager_init_compiles_one_program_for_the_slots_and_one_for_the_schedule():
    """Op by op, Adam's init compiled one zeros program per leaf shape and cosine_decay one per operation
    (17 programs for the LeNet example); now one for the slots and one for the rate (shapes unique to this
    test, so no other test's programs are reused)."""
    params = {"a": jnp.ones((3, 5, 7)), "b": jnp.ones((11,)), "c": [jnp.ones((2, 13)), jnp.ones((), jnp.float32)]}
    schedule = pn.schedules.cosine_decay(0.1, 17)
    state, compiled = _compiles(lambda: pn.optim.adam(schedule).init(params))
    assert compiled <= 3  # the slots, the rate, and at most the count's zeros
    mu, nu = state.slots[0]
    chex.assert_trees_all_equal(mu, jax.tree_util.tree_map(jnp.zeros_like, params))
    chex.assert_trees_all_equal(nu, mu)
    assert mu["c"][1].dtype == jnp.float32 and mu["a"].dtype == jnp.float64
    np.testing.assert_allclose(state.learning_rate, schedule(0))
    # a schedule that needs a concrete step (Python control flow) still initialises, eagerly
    stepwise = pn.optim.sgd(lambda step: 0.1 if step < 10 else 0.01).init(params)
    assert float(stepwise.learning_rate) == 0.1


def test_opt_state_round_trips_through_tree_util():
    opt = pn.optim.chain(pn.optim.clip_by_global_norm(1.0), pn.optim.adamw(0.01))
    state = opt.init(start(jnp.float64))
    state = opt.step(state, jax.grad(objective)(state.params))
    leaves, treedef = jax.tree_util.tree_flatten(state)
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(again, pn.optim.OptState)
    chex.assert_trees_all_equal(again, state)


def test_clip_by_global_norm_and_weight_decay_equal_optax_chains():
    opt = pn.optim.chain(pn.optim.clip_by_global_norm(0.5), pn.optim.momentum(0.02),
                         pn.optim.add_decayed_weights(0.01))
    tx = optax.chain(optax.clip_by_global_norm(0.5), optax.trace(0.9),
                     optax.add_decayed_weights(0.01), optax.scale(-0.02))
    p = start(jnp.float64)
    state, tx_state = opt.init(p), tx.init(p)
    for _ in range(50):
        state = opt.step(state, jax.grad(objective)(state.params))
        u, tx_state = tx.update(jax.grad(objective)(p), tx_state, p)
        p = optax.apply_updates(p, u)
    assert max(compare_trees(state.params, p).values()) <= 1e-10


def test_clipping_bounds_the_step():
    opt = pn.optim.chain(pn.optim.clip_by_global_norm(1.0), pn.optim.sgd(1.0))
    state = opt.step(opt.init({"w": jnp.zeros(2)}), {"w": jnp.array([30.0, 40.0])})
    np.testing.assert_allclose(state.params["w"], [-0.6, -0.8], rtol=1e-12)


@pytest.mark.parametrize("name", ["adam", "rmsprop", "adagrad", "adamw", "momentum"])
def test_float16_params_with_zero_gradients_stay_finite(name):
    opt = getattr(pn.optim, name)(1e-3)
    params = {"w": jnp.ones(4, jnp.float16)}
    state = opt.init(params)
    for _ in range(3):
        state = opt.step(state, {"w": jnp.zeros(4, jnp.float16)})
    assert state.params["w"].dtype == jnp.float16
    assert bool(jnp.all(jnp.isfinite(state.params["w"])))


@pytest.mark.parametrize("make,argument", [
    (lambda: pn.optim.sgd(-0.1), "learning_rate"),
    (lambda: pn.optim.adam(float("nan")), "learning_rate"),
    (lambda: pn.optim.adam(float("inf")), r"learning_rate must be in \[0.0, inf\), got inf"),
    (lambda: pn.optim.adam(0.1, b1=1.0), "b1"),
    (lambda: pn.optim.adam(0.1, b2=-0.1), "b2"),
    (lambda: pn.optim.adam(0.1, eps=-1e-8), "eps"),
    (lambda: pn.optim.rmsprop(0.1, decay=1.5), "decay"),
    (lambda: pn.optim.momentum(0.1, momentum=1.0), "momentum"),
    (lambda: pn.optim.nesterov(0.1, momentum=float("nan")), "momentum"),
    (lambda: pn.optim.adagrad(0.1, initial_accumulator_value=-1), "initial_accumulator_value"),
    (lambda: pn.optim.adamw(0.1, weight_decay=-1), "weight_decay"),
])
def test_invalid_hyperparameters_name_the_argument(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()


def test_grads_that_do_not_match_params_name_the_key_path():
    opt = pn.optim.adam(0.1)
    state = opt.init({"layer": {"W": jnp.ones((2, 3)), "b": jnp.ones(3)}})
    with pytest.raises(ValueError, match=r"missing key paths \[\"\['layer'\]\['b'\]\"\]"):
        opt.step(state, {"layer": {"W": jnp.ones((2, 3))}})
    with pytest.raises(ValueError, match=r"\['layer'\]\['W'\] has shape \(3, 2\)"):
        opt.step(state, {"layer": {"W": jnp.ones((3, 2)), "b": jnp.ones(3)}})


def test_optimizer_checkpoint_and_gradient_checker_report_one_mismatch_the_same_way():
    """The three tree comparers share one walk (purenet._trees): the same first mismatch for each."""
    from purenet import _trees
    from purenet.io import checkpoint

    params = {"layer": {"W": jnp.ones((2, 3), jnp.float32), "b": jnp.ones(3)}, "z": jnp.zeros(2)}
    wrong = {"layer": {"W": params["layer"]["W"], "b": jnp.ones(4)}, "z": jnp.zeros((1, 2))}
    m = _trees.first_mismatch(_trees.by_path(wrong), _trees.by_path(params))
    assert m == _trees.Mismatch("shape", "['layer']['b']", (4,), (3,))  # the first in params' order
    with pytest.raises(ValueError, match=r"grads leaf \['layer'\]\['b'\] has shape \(4,\), but the param"):
        pn.optim.sgd(0.1).step(pn.optim.sgd(0.1).init(params), wrong)
    with pytest.raises(pn.CheckpointError, match=r"leaf \['layer'\]\['b'\] has shape \(4,\), expected \(3,\)"):
        checkpoint.conform(wrong, params)
    other = {"layer": {"W": jnp.ones((2, 3)), "c": jnp.ones(3)}, "z": jnp.zeros(2)}
    missing, extra = ["['layer']['b']"], ["['layer']['c']"]
    assert _trees.first_mismatch(_trees.by_path(other), _trees.by_path(params)) == _trees.Mismatch(
        "paths", missing=missing, extra=extra)
    with pytest.raises(AssertionError, match=rf"missing {missing}, extra {extra}".replace("[", r"\[")):
        compare_trees(other, params)
    halves = jax.tree_util.tree_map(lambda a: a.astype(jnp.float16), params)
    assert _trees.first_mismatch(_trees.by_path(halves), _trees.by_path(params), dtype=lambda a: a.dtype) == (
        _trees.Mismatch("dtype", "['layer']['W']", jnp.float16, jnp.float32))
    assert _trees.first_mismatch(_trees.by_path(halves), _trees.by_path(params)) is None  # dtypes only when asked


def test_apply_if_finite_skips_or_raises():
    opt = pn.optim.apply_if_finite(pn.optim.adam(0.1), policy="skip")
    state = opt.init({"w": jnp.ones(2)})
    bad = {"w": jnp.array([1.0, jnp.nan])}
    skipped = jax.jit(opt.step)(state, bad)
    chex.assert_trees_all_equal(skipped.params, state.params)
    assert int(skipped.count) == 1
    good = opt.step(skipped, {"w": jnp.ones(2)})
    assert bool(jnp.all(good.params["w"] < 1))
    raising = pn.optim.apply_if_finite(pn.optim.adam(0.1), policy="raise")
    with pytest.raises(ValueError, match=r"non-finite gradient .* \['w'\]"):
        raising.step(state, bad)


def test_optax_adapter_both_ways():
    p = start(jnp.float64)
    tx = pn.optim.to_optax(pn.optim.adam(0.01))
    ours = pn.optim.adam(0.01)
    tx_state, state, q = tx.init(p), ours.init(p), p
    for _ in range(20):
        u, tx_state = tx.update(jax.grad(objective)(q), tx_state, q)
        q = optax.apply_updates(q, u)
        state = ours.step(state, jax.grad(objective)(state.params))
    assert max(compare_trees(q, state.params).values()) <= 1e-12
    wrapped = pn.optim.from_optax(optax.adam(0.01))
    state2 = wrapped.init(p)
    for _ in range(20):
        state2 = wrapped.step(state2, jax.grad(objective)(state2.params))
    assert max(compare_trees(state2.params, state.params).values()) <= 1e-10
    with pytest.raises(ValueError, match=r"needs \('factors',\)"):  # K-FAC's step needs its factors
        pn.optim.to_optax(pn.optim.kfac(pn.mlp([2, 3]), 0.1))


# ------------------------------------------------------------------ convergence


def rosenbrock(p):
    x, y = p["xy"][0], p["xy"][1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


CONVERGENCE = {  # optimizer, steps: stated budgets that each one meets
    "sgd": (lambda: pn.optim.sgd(1e-3), 20000),
    "momentum": (lambda: pn.optim.momentum(2e-4, 0.9), 20000),
    "nesterov": (lambda: pn.optim.nesterov(2e-4, 0.9), 20000),
    "adagrad": (lambda: pn.optim.adagrad(0.5), 20000),
    "rmsprop": (lambda: pn.optim.chain(pn.optim.scale_by_rms(0.9), learning_rate=pn.schedules.exponential_decay(1e-2, 1000, 0.5)), 20000),
    "adam": (lambda: pn.optim.adam(2e-2), 20000),
    "adamw": (lambda: pn.optim.adamw(2e-2, weight_decay=0.0), 20000),
}


def _run(opt, f, params, steps):
    def body(s, _):
        return opt.step(s, jax.grad(f)(s.params)), None

    return jax.lax.scan(body, opt.init(params), None, length=steps)[0]


@pytest.mark.parametrize("name", sorted(CONVERGENCE))
def test_reaches_rosenbrock_minimum(name):
    make, steps = CONVERGENCE[name]
    final = jax.jit(lambda p: _run(make(), rosenbrock, p, steps))({"xy": jnp.array([-1.2, 1.0])})
    np.testing.assert_allclose(final.params["xy"], [1.0, 1.0], atol=2e-2)


@pytest.mark.parametrize("name", sorted(CONVERGENCE))
def test_fits_the_lecture_example(name):
    from tests.test_network import LECTURE_NET, lecture_problem

    params, state, x, y = lecture_problem()

    def f(p):
        return pn.loss(LECTURE_NET, p, state, x, y, loss="mse")[0]

    make, _ = CONVERGENCE[name]
    opt = make() if name not in ("sgd", "momentum", "nesterov") else {
        "sgd": pn.optim.sgd(1.0), "momentum": pn.optim.momentum(0.5), "nesterov": pn.optim.nesterov(0.5)}[name]
    final = jax.jit(lambda p: _run(opt, f, p, 2000))(params)
    assert float(f(final.params)) < 1e-3 < float(f(params))


def test_adam_slot_is_a_named_state_and_a_saved_dict_slot_still_steps(tmp_path):
    """scale_by_adam's slot is AdamState(m, v); a state saved as the dict {"m", "v"} (before) steps the
    same and keeps its form, and loads into an AdamState-shaped `like`."""
    params = {"w": jnp.array([1.0, -2.0])}
    grads = {"w": jnp.array([0.5, 0.25])}
    opt = pn.optim.adam(0.1)
    state = opt.init(params)
    assert isinstance(state.slots[0], pn.optim.AdamState)
    old = state._replace(slots=({"m": state.slots[0].m, "v": state.slots[0].v},))
    new_step, old_step = opt.step(state, grads), opt.step(old, grads)
    np.testing.assert_array_equal(new_step.params["w"], old_step.params["w"])
    assert isinstance(old_step.slots[0], dict)
    np.testing.assert_array_equal(old_step.slots[0]["m"]["w"], new_step.slots[0].m["w"])
    pn.save(tmp_path / "old.ckpt", old_step)
    back = pn.load(tmp_path / "old.ckpt", like=new_step)
    assert isinstance(back.slots[0], pn.optim.AdamState)
    np.testing.assert_array_equal(back.slots[0].v["w"], new_step.slots[0].v["w"])
