"""Sequence models: Embedding, MultiHeadAttention, transformer blocks and pn.gpt against
jax.grad (float64), causal masking, per-example gradients, PyTorch references, generation
and the text data set."""
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import purenet as pn
from purenet.testing import compare_trees, transformer_block, transformer_cases
from tests.conftest import scaled

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def assert_grads_match(actual, expected, rtol):
    """Per-leaf relative error <= rtol, except attention's key bias: its gradient is exactly
    zero (softmax ignores a shift of a whole row), where autodiff leaves rounding noise, so
    it is compared absolutely against the scale of the whole gradient."""
    errors = compare_trees(actual, expected)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(expected))
    flat = dict((jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_leaves_with_path(expected))
    bad = {}
    for path, err in errors.items():
        if path.endswith("['bk']"):
            if float(jnp.max(jnp.abs(flat[path]))) > 1e-12 * scale:
                bad[path] = "reference not ~0"
        elif not err <= rtol:
            bad[path] = err
    assert not bad, f"handwritten gradient differs from jax.grad: {bad}\n{errors}"


def check_layer(layer, x, seed=0, rtol=1e-10):
    report = pn.check_grads(layer, x, key=jax.random.key(seed), raise_on_failure=False)
    bad = {p: e for p, e in report.errors.items() if not (e <= rtol or p.endswith("['bk']"))}
    assert not bad, str(report)


SIZES = dict(batch=st.sampled_from([1, 2]), t=st.sampled_from([1, 3]), d=st.sampled_from([4, 8]),
             heads=st.sampled_from([1, 2]))


# ------------------------------------------------------------------ layers against jax.grad


@settings(max_examples=scaled(2))
@given(**SIZES, seed=st.integers(0, 2**31 - 1))
def test_embedding_backward_is_a_scatter_add_equal_to_autodiff(batch, t, d, heads, seed):
    del heads
    layer = pn.Embedding(5, d)
    ids = jax.random.randint(jax.random.key(seed), (batch, t), 0, 5)
    report = pn.check_grads(layer, ids, key=jax.random.key(seed))
    assert report.ok, str(report)
    params, _, _ = layer.init(jax.random.key(0), (t,), jnp.float64)
    dy = jax.random.normal(jax.random.key(1), (batch, t, d), jnp.float64)
    grads, dx = layer.backward(params, ids, dy)
    assert dx is None
    expected = np.zeros((5, d))
    np.add.at(expected, np.asarray(ids).ravel(), np.asarray(dy).reshape(-1, d))
    np.testing.assert_allclose(grads["E"], expected, rtol=1e-12, atol=1e-15)


@pytest.mark.slow
@settings(max_examples=scaled(2))
@given(**SIZES, causal=st.booleans(), use_bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_attention_backward_matches_autodiff(batch, t, d, heads, causal, use_bias, seed):
    layer = pn.MultiHeadAttention(heads, causal=causal, use_bias=use_bias)
    x = 2.0 * jax.random.normal(jax.random.key(seed), (batch, t, d), jnp.float64)
    check_layer(layer, x, seed)


def test_attention_key_bias_gradient_is_exactly_zero():
    layer = pn.MultiHeadAttention(2)
    params, _, _ = layer.init(jax.random.key(0), (3, 4), jnp.float64)
    params = dict(params, bk=jnp.arange(4.0))
    x = jax.random.normal(jax.random.key(1), (2, 3, 4), jnp.float64)
    y, _, cache = layer.forward(params, {}, x)
    y0, _, _ = layer.forward(dict(params, bk=jnp.zeros(4)), {}, x)
    np.testing.assert_allclose(y, y0, rtol=1e-12)  # bk changes nothing
    grads, _ = layer.backward(params, cache, jnp.ones_like(y))
    assert np.all(np.asarray(grads["bk"]) == 0)


@settings(max_examples=scaled(3))
@given(**SIZES, seed=st.integers(0, 2**31 - 1))
def test_positional_embedding_matches_autodiff(batch, t, d, heads, seed):
    del heads
    x = jax.random.normal(jax.random.key(seed), (batch, t, d), jnp.float64)
    report = pn.check_grads(pn.PositionalEmbedding(t + 1), x, key=jax.random.key(seed))
    assert report.ok, str(report)


@partial(jax.jit, static_argnames=("net", "loss", "train"))
def _handwritten_and_autodiff(net, params, state, x, y, key, loss, train):
    """Both gradients in one compiled function (cached across hypothesis examples of one shape)."""
    value, grads, _ = pn.value_and_grad(net, params, state, x, y, loss=loss, l2=0.1, train=train, key=key)

    def reference(p):
        return pn.loss(net, p, state, x, y, loss=loss, l2=0.1, train=train, key=key)[0]

    return (value, grads), jax.value_and_grad(reference)(params)


@settings(max_examples=scaled(2))
@given(transformer_cases(dropout=True))
def test_transformer_networks_match_autodiff(case):
    params, state, x, y = case.data()
    (value, grads), (ref_value, ref_grads) = _handwritten_and_autodiff(
        case.net, params, state, x, y, jax.random.key(case.seed), case.loss, case.train)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    assert_grads_match(grads, ref_grads, 1e-9 if case.kind == "gpt" else 1e-10)


@partial(jax.jit, static_argnames=("net", "loss"))
def _per_example_and_vmap(net, params, state, x, y, loss):
    def one(xi, yi):
        return jax.grad(lambda p: pn.loss(net, p, state, xi[None], yi[None], loss=loss, l2=0.1)[0])(params)

    _, grads = pn.per_example_grads(net, params, state, x, y, loss=loss, l2=0.1)
    norms = pn.per_example_grad_norms(net, params, state, x, y, loss=loss, l2=0.1)
    return grads, norms, jax.vmap(one)(x, y)


@settings(max_examples=scaled(2))
@given(transformer_cases(max_layers=1))
def test_transformer_per_example_grads_and_norms_equal_vmap_of_grad(case):
    params, state, x, y = case.data()
    grads, norms, ref = _per_example_and_vmap(case.net, params, state, x, y, case.loss)
    assert_grads_match(grads, ref, 1e-9)
    explicit = jnp.sqrt(sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, 1) for g in jax.tree_util.tree_leaves(ref)))
    np.testing.assert_allclose(norms, explicit, rtol=1e-8)


