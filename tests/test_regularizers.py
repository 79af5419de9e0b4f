"""Dropout and batch norm: handwritten backward, statistics and edge cases."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import purenet as pn
from purenet.testing import net_cases
from tests.conftest import scaled


@pytest.mark.slow
@settings(max_examples=scaled(8))
@given(net_cases(dropout=True, batchnorm=True))
def test_value_and_grad_with_dropout_and_batchnorm_matches_autodiff(case):
    params, state, x, y = case.data()
    key = jax.random.key(case.seed)
    report = pn.check_grads(case.net, x, y, loss=case.loss, params=params, state=state,
                            l2=case.l2, train=True, key=key)
    assert report.ok, f"{case}\n{report}"


@pytest.mark.parametrize("layer", [pn.Dropout(0.3), pn.BatchNorm(), pn.BatchNorm(momentum=0.5, eps=1e-3)])
@pytest.mark.parametrize("train", [True, False])
def test_layer_backward_matches_autodiff(layer, train):
    for seed in range(5):
        x = jax.random.normal(jax.random.key(seed), (6, 4)) * 3 + 1
        state = None
        if isinstance(layer, pn.BatchNorm):
            state = {"mean": jnp.full(4, 0.5), "var": jnp.full(4, 2.0)}
        report = pn.check_grads(layer, x, state=state, train=train, key=jax.random.key(seed + 100))
        assert report.ok, str(report)


# ------------------------------------------------------------------ dropout


def test_dropout_preserves_the_mean_in_expectation():
    x = jnp.full((200, 500), 2.0)
    y, _, _ = pn.Dropout(0.4).forward({}, {}, x, train=True, key=jax.random.key(0))
    # 100,000 units, each 2/0.6 with p=0.6: the mean's std is ~0.0052
    assert abs(float(jnp.mean(y)) - 2.0) < 0.03
    assert abs(float(jnp.mean(y == 0)) - 0.4) < 0.01
    np.testing.assert_allclose(jnp.unique(y), [0.0, 2.0 / 0.6], rtol=1e-6)


def test_dropout_rate_zero_and_evaluation_are_the_identity():
    x = jax.random.normal(jax.random.key(0), (4, 3))
    for layer, train in [(pn.Dropout(0.0), True), (pn.Dropout(0.9), False)]:
        y, _, cache = layer.forward({}, {}, x, train=train, key=jax.random.key(1))
        np.testing.assert_array_equal(y, x)
        np.testing.assert_array_equal(layer.backward({}, cache, x)[1], x)


def test_dropout_masks_differ_across_layers_and_keys_and_repeat_for_a_key():
    net = pn.Sequential([pn.Identity(), pn.Dropout(0.5), pn.Dropout(0.5)])
    x = jnp.ones((10, 40))
    params, state = pn.init(net, jax.random.key(0), in_dim=40)
    _, _, caches = net.forward(params, state, x, train=True, key=jax.random.key(7))
    assert not np.array_equal(caches[1], caches[2])
    _, _, again = net.forward(params, state, x, train=True, key=jax.random.key(7))
    np.testing.assert_array_equal(caches[1], again[1])
    _, _, other = net.forward(params, state, x, train=True, key=jax.random.key(8))
    assert not np.array_equal(caches[1], other[1])


def test_dropout_without_a_key_in_training_says_so():
    net = pn.mlp([3, 4, 2], dropout=0.5)
    params, state = pn.init(net, jax.random.key(0))
    with pytest.raises(ValueError, match="Dropout in training needs a random key"):
        pn.value_and_grad(net, params, state, jnp.ones((2, 3)), jnp.array([0, 1]), train=True)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan")])
def test_dropout_rate_outside_0_1_is_an_error(rate):
    with pytest.raises(ValueError, match="Dropout rate"):
        pn.Dropout(rate)


def test_dropout_vmaps_over_keys():
    x = jnp.ones((3, 5))
    keys = jax.random.split(jax.random.key(0), 4)
    ys = jax.vmap(lambda k: pn.Dropout(0.5).forward({}, {}, x, train=True, key=k)[0])(keys)
    chex.assert_shape(ys, (4, 3, 5))
    assert len({np.asarray(y).tobytes() for y in ys}) == 4


# ------------------------------------------------------------------ batch norm


def test_batchnorm_training_output_is_standardised():
    bn = pn.BatchNorm()
    params, state, _ = bn.init(None, 3)
    x = jax.random.normal(jax.random.key(0), (64, 3)) * jnp.array([1.0, 5.0, 0.1]) + jnp.array([3.0, -2.0, 100.0])
    y, new_state, _ = bn.forward(params, state, x, train=True)
    np.testing.assert_allclose(jnp.mean(y, 0), 0.0, atol=1e-10)
    np.testing.assert_allclose(jnp.var(y, 0), 1.0, rtol=1e-3)
    np.testing.assert_allclose(new_state["mean"], 0.1 * jnp.mean(x, 0), rtol=1e-12)
    np.testing.assert_allclose(new_state["var"], 0.9 + 0.1 * jnp.var(x, 0), rtol=1e-12)


def test_batchnorm_running_statistics_converge_to_the_data():
    bn = pn.BatchNorm(momentum=0.9)
    params, state, _ = bn.init(None, 2)
    mean, std = jnp.array([4.0, -1.0]), jnp.array([2.0, 0.5])
    step = jax.jit(lambda s, k: bn.forward(params, s, jax.random.normal(k, (256, 2)) * std + mean, train=True)[1])
    for k in jax.random.split(jax.random.key(0), 150):
        state = step(state, k)
    np.testing.assert_allclose(state["mean"], mean, atol=0.1)
    np.testing.assert_allclose(state["var"], std**2, rtol=0.1)


def test_batchnorm_evaluation_uses_running_statistics_and_keeps_state():
    bn = pn.BatchNorm(eps=1e-5)
    params = {"gamma": jnp.array([2.0, 0.5]), "beta": jnp.array([0.1, -0.3])}
    state = {"mean": jnp.array([1.0, -2.0]), "var": jnp.array([4.0, 0.25])}
    x = jnp.array([[3.0, -1.0], [0.0, 0.0]])
    y, new_state, _ = bn.forward(params, state, x, train=False)
    expected = params["gamma"] * (x - state["mean"]) / jnp.sqrt(state["var"] + 1e-5) + params["beta"]
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    chex.assert_trees_all_equal(new_state, state)
    net = pn.mlp([2, 3, 2], batchnorm=True)
    p, s = pn.init(net, jax.random.key(0))
    _, s_eval = pn.forward(net, p, s, x, train=False)
    chex.assert_trees_all_equal(s_eval, s)
    _, _, s_vg = pn.value_and_grad(net, p, s, x, jnp.array([0, 1]))
    chex.assert_trees_all_equal(s_vg, s)


def test_batchnorm_training_batch_of_one_is_an_error():
    net = pn.mlp([3, 4, 2], batchnorm=True)
    params, state = pn.init(net, jax.random.key(0))
    with pytest.raises(ValueError, match="at least 2 examples"):
        pn.value_and_grad(net, params, state, jnp.ones((1, 3)), jnp.array([0]), train=True)
    pn.forward(net, params, state, jnp.ones((1, 3)), train=False)  # evaluation is fine


def test_batchnorm_constant_feature_gives_zero_output_and_finite_gradients():
    x = jnp.stack([jnp.full(8, 3.0), jnp.arange(8.0)], axis=1)
    bn = pn.BatchNorm()
    params, state, _ = bn.init(None, 2)
    y, _, cache = bn.forward(params, state, x, train=True)
    np.testing.assert_array_equal(y[:, 0], 0.0)
    grads, dx = bn.backward(params, cache, jnp.ones_like(x) + x)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves((grads, dx)))
    assert pn.check_grads(bn, x, train=True).ok


def test_batchnorm_large_mean_keeps_its_variance_in_float32():
    x = (1e4 + jax.random.normal(jax.random.key(0), (512, 1))).astype(jnp.float32)
    bn = pn.BatchNorm()
    params, state, _ = bn.init(None, 1, dtype=jnp.float32)
    _, new_state, _ = bn.forward(params, state, x, train=True)
    batch_var = (new_state["var"] - 0.9) / 0.1
    np.testing.assert_allclose(batch_var, 1.0, rtol=0.15)


def test_state_flows_through_value_and_grad_in_training_and_jit():
    net = pn.mlp([3, 5, 2], batchnorm=True, dropout=0.2)
    params, state = pn.init(net, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (16, 3)) + 2.0
    run = jax.jit(lambda p, s, k: pn.value_and_grad(net, p, s, x, jnp.arange(16) % 2, train=True, key=k))
    _, _, new_state = run(params, state, jax.random.key(2))
    assert not np.allclose(new_state[1]["mean"], state[1]["mean"])
    _, eager_grads, eager_state = pn.value_and_grad(net, params, state, x, jnp.arange(16) % 2,
                                                    train=True, key=jax.random.key(2))
    chex.assert_trees_all_close((eager_grads, eager_state), run(params, state, jax.random.key(2))[1:],
                                rtol=1e-10)


def test_batchnorm_on_a_batch_of_two_blocks_the_gradient_upstream():
    # Two rows normalise to exactly -1 and +1 whatever they were, so nothing
    # before batch norm can change the loss: both backward passes give ~0.
    net = pn.Sequential([pn.Dense(3), pn.BatchNorm(), pn.Tanh(), pn.Dense(2), pn.Softmax()])
    params, state = pn.init(net, jax.random.key(0), in_dim=4)
    x = jax.random.normal(jax.random.key(1), (2, 4))
    _, grads, _ = pn.value_and_grad(net, params, state, x, jnp.array([0, 1]), train=True)
    ref = jax.grad(lambda p: pn.loss(net, p, state, x, jnp.array([0, 1]), train=True)[0])(params)
    scale = float(jnp.max(jnp.abs(grads[3]["W"])))
    for g in (grads[0]["W"], ref[0]["W"]):
        assert float(jnp.max(jnp.abs(g))) < 1e-4 * scale
