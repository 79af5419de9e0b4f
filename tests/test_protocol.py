"""The layer protocol: a layer written outside purenet with only init, forward and backward
works with every feature, nested in every container, checked against autodiff in float64.
And every fast path equals the generic default (the layer's own backward, vmapped)."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import purenet as pn
from purenet.layers import base

jax.config.update("jax_enable_x64", True)


# ---------------------------------------------------------------- two layers a user writes


@dataclasses.dataclass(frozen=True)
class Affine:
    """y = x K + s, with parameters not named W (K: rank 2, no declared role -> a weight)."""

    features: int

    def init(self, key, in_shape, dtype=None):
        d = in_shape[-1] if isinstance(in_shape, tuple) else in_shape
        K = jax.random.normal(key, (d, self.features), dtype or jnp.float64) / np.sqrt(d)
        shape = (in_shape[:-1] if isinstance(in_shape, tuple) else ()) + (self.features,)
        return {"kernel": K, "shift": 0.1 * jnp.ones((self.features,), K.dtype)}, {}, shape

    def forward(self, params, state, x, train=False, key=None):
        return x @ params["kernel"] + params["shift"], state, x

    def backward(self, params, x, dy):
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        return {"kernel": x2.T @ dy2, "shift": dy2.sum(0)}, dy @ params["kernel"].T


@dataclasses.dataclass(frozen=True)
class TimeMix:
    """On sequences (batch, T, d): y_t = tanh(x_t A + x_{t-1} B), x_{-1} = 0."""

    def init(self, key, in_shape, dtype=None):
        d = in_shape[-1]
        ka, kb = jax.random.split(key)
        draw = lambda k: jax.random.normal(k, (d, d), dtype or jnp.float64) / np.sqrt(2 * d)  # noqa: E731
        return {"A": draw(ka), "B": draw(kb)}, {}, in_shape

    def forward(self, params, state, x, train=False, key=None):
        prev = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]
        y = jnp.tanh(x @ params["A"] + prev @ params["B"])
        return y, state, (x, prev, y)

    def backward(self, params, cache, dy):
        x, prev, y = cache
        da = dy * (1 - y * y)
        grads = {"A": jnp.einsum("btd,bte->de", x, da), "B": jnp.einsum("btd,bte->de", prev, da)}
        dprev = da @ params["B"].T
        dx = da @ params["A"].T + jnp.pad(dprev, ((0, 0), (0, 1), (0, 0)))[:, 1:]
        return grads, dx


def _row_nets():
    return {
        "sequential": pn.Sequential([Affine(5), pn.Tanh(), Affine(3), pn.Softmax()]),
        "residual": pn.Sequential([Affine(4), pn.Residual(pn.Sequential([Affine(4), pn.Tanh()])), Affine(3),
                                   pn.Softmax()]),
        "parallel": pn.Sequential([pn.Parallel([Affine(2), pn.Sequential([pn.Dense(3), Affine(2)])]), pn.Tanh(),
                                   Affine(3), pn.Softmax()]),
        "remat": pn.Sequential([pn.Remat(pn.Sequential([Affine(5), pn.Tanh()])), Affine(3), pn.Softmax()]),
        "frozen": pn.Sequential([pn.Frozen(Affine(5)), pn.Tanh(), Affine(3), pn.Softmax()]),
    }


def _sequence_net():
    return pn.Sequential([pn.Dense(4), TimeMix(), pn.Residual(pn.Sequential([pn.LayerNorm(), TimeMix()])),
                          Affine(3), pn.Softmax()])


ROW_NETS = _row_nets()
L2 = 0.05


def _case(name):
    if name == "sequence":
        net, x = _sequence_net(), jax.random.normal(jax.random.key(1), (5, 4, 3), jnp.float64)
        y = jax.random.randint(jax.random.key(2), (5, 4), 0, 3)
        params, state = pn.init(net, jax.random.key(0), in_shape=(4, 3))
    else:
        net, x = ROW_NETS[name], jax.random.normal(jax.random.key(1), (5, 4), jnp.float64)
        y = jnp.array([0, 1, 2, 1, 0])
        params, state = pn.init(net, jax.random.key(0), in_shape=4)
    return net, params, state, x, y


NAMES = [*ROW_NETS, "sequence"]


def _frozen_mask(net, params):
    """True where a parameter trains (autodiff of pn.loss still differentiates frozen ones)."""
    return base.map_leaves(net, lambda layer, p, frozen: jax.tree_util.tree_map(lambda _: not frozen, p), params)


def _masked(tree, mask):
    return jax.tree_util.tree_map(lambda g, m: g if m else jnp.zeros_like(g), tree, mask)


def _reference_per_example(net, params, state, x, y):
    mask = _frozen_mask(net, params)

    def one(xi, yi):
        g = jax.grad(lambda p: pn.loss(net, p, state, xi[None], yi[None], l2=L2)[0])(params)
        return _masked(g, mask)

    return jax.vmap(one)(x, y)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_every_feature_equals_autodiff(name):
    net, params, state, x, y = _case(name)
    mask = _frozen_mask(net, params)
    # value_and_grad, with l2 on the foreign weight matrices (rank >= 2, no declared role)
    value, grads, _ = pn.value_and_grad(net, params, state, x, y, l2=L2)
    ref = _masked(jax.grad(lambda p: pn.loss(net, p, state, x, y, l2=L2)[0])(params), mask)
    chex.assert_trees_all_close(grads, ref, rtol=1e-10, atol=1e-12)
    # per-example gradients, norms, clipping
    per = _reference_per_example(net, params, state, x, y)
    _, mine = pn.per_example_grads(net, params, state, x, y, l2=L2)
    chex.assert_trees_all_close(mine, per, rtol=1e-10, atol=1e-12)
    sq = sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in jax.tree_util.tree_leaves(per))
    np.testing.assert_allclose(pn.per_example_grad_norms(net, params, state, x, y, l2=L2), jnp.sqrt(sq), rtol=1e-10)
    data = _reference_per_example(net, params, state, x, y) if L2 == 0 else jax.vmap(
        lambda xi, yi: _masked(jax.grad(lambda p: pn.loss(net, p, state, xi[None], yi[None])[0])(params), mask))(x, y)
    norms = jnp.sqrt(sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in jax.tree_util.tree_leaves(data)))
    clip = 0.5 * float(jnp.median(norms))
    factor = jnp.minimum(1.0, clip / norms)
    clipped = jax.tree_util.tree_map(lambda g: jnp.mean(g * factor.reshape((-1,) + (1,) * (g.ndim - 1)), 0), data)
    _, got, _ = pn.clipped_value_and_grad(net, params, state, x, y, clip_norm=clip)
    chex.assert_trees_all_close(got, clipped, rtol=1e-10, atol=1e-12)
    # statistics
    fisher = jax.tree_util.tree_map(lambda g: jnp.mean(g * g, 0), data)
    chex.assert_trees_all_close(pn.stats.fisher_diagonal(net, params, state, x, y), fisher, rtol=1e-10, atol=1e-14)
    flat = jnp.concatenate([g.reshape(g.shape[0], -1) for g in jax.tree_util.tree_leaves(data)], axis=1)
    np.testing.assert_allclose(pn.stats.gradient_gram(net, params, state, (x, y), (x[:3], y[:3])),
                               flat @ flat[:3].T, rtol=1e-10, atol=1e-14)
    mean = flat.mean(0)
    b_simple = jnp.sum(jnp.var(flat, axis=0, ddof=1)) / jnp.sum(mean * mean)
    np.testing.assert_allclose(pn.stats.gradient_noise_scale(net, params, state, x, y), b_simple, rtol=1e-9)
    # as_function: jax.grad through the bridge runs the handwritten backward
    apply = pn.as_function(net)
    via_bridge = jax.grad(lambda p: -jnp.mean(jnp.log(jnp.take_along_axis(
        apply(p, state, x)[0].reshape(-1, 3), y.reshape(-1, 1), axis=1))))(params)
    chex.assert_trees_all_close(via_bridge, _masked(jax.grad(lambda p: pn.loss(net, p, state, x, y)[0])(params), mask),
                                rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["sequential", pytest.param("sequence", marks=pytest.mark.slow)])
def test_hvp_diagnostics_and_checkpoint(name, tmp_path):
    net, params, state, x, y = _case(name)
    v = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.3), params)
    ref = jax.jvp(jax.grad(lambda p: pn.loss(net, p, state, x, y, l2=L2)[0]), (params,), (v,))[1]
    chex.assert_trees_all_close(pn.hvp(net, params, state, x, y, v, l2=L2), ref, rtol=1e-9, atol=1e-12)
    flow = pn.diagnostics.gradient_flow(net, params, state, x, y)
    with_params = [leaf for leaf in base.leaves(net, params) if base.has_params(leaf.params)]
    assert flow["grad_norm"].shape == flow["weight_norm"].shape == (len(with_params),)
    assert len(pn.diagnostics.layer_names(net, params)) == len(with_params)
    assert np.all(np.asarray(flow["grad_norm"]) > 0)
    pn.save(tmp_path / "p.pn", {"params": params, "state": state})
    back = pn.load(tmp_path / "p.pn", like={"params": params, "state": state})
    chex.assert_trees_all_equal(back["params"], params)


def test_frozen_is_frozen_for_every_path():
    net, params, state, x, y = _case("frozen")
    _, grads, _ = pn.value_and_grad(net, params, state, x, y, l2=L2)
    chex.assert_trees_all_equal(grads[0], jax.tree_util.tree_map(jnp.zeros_like, params[0]))
    values, per = pn.per_example_grads(net, params, state, x, y, l2=L2)
    chex.assert_trees_all_equal(per[0], jax.tree_util.tree_map(lambda p: jnp.zeros((5, *p.shape)), params[0]))
    norms = pn.per_example_grad_norms(net, params, state, x, y, l2=L2)
    from_grads = jnp.sqrt(sum(jnp.sum(g.reshape(5, -1) ** 2, 1) for g in jax.tree_util.tree_leaves(per)))
    np.testing.assert_allclose(norms, from_grads, rtol=1e-10)
    assert not jax.tree_util.tree_leaves(pn.decay_mask(net, params)[0])[0]
    fit = pn.fit(net, pn.optim.sgd(0.1), (x, y), key=jax.random.key(0), epochs=2, batch_size=5, l2=0.5,
                 params=params, state=state)
    chex.assert_trees_all_equal(fit.params[0], params[0])


def test_roles_and_l2_of_every_weight_matrix_in_a_gpt():
    net = pn.gpt(vocab_size=11, context=6, layers=2, heads=2, features=8, tie_embeddings=False)
    params, state = pn.init(net, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (3, 6), 0, 11)
    labels = jnp.roll(ids, -1, axis=1)
    l2 = 0.3
    _, with_l2, _ = pn.value_and_grad(net, params, state, ids, labels, l2=l2)
    _, without, _ = pn.value_and_grad(net, params, state, ids, labels)
    roles = pn.roles(net, params)
    diff = jax.tree_util.tree_map(lambda a, b: a - b, with_l2, without)
    seen = set()
    for (path, d), r, p in zip(jax.tree_util.tree_leaves_with_path(diff), jax.tree_util.tree_leaves(roles),
                               jax.tree_util.tree_leaves(params)):
        seen.add(r)
        expected = l2 * p if r == "weight" else jnp.zeros_like(p)
        np.testing.assert_allclose(d, expected, atol=1e-12, err_msg=jax.tree_util.keystr(path))
    assert seen == {"weight", "bias", "gain", "embedding"}
    attention = params[0]["body"][2][0][1]  # block 0, its attention Residual's Sequential, the attention layer
    assert set(attention) >= {"Wq", "Wk", "Wv", "Wo"}
    assert all(r == "weight" for r in (roles[0]["body"][2][0][1][k] for k in ("Wq", "Wk", "Wv", "Wo")))
    np.testing.assert_allclose(diff[0]["body"][2][0][1]["Wq"], l2 * attention["Wq"], atol=1e-12)


def test_kfac_preconditions_every_dense_layer_of_a_gpt_and_inside_wrappers():
    net = pn.gpt(vocab_size=11, context=6, layers=2, heads=2, features=8)
    params, state = pn.init(net, jax.random.key(0))
    factors = pn.stats.kfac_zeros(net, params)
    found = [f for f in jax.tree_util.tree_leaves(factors, is_leaf=lambda t: isinstance(t, pn.stats.KFACFactors))
             if isinstance(f, pn.stats.KFACFactors)]
    assert len(found) == 2 * (2 + 4)  # two Dense layers in each block's MLP, four projections in its attention
    ids = jax.random.randint(jax.random.key(1), (3, 6), 0, 11)
    opt = pn.optim.kfac(net, 0.01)
    fit = pn.fit(net, opt, (ids, jnp.roll(ids, -1, 1)), key=jax.random.key(0), epochs=2, batch_size=3)
    assert np.all(np.isfinite(fit.history["loss"]))
    for wrapper, expected in ((pn.Remat, 1), (pn.Frozen, 0)):
        wrapped = pn.Sequential([wrapper(pn.Dense(4)), pn.Tanh(), pn.Dense(3), pn.Softmax()])
        p, _ = pn.init(wrapped, jax.random.key(0), in_dim=2)
        tree = pn.stats.kfac_zeros(wrapped, p)
        assert (tree[0] is not None) == bool(expected)


def test_kfac_composes_with_wrappers_and_finds_ema_by_name():
    net = pn.mlp([4, 6, 3])
    params, state = pn.init(net, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (8, 4))
    y = jnp.arange(8) % 3
    trainable = jax.tree_util.tree_map(lambda _: True, params)
    for opt in (pn.optim.ema(pn.optim.kfac(net, 0.05)), pn.optim.masked(pn.optim.kfac(net, 0.05), trainable),
                pn.optim.apply_if_finite(pn.optim.kfac(net, 0.05))):
        fit = pn.fit(net, opt, (x, y), key=jax.random.key(0), epochs=2, batch_size=8)
        assert np.all(np.isfinite(fit.history["loss"]))
    for opt in (pn.optim.masked(pn.optim.ema(pn.optim.sgd(0.1)), trainable),
                pn.optim.chain(pn.optim.ema(pn.optim.sgd(0.1)), pn.optim.scale_by_momentum(0.9))):
        state_ = opt.init(params)
        chex.assert_trees_all_equal(pn.optim.ema_params(state_), params)
        fit = pn.fit(net, opt, (x, y), key=jax.random.key(0), epochs=2, batch_size=8, evaluate_with_ema=True,
                     validation=(x, y))
        chex.assert_trees_all_equal(fit.params, pn.optim.ema_params(fit.opt_state))
    with pytest.raises(ValueError, match="pn.optim.ema"):
        pn.fit(net, pn.optim.momentum(0.1), (x, y), key=jax.random.key(0), epochs=1, evaluate_with_ema=True)
    with pytest.raises(ValueError, match="pn.optim.ema"):
        pn.optim.ema_params(pn.optim.adam(0.1).init(params))


@pytest.mark.parametrize("wrapper", [pn.Frozen, pn.Remat, lambda e: pn.Parallel([e])])
def test_a_wrapped_embedding_is_a_first_layer(wrapper):
    net = pn.Sequential([wrapper(pn.Embedding(7, 4)), pn.Flatten(), pn.Dense(3), pn.Softmax()])
    params, state = pn.init(net, jax.random.key(0), in_shape=(5,))
    ids = jax.random.randint(jax.random.key(1), (4, 5), 0, 7)
    value, grads, _ = pn.value_and_grad(net, params, state, ids, jnp.arange(4) % 3)
    assert np.isfinite(value)
    fit = pn.fit(net, pn.optim.sgd(0.1), (ids, jnp.arange(4) % 3), key=jax.random.key(0), epochs=1, batch_size=4)
    assert np.isfinite(fit.history["loss"][0])


# ---------------------------------------------------------------- every fast path equals the generic default


def _fast_layers():
    """The layers that define a feature's method themselves (the declared structures' rules are proven in
    tests/test_structure.py, for every family that declares one)."""
    return [(pn.PositionalEmbedding(4), (3, 2)), (pn.BatchNorm(), (3,)), (pn.BatchNorm(), (2, 2, 3))]


FAST = _fast_layers()


@settings(max_examples=4, deadline=None)
@given(index=st.integers(0, len(FAST) - 1), seed=st.integers(0, 2**16), l2=st.sampled_from([0.0, 0.3]))
def test_fast_paths_equal_the_generic_default(index, seed, l2):
    layer, shape = FAST[index]
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params, state, out = layer.init(k1, shape, jnp.float64)
    x = jax.random.normal(k2, (3, *shape), jnp.float64)
    _, _, cache = layer.forward(params, state, x, train=False)
    dy = jax.random.normal(k3, (3, *out), jnp.float64)
    fast = base.per_example_backward(layer, params, cache, dy)
    slow = base.generic_per_example_backward(layer, params, cache, dy)
    chex.assert_trees_all_close(fast, slow, rtol=1e-10, atol=1e-12)
    sq, dx = base.per_example_sq_norms(layer, params, cache, dy, l2)
    sq_ref, dx_ref = base.generic_per_example_sq_norms(type("Bare", (), {  # the three methods, no fast path
        "init": layer.init, "forward": layer.forward, "backward": layer.backward,
        "roles": getattr(layer, "roles", {})})(), params, cache, dy, l2)
    np.testing.assert_allclose(sq, sq_ref, rtol=1e-10, atol=1e-12)
    chex.assert_trees_all_close(dx, dx_ref, rtol=1e-10, atol=1e-12)
    grads = slow[0]
    chex.assert_trees_all_close(base.per_example_sq(layer, params, cache, dy)[0],
                                jax.tree_util.tree_map(lambda g: jnp.sum(g * g, 0), grads), rtol=1e-10, atol=1e-12)
    flat = jnp.concatenate([g.reshape(3, -1) for g in jax.tree_util.tree_leaves(grads)], axis=1)
    np.testing.assert_allclose(base.per_example_gram(layer, params, cache, dy, cache, dy)[0], flat @ flat.T,
                               rtol=1e-10, atol=1e-12)


def test_a_cache_leaf_shared_by_all_examples_is_not_sliced():
    """A leaf whose leading axis is not the batch (here a (2,) vector) reaches every example's backward whole."""

    @dataclasses.dataclass(frozen=True)
    class Shifted:
        def init(self, key, in_shape, dtype=None):
            return {"w": jnp.ones(in_shape, dtype or jnp.float64)}, {}, in_shape

        def forward(self, params, state, x, train=False, key=None):
            c = jnp.array([2.0, 3.0])
            return x * params["w"] * c[0] + c[1], state, (x, c)

        def backward(self, params, cache, dy):
            x, c = cache
            return {"w": jnp.sum(dy * x * c[0], axis=0)}, dy * params["w"] * c[0]

    layer = Shifted()
    params, state, _ = layer.init(None, (5,))
    x = jax.random.normal(jax.random.key(0), (3, 5), jnp.float64)
    _, _, cache = layer.forward(params, state, x)
    dy = jax.random.normal(jax.random.key(1), (3, 5), jnp.float64)
    grads, dx = base.per_example_backward(layer, params, cache, dy)
    np.testing.assert_allclose(grads["w"], dy * x * 2.0, rtol=1e-12)
    np.testing.assert_allclose(dx, dy * 2.0, rtol=1e-12)