def test_dp_sgd_clipping_runs_through_a_gpt():
    net = pn.gpt(5, 4, 1, 2, 8)
    params, state = pn.init(net, jax.random.key(0), dtype=jnp.float64)
    ids = jax.random.randint(jax.random.key(1), (3, 4), 0, 5)
    value, grads, _ = jax.jit(lambda p: pn.clipped_value_and_grad(net, p, state, ids, ids, clip_norm=1e-3))(params)
    norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree_util.tree_leaves(grads)))
    assert np.isfinite(value) and norm <= 1e-3 * (1 + 1e-9)


# ------------------------------------------------------------------ causal masking


@pytest.mark.parametrize("heads", [1, 2])
def test_causal_attention_ignores_future_positions_and_gives_them_zero_gradient(heads):
    layer = pn.MultiHeadAttention(heads, causal=True)
    params, _, _ = layer.init(jax.random.key(0), (5, 4), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (2, 5, 4), jnp.float64)
    y, _, cache = layer.forward(params, {}, x)
    for t in range(5):
        changed = x.at[:, t + 1:].add(jax.random.normal(jax.random.key(t), (2, 4 - t, 4), jnp.float64) * 10)
        y2, _, _ = layer.forward(params, {}, changed)
        np.testing.assert_array_equal(y2[:, :t + 1], y[:, :t + 1])
    # a loss on position 2 only: positions 3 and 4 get exactly zero gradient, and masked P is exactly 0
    dy = jnp.zeros_like(y).at[:, 2].set(1.0)
    _, dx = layer.backward(params, cache, dy)
    assert np.all(np.asarray(dx[:, 3:]) == 0) and np.any(np.asarray(dx[:, :3]) != 0)
    assert np.all(np.asarray(cache.stats)[..., np.triu_indices(5, 1)[0], np.triu_indices(5, 1)[1]] == 0)


