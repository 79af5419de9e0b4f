"""Long sequences and LLaMA-style models: blockwise attention, grouped-query heads, RoPE, SwiGLU,
pn.llama, cross-entropy on logits networks and the KV cache of pn.generate.

Everything in float64 against autodiff (and references written here independently, and
PyTorch's scaled_dot_product_attention for GQA). Shapes come from small fixed sets.
"""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import purenet as pn
from purenet.layers import attention_kernels as kernels
from purenet.layers.attention import rope, rope_angles
from purenet.analysis.per_example import per_example_backward, per_example_sq_norms
from purenet.layers.base import decode_init, generic_per_example_backward, generic_per_example_sq_norms
from purenet.testing import check_grads, check_per_example

from tests.conftest import scaled

jax.config.update("jax_enable_x64", True)


def assert_grads_close(actual, expected, rtol=1e-10):
    """Per leaf: relative error <= rtol; a leaf that is mathematically zero (bk without rope, every
    query weight at T = 1) is compared absolutely, as autodiff returns rounding noise there."""
    flat_a, flat_e = jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)
    assert len(flat_a) == len(flat_e)
    for a, e in zip(flat_a, flat_e):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape
        scale = np.max(np.abs(e), initial=0.0)
        err = np.max(np.abs(a - e), initial=0.0)
        if scale < 1e-12:
            assert err < 1e-12, err
        else:
            assert err <= rtol * scale, err / scale


def reference_attention(q, k, v, causal):
    """softmax(q k^T) v with the kv heads repeated for their groups: q (B, K, G, T, dh), k v (B, K, T, dh)."""
    g = q.shape[2]
    kr, vr = jnp.repeat(k[:, :, None], g, axis=2), jnp.repeat(v[:, :, None], g, axis=2)
    s = jnp.einsum("bkgtd,bkgsd->bkgts", q, kr)
    if causal:
        t = q.shape[3]
        s = jnp.where(jnp.arange(t)[None, :] <= jnp.arange(t)[:, None], s, -jnp.inf)
    return jnp.einsum("bkgts,bkgsd->bkgtd", jax.nn.softmax(s, axis=-1), vr)


# T around the block size 4: 1, below it, a prime, exactly two blocks (masks at block edges), past it.
LENGTHS = (1, 3, 5, 8, 11)


@partial(jax.jit, static_argnames=("t", "causal", "groups"))
def _three_ways(key, t, causal, groups):
    """Outputs and (dq, dk, dv) by autodiff of the reference, the dense form and the blockwise form."""
    ks = jax.random.split(key, 4)
    q = jax.random.normal(ks[0], (2, 2, groups, t, 4))
    k, v = (jax.random.normal(kk, (2, 2, t, 4)) for kk in ks[1:3])
    do = jax.random.normal(ks[3], q.shape)
    o_ref, vjp = jax.vjp(lambda a, b, c: reference_attention(a, b, c, causal), q, k, v)
    o_dense, p = kernels.dense_attention(q, k, v, causal)
    o_block, lse = kernels.blockwise_attention(q, k, v, causal, 4)
    s = jnp.einsum("bkgtd,bksd->bkgts", q, k)
    if causal:
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    return ((o_ref, vjp(do)), (o_dense, kernels.dense_attention_backward(q, k, v, p, do)),
            (o_block, kernels.blockwise_attention_backward(q, k, v, o_block, lse, do, causal, 4)),
            (lse, jax.scipy.special.logsumexp(s, axis=-1)))


@pytest.mark.slow
@settings(max_examples=scaled(3))
@given(t=st.sampled_from(LENGTHS), causal=st.booleans(), groups=st.sampled_from((1, 2)), seed=st.integers(0, 99))
def test_blockwise_equals_dense_equals_autodiff(t, causal, groups, seed):
    reference, dense, blockwise, (lse, expected_lse) = _three_ways(jax.random.key(seed), t, causal, groups)
    assert_grads_close(dense, reference)
    assert_grads_close(blockwise, reference)
    # the saved log-sum-exp is each query's, over the keys it may see
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-12)