# ---------------------------------------------------------------- the protocol's inventory


def test_every_name_the_library_reads_from_a_layer_is_in_the_inventory():
    """The features probe layers by name: each such name must be listed (and so documented) once."""
    import pathlib
    import re

    from purenet.layers.protocol import PROTOCOL

    root = pathlib.Path(pn.__file__).parent
    probed = set()
    for path in root.rglob("*.py"):
        text = path.read_text()
        probed |= set(re.findall(r"(?:hasattr|getattr)\((?:layer|net|leaf\.layer|model)\b[^,]*, \"([a-z_]+)\"", text))
    assert probed, "the probe pattern found nothing: update this test with the code"
    probed -= {"__dict__", "bias"}  # the inventory's own scan; the nanoGPT converter reading NanoGPT's config
    assert probed <= set(PROTOCOL), f"read from layers but not in the inventory: {sorted(probed - set(PROTOCOL))}"


@dataclasses.dataclass(frozen=True)
class CouplesExamples(pn.Layer):
    """x - mean over the batch: couples the examples, and declares it with a misspelt name."""

    mixes_example = True  # the misspelling DP-SGD would otherwise ignore

    def init(self, key, in_shape, dtype=None):
        return {}, {}, pn.layers.base.as_shape(in_shape)

    def forward(self, params, state, x, train=False, key=None):
        return x - jnp.mean(x, axis=0), state, None

    def backward(self, params, cache, dy):
        return {}, dy - jnp.mean(dy, axis=0)


