"""Layers declare their structure (the products their parameters enter); each feature holds one rule per
product kind. Every rule equals the generic default (the layer's own backward, vmapped) and autodiff in
float64, for every layer family that declares products; K-FAC's factors equal their documented
definition computed by autodiff; a structure that misses a parameter is an error at pn.init."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import purenet as pn
from purenet.analysis import stats
from purenet.analysis.kfac import kfac_eligible, layer_kfac_factors, uncovered_weights
from purenet.analysis.per_example import per_example_backward, per_example_sq_norms
from purenet.layers import base, structure
from purenet.models.gpt import TiedEnds
from purenet.privacy.clipping import sq_norms_and_weighted_sum

jax.config.update("jax_enable_x64", True)

# (layer, one example's shape, integer ids?): every family that declares products, and their variants
LAYERS = [
    (pn.Dense(3), (4,), False), (pn.Dense(3, use_bias=False), (2, 4), False),
    (pn.MultiHeadAttention(2, causal=True), (3, 4), False),
    (pn.MultiHeadAttention(4, num_kv_heads=2, rope=True, use_bias=False), (3, 8), False),
    (pn.SwiGLU(5), (3, 4), False), (pn.LSTM(3), (4, 2), False), (pn.GRU(3), (4, 2), False),
    (pn.LayerNorm(), (3,), False), (pn.RMSNorm(), (2, 3), False), (pn.GroupNorm(2), (2, 2, 4), False),
    (pn.Embedding(6, 3), (4,), True),
    (pn.Conv2D(2, 3, implementation="xla"), (5, 5, 2), False),
    (pn.Conv2D(2, 2, strides=2, implementation="im2col"), (4, 4, 1), False),
    (pn.Conv2D(16, 3, padding="VALID", implementation="xla"), (4, 4, 8), False),  # the ghost norm
    (pn.Conv1D(5, 3, 2, implementation="im2col"), (7, 2), False), (pn.Conv1D(40, 2, implementation="xla"), (4, 3), False),
    (pn.ConvTranspose2D(3, 3, strides=2), (3, 3, 2), False),
    (pn.ConvTranspose2D(2, (2, 3), strides=(1, 2), padding="VALID", use_bias=False), (3, 4, 2), False),
]


def _bare(layer):
    """The three methods and the roles: what the generic default sees."""
    roles = {"param_roles": layer.param_roles} if hasattr(layer, "param_roles") else {"roles": getattr(layer, "roles", {})}
    return type("Bare", (), {"init": layer.init, "forward": layer.forward, "backward": layer.backward, **roles})()


def _batch(layer, shape, ids, n, seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    if ids:
        return jax.random.randint(k1, (n, *shape), 0, layer.num_embeddings)
    return jax.random.normal(k1, (n, *shape), jnp.float64)


def _setup(index, n=3, seed=0):
    layer, shape, ids = LAYERS[index]
    params, state, out = layer.init(jax.random.key(seed), shape, jnp.float64)
    x = _batch(layer, shape, ids, n, seed + 1)
    _, _, cache = layer.forward(params, state, x)
    dy = jax.random.normal(jax.random.key(seed + 2), (n, *out), jnp.float64)
    return layer, params, state, x, cache, dy


def _close(a, b):
    """Leaf by leaf to 1e-10 relative; atol for attention's bk, whose gradient is exactly zero by the
    backward and rounding noise by autodiff and the rules."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(u, v, rtol=1e-10, atol=1e-12, err_msg=jax.tree_util.keystr(path))


def _rows(grads, n):
    return jnp.concatenate([g.reshape(n, -1) for g in jax.tree_util.tree_leaves(grads)], axis=1)


