"""Gradient-flow diagnostics against hand computations; recording them changes nothing."""
import chex
import jax
import jax.numpy as jnp
import numpy as np

import purenet as pn


def test_gradient_flow_matches_hand_computation():
    net = pn.Sequential([pn.Dense(3), pn.ReLU(), pn.Dense(2), pn.Sigmoid(), pn.Dense(2), pn.Softmax()])
    params = (
        {"W": jnp.array([[1.0, -1.0, 0.5], [2.0, -1.0, 0.0]]), "b": jnp.array([0.0, 0.0, -5.0])}, {},
        {"W": jnp.array([[10.0, 0.1], [-10.0, 0.2], [1.0, 1.0]]), "b": jnp.zeros(2)}, {},
        {"W": jnp.eye(2), "b": jnp.zeros(2)}, {},
    )
    state = ({},) * 6
    x = jnp.array([[1.0, 1.0], [0.5, -1.0]])
    y = jnp.array([0, 1])
    d = pn.diagnostics.gradient_flow(net, params, state, x, y)
    # relu inputs: [[3, -2, -4.5], [-1.5, 1.5, -4.75]]: unit 3 is dead for both examples
    np.testing.assert_allclose(d["dead_fraction"][0], 1 / 3)
    assert np.isnan(d["saturated_fraction"][0])
    h1 = jax.nn.relu(x @ params[0]["W"] + params[0]["b"])
    s = jax.nn.sigmoid(h1 @ params[2]["W"])
    np.testing.assert_allclose(d["saturated_fraction"][1], jnp.mean(jnp.abs(s - 0.5) > 0.49))
    np.testing.assert_allclose(d["input_rms"], [jnp.sqrt(jnp.mean(x**2)), jnp.sqrt(jnp.mean(h1**2)),
                                                jnp.sqrt(jnp.mean(s**2))], rtol=1e-12)
    _, grads, _ = pn.value_and_grad(net, params, state, x, y)
    np.testing.assert_allclose(d["grad_norm"], [jnp.linalg.norm(grads[i]["W"]) for i in (0, 2, 4)], rtol=1e-12)
    np.testing.assert_allclose(d["weight_norm"], [jnp.linalg.norm(params[i]["W"]) for i in (0, 2, 4)])
    new = jax.tree_util.tree_map(lambda p: 1.1 * p, params)
    np.testing.assert_allclose(pn.diagnostics.update_ratio(net, params, new), 0.1, rtol=1e-10)


def test_tanh_saturation():
    net = pn.Sequential([pn.Dense(4), pn.Tanh(), pn.Dense(2), pn.Softmax()])
    params, state = pn.init(net, jax.random.key(0), in_dim=3)
    params = (jax.tree_util.tree_map(lambda p: 100 * p, params[0]),) + params[1:]
    x = jax.random.normal(jax.random.key(1), (32, 3))
    d = pn.diagnostics.gradient_flow(net, params, state, x, jnp.zeros(32, jnp.int32))
    _, _, caches = net.forward(params, state, x)
    np.testing.assert_allclose(d["saturated_fraction"][0], jnp.mean(jnp.abs(caches[1]) > 0.99))
    assert float(d["saturated_fraction"][0]) > 0.8


def test_recording_diagnostics_does_not_change_training():
    data = pn.datasets.digits()
    net = pn.mlp([64, 32, 16, 10], dropout=0.1)
    kw = dict(key=jax.random.key(0), epochs=3, batch_size=64)
    plain = pn.fit(net, pn.optim.adam(1e-3), (data.x_train, data.y_train), **kw)
    probe = (data.x_train[:128], data.y_train[:128])
    recorded = pn.fit(net, pn.optim.adam(1e-3), (data.x_train, data.y_train), diagnostics=probe, **kw)
    chex.assert_trees_all_equal(plain.params, recorded.params)
    np.testing.assert_array_equal(plain.history["loss"], recorded.history["loss"])
    assert recorded.history["grad_norm"].shape == (3, 3)
    assert recorded.history["dead_fraction"].shape == (3, 2)
    assert np.all(recorded.history["update_ratio"] > 0)
    last = pn.diagnostics.gradient_flow(net, recorded.params, recorded.state, *probe)
    np.testing.assert_allclose(recorded.history["grad_norm"][-1], last["grad_norm"], rtol=1e-5)