def test_gpt_predictions_do_not_depend_on_future_tokens():
    net = pn.gpt(7, 6, 2, 2, 8)
    params, state = pn.init(net, jax.random.key(0), dtype=jnp.float64)
    ids = jax.random.randint(jax.random.key(1), (2, 6), 0, 7)
    y, _ = pn.forward(net, params, state, ids)
    for t in range(6):
        changed = ids.at[:, t + 1:].set((ids[:, t + 1:] + 3) % 7)
        np.testing.assert_array_equal(pn.forward(net, params, state, changed)[0][:, :t + 1], y[:, :t + 1])
    assert not np.allclose(pn.forward(net, params, state, ids.at[:, 0].set((ids[:, 0] + 1) % 7))[0][:, -1],
                           y[:, -1])


# ------------------------------------------------------------------ weight tying


def test_tied_embedding_gradient_is_the_sum_of_both_uses():
    tied, untied = pn.gpt(6, 4, 1, 2, 8), pn.gpt(6, 4, 1, 2, 8, tie_embeddings=False)
    params, state = pn.init(tied, jax.random.key(0), dtype=jnp.float64)
    E = params[0]["token"]["E"]
    uparams = (dict(params[0], head={"W": E.T}),) + params[1:]
    ids = jax.random.randint(jax.random.key(1), (3, 4), 0, 6)
    labels = jax.random.randint(jax.random.key(2), (3, 4), 0, 6)
    v1, g1, _ = pn.value_and_grad(tied, params, state, ids, labels)
    v2, g2, _ = pn.value_and_grad(untied, uparams, state, ids, labels)
    np.testing.assert_allclose(v1, v2, rtol=1e-12)
    np.testing.assert_allclose(g1[0]["token"]["E"], g2[0]["token"]["E"] + g2[0]["head"]["W"].T, rtol=1e-10)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(g1)
    assert "head" not in params[0]


# ------------------------------------------------------------------ integer inputs


def test_integer_ids_are_accepted_only_where_the_first_layer_is_an_embedding():
    emb_net = pn.Sequential([pn.Embedding(5, 4), pn.Dense(3), pn.Softmax()])
    params, state = pn.init(emb_net, jax.random.key(0), (2,))
    ids = jnp.array([[0, 4], [1, 2]])
    y, _ = pn.forward(emb_net, params, state, ids)
    assert y.shape == (2, 2, 3) and y.dtype == pn.initializers.default_float()
    with pytest.raises(TypeError, match="integer token ids"):
        pn.forward(emb_net, params, state, ids.astype(jnp.float32))
    with pytest.raises(ValueError, match="token id 5 is out of range for 5"):
        pn.forward(emb_net, params, state, ids.at[0, 0].set(5))
    with pytest.raises(ValueError, match="token id -1 is out of range"):
        pn.loss(emb_net, params, state, ids.at[0, 0].set(-1), ids % 3)
    mlp = pn.mlp([2, 3])
    mparams, mstate = pn.init(mlp, jax.random.key(0))
    with pytest.raises(TypeError, match="floating-point"):
        pn.forward(mlp, mparams, mstate, ids)
    with pytest.raises(TypeError, match="integer token ids"):  # the layer itself refuses floats
        pn.Embedding(5, 4).forward(params[0], {}, jnp.zeros((1, 2)))
    with pytest.raises(TypeError, match="integer token ids"):
        pn.forward(pn.gpt(5, 4, 1, 1, 4), *pn.init(pn.gpt(5, 4, 1, 1, 4), jax.random.key(0)), jnp.zeros((1, 4)))