@functools.partial(jax.jit, static_argnums=0)
def _every_feature(index, params, state, x, dy, x_b, dy_b):
    """Every feature by the layer's rules, and the references: the generic default and autodiff (one
    program per layer: compiled once, far faster than op by op)."""
    layer = LAYERS[index][0]
    cache, cache_b = layer.forward(params, state, x)[2], layer.forward(params, state, x_b)[2]

    def one(x_i, dy_i):  # autodiff: example i's gradient of <y_i, dy_i>
        return jax.grad(lambda p: jnp.sum(layer.forward(p, state, x_i[None])[0] * dy_i[None]))(params)
    return {"autodiff": jax.vmap(one)(x, dy), **_features(layer, params, cache, dy, cache_b, dy_b)}


def _features(layer, params, cache, dy, cache_b, dy_b):
    """Every feature by the layer's rules, and the generic default they must equal."""
    w = jnp.linspace(0.5, 2.0, jax.tree_util.tree_leaves(dy)[0].shape[0])
    out = {}
    out["generic"], out["dx_ref"] = base.generic_per_example_backward(layer, params, cache, dy)
    out["generic_b"], _ = base.generic_per_example_backward(layer, params, cache_b, dy_b)
    out["grads"], out["dx"] = per_example_backward(layer, params, cache, dy)
    for l2 in (0.0, 0.3):
        out[f"sq {l2}"] = per_example_sq_norms(layer, params, cache, dy, l2)[0]
        out[f"sq_ref {l2}"] = base.generic_per_example_sq_norms(_bare(layer), params, cache, dy, l2)[0]
    out["clip_sq"], _, weighted_sum = sq_norms_and_weighted_sum(layer, params, cache, dy)  # one-pass clipping
    out["weighted"] = weighted_sum(w)
    out["weighted_ref"] = jax.tree_util.tree_map(lambda g: jnp.tensordot(w, g, axes=1), out["generic"])
    out["squares"] = stats.per_example_sq(layer, params, cache, dy)[0]
    columns = jax.tree_util.tree_map(lambda d: jnp.stack([d, 2 * d]), dy)  # two columns: squares sum to 5 x one's
    summed = jax.vmap(lambda d: stats.per_example_sq_columns(layer, params, cache, d, "c")[0], axis_name="c")(columns)
    out["columns"] = jax.tree_util.tree_map(lambda t: t[0], summed)
    out["gram"] = stats.per_example_gram(layer, params, cache, dy, cache_b, dy_b)[0]
    return out


@pytest.mark.parametrize("index", range(len(LAYERS)), ids=[type(layer).__name__ for layer, *_ in LAYERS])
def test_every_rule_equals_the_generic_default_and_autodiff(index):
    layer, params, state, x, _, dy = _setup(index)
    assert hasattr(layer, "structure"), "every family here declares its products"
    *_, x_b, _, dy_b = _setup(index, n=2, seed=5)
    r = _every_feature(index, params, state, x, dy, x_b, dy_b)
    _check_features(r, dy.shape[0])


