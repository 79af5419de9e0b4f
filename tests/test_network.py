"""pn.value_and_grad (handwritten) against jax.value_and_grad(pn.loss) (autodiff)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import purenet as pn
from purenet.testing import compare_trees, net_cases, relative_error
from tests.conftest import scaled


def _check_case(case, train=False, key=None):
    params, state, x, y = case.data()
    report = pn.check_grads(case.net, x, y, loss=case.loss, params=params, state=state,
                            l2=case.l2, train=train, key=key)
    assert report.ok, f"{case}\n{report}"  # compare_trees also checks paths and shapes


@pytest.mark.slow
@settings(max_examples=scaled(10))
@given(net_cases())
def test_value_and_grad_matches_autodiff(case):
    _check_case(case)


def test_grads_have_the_structure_shapes_and_dtypes_of_params():
    net = pn.mlp([3, 4, 4, 2], dropout=0.5, batchnorm=True)
    params, state = pn.init(net, jax.random.key(0), dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(1), (6, 3), jnp.float32)
    _, grads, new_state = pn.value_and_grad(net, params, state, x, jnp.arange(6) % 2,
                                            train=True, key=jax.random.key(2))
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)


def test_net_cases_cover_every_activation_and_output_loss_pair():
    from hypothesis import find

    from purenet.testing import ACTIVATIONS, OUTPUT_LOSSES

    for hidden in ACTIVATIONS:
        find(net_cases(), lambda c, h=hidden: len(c.net.layers) > 2 and c.net.layers[1] == pn.mlp([1, 1, 1], hidden=h).layers[1])
    for output, loss in OUTPUT_LOSSES:
        find(net_cases(), lambda c, o=output, lo=loss: (c.output, c.loss) == (o, lo))


# ------------------------------------------------------------------ the lecture's worked example

W1 = jnp.array([[0.1, 0.3, 0.8, -0.4], [-0.3, -0.2, 0.5, 0.5], [-0.3, 0.0, 0.5, 0.4], [0.2, 0.5, -0.9, 0.7]])
W2 = jnp.array([[0.5, 0.8, 0.2, 0.4], [0.5, 0.2, 0.3, -0.5]])
LECTURE_NET = pn.Sequential([pn.Dense(4), pn.Sigmoid(), pn.Dense(2), pn.Softmax()])


def lecture_problem():
    """The slide's 4-4-2 network. Slide W_i is (out, in); Dense stores W_i^T."""
    params = ({"W": W1.T, "b": jnp.zeros(4)}, {}, {"W": W2.T, "b": jnp.zeros(2)}, {})
    state = ({}, {}, {}, {})
    return params, state, jnp.array([[2.0, 5.0, 3.0, 3.0]]), jnp.array([[1.0, 0.0]])


def test_lecture_worked_example_forward():
    params, state, x, y = lecture_problem()
    _, _, cache = LECTURE_NET.forward(params, state, x)
    np.testing.assert_allclose(cache[0][0], x[0])
    np.testing.assert_allclose(cache[2][0], [0.94784644, 0.80218389, 0.89090318, 0.90887704], rtol=1e-7)
    np.testing.assert_allclose(x @ W1.T, [[2.9, 1.4, 2.1, 2.3]], rtol=1e-12)
    out, _ = pn.forward(LECTURE_NET, params, state, x)
    np.testing.assert_allclose(out, [[0.77034, 0.22966]], atol=5e-6)
    value, _ = pn.loss(LECTURE_NET, params, state, x, y, loss="mse")
    np.testing.assert_allclose(value, 0.105491, atol=5e-7)


def test_lecture_worked_example_gradients_are_the_true_ones():
    params, state, x, y = lecture_problem()
    value, grads, _ = pn.value_and_grad(LECTURE_NET, params, state, x, y, loss="mse")
    # w212 = slide W2[0, 1] = Dense W[1, 0]; the slide's -0.029 takes one path
    # and drops softmax's cross term; the true value sums both.
    np.testing.assert_allclose(grads[2]["W"][1, 0], -0.13038, atol=5e-6)
    # w131 = slide W1[2, 0] = Dense W[0, 2]
    np.testing.assert_allclose(grads[0]["W"][0, 2], 0.0031594, atol=5e-8)
    ref = jax.grad(lambda p: pn.loss(LECTURE_NET, p, state, x, y, loss="mse")[0])(params)
    assert max(compare_trees(grads, ref).values()) <= 1e-10


# ------------------------------------------------------------------ special points


def test_softmax_cross_entropy_at_logits_of_1e4_is_finite_and_exact():
    net = pn.Sequential([pn.Identity(), pn.Softmax()])
    x = jnp.array([[1e4, 0.0, -1e4]])
    value, grads, _ = pn.value_and_grad(net, ({}, {}), ({}, {}), x, jnp.array([2]))
    assert float(value) == 2e4
    # the gradient with respect to the logits is p - onehot = [1, 0, -1]
    _, _, cache = net.layers[0].forward({}, {}, x)
    dz = pn.losses.softmax_cross_entropy_backward(x, jnp.array([2]))
    np.testing.assert_array_equal(dz, [[1.0, 0.0, -1.0]])
    ref = jax.grad(lambda z: pn.loss(net, ({}, {}), ({}, {}), z, jnp.array([2]))[0])(x)
    np.testing.assert_array_equal(ref, [[1.0, 0.0, -1.0]])