@dataclasses.dataclass(frozen=True)
class OwnHelpers(pn.Layer):
    """A layer with helpers of its own whose names are nothing like the protocol's."""

    scale: float = 2.0

    def init(self, key, in_shape, dtype=None):
        return {}, {}, pn.layers.base.as_shape(in_shape)

    def forward(self, params, state, x, train=False, key=None):
        return self.rescaled(x), state, None

    def rescaled(self, x):
        return x * self.scale

    def _private_sq_norm(self):  # private names are never checked
        return 0

    def backward(self, params, cache, dy):
        return {}, self.rescaled(dy)


def test_a_misspelt_protocol_name_is_an_error_with_the_suggestion_at_init():
    for net in (CouplesExamples(), pn.Sequential([pn.Dense(3), pn.Residual(pn.Sequential([CouplesExamples()]))])):
        with pytest.raises(AttributeError, match=r"CouplesExamples defines 'mixes_example'.*did you mean "
                                                 r"'mixes_examples'\?"):
            pn.init(net, jax.random.key(0), in_shape=3)
    misspelt_fast_path = type("Misspelt", (OwnHelpers,), {"per_example_sq_norm": lambda self, *a: None})
    with pytest.raises(AttributeError, match="did you mean 'per_example_sq_norms'"):
        pn.init(dataclasses.dataclass(frozen=True)(misspelt_fast_path)(), jax.random.key(0), in_shape=3)
    params, state = pn.init(pn.Sequential([OwnHelpers(), pn.Dense(2)]), jax.random.key(0), in_shape=3)
    assert params[1]["W"].shape == (3, 2)


