"""Each layer's handwritten backward against jax.grad, in float64, over random shapes."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import purenet as pn
from purenet import initializers
from tests.conftest import scaled

# A few sizes (1 included): every new shape costs a compile, the values vary freely.
WIDTHS = st.sampled_from([1, 2, 5])
BATCHES = st.sampled_from([1, 2, 5])

LAYERS = {
    "dense": lambda d: pn.Dense(d.draw(WIDTHS), init=d.draw(st.sampled_from(["he_normal", "xavier_uniform"]))),
    "dense_no_bias": lambda d: pn.Dense(d.draw(WIDTHS), use_bias=False),
    "sigmoid": lambda d: pn.Sigmoid(),
    "tanh": lambda d: pn.Tanh(),
    "relu": lambda d: pn.ReLU(),
    "leaky_relu": lambda d: pn.LeakyReLU(d.draw(st.sampled_from([0.01, 0.2, 0.5]))),
    "identity": lambda d: pn.Identity(),
    "softmax": lambda d: pn.Softmax(),
    "sequential": lambda d: pn.Sequential([pn.Dense(d.draw(WIDTHS)), pn.Tanh(), pn.Dense(3), pn.Softmax()]),
}


def _draw_input(data, allow_zeros=True):
    batch = data.draw(BATCHES, label="batch")
    width = data.draw(WIDTHS, label="width")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    # Unit-scale inputs: deep saturation (tanh(11) = 1 - 6e-10) makes the
    # gradient a difference of rounded terms in *any* implementation; the
    # extremes have their own exact tests below.
    x = jax.random.normal(jax.random.key(seed), (batch, width), jnp.float64)
    if allow_zeros and data.draw(st.booleans(), label="exact zeros"):
        x = x.at[:, 0].set(0.0)  # the relu / leaky relu kinks
    return x, seed


@pytest.mark.parametrize("name", sorted(LAYERS))
@settings(max_examples=scaled(20))
@given(data=st.data())
def test_layer_backward_matches_autodiff(name, data):
    layer = LAYERS[name](data)
    x, seed = _draw_input(data)
    report = pn.check_grads(layer, x, key=jax.random.key(seed))
    assert report.ok, str(report)


@pytest.mark.parametrize("name", sorted(LAYERS))
@settings(max_examples=scaled(20))
@given(data=st.data())
def test_layer_backward_is_linear_in_cotangent(name, data):
    layer = LAYERS[name](data)
    x, seed = _draw_input(data)
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params, state, _ = layer.init(k1, x.shape[-1], dtype=jnp.float64)
    y, _, cache = layer.forward(params, state, x)
    c1 = jax.random.normal(k2, y.shape, jnp.float64)
    c2 = jax.random.normal(k3, y.shape, jnp.float64)
    combined = layer.backward(params, cache, c1 + 2 * c2)
    separate = jax.tree_util.tree_map(
        lambda a, b: a + 2 * b, layer.backward(params, cache, c1), layer.backward(params, cache, c2)
    )
    chex.assert_trees_all_close(combined, separate, rtol=1e-10, atol=1e-12)


def test_relu_and_leaky_relu_at_exactly_zero_follow_jax_nn():
    x = jnp.array([[-1.0, 0.0, 2.0]])
    ones = jnp.ones_like(x)
    for layer, expected in [(pn.ReLU(), [0.0, 0.0, 1.0]), (pn.LeakyReLU(0.1), [0.1, 1.0, 1.0])]:
        _, _, cache = layer.forward({}, {}, x)
        _, dx = layer.backward({}, cache, ones)
        np.testing.assert_array_equal(dx[0], expected)
    np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(jax.nn.relu(v)))(x)[0], [0.0, 0.0, 1.0])


def test_sigmoid_at_plus_minus_1000_is_exact_and_finite():
    x = jnp.array([[-1000.0, 1000.0]])
    y, _, cache = pn.Sigmoid().forward({}, {}, x)
    np.testing.assert_array_equal(y, [[0.0, 1.0]])
    _, dx = pn.Sigmoid().backward({}, cache, jnp.ones_like(x))
    np.testing.assert_array_equal(dx, [[0.0, 0.0]])


def test_initializers_draw_exactly_as_jax_nn_initializers():
    key = jax.random.key(3)
    reference = {
        "xavier_uniform": jax.nn.initializers.glorot_uniform(),
        "xavier_normal": jax.nn.initializers.glorot_normal(),
        "he_normal": jax.nn.initializers.he_normal(),
        "he_uniform": jax.nn.initializers.he_uniform(),
        "lecun_normal": jax.nn.initializers.lecun_normal(),
        "zeros": jax.nn.initializers.zeros,
    }
    for name, ref in reference.items():
        params, _, _ = pn.Dense(7, init=name).init(key, 5, dtype=jnp.float32)
        np.testing.assert_array_equal(params["W"], ref(key, (5, 7), jnp.float32), err_msg=name)
        np.testing.assert_array_equal(params["b"], jnp.zeros(7))


@pytest.mark.parametrize("key", [jax.random.key(4), jax.random.PRNGKey(4), jax.random.key(4, impl="rbg")],
                         ids=["threefry", "raw uint32", "rbg"])
@pytest.mark.parametrize("shape", [(3, 3, 8, 16), (5, 5, 1, 16), (1025, 1025)], ids=["1152", "400", "past 2^20"])
def test_initializers_draw_the_shape_itself_from_a_shared_flat_program(key, shape):
    # the draw is the first entries of a flat, size-bucketed one (one compile for many shapes):
    # the values must be the shape's own draw, for every key kind and across the 2^20 bucket step
    for name, ref in [("he_normal", jax.nn.initializers.he_normal()),
                      ("xavier_uniform", jax.nn.initializers.glorot_uniform()),
                      ("normal", jax.nn.initializers.normal(1.0))]:
        np.testing.assert_array_equal(initializers.get(name)(key, shape, jnp.float32), ref(key, shape, jnp.float32),
                                      err_msg=name)


def test_variance_scaling_of_a_vector_names_the_problem():
    with pytest.raises(ValueError, match=r"at least 2 dimensions.*shape \(7,\)"):
        initializers.get("he_normal")(jax.random.key(0), (7,), jnp.float32)


def test_he_normal_has_the_stated_variance():
    params, _, _ = pn.Dense(400, init="he_normal").init(jax.random.key(0), 300)
    assert abs(float(jnp.var(params["W"])) * 300 / 2 - 1) < 0.02


def test_layers_are_hashable_configs_usable_as_static_jit_args():
    net = pn.mlp([3, 4, 2], dropout=0.5, batchnorm=True)
    assert hash(net) == hash(pn.mlp([3, 4, 2], dropout=0.5, batchnorm=True))
    assert net == pn.mlp([3, 4, 2], dropout=0.5, batchnorm=True)
    fwd = jax.jit(pn.forward, static_argnums=0)
    params, state = pn.init(net, jax.random.key(0))
    y, _ = fwd(net, params, state, jnp.ones((2, 3)))
    chex.assert_shape(y, (2, 2))


def test_mlp_places_layers_conventionally():
    net = pn.mlp([3, 5, 4, 2], hidden="tanh", output="sigmoid", dropout=0.1, batchnorm=True)
    kinds = [type(layer).__name__ for layer in net.layers]
    assert kinds == ["Dense", "BatchNorm", "Tanh", "Dropout"] * 2 + ["Dense", "Sigmoid"]
    assert net.layers[0].initializer == "xavier_normal"
    assert pn.mlp([3, 2]).layers[0].initializer == "he_normal"


@pytest.mark.parametrize("bad", [[3], [3, 0, 2], [3, 2.5, 2]])
def test_mlp_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="mlp sizes"):
        pn.mlp(bad)


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown initializer 'glorot'"):
        pn.Dense(3, init="glorot")
    with pytest.raises(ValueError, match="unknown hidden activation"):
        pn.mlp([2, 2, 2], hidden="swish")
    with pytest.raises(ValueError, match="positive integer"):
        pn.Dense(0)


def test_layer_reprs_are_constructor_calls_and_replace_works():
    import dataclasses

    for layer in (pn.Dense(3, init="xavier_uniform", use_bias=False),
                  pn.Conv2D(4, (3, 2), strides=2, padding="VALID", init="lecun_normal", implementation="im2col")):
        assert eval(repr(layer), {"Dense": pn.Dense, "Conv2D": pn.Conv2D}) == layer
        wider = dataclasses.replace(layer, features=7)
        assert wider.features == 7 and wider.initializer == layer.initializer