def rope_reference(x, positions):
    """RoPE as complex rotation: the pair (x_j, x_{j+dh/2}) is x_j + i x_{j+dh/2}, times e^{i pos theta_j}."""
    h = x.shape[-1] // 2
    theta = 10000.0 ** (-2.0 * np.arange(h) / (2 * h))
    z = (np.asarray(x[..., :h]) + 1j * np.asarray(x[..., h:])) * np.exp(1j * np.asarray(positions)[:, None] * theta)
    return np.concatenate([z.real, z.imag], axis=-1)


def test_rope_is_the_rotate_half_convention_and_scores_depend_on_distance_only():
    x = jax.random.normal(jax.random.key(0), (2, 3, 7, 8))
    cos, sin = rope_angles(jnp.arange(7), 8, x.dtype)
    np.testing.assert_allclose(rope(x, cos, sin), rope_reference(x, np.arange(7)), rtol=1e-12, atol=1e-13)
    q, k = jax.random.normal(jax.random.key(1), (2, 8))
    def score(p, s):
        cq, sq = rope_angles(jnp.array([p]), 8, q.dtype)
        ck, sk = rope_angles(jnp.array([s]), 8, k.dtype)
        return float(jnp.sum(rope(q, cq, sq) * rope(k, ck, sk)))
    assert score(5, 2) == pytest.approx(score(105, 102), rel=1e-10)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)