def test_dense_gradient_through_saturated_softmax_cross_entropy_is_finite():
    net = pn.Sequential([pn.Dense(3, init="zeros"), pn.Softmax()])
    params = ({"W": jnp.array([[1e4, 0.0, -1e4]]), "b": jnp.zeros(3)}, {})
    value, grads, _ = pn.value_and_grad(net, params, ({}, {}), jnp.array([[1.0]]), jnp.array([2]))
    assert float(value) == 2e4
    np.testing.assert_array_equal(grads[0]["W"], [[1.0, 0.0, -1.0]])
    np.testing.assert_array_equal(grads[0]["b"], [1.0, 0.0, -1.0])


def test_binary_cross_entropy_at_logit_100_target_0():
    net = pn.Sequential([pn.Dense(1), pn.Sigmoid()])
    params = ({"W": jnp.array([[100.0]]), "b": jnp.zeros(1)}, {})
    value, grads, _ = pn.value_and_grad(net, params, ({}, {}), jnp.array([[1.0]]), jnp.array([[0.0]]),
                                        loss="binary_cross_entropy")
    assert float(value) == 100.0
    assert float(grads[0]["W"][0, 0]) == 1.0


def test_sigmoid_hidden_layer_at_plus_minus_1000_gives_finite_gradients():
    net = pn.Sequential([pn.Dense(2), pn.Sigmoid(), pn.Dense(1), pn.Identity()])
    params = ({"W": jnp.array([[1000.0, -1000.0]]), "b": jnp.zeros(2)}, {},
              {"W": jnp.ones((2, 1)), "b": jnp.zeros(1)}, {})
    state = ({},) * 4
    value, grads, _ = pn.value_and_grad(net, params, state, jnp.array([[1.0]]), jnp.array([[0.5]]), loss="mse")
    assert float(value) == 0.25
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    np.testing.assert_array_equal(grads[0]["W"], [[0.0, 0.0]])


@pytest.mark.parametrize("loss,output", [("cross_entropy", "softmax"), ("mse", "softmax"),
                                         ("binary_cross_entropy", "sigmoid"), ("mse", "identity")])
def test_float32_agrees_with_float64(loss, output):
    net = pn.mlp([5, 8, 6, 3], hidden="tanh", output=output)
    key = jax.random.key(0)
    params64, state = pn.init(net, key, dtype=jnp.float64)
    params32 = jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), params64)
    x = jax.random.normal(key, (7, 5))
    y = {"cross_entropy": jnp.arange(7) % 3, "mse": jnp.ones((7, 3)) * 0.3,
         "binary_cross_entropy": jnp.ones((7, 3)) * 0.3}[loss]
    v64, g64, _ = pn.value_and_grad(net, params64, state, x, y, loss=loss, l2=0.01)
    v32, g32, _ = pn.value_and_grad(net, params32, state, x.astype(jnp.float32), y, loss=loss, l2=0.01)
    assert g32[0]["W"].dtype == jnp.float32
    assert relative_error(v32, v64) < 1e-5
    assert max(compare_trees(g32, g64).values()) < 1e-5


def test_l2_adds_half_sum_of_squared_weights_and_not_biases():
    net = pn.mlp([2, 3, 2])
    params, state = pn.init(net, jax.random.key(1))
    params = jax.tree_util.tree_map(lambda p: p + 0.5, params)
    x, y = jnp.ones((4, 2)), jnp.array([0, 1, 1, 0])
    v0, g0, _ = pn.value_and_grad(net, params, state, x, y)
    v1, g1, _ = pn.value_and_grad(net, params, state, x, y, l2=0.3)
    weights = params[0]["W"], params[2]["W"]
    np.testing.assert_allclose(v1 - v0, 0.15 * sum(jnp.sum(w**2) for w in weights), rtol=1e-12)
    np.testing.assert_allclose(g1[0]["W"] - g0[0]["W"], 0.3 * params[0]["W"], rtol=1e-12)
    np.testing.assert_array_equal(g1[0]["b"], g0[0]["b"])


# ------------------------------------------------------------------ jit


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_jit_and_no_jit_agree(loss):
    net = pn.mlp([4, 6, 3], hidden="relu")
    params, state = pn.init(net, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (5, 4))
    y = jnp.array([0, 1, 2, 0, 1]) if loss == "cross_entropy" else jnp.ones((5, 3))

    def run(p, s, xx, yy):
        return pn.value_and_grad(net, p, s, xx, yy, loss=loss, l2=0.01)

    eager = run(params, state, x, y)
    jitted = jax.jit(run)(params, state, x, y)
    chex.assert_trees_all_close(eager, jitted, rtol=1e-12, atol=1e-14, strict=True)


def test_jitted_value_and_grad_traces_once_for_repeated_shapes():
    net = pn.mlp([4, 6, 3])
    params, state = pn.init(net, jax.random.key(0))
    traces = []

    @jax.jit
    def step(p, s, x, y):
        traces.append(1)
        return pn.value_and_grad(net, p, s, x, y)

    for i in range(5):
        x = jax.random.normal(jax.random.key(i), (8, 4))
        step(params, state, x, jnp.arange(8) % 3)
    assert len(traces) == 1


def test_vmap_over_examples_gives_per_example_losses():
    net = pn.mlp([3, 4, 2])
    params, state = pn.init(net, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (6, 3))
    y = jnp.arange(6) % 2
    per = jax.vmap(lambda xi, yi: pn.value_and_grad(net, params, state, xi[None], yi[None])[0])(x, y)
    whole = pn.loss(net, params, state, x, y)[0]
    np.testing.assert_allclose(jnp.mean(per), whole, rtol=1e-12)
