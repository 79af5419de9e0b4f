"""Shapes and composition: Residual, Parallel, Flatten, LayerNorm, RMSNorm, the modern
activations and user losses, against jax.grad in float64."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import purenet as pn
from purenet.layers import base
from tests.conftest import scaled
from purenet.testing import check_per_example, compare_trees, net_cases

WIDTHS = st.sampled_from([1, 2, 5])
SHAPES = st.sampled_from([(1, 2), (2, 5), (5, 5), (2, 3, 5), (1, 3, 2)])  # (batch, ..., width)

NEW_LAYERS = {
    "layer_norm": lambda d: pn.LayerNorm(use_bias=d.draw(st.booleans())),
    "rms_norm": lambda d: pn.RMSNorm(),
    "gelu": lambda d: pn.GELU(approximate=d.draw(st.booleans())),
    "silu": lambda d: pn.SiLU(),
    "elu": lambda d: pn.ELU(d.draw(st.sampled_from([1.0, 0.5]))),
    "softplus": lambda d: pn.Softplus(),
    "flatten": lambda d: pn.Flatten(),
    "residual": lambda d: pn.Residual(pn.Sequential([pn.LayerNorm(), pn.Dense(d.draw(WIDTHS)), pn.GELU(),
                                                     pn.Dense(5)])),
    "parallel_concat": lambda d: pn.Parallel([pn.Dense(d.draw(WIDTHS)), pn.Sequential([pn.Dense(2), pn.Tanh()])]),
    "parallel_sum": lambda d: pn.Parallel([pn.Dense(2), pn.Sequential([pn.Dense(2), pn.SiLU()]), pn.Identity()
                                           if d.draw(st.booleans()) else pn.Dense(2)], merge="sum"),
}
NEEDS_WIDTH = {"residual": 5, "parallel_sum": None}


def _input(name, data):
    shape = data.draw(SHAPES, label="shape")
    if name in ("layer_norm", "rms_norm", "residual"):
        shape = shape[:-1] + (5,)  # normalising 1 or 2 features leaves a gradient of rounding noise
    if name == "parallel_sum":
        shape = shape[:-1] + (2,)  # the Identity branch must match the Dense branches' width
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    x = jax.random.normal(jax.random.key(seed), shape, jnp.float64)
    if data.draw(st.booleans(), label="exact zeros"):
        x = x.at[..., 0].set(0.0)  # the kinks
    return x, seed


@pytest.mark.parametrize("name", sorted(NEW_LAYERS))
@settings(max_examples=scaled(6))
@given(data=st.data())
def test_new_layer_backward_matches_autodiff(name, data):
    layer = NEW_LAYERS[name](data)
    x, seed = _input(name, data)
    report = pn.check_grads(layer, x, key=jax.random.key(seed))
    assert report.ok, str(report)


@settings(max_examples=scaled(6))
@given(net_cases(compose=True, sequences=True))
def test_composed_networks_match_autodiff(case):
    params, state, x, y = case.data()
    report = pn.check_grads(case.net, x, y, loss=case.loss, params=params, state=state, l2=case.l2)
    assert report.ok, f"{case}\n{report}"


@pytest.mark.slow
@settings(max_examples=scaled(2))
@given(net_cases(max_depth=2, compose=True, sequences=True))
def test_composed_per_example_grads_and_norms_equal_vmap_of_grad(case):
    params, state, x, y = case.data()
    check_per_example(case.net, x, y, loss=case.loss, params=params, state=state, l2=case.l2)


def test_net_cases_draw_every_block_kind():
    from hypothesis import find

    kinds = [pn.Residual, pn.Parallel, pn.LayerNorm, pn.RMSNorm, pn.Flatten, pn.GELU]
    for kind in kinds:
        find(net_cases(compose=True, sequences=True),
             lambda c, k=kind: any(isinstance(layer, k) for layer in c.net.layers))
    find(net_cases(compose=True, sequences=True), lambda c: len(c.in_shape) == 2 and c.loss == "cross_entropy")


# ------------------------------------------------------------------ the chain rule at a fork


def test_residual_gradient_is_dy_plus_the_blocks():
    block = pn.Dense(3)
    params, _, _ = block.init(jax.random.key(0), 3)
    x = jax.random.normal(jax.random.key(1), (4, 3))
    dy = jax.random.normal(jax.random.key(2), (4, 3))
    y, _, cache = pn.Residual(block).forward(params, {}, x)
    np.testing.assert_allclose(y, x + x @ params["W"] + params["b"], rtol=1e-12)
    grads, dx = pn.Residual(block).backward(params, cache, dy)
    np.testing.assert_allclose(dx, dy + dy @ params["W"].T, rtol=1e-12)
    np.testing.assert_allclose(grads["W"], x.T @ dy, rtol=1e-12)


def test_parallel_sums_the_input_gradient_over_branches():
    net = pn.Parallel([pn.Dense(2), pn.Dense(3)])
    params, state, out_shape = net.init(jax.random.key(0), 4)
    assert out_shape == (5,)
    x = jax.random.normal(jax.random.key(1), (6, 4))
    y, _, cache = net.forward(params, state, x)
    chex.assert_shape(y, (6, 5))
    dy = jax.random.normal(jax.random.key(2), (6, 5))
    grads, dx = net.backward(params, cache, dy)
    np.testing.assert_allclose(dx, dy[:, :2] @ params[0]["W"].T + dy[:, 2:] @ params[1]["W"].T, rtol=1e-12)
    np.testing.assert_allclose(grads[1]["W"], x.T @ dy[:, 2:], rtol=1e-12)


def test_shapes_flow_through_init():
    net = pn.Sequential([pn.Dense(8), pn.LayerNorm(), pn.Residual(pn.Dense(8)),
                         pn.Parallel([pn.Dense(3), pn.Dense(4)]), pn.Flatten(), pn.Dense(2)])
    _, _, out = net.init(jax.random.key(0), (5, 6))
    assert out == (2,)
    assert net.init(jax.random.key(0), (5, 6))[2] == net.init(jax.random.key(0), [5, 6])[2]
    _, _, out = pn.Sequential(net.layers[:4]).init(jax.random.key(0), (5, 6))
    assert out == (5, 7)
    # an int n means (n,); in_dim= stays an alias
    a = pn.init(pn.Dense(3), jax.random.key(0), 4)
    b = pn.init(pn.Dense(3), jax.random.key(0), in_shape=(4,))
    c = pn.init(pn.Dense(3), jax.random.key(0), in_dim=4)
    chex.assert_trees_all_equal(a, b, c)
    assert pn.Sequential([pn.Dense(2)], in_dim=4).in_shape == (4,)
    assert pn.mlp([4, 3, 2]).in_dim == 4


def test_dense_and_activations_act_on_the_last_axis():
    params, _, _ = pn.Dense(3).init(jax.random.key(0), (7, 4))
    x = jax.random.normal(jax.random.key(1), (2, 7, 4))
    y, _, _ = pn.Dense(3).forward(params, {}, x)
    np.testing.assert_allclose(y[1, 5], x[1, 5] @ params["W"] + params["b"], rtol=1e-12)


@pytest.mark.parametrize("jit", [False, True])
def test_composed_net_trains_and_jits(jit):
    net = pn.Sequential([pn.Dense(6), pn.Residual(pn.Sequential([pn.LayerNorm(), pn.Dense(6), pn.GELU()])),
                         pn.Parallel([pn.Dense(2), pn.Dense(2)], merge="sum"), pn.Softmax()])
    params, state = pn.init(net, jax.random.key(0), 3)
    x = jax.random.normal(jax.random.key(1), (8, 3))
    y = jnp.arange(8) % 2
    f = jax.jit(pn.value_and_grad, static_argnums=0) if jit else pn.value_and_grad
    value, grads, _ = f(net, params, state, x, y)
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)
    assert np.isfinite(value)


# ------------------------------------------------------------------ bad shapes and merges


def test_residual_that_changes_the_width_names_the_layer_and_shapes():
    with pytest.raises(ValueError, match=r"layer 1 \(Residual\): Residual\(Dense\): the block maps shape \(4,\) "
                                         r"to \(3,\)"):
        pn.init(pn.Sequential([pn.Dense(4), pn.Residual(pn.Dense(3))]), jax.random.key(0), 2)


def test_parallel_shape_errors_and_unknown_merge():
    with pytest.raises(ValueError, match=r"merge='sum'.*\[\(2,\), \(3,\)\]"):
        pn.Parallel([pn.Dense(2), pn.Dense(3)], merge="sum").init(jax.random.key(0), 4)
    with pytest.raises(ValueError, match=r"merge='concat'.*every other axis"):
        pn.Parallel([pn.Identity(), pn.Flatten()]).init(jax.random.key(0), (2, 3))
    with pytest.raises(ValueError, match="merge must be one of"):
        pn.Parallel([pn.Dense(2)], merge="mean")
    with pytest.raises(ValueError, match="at least one branch"):
        pn.Parallel([])


def test_bad_in_shapes_and_norm_widths():
    with pytest.raises(ValueError, match="in_shape must be a non-empty tuple of positive ints"):
        pn.init(pn.Dense(2), jax.random.key(0), (3, 0))
    params, state = pn.init(pn.LayerNorm(), jax.random.key(0), 4)
    with pytest.raises(ValueError, match=r"LayerNorm.*4 features.*\(2, 5\)"):
        pn.forward(pn.LayerNorm(), params, state, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="LayerNorm eps"):
        pn.LayerNorm(eps=0.0)


# ------------------------------------------------------------------ user losses and sequence losses


def huber(out, y):
    r = jnp.abs(out - y)
    return jnp.sum(jnp.where(r < 1, r**2 / 2, r - 0.5)) / out.shape[0]


def huber_backward(out, y):
    return jnp.clip(out - y, -1, 1) / out.shape[0]


HUBER = pn.Loss(huber, huber_backward)
NET = pn.Sequential([pn.Dense(6), pn.Tanh(), pn.Residual(pn.Sequential([pn.LayerNorm(), pn.Dense(6)])),
                     pn.Dense(2)])


def test_user_loss_is_accepted_wherever_a_name_is():
    params, state = pn.init(NET, jax.random.key(0), 3)
    x = jax.random.normal(jax.random.key(1), (8, 3))
    y = 3 * jax.random.normal(jax.random.key(2), (8, 2))  # large residuals: both branches of huber
    assert pn.check_grads(NET, x, y, loss=HUBER, params=params, state=state, l2=0.1).ok
    value, _ = pn.loss(NET, params, state, x, y, loss=HUBER)
    out, _ = pn.forward(NET, params, state, x)
    np.testing.assert_allclose(value, huber(out, y), rtol=1e-12)
    values, grads = pn.per_example_grads(NET, params, state, x, y, loss=HUBER)
    np.testing.assert_allclose(jnp.mean(values), value, rtol=1e-12)
    _, batch, _ = pn.value_and_grad(NET, params, state, x, y, loss=HUBER)
    mean = jax.tree_util.tree_map(lambda g: jnp.mean(g, 0), grads)
    assert max(compare_trees(mean, batch).values()) <= 1e-10
    result = pn.fit(NET, pn.optim.adam(1e-2), (x, y), key=jax.random.key(3), epochs=3, batch_size=4, loss=HUBER)
    assert result.history["loss"][-1] < result.history["loss"][0]


def test_user_loss_with_wrong_backward_shape_or_value_is_named():
    params, state = pn.init(NET, jax.random.key(0), 3)
    x, y = jnp.ones((4, 3)), jnp.zeros((4, 2))
    bad = pn.Loss(huber, lambda out, y: jnp.sum(out, axis=-1))
    with pytest.raises(ValueError, match=r"loss huber: backward returned shape \(4,\), but dL/dout must have "
                                         r"the output's shape \(4, 2\)"):
        pn.value_and_grad(NET, params, state, x, y, loss=bad)
    vector = pn.Loss(lambda out, y: out[:, 0], huber_backward, name="vector")
    with pytest.raises(ValueError, match="loss vector: value returned shape"):
        pn.loss(NET, params, state, x, y, loss=vector)
    with pytest.raises(TypeError, match="needs two functions"):
        pn.Loss(huber, None)
    with pytest.raises(ValueError, match="or pass your own pn.Loss"):
        pn.loss(NET, params, state, x, y, loss="huber")


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_losses_on_sequences_average_over_every_position(loss):
    net = pn.Sequential([pn.Dense(4), pn.Softmax()])
    params, state = pn.init(net, jax.random.key(0), (5, 3))
    x = jax.random.normal(jax.random.key(1), (2, 5, 3))
    labels = jax.random.randint(jax.random.key(2), (2, 5), 0, 4)
    y = labels if loss == "cross_entropy" else jax.nn.one_hot(labels, 4)
    value, _ = pn.loss(net, params, state, x, y, loss=loss)
    flat, _ = pn.loss(net, params, state, x.reshape(10, 3), y.reshape(10, *y.shape[2:]), loss=loss)
    np.testing.assert_allclose(value, flat, rtol=1e-12)
    assert pn.check_grads(net, x, y, loss=loss, params=params, state=state).ok


# ------------------------------------------------------------------ per-example Dense with positions


@pytest.mark.parametrize("positions", [2, 12])  # T^2 <= in*out: the ghost norm; above: formed dW_i
def test_dense_per_example_norms_over_positions(positions):
    layer = pn.Dense(3)
    params, _, _ = layer.init(jax.random.key(0), 4)
    x = jax.random.normal(jax.random.key(1), (5, positions, 4))
    dy = jax.random.normal(jax.random.key(2), (5, positions, 3))
    _, _, cache = layer.forward(params, {}, x)
    grads, _ = base.per_example_backward(layer, params, cache, dy)
    np.testing.assert_allclose(grads["W"][2], x[2].T @ dy[2], rtol=1e-12)
    sq, _ = base.per_example_sq_norms(layer, params, cache, dy, l2=0.3)
    explicit = (jnp.sum((grads["W"] + 0.3 * params["W"]) ** 2, axis=(1, 2))
                + jnp.sum((grads["b"] + 0.0) ** 2, axis=1))
    np.testing.assert_allclose(sq, explicit, rtol=1e-10)


# ------------------------------------------------------------------ everything else keeps working


def test_diagnostics_find_dense_layers_at_any_depth():
    net = pn.Sequential([pn.Dense(4), pn.ReLU(), pn.Residual(pn.Sequential([pn.Dense(4), pn.Tanh()])),
                         pn.Parallel([pn.Dense(2), pn.Sequential([pn.Dense(2), pn.ReLU()])]), pn.Softmax()])
    params, state = pn.init(net, jax.random.key(0), 3)
    x, y = jax.random.normal(jax.random.key(1), (8, 3)), jnp.arange(8) % 4
    d = pn.diagnostics.gradient_flow(net, params, state, x, y)
    _, grads, _ = pn.value_and_grad(net, params, state, x, y)
    dense_grads = [grads[0]["W"], grads[2][0]["W"], grads[3][0]["W"], grads[3][1][0]["W"]]
    np.testing.assert_allclose(d["grad_norm"], [jnp.linalg.norm(g) for g in dense_grads], rtol=1e-12)
    assert d["dead_fraction"].shape == d["saturated_fraction"].shape == (3,)  # relu, tanh, relu
    assert np.isnan(d["dead_fraction"][1]) and not np.isnan(d["saturated_fraction"][1])
    new = jax.tree_util.tree_map(lambda p: 1.5 * p, params)
    np.testing.assert_allclose(pn.diagnostics.update_ratio(net, params, new), 0.5, rtol=1e-10)


def test_composed_params_round_trip_through_checkpoints(tmp_path):
    params, state = pn.init(NET, jax.random.key(0), 3)
    pn.save(tmp_path / "c.ckpt", {"params": params, "state": state})
    loaded = pn.load(tmp_path / "c.ckpt", like={"params": params, "state": state})
    chex.assert_trees_all_equal(loaded["params"], params)


def test_train_sweep_and_dp_sgd_run_composed_nets_with_a_user_loss():
    x = jax.random.normal(jax.random.key(0), (32, 3))
    y = 3 * jax.random.normal(jax.random.key(1), (32, 2))
    _, history, _ = pn.train(NET, pn.optim.adam(1e-2), (x, y), key=jax.random.key(2), epochs=3, batch_size=8,
                             loss=HUBER)
    assert history["loss"][-1] < history["loss"][0]
    result = pn.sweep(lambda hp: (NET, pn.optim.adam(hp["learning_rate"])), (x, y),
                      grid={"seed": [0, 1], "learning_rate": [1e-3, 1e-2]}, epochs=2, batch_size=8, loss=HUBER)
    assert np.asarray(result.history["loss"]).shape == (4, 2)
    params, state = pn.init(NET, jax.random.key(3), 3)
    _, per = pn.per_example_grads(NET, params, state, x, y, loss=HUBER)
    norms = pn.per_example_grad_norms(NET, params, state, x, y, loss=HUBER)
    clip = float(jnp.median(norms))
    _, clipped, _ = pn.clipped_value_and_grad(NET, params, state, x, y, clip_norm=clip, loss=HUBER)
    scale = jnp.minimum(1.0, clip / norms)
    expected = jax.tree_util.tree_map(lambda g: jnp.mean(g * scale.reshape((-1,) + (1,) * (g.ndim - 1)), 0), per)
    assert max(compare_trees(clipped, expected).values()) <= 1e-10


def test_errors_of_other_types_keep_their_type_and_name_the_layer_in_a_note():
    class Picky(pn.Identity):
        def apply(self, x):
            raise jax.errors.ConcretizationTypeError(x, "a picky layer")  # a JAX error: its own constructor

    with pytest.raises(jax.errors.ConcretizationTypeError) as info:
        jax.jit(lambda x: pn.forward(pn.Sequential([pn.Dense(2), Picky()]), *pn.init(
            pn.Sequential([pn.Dense(2), Picky()]), jax.random.key(0), 3), x))(jnp.ones((1, 3)))
    assert "in layer 1 (Picky)" in info.value.__notes__