def attention_reference(params, x, heads, kv_heads, causal, use_rope):
    """The layer written independently: per-head loops, kv heads shared by groups, RoPE by complex numbers."""
    b, t, d = x.shape
    dh, g = d // heads, heads // kv_heads
    q, k, v = x @ params["Wq"], x @ params["Wk"], x @ params["Wv"]
    if "bq" in params:
        q, k, v = q + params["bq"], k + params["bk"], v + params["bv"]
    outs = []
    for i in range(heads):
        qi, ki, vi = q[..., i * dh:(i + 1) * dh], k[..., (i // g) * dh:(i // g + 1) * dh], v[..., (i // g) * dh:(i // g + 1) * dh]
        if use_rope:
            qi, ki = jnp.asarray(rope_reference(qi, np.arange(t))), jnp.asarray(rope_reference(ki, np.arange(t)))
        s = jnp.einsum("btd,bsd->bts", qi, ki) / np.sqrt(dh)
        if causal:
            s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
        outs.append(jax.nn.softmax(s, axis=-1) @ vi)
    y = jnp.concatenate(outs, axis=-1) @ params["Wo"]
    return y + params["bo"] if "bo" in params else y


@pytest.mark.parametrize("implementation", ["dense", "blockwise"])
@pytest.mark.parametrize("kv_heads,use_rope", [(None, True), (2, False), (1, True)])
def test_attention_layer_equals_an_independent_reference(implementation, kv_heads, use_rope):
    layer = pn.MultiHeadAttention(4, causal=True, num_kv_heads=kv_heads, rope=use_rope,
                                  implementation=implementation, block_size=3)
    params, _, _ = layer.init(jax.random.key(0), (7, 16))
    params = {n: w + 0.1 * jax.random.normal(jax.random.key(i), w.shape) for i, (n, w) in enumerate(params.items())}
    x = jax.random.normal(jax.random.key(1), (2, 7, 16))
    y, _, _ = layer.forward(params, {}, x)
    np.testing.assert_allclose(y, attention_reference(params, x, 4, kv_heads or 4, True, use_rope), rtol=1e-10,
                               atol=1e-12)
    assert params["Wk"].shape == (16, (kv_heads or 4) * 4)


def test_grouped_query_attention_equals_pytorch():
    torch = pytest.importorskip("torch")
    ks = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(ks[0], (2, 2, 3, 6, 4))    # 2 kv heads, groups of 3 query heads
    k, v = (jax.random.normal(kk, (2, 2, 6, 4)) for kk in ks[1:])
    for causal in (False, True):
        expected = torch.nn.functional.scaled_dot_product_attention(
            torch.tensor(np.asarray(q).reshape(2, 6, 6, 4)), torch.tensor(np.asarray(k)), torch.tensor(np.asarray(v)),
            is_causal=causal, scale=1.0, enable_gqa=True).numpy().reshape(q.shape)
        for o, _ in (kernels.dense_attention(q, k, v, causal), kernels.blockwise_attention(q, k, v, causal, 4)):
            np.testing.assert_allclose(o, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["dense", "blockwise"])
def test_llama_gradients_equal_autodiff_and_per_example_norms_vmap(implementation):
    net = pn.llama(11, 9, 1, 4, 16, kv_heads=2, implementation=implementation)
    x = jax.random.randint(jax.random.key(0), (3, 9), 0, 11)
    y = jax.random.randint(jax.random.key(1), (3, 9), 0, 11)
    params, state = pn.init(net, jax.random.key(2))
    value, grads, _ = pn.value_and_grad(net, params, state, x, y, loss="cross_entropy")
    ref_value, ref_grads = jax.value_and_grad(lambda p: pn.loss(net, p, state, x, y, loss="cross_entropy")[0])(params)
    assert float(value) == pytest.approx(float(ref_value), rel=1e-12)
    assert_grads_close(grads, ref_grads)
    if implementation == "blockwise":
        check_per_example(net, x, y, loss="cross_entropy", params=params, state=state)


@pytest.mark.slow
def test_blockwise_per_example_norms_equal_vmap_of_autodiff_without_a_square_array():
    attention = pn.MultiHeadAttention(2, causal=True, num_kv_heads=1, rope=True, implementation="blockwise",
                                      block_size=4)
    net = pn.Sequential([attention, pn.Flatten(), pn.Dense(3)])
    x = jax.random.normal(jax.random.key(0), (3, 6, 8))
    y = jax.random.normal(jax.random.key(1), (3, 3))
    params, state = pn.init(net, jax.random.key(2), (6, 8))
    check_per_example(net, x, y, loss="mse", params=params, state=state)
    # nothing of shape (T, T) is kept: the cache holds the log-sum-exp (B, K, G, T)
    _, _, cache = attention.forward(params[0], {}, x)
    assert cache.stats.shape == (3, 1, 2, 6)
    # the fast paths equal the generic defaults
    dy = jax.random.normal(jax.random.key(4), x.shape)
    fast, _ = per_example_backward(attention, params[0], cache, dy)
    generic, _ = generic_per_example_backward(attention, params[0], cache, dy)
    assert_grads_close(fast, generic)
    assert_grads_close(per_example_sq_norms(attention, params[0], cache, dy, 0.1)[0],
                       generic_per_example_sq_norms(attention, params[0], cache, dy, 0.1)[0])


def test_swiglu_gradients_and_per_example_paths():
    layer = pn.SwiGLU(6)
    x = jax.random.normal(jax.random.key(0), (3, 4, 5))
    check_grads(layer, x)
    params, _, _ = layer.init(jax.random.key(1), (4, 5))
    _, _, cache = layer.forward(params, {}, x)
    dy = jax.random.normal(jax.random.key(2), (3, 4, 5))
    assert_grads_close(per_example_backward(layer, params, cache, dy)[0],
                       generic_per_example_backward(layer, params, cache, dy)[0])
    assert_grads_close(per_example_sq_norms(layer, params, cache, dy, 0.3)[0],
                       generic_per_example_sq_norms(layer, params, cache, dy, 0.3)[0])
    a, b = x @ params["W1"], x @ params["W3"]
    np.testing.assert_allclose(layer.forward(params, {}, x)[0], (jax.nn.silu(a) * b) @ params["W2"], rtol=1e-12)


def test_cross_entropy_on_a_logits_network_is_fused_and_stable():
    gpt = pn.gpt(7, 6, 1, 2, 8)
    logits_net = gpt.layers[0]                       # the GPT without its Softmax: outputs logits
    x = jax.random.randint(jax.random.key(0), (2, 6), 0, 7)
    y = jax.random.randint(jax.random.key(1), (2, 6), 0, 7)
    params, state = pn.init(gpt, jax.random.key(2))
    with_softmax = pn.loss(gpt, params, state, x, y, loss="cross_entropy")[0]
    on_logits = pn.loss(logits_net, params[0], state[0], x, y, loss="cross_entropy")[0]
    assert float(on_logits) == pytest.approx(float(with_softmax), rel=1e-12)
    grad = jax.jit(pn.value_and_grad, static_argnames=("net", "loss"))
    _, g1, _ = grad(gpt, params, state, x, y, loss="cross_entropy")
    _, g2, _ = grad(logits_net, params[0], state[0], x, y, loss="cross_entropy")
    assert_grads_close(g2, g1[0])
    # the documented name reads any network's outputs as logits, stably at +-1e4
    net = pn.Sequential([pn.Dense(3)])
    p, s = pn.init(net, jax.random.key(3), 2)
    p = ({"W": 1e4 * jnp.array([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]]), "b": jnp.zeros(3)},)
    xs, ys = jnp.array([[1.0, 0.0], [0.0, 1.0]]), jnp.array([1, 0])
    value, grads, _ = pn.value_and_grad(net, p, s, xs, ys, loss="softmax_cross_entropy")
    assert float(value) == pytest.approx(1.5e4, rel=1e-12)   # (2e4 + 1e4) / 2: lse - z_label per row
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.parametrize("model", [pytest.param("gpt", marks=pytest.mark.slow), "llama"])
def test_cached_generation_equals_uncached_token_for_token(model):
    net = pn.gpt(11, 8, 2, 2, 8) if model == "gpt" else pn.llama(11, 8, 2, 4, 16, kv_heads=2)
    params, state = pn.init(net, jax.random.key(0))
    prompt = jax.random.randint(jax.random.key(1), (2, 3), 0, 11)
    for temperature in (0.0, 0.5, 1.0):
        for steps in (5, 9):  # within the context, and past it (the sliding window)
            key = jax.random.key(steps)
            cached = pn.generate(net, params, state, prompt, key, steps, temperature, cache=True)
            uncached = pn.generate(net, params, state, prompt, key, steps, temperature, cache=False)
            np.testing.assert_array_equal(cached, uncached)
            np.testing.assert_array_equal(cached[:, :3], prompt)


def test_kv_cache_holds_the_key_value_heads_only():
    net = pn.llama(11, 8, 1, 4, 16, kv_heads=1)
    params, _ = pn.init(net, jax.random.key(0))
    kv = decode_init(net, params, 2, 8)
    shapes = {a.shape for a in jax.tree_util.tree_leaves(kv)}
    assert shapes == {(2, 1, 8, 4)}       # (batch, kv_heads, length, head width): 4x less than all heads


def _train_step_temp_bytes(implementation, t):
    net = pn.Sequential([pn.MultiHeadAttention(2, causal=True, implementation=implementation, block_size=128)])
    params, state = pn.init(net, jax.random.key(0), (t, 16), dtype=jnp.float32)
    x = jnp.zeros((1, t, 16), jnp.float32)
    step = jax.jit(lambda p, x: pn.value_and_grad(net, p, state, x, x, loss="mse")[:2])
    return step.lower(params, x).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_train_step_memory_grows_linearly_in_t():
    blockwise = _train_step_temp_bytes("blockwise", 1024) / _train_step_temp_bytes("blockwise", 512)
    dense = _train_step_temp_bytes("dense", 1024) / _train_step_temp_bytes("dense", 512)
    assert blockwise < 2.5 < 3.5 < dense, (blockwise, dense)


def test_auto_picks_dense_for_short_and_blockwise_for_long_sequences():
    layer = pn.MultiHeadAttention(8, causal=True)
    assert layer.implementation_for(64) == "dense"
    assert layer.implementation_for(4096) == "blockwise"


def test_bad_attention_configurations_are_named():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        pn.MultiHeadAttention(4, num_kv_heads=3)
    with pytest.raises(ValueError, match="implementation"):
        pn.MultiHeadAttention(4, implementation="flash")
    with pytest.raises(ValueError, match="odd"):
        pn.MultiHeadAttention(2, rope=True).init(jax.random.key(0), (5, 6))
    with pytest.raises(ValueError, match="cannot decode one position"):
        decode_init(pn.Conv2D(3, 3), {}, 1, 4)
    with pytest.raises(ValueError, match="causal"):
        pn.MultiHeadAttention(2).decode_init({"Wq": jnp.zeros((4, 4))}, 1, 4)
    with pytest.raises(ValueError, match="divide into heads"):
        pn.llama(5, 8, 1, 3, 16)
