"""pn.LSTM and pn.GRU: PyTorch's nn.LSTM / nn.GRU in float64, backward = jax.grad, per-example fast paths.

Shapes come from small fixed sets (each new shape is a compile).
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import purenet as pn
from purenet.layers import base
from purenet.testing import check_grads, compare_trees
from tests.conftest import scaled

torch = pytest.importorskip("torch")

LAYERS = {"lstm": pn.LSTM, "gru": pn.GRU}


def _data(layer, batch, t, d, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params, state, out = layer.init(k1, (t, d), jnp.float64)
    x = jax.random.normal(k2, (batch, t, d), jnp.float64)
    dy = jax.random.normal(k3, (batch, *out), jnp.float64)
    return params, state, x, dy


# ---------------------------------------------------------------- PyTorch's nn.LSTM / nn.GRU


def _torch_module(kind, params, d, h):
    t = lambda a: torch.tensor(np.asarray(a))  # noqa: E731
    if kind == "lstm":
        m = torch.nn.LSTM(d, h, batch_first=True).double()
        biases = (params["b"] * 0.25, params["b"] * 0.75)  # any split: torch adds them
    else:
        m = torch.nn.GRU(d, h, batch_first=True).double()
        biases = (params["bx"], params["bh"])
    with torch.no_grad():
        m.weight_ih_l0.copy_(t(params["Wx"].T))
        m.weight_hh_l0.copy_(t(params["Wh"].T))
        m.bias_ih_l0.copy_(t(biases[0]))
        m.bias_hh_l0.copy_(t(biases[1]))
    return m


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("batch,t,d,h", [(3, 5, 4, 6), (1, 1, 2, 3)])
def test_forward_and_gradients_equal_torch(kind, batch, t, d, h):
    layer = LAYERS[kind](h)
    params, state, x, dy = _data(layer, batch, t, d, seed=batch + t)
    x = 2 * x  # saturate a few gates
    y, _, cache = layer.forward(params, state, x)
    grads, dx = layer.backward(params, cache, dy)

    m = _torch_module(kind, params, d, h)
    xt = torch.tensor(np.asarray(x), requires_grad=True)
    ty, _ = m(xt)
    ty.backward(torch.tensor(np.asarray(dy)))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(grads["Wx"], m.weight_ih_l0.grad.numpy().T, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(grads["Wh"], m.weight_hh_l0.grad.numpy().T, rtol=1e-11, atol=1e-12)
    if kind == "lstm":  # b = b_ih + b_hh: each torch bias gets the same gradient, ours
        np.testing.assert_allclose(grads["b"], m.bias_ih_l0.grad.numpy(), rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(grads["b"], m.bias_hh_l0.grad.numpy(), rtol=1e-11, atol=1e-12)
    else:
        np.testing.assert_allclose(grads["bx"], m.bias_ih_l0.grad.numpy(), rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(grads["bh"], m.bias_hh_l0.grad.numpy(), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_param_layout_roles_and_pytorch_init(kind):
    h, d = 16, 5
    layer = LAYERS[kind](h)
    params, state, out = layer.init(jax.random.key(0), (7, d), jnp.float64)
    k = 4 if kind == "lstm" else 3
    expected = {"Wx": (d, k * h), "Wh": (h, k * h), "b": (k * h,)} if kind == "lstm" else \
        {"Wx": (d, k * h), "Wh": (h, k * h), "bx": (k * h,), "bh": (k * h,)}
    assert {name: p.shape for name, p in params.items()} == expected
    assert state == {} and out == (7, h)
    assert max(float(jnp.max(jnp.abs(params[w]))) for w in ("Wx", "Wh")) <= 1 / np.sqrt(h)  # U(-k, k)
    assert float(jnp.std(params["Wh"])) == pytest.approx(1 / np.sqrt(3 * h), rel=0.1)
    assert pn.roles(layer, params) == {n: ("weight" if n.startswith("W") else "bias") for n in params}
    assert pn.decay_mask(layer, params) == {n: n.startswith("W") for n in params}
    other, _, _ = LAYERS[kind](h, init="xavier_uniform").init(jax.random.key(0), (7, d), jnp.float64)
    assert all(float(jnp.max(jnp.abs(b))) == 0 for n, b in other.items() if n.startswith("b"))
    assert LAYERS[kind](h) == LAYERS[kind](h) and hash(LAYERS[kind](h)) == hash(LAYERS[kind](h))
    assert LAYERS[kind](h) != LAYERS[kind](h + 1) and pn.LSTM(h) != pn.GRU(h)
    assert repr(layer) == f"{type(layer).__name__}(features={h}, init='pytorch')"


# ---------------------------------------------------------------- against jax.grad, hypothesis over sizes

BATCHES, LENGTHS, WIDTHS, FEATURES = (1, 3), (1, 2, 5), (2, 3), (1, 4)


@settings(max_examples=scaled(10), deadline=None)
@given(kind=st.sampled_from(["lstm", "gru"]), batch=st.sampled_from(BATCHES), t=st.sampled_from(LENGTHS),
       d=st.sampled_from(WIDTHS), h=st.sampled_from(FEATURES), unroll=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**16))
def test_backward_equals_jax_grad(kind, batch, t, d, h, unroll, seed):
    layer = LAYERS[kind](h, unroll=unroll)
    x = 1.5 * jax.random.normal(jax.random.key(seed), (batch, t, d), jnp.float64)
    check_grads(layer, x, key=jax.random.key(seed + 1), rtol=1e-10)


# ---------------------------------------------------------------- per-example fast paths


@settings(max_examples=scaled(8), deadline=None)
@given(kind=st.sampled_from(["lstm", "gru"]), shape=st.sampled_from([(1, 3, 4), (4, 2, 3), (3, 1, 5)]),
       h=st.sampled_from([2, 3]), l2=st.sampled_from([0.0, 0.3]), seed=st.integers(0, 2**16))
def test_fast_paths_equal_the_generic_default(kind, shape, h, l2, seed):
    """(T, d, h) pairs are chosen so that both sides of the Gram/outer choice run: T^2 <= d 4h and above."""
    batch, t, d = shape
    layer = LAYERS[kind](h)
    params, state, x, dy = _data(layer, batch, t, d, seed)
    _, _, cache = layer.forward(params, state, x)
    fast = base.per_example_backward(layer, params, cache, dy)
    slow = base.generic_per_example_backward(layer, params, cache, dy)
    chex.assert_trees_all_close(fast, slow, rtol=1e-10, atol=1e-12)
    sq, dx = base.per_example_sq_norms(layer, params, cache, dy, l2)
    bare = type("Bare", (), {"backward": layer.backward, "roles": layer.roles})()
    sq_ref, dx_ref = base.generic_per_example_sq_norms(bare, params, cache, dy, l2)
    np.testing.assert_allclose(sq, sq_ref, rtol=1e-10, atol=1e-12)
    chex.assert_trees_all_close(dx, dx_ref, rtol=1e-10, atol=1e-12)
    full = layer.backward(params, cache, dy)
    chex.assert_trees_all_close(jax.tree_util.tree_map(lambda g: jnp.sum(g, 0), fast[0]), full[0], rtol=1e-10,
                                atol=1e-12)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_ghost_norm_takes_both_branches(kind):
    """T^2 > d 4h (long sequences, narrow layer): the explicit branch; short ones: the Gram branch."""
    layer = LAYERS[kind](1)
    for t in (2, 6):
        params, state, x, dy = _data(layer, 2, t, 1, seed=t)
        _, _, cache = layer.forward(params, state, x)
        sq, _ = base.per_example_sq_norms(layer, params, cache, dy, 0.5)
        ref, _ = base.generic_per_example_sq_norms(layer, params, cache, dy, 0.5)
        np.testing.assert_allclose(sq, ref, rtol=1e-10)


def _net(kind, h=4, classes=3):
    return pn.Sequential([LAYERS[kind](h), pn.Flatten(), pn.Dense(classes), pn.Softmax()])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_in_a_network_per_example_grads_and_norms_equal_vmap_of_grad(kind):
    net = _net(kind)
    params, state = pn.init(net, jax.random.key(0), (4, 3))
    x = jax.random.normal(jax.random.key(1), (5, 4, 3), jnp.float64)
    y = jnp.arange(5) % 3
    pn.testing.check_per_example(net, x, y, loss="cross_entropy", params=params, state=state, l2=0.1)
    pn.check_grads(net, x, y, loss="cross_entropy", params=params, state=state, l2=0.1)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_in_a_network_with_dense_trains_under_jit_and_dp(kind):
    net = pn.Sequential([LAYERS[kind](4), pn.Dense(2)])  # a per-step head: (batch, T, 2)
    params, state = pn.init(net, jax.random.key(0), (6, 3))
    x = jax.random.normal(jax.random.key(1), (4, 6, 3), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (4, 6, 2), jnp.float64)

    @jax.jit
    def step(p):
        return pn.value_and_grad(net, p, state, x, y, loss="mse")[:2]

    value, grads = step(params)
    ref_value, ref = jax.value_and_grad(lambda p: pn.loss(net, p, state, x, y, loss="mse")[0])(params)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    assert max(compare_trees(grads, ref).values()) <= 1e-10

    norms = jax.jit(lambda p: pn.per_example_grad_norms(net, p, state, x, y, loss="mse"))(params)
    per = jax.vmap(lambda xi, yi: jax.grad(lambda p: pn.loss(net, p, state, xi[None], yi[None], loss="mse")[0])(
        params))(x, y)
    explicit = jnp.sqrt(sum(jnp.sum(g.reshape(4, -1) ** 2, 1) for g in jax.tree_util.tree_leaves(per)))
    np.testing.assert_allclose(norms, explicit, rtol=1e-10)

    clip = float(jnp.median(explicit))
    _, clipped, _ = jax.jit(lambda p: pn.clipped_value_and_grad(net, p, state, x, y, loss="mse", clip_norm=clip))(
        params)
    scale = jnp.minimum(1.0, clip / explicit)
    expected = jax.tree_util.tree_map(lambda g: jnp.mean(g * scale.reshape((-1,) + (1,) * (g.ndim - 1)), 0), per)
    assert max(compare_trees(clipped, expected).values()) <= 1e-10
    fit = pn.fit(net, pn.optim.adam(1e-2), (x, y), loss="mse", key=jax.random.key(0), epochs=3, batch_size=4)
    assert fit.history["loss"][-1] < fit.history["loss"][0]


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_bad_inputs_name_the_layer_and_the_shape(kind):
    layer = LAYERS[kind](4)
    name = type(layer).__name__
    params, state, _ = layer.init(jax.random.key(0), (5, 3), jnp.float64)
    with pytest.raises(ValueError, match=rf"{name}\(features=4.*\(batch, T, 3\).*\(2, 3\)"):
        layer.forward(params, state, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=rf"{name}.*\(2, 5, 7\)"):
        layer.forward(params, state, jnp.ones((2, 5, 7)))
    with pytest.raises(ValueError, match=rf"{name}.*\(T, d\).*\(3,\)"):
        layer.init(jax.random.key(0), 3)
    with pytest.raises(ValueError, match=f"{name} features must be a positive integer"):
        LAYERS[kind](0)
    with pytest.raises(ValueError, match="unknown initializer"):
        LAYERS[kind](4, init="nope")