def test_fit_trains_a_gpt_on_integer_ids():
    net = pn.gpt(5, 4, 1, 2, 8)
    ids = jax.random.randint(jax.random.key(0), (32, 5), 0, 5)
    x, y = ids[:, :-1], ids[:, 1:]
    result = pn.fit(net, pn.optim.adam(1e-2), (x, y), key=jax.random.key(1), epochs=3, batch_size=8)
    assert jax.tree_util.tree_leaves(result.params)[0].dtype == pn.initializers.default_float()
    with pytest.raises(ValueError, match="out of range"):
        pn.fit(net, pn.optim.adam(1e-2), (x.at[0, 0].set(9), y), key=jax.random.key(1), epochs=1)


def test_gpt_configuration_errors_are_clear():
    with pytest.raises(ValueError, match="divide"):
        pn.gpt(5, 4, 1, 3, 8)
    with pytest.raises(ValueError, match="heads"):
        pn.MultiHeadAttention(3).init(jax.random.key(0), (2, 8))
    net = pn.gpt(5, 4, 1, 1, 4)
    params, state = pn.init(net, jax.random.key(0))
    with pytest.raises(ValueError, match="T <= 4"):
        pn.forward(net, params, state, jnp.zeros((1, 5), jnp.int32))


def test_gpt_initialises_as_gpt2_eagerly_and_under_jit():
    """E, P and the block matrices N(0, 0.02^2), the residual projections N(0, (0.02/sqrt(2L))^2),
    biases 0, LayerNorm gains 1; no two matrices share values (they are cut from one normal
    vector), and a jitted init gives the eager one's values."""
    net = pn.gpt(vocab_size=64, context=32, layers=2, heads=2, features=32)
    params = pn.init(net, jax.random.key(0))[0][0]  # the GPT's, before the Softmax
    jitted = jax.jit(lambda k: pn.init(net, k))(jax.random.key(0))[0][0]
    assert max(compare_trees(jitted, params).values()) < 1e-6
    res = 0.02 / np.sqrt(2 * 2)
    blocks = params["body"][1:3]
    matrices = [(params["token"]["E"], 0.02), (params["body"][0]["P"], 0.02)]
    for attn_seq, mlp_seq in blocks:
        attn, fc, proj = attn_seq[1], mlp_seq[1], mlp_seq[3]
        matrices += [(attn[n], res if n == "Wo" else 0.02) for n in ("Wq", "Wk", "Wv", "Wo")]
        matrices += [(fc["W"], 0.02), (proj["W"], res)]
        assert all(float(jnp.max(jnp.abs(attn[b]))) == 0 for b in ("bq", "bk", "bv", "bo"))
        assert float(jnp.max(jnp.abs(attn_seq[0]["gamma"] - 1))) == 0
    for m, std in matrices:
        assert abs(float(jnp.std(m)) / std - 1) < 0.1 and abs(float(jnp.mean(m))) < 4 * std / np.sqrt(m.size)
    firsts = {round(float(m.ravel()[0]), 12) for m, _ in matrices}
    assert len(firsts) == len(matrices)


# ------------------------------------------------------------------ PyTorch