@pytest.mark.parametrize("layer", [
    pn.Dense(3), pn.Softmax(), pn.Sigmoid(), pn.ReLU(), pn.LayerNorm(), pn.Conv2D(2, 3), pn.Conv1D(2, 3),
    pn.ConvTranspose2D(2, 3), pn.MultiHeadAttention(2, init="he_normal", rope=True, block_size=4),
    pn.SwiGLU(8, init="he_normal"), pn.LSTM(3), pn.GRU(3), pn.Embedding(5, 3), pn.Dropout(0.1), pn.BatchNorm(),
    pn.GroupNorm(2), pn.MaxPool2D(2),
], ids=lambda layer: type(layer).__name__)
def test_layers_survive_dataclasses_replace_and_keep_their_docstrings(layer):
    """A layer config is a dataclass: replace() rebuilds it equal (a field named unlike its argument broke
    MultiHeadAttention and SwiGLU); its docstring is its own, not dataclass's generated signature."""
    assert dataclasses.replace(layer) == layer and hash(dataclasses.replace(layer)) == hash(layer)
    doc = type(layer).__doc__ or ""
    assert len(doc) > 40 and not doc.startswith(type(layer).__name__ + "("), doc
    if hasattr(layer, "initializer"):
        assert dataclasses.replace(layer, initializer="lecun_normal").initializer == "lecun_normal"