def _check_features(r, n):
    _close(r["generic"], r["autodiff"])
    _close(r["grads"], r["generic"])
    if r["dx_ref"] is not None:
        np.testing.assert_allclose(r["dx"], r["dx_ref"], rtol=1e-10, atol=1e-12)
    for l2 in (0.0, 0.3):
        np.testing.assert_allclose(r[f"sq {l2}"], r[f"sq_ref {l2}"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(r["clip_sq"], jnp.sum(_rows(r["generic"], n) ** 2, axis=1), rtol=1e-10, atol=1e-12)
    _close(r["weighted"], r["weighted_ref"])
    squares = jax.tree_util.tree_map(lambda g: jnp.sum(g * g, axis=0), r["generic"])
    _close(r["squares"], squares)
    _close(r["columns"], jax.tree_util.tree_map(lambda s: 5 * s, squares))
    np.testing.assert_allclose(r["gram"], _rows(r["generic"], n) @ _rows(r["generic_b"], 2).T, rtol=1e-10, atol=1e-12)


@functools.partial(jax.jit, static_argnums=0)
def _tied_ends_features(tied, params, batches):
    """GPT's ends (cache (ids, h), dy (dL/dh0, dL/dlogits)): every rule, the generic default and autodiff."""
    layer = TiedEnds(tied)
    (cache, dy), (cache_b, dy_b) = batches

    def one(ids, h, dh0, dlogits):  # example i's gradient of <E[ids], dh0> + <h M, dlogits>
        def f(p):
            head = p["token"]["E"].T if tied else p["head"]["W"]
            return jnp.sum(p["token"]["E"][ids] * dh0) + jnp.sum((h @ head) * dlogits)
        return jax.grad(f)(params)
    return {"autodiff": jax.vmap(one)(*cache, *dy), **_features(layer, params, cache, dy, cache_b, dy_b)}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gpt_tied_ends_rules_equal_the_generic_default_and_autodiff(tied):
    """GPT's ends declare a TiedTable (E looked up and read out, the norm's cross term) or a Lookup
    and a dense head: every feature from the rules, none from methods of the layer."""
    vocab, d = 5, 3
    k = jax.random.split(jax.random.key(0), 4)
    params = {"token": {"E": jax.random.normal(k[0], (vocab, d), jnp.float64)}}
    if not tied:
        params["head"] = {"W": jax.random.normal(k[1], (d, vocab), jnp.float64)}
    layer = TiedEnds(tied)
    structure.check(layer, params)
    assert not any(hasattr(layer, m) for m in ("per_example_backward", "per_example_sq_norms"))

    def batch(key, n, t=4):
        ks = jax.random.split(key, 4)
        ids = jax.random.randint(ks[0], (n, t), 0, vocab).at[:, 1].set(2)  # a repeated id: the scatter adds
        h, dh0 = jax.random.normal(ks[1], (n, t, d), jnp.float64), jax.random.normal(ks[2], (n, t, d), jnp.float64)
        return (ids, h), (dh0, jax.random.normal(ks[3], (n, t, vocab), jnp.float64))
    r = _tied_ends_features(tied, params, (batch(k[2], 3), batch(k[3], 2)))
    _check_features(r, 3)
    if not tied:  # the head is a dense product: K-FAC preconditions it
        assert kfac_eligible(layer, params) and not uncovered_weights(layer, params)
        (ids, h), dy = batch(k[2], 3)
        _check_factors(layer_kfac_factors(layer, params, (ids, h), dy)[0], "head/W", h, dy[1], False, 3)


def test_every_kind_has_every_rule_or_a_stated_default():
    """A product kind absent from a rule table uses that feature's stated default (its per-example
    gradients); every kind must at least have per-example gradients and a batch gradient."""
    from purenet.analysis.per_example import GRADS

    assert set(GRADS) == set(structure.KINDS)
    for kind in structure.KINDS:  # batch_grads knows every kind
        assert kind.__name__ in structure.__doc__


# ---------------------------------------------------------------- the declaration is checked


def _declaring(keys):
    @dataclasses.dataclass(frozen=True)
    class Declares(pn.Layer):
        def init(self, key, in_shape, dtype=None):
            return {"W": jnp.ones((in_shape[-1], 2)), "b": jnp.zeros(2)}, {}, in_shape[:-1] + (2,)

        def forward(self, params, state, x, train=False, key=None):
            return x @ params["W"] + params["b"], state, x

        def backward(self, params, x, dy):
            return {"W": x.T @ dy, "b": dy.sum(0)}, dy @ params["W"].T

        def structure(self, params):
            return (structure.DenseProduct(*keys),)

        def products(self, params, x, dy):
            return ((x, dy),), dy @ params["W"].T
    return Declares()


def test_a_structure_that_misses_or_repeats_a_parameter_is_an_error_at_init():
    net = pn.Sequential([_declaring((("W",), (None,)))])
    with pytest.raises(ValueError, match=r"Declares.structure must place every parameter.*missing \['b'\]"):
        pn.init(net, jax.random.key(0), in_shape=3)
    net = pn.Sequential([_declaring((("W", "W"), ("b", None)))])
    with pytest.raises(ValueError, match=r"in two \['W'\]"):
        pn.init(net, jax.random.key(0), in_shape=3)
    good = pn.Sequential([_declaring((("W",), ("b",))), pn.Softmax()])
    params, state = pn.init(good, jax.random.key(0), in_shape=3)
    x, y = jax.random.normal(jax.random.key(1), (4, 3)), jnp.arange(4) % 2
    values, grads = pn.per_example_grads(good, params, state, x, y)  # the user's layer gets the rules
    ref = jax.vmap(lambda xi, yi: jax.grad(lambda p: -jnp.log(pn.forward(good, p, state, xi[None])[0][0, yi]))(params))(x, y)
    _close(grads, ref)


# ---------------------------------------------------------------- K-FAC by construction


def _kfac_definition(a, g, bias, n):
    """A = 1/(N T) sum a a^T (a = [h, 1] with a bias), G = 1/N sum_{i,t} g g^T: the documented definition."""
    a2 = a.reshape(-1, a.shape[-1])
    if bias:
        a2 = jnp.concatenate([a2, jnp.ones((a2.shape[0], 1))], axis=1)
    g2 = g.reshape(-1, g.shape[-1])
    return a2.T @ a2 / a2.shape[0], g2.T @ g2 / n


def _check_factors(factors, key, a, g, bias, n):
    A, G = _kfac_definition(a, g, bias, n)
    f = factors.factors[key] if isinstance(factors, pn.stats.KFACBlocks) else factors
    np.testing.assert_allclose(f.A, A, rtol=1e-10, atol=1e-14, err_msg=key)
    np.testing.assert_allclose(f.G, G, rtol=1e-10, atol=1e-14, err_msg=key)


def test_swiglu_kfac_factors_are_their_definition_by_autodiff():
    layer = pn.SwiGLU(5)
    params, _, _ = layer.init(jax.random.key(0), (3, 4), jnp.float64)
    x, dy = jax.random.normal(jax.random.key(1), (2, 3, 4)), jax.random.normal(jax.random.key(2), (2, 3, 4))
    _, _, cache = layer.forward(params, {}, x)

    def out(e1, e3, e2):  # each product's output, perturbed
        a, b = x @ params["W1"] + e1, x @ params["W3"] + e3
        return (jax.nn.silu(a) * b) @ params["W2"] + e2

    z = jnp.zeros((2, 3, 5))
    d1, d3, _ = jax.grad(lambda *e: jnp.sum(out(*e) * dy), argnums=(0, 1, 2))(z, z, jnp.zeros((2, 3, 4)))
    u = jax.nn.silu(x @ params["W1"]) * (x @ params["W3"])
    factors, _ = layer_kfac_factors(layer, params, cache, dy)
    assert sorted(factors.factors) == ["W1", "W2", "W3"]
    _check_factors(factors, "W1", x, d1, False, 2)
    _check_factors(factors, "W3", x, d3, False, 2)
    _check_factors(factors, "W2", u, dy, False, 2)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_recurrent_kfac_factors_are_their_definition_over_the_time_steps(cell):
    """KFAC-expand over the T steps: A of the step inputs x_t (with the bias's 1) and h_{t-1}, G of
    dL/dz_t, each from autodiff of the recurrence with a perturbation added to every step's product."""
    layer = getattr(pn, cell)(3)
    n, t, d, h = 2, 4, 2, 3
    params, _, _ = layer.init(jax.random.key(0), (t, d), jnp.float64)
    x, dy = jax.random.normal(jax.random.key(1), (n, t, d)), jax.random.normal(jax.random.key(2), (n, t, h))
    y, _, cache = layer.forward(params, {}, x)

    def run(ex, eh):  # PyTorch's equations, ex / eh added to the step's x- and h-products
        hs, c, state = [], jnp.zeros((n, h)), jnp.zeros((n, h))
        for s in range(t):
            if cell == "LSTM":
                zt = x[:, s] @ params["Wx"] + ex[:, s] + state @ params["Wh"] + eh[:, s] + params["b"]
                i, f, g, o = (zt[:, k * h:(k + 1) * h] for k in range(4))
                c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
                state = jax.nn.sigmoid(o) * jnp.tanh(c)
            else:
                gx = x[:, s] @ params["Wx"] + params["bx"] + ex[:, s]
                gh = state @ params["Wh"] + params["bh"] + eh[:, s]
                r, zg = jax.nn.sigmoid(gx[:, :h] + gh[:, :h]), jax.nn.sigmoid(gx[:, h:2 * h] + gh[:, h:2 * h])
                nn_ = jnp.tanh(gx[:, 2 * h:] + r * gh[:, 2 * h:])
                state = (1 - zg) * nn_ + zg * state
            hs.append(state)
        return jnp.stack(hs, axis=1)

    k = params["Wx"].shape[1]
    zeros = jnp.zeros((n, t, k))
    np.testing.assert_allclose(run(zeros, zeros), y, rtol=1e-10)
    dzx, dzh = jax.grad(lambda ex, eh: jnp.sum(run(ex, eh) * dy), argnums=(0, 1))(zeros, zeros)
    h_prev = jnp.concatenate([jnp.zeros((n, 1, h)), y[:, :-1]], axis=1)
    factors, _ = layer_kfac_factors(layer, params, cache, dy)
    bias_x, bias_h = ("b", None) if cell == "LSTM" else ("bx", "bh")
    _check_factors(factors, f"Wx|{bias_x}", x, dzx, True, n)
    _check_factors(factors, "Wh" if bias_h is None else f"Wh|{bias_h}", h_prev, dzh, bias_h is not None, n)


def test_conv_transpose_kfac_factors_are_their_definition_on_the_patches():
    """a_t: the patch output pixel t reads, as autodiff sees it: d y[t, f] / d W[:, :, :, f]."""
    layer = pn.ConvTranspose2D(2, 3, strides=2)
    params, _, _ = layer.init(jax.random.key(0), (3, 3, 2), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (2, 3, 3, 2))
    y, _, cache = layer.forward(params, {}, x)
    dy = jax.random.normal(jax.random.key(2), y.shape)
    jac = jax.jacobian(lambda W: layer.forward({**params, "W": W}, {}, x)[0][..., 0])(params["W"])
    patches = jac[..., 0].reshape(*y.shape[:3], -1)  # (N, Ho, Wo, kh kw C): the product's input
    factors, _ = layer_kfac_factors(layer, params, cache, dy)
    _check_factors(factors, "W", patches, dy, True, 2)


def test_kfac_preconditions_every_weight_of_llama_recurrent_and_transposed_networks():
    nets = [(pn.llama(vocab_size=7, context=4, layers=1, heads=2, features=4), None),
            (pn.Sequential([pn.LSTM(3), pn.GRU(3), pn.Dense(2), pn.Softmax()]), (4, 2)),
            (pn.Sequential([pn.ConvTranspose2D(2, 3, strides=2), pn.ReLU(), pn.Flatten(), pn.Dense(2),
                            pn.Softmax()]), (3, 3, 1))]
    for net, shape in nets:
        params, _ = pn.init(net, jax.random.key(0), in_shape=shape)
        for leaf in base.leaves(net, params):
            assert not uncovered_weights(leaf.layer, leaf.params), leaf.path
            roles = jax.tree_util.tree_leaves(base.layer_roles(leaf.layer, leaf.params))
            assert kfac_eligible(leaf.layer, leaf.params) == ("weight" in roles), leaf.path