@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def test_embedding_equals_torch(torch):
    layer = pn.Embedding(7, 5)
    params, _, _ = layer.init(jax.random.key(0), (4,), jnp.float64)
    ids = jax.random.randint(jax.random.key(1), (3, 4), 0, 7)
    dy = jax.random.normal(jax.random.key(2), (3, 4, 5), jnp.float64)
    y, _, cache = layer.forward(params, {}, ids)
    grads, _ = layer.backward(params, cache, dy)
    E = torch.tensor(np.asarray(params["E"]), requires_grad=True)
    yt = torch.nn.functional.embedding(torch.tensor(np.asarray(ids)), E)
    yt.backward(torch.tensor(np.asarray(dy)))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-14)
    np.testing.assert_allclose(grads["E"], E.grad.numpy(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [1, 2, 4])
def test_attention_equals_torch_scaled_dot_product_attention(torch, causal, heads):
    b, t, d = 2, 5, 8
    layer = pn.MultiHeadAttention(heads, causal=causal)
    params, _, _ = layer.init(jax.random.key(0), (t, d), jnp.float64)
    params = {k: v + 0.1 * jax.random.normal(jax.random.key(i), v.shape, jnp.float64)
              for i, (k, v) in enumerate(params.items())}  # non-zero biases
    x = jax.random.normal(jax.random.key(9), (b, t, d), jnp.float64)
    dy = jax.random.normal(jax.random.key(10), (b, t, d), jnp.float64)
    y, _, cache = layer.forward(params, {}, x)
    grads, dx = layer.backward(params, cache, dy)

    tp = {k: torch.tensor(np.asarray(v), requires_grad=True) for k, v in params.items()}
    xt = torch.tensor(np.asarray(x), requires_grad=True)

    def heads_of(z):
        return z.reshape(b, t, heads, d // heads).transpose(1, 2)

    q, k, v = (heads_of(xt @ tp[f"W{n}"] + tp[f"b{n}"]) for n in "qkv")
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    yt = o.transpose(1, 2).reshape(b, t, d) @ tp["Wo"] + tp["bo"]
    yt.backward(torch.tensor(np.asarray(dy)))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-13)
    for name in params:
        np.testing.assert_allclose(grads[name], tp[name].grad.numpy(), rtol=1e-10, atol=1e-13, err_msg=name)


# ------------------------------------------------------------------ generation


def test_generate_is_pure_keeps_the_prompt_and_is_causal():
    net = pn.gpt(6, 4, 1, 2, 8)
    params, state = pn.init(net, jax.random.key(0))
    prompt = jnp.array([[1, 2], [3, 4]])
    a = pn.generate(net, params, state, prompt, jax.random.key(1), 7)
    b = pn.generate(net, params, state, prompt, jax.random.key(1), 7)
    assert a.shape == (2, 9)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, :2], prompt)
    assert int(a.min()) >= 0 and int(a.max()) < 6
    one = pn.generate(net, params, state, jnp.array([1, 2]), jax.random.key(1), 3)
    assert one.shape == (5,)
    # temperature 0 is greedy: each new id is the argmax of the forward pass on what precedes it
    g = pn.generate(net, params, state, prompt, jax.random.key(1), 6, temperature=0.0)
    forward = jax.jit(lambda window: pn.forward(net, params, state, window)[0])  # one compile per window length
    for pos in range(2, 8):
        window = g[:, max(0, pos - 4):pos]
        probs = forward(window)
        np.testing.assert_array_equal(g[:, pos], jnp.argmax(probs[:, -1], axis=-1))
    with pytest.raises(TypeError, match="integer"):
        pn.generate(net, params, state, jnp.zeros((1, 2)), jax.random.key(0), 2)


# ------------------------------------------------------------------ text data


def test_text_dataset_and_windows_on_a_small_file(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("hello world, hello purenet!\n" * 10, encoding="utf-8")
    data = pn.datasets.text(path)
    assert data.vocab == "".join(sorted(set(path.read_text())))
    assert len(data.train) == int(0.9 * 280) and len(data.train) + len(data.val) == 280
    assert data.decode(data.encode("hello")) == "hello"
    assert data.decode(np.concatenate([data.train, data.val])) == path.read_text()
    x, y = pn.datasets.windows(data.train, jax.random.key(0), 5, 8)
    assert x.shape == y.shape == (5, 8) and x.dtype == jnp.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        data.encode("xyz")


@pytest.mark.skipif(not CORPUS.exists(), reason=f"tiny Shakespeare is not at {CORPUS}")
def test_tiny_shakespeare_corpus():
    data = pn.datasets.text(CORPUS)
    assert data.vocab_size == 65
    assert len(data.train) == 1_003_854 and len(data.val) == 111_540
    assert data.decode(data.train[:14]) == "First Citizen:"


# ------------------------------------------------------------------ a transformer block by hand


def test_transformer_block_keeps_shape_and_trains():
    block = transformer_block(8, 2)
    params, state, out = block.init(jax.random.key(0), (3, 8))
    assert out == (3, 8)
    x = jax.random.normal(jax.random.key(1), (4, 3, 8))
    value, grads, _ = pn.value_and_grad(block, params, state, x, x, loss="mse")
    assert np.isfinite(value)