def test_gradients_are_ours_autodiff_only_in_the_checker_and_interop():
    """Library code never calls jax.grad, jax.vjp, jax.jvp, jax.linearize or jax.custom_vjp: autodiff is the
    reference, used by purenet.testing (the gradient checker) and purenet.analysis.interop (which says so)."""
    import ast
    import pathlib

    root = pathlib.Path(pn.__file__).parent
    allowed = {root / "analysis" / "interop.py"}
    autodiff = {"grad", "vjp", "jvp", "linearize", "custom_vjp", "value_and_grad"}

    def calls(tree):
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr in autodiff and isinstance(node.value, ast.Name)
                    and node.value.id == "jax"):
                yield node.lineno
            if isinstance(node, ast.ImportFrom) and node.module == "jax" and autodiff & {a.name for a in node.names}:
                yield node.lineno

    found = [f"{path.relative_to(root)}:{line}" for path in root.rglob("*.py")
             if path not in allowed and root / "testing" not in path.parents
             for line in calls(ast.parse(path.read_text()))]
    assert not found, found
    assert list(calls(ast.parse((root / "analysis" / "interop.py").read_text())))  # the check sees real calls
    assert "jax.jvp" in (root / "analysis" / "interop.py").read_text().split('"""')[1]  # and interop says so at its top
