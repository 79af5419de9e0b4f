"""Per-example gradients and norms from the handwritten backward, and DP-SGD clipping."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import purenet as pn
from purenet.testing import compare_trees, net_cases
from tests.conftest import scaled


def reference_per_example(case, params, state, x, y):
    """jax.vmap(jax.grad) of the loss on one example at a time."""
    def one(xi, yi):
        return jax.grad(lambda p: pn.loss(case.net, p, state, xi[None], yi[None], loss=case.loss,
                                          l2=case.l2)[0])(params)

    return jax.vmap(one)(x, y)


@pytest.mark.slow
@settings(max_examples=scaled(3))
@given(net_cases(max_depth=2))
def test_per_example_grads_equal_vmap_of_grad(case):
    params, state, x, y = case.data()
    values, grads = pn.per_example_grads(case.net, params, state, x, y, loss=case.loss, l2=case.l2)
    ref = reference_per_example(case, params, state, x, y)
    assert max(compare_trees(grads, ref).values()) <= 1e-10
    _, batch_grads, _ = pn.value_and_grad(case.net, params, state, x, y, loss=case.loss, l2=case.l2)
    mean = jax.tree_util.tree_map(lambda g: jnp.mean(g, axis=0), grads)
    assert max(compare_trees(mean, batch_grads).values()) <= 1e-10
    whole, _ = pn.loss(case.net, params, state, x, y, loss=case.loss, l2=case.l2)
    np.testing.assert_allclose(jnp.mean(values), whole, rtol=1e-10)
    norms = pn.per_example_grad_norms(case.net, params, state, x, y, loss=case.loss, l2=case.l2)
    explicit = jnp.sqrt(sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in jax.tree_util.tree_leaves(ref)))
    np.testing.assert_allclose(norms, explicit, rtol=1e-8, atol=1e-12)


def test_clipping_bounds_every_example_and_equals_the_explicit_computation():
    net = pn.mlp([5, 8, 3])
    params, state = pn.init(net, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (16, 5)) * 3
    y = jnp.arange(16) % 3
    _, per = pn.per_example_grads(net, params, state, x, y)
    norms = pn.per_example_grad_norms(net, params, state, x, y)
    clip = float(jnp.median(norms))
    scale = jnp.minimum(1.0, clip / norms)
    clipped = jax.tree_util.tree_map(lambda g: g * scale.reshape((-1,) + (1,) * (g.ndim - 1)), per)
    contributions = jnp.sqrt(sum(jnp.sum(g.reshape(16, -1) ** 2, 1) for g in jax.tree_util.tree_leaves(clipped)))
    assert float(jnp.max(contributions)) <= clip * (1 + 1e-10)
    _, grads, _ = pn.clipped_value_and_grad(net, params, state, x, y, clip_norm=clip)
    expected = jax.tree_util.tree_map(lambda g: jnp.mean(g, 0), clipped)
    assert max(compare_trees(grads, expected).values()) <= 1e-10


def test_noise_has_the_stated_scale_and_needs_a_key():
    net = pn.mlp([4, 3])
    params, state = pn.init(net, jax.random.key(0))
    x, y = jnp.ones((8, 4)), jnp.zeros(8, jnp.int32)
    _, clean, _ = pn.clipped_value_and_grad(net, params, state, x, y, clip_norm=1.0)
    draws = jnp.stack([
        pn.clipped_value_and_grad(net, params, state, x, y, clip_norm=1.0, noise_multiplier=2.0,
                                  noise_key=jax.random.key(i))[1][0]["W"] - clean[0]["W"]
        for i in range(200)])
    np.testing.assert_allclose(jnp.std(draws), 2.0 * 1.0 / 8, rtol=0.05)
    with pytest.raises(ValueError, match="noise_key"):
        pn.clipped_value_and_grad(net, params, state, x, y, clip_norm=1.0, noise_multiplier=1.0)


def test_batchnorm_in_training_has_no_per_example_gradients():
    net = pn.mlp([3, 4, 2], batchnorm=True)
    params, state = pn.init(net, jax.random.key(0))
    with pytest.raises(ValueError, match="undefined through BatchNorm in training"):
        pn.per_example_grads(net, params, state, jnp.ones((4, 3)), jnp.zeros(4, jnp.int32), train=True)
    values, grads = pn.per_example_grads(net, params, state, jnp.ones((4, 3)), jnp.zeros(4, jnp.int32))
    chex.assert_shape(grads[1]["gamma"], (4, 4))


def test_fit_with_dp_sgd_trains_and_is_deterministic():
    data = pn.datasets.digits()
    net = pn.mlp([64, 32, 10])
    run = lambda: pn.fit(net, pn.optim.sgd(0.5), (data.x_train[:512], data.y_train[:512]),  # noqa: E731
                         key=jax.random.key(0), epochs=4, batch_size=64, dp=pn.DPSGD(1.0, 0.5))
    a, b = run(), run()
    chex.assert_trees_all_equal(a.params, b.params)
    assert a.history["loss"][-1] < a.history["loss"][0]
    acc = pn.metrics.accuracy(net, a.params, a.state, data.x_test, data.y_test)
    assert float(acc) > 0.5


CNN = pn.Sequential([pn.Conv2D(3, 3, implementation="im2col"), pn.ReLU(), pn.MaxPool2D(2),
                     pn.Conv2D(4, 3, strides=2, implementation="xla"), pn.Tanh(), pn.Flatten(), pn.Dense(3),
                     pn.Softmax()], in_shape=(6, 6, 2))


@pytest.mark.parametrize("chunk_size", [3, 100, *(pytest.param(n, marks=pytest.mark.slow) for n in (1, 4, 8))])
def test_chunks_give_the_whole_batch_norms_and_clipped_gradient(chunk_size):
    params, state = pn.init(CNN, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (8, 6, 6, 2))
    y = jnp.arange(8) % 3
    whole, chunked = jax.jit(lambda p: [pn.per_example_grad_norms(CNN, p, state, x, y, l2=0.01, chunk_size=size)
                                        for size in (None, chunk_size)])(params)
    np.testing.assert_allclose(chunked, whole, rtol=1e-12)
    kwargs = dict(clip_norm=float(jnp.median(whole)), noise_multiplier=0.5, noise_key=jax.random.key(2), l2=0.01)

    @jax.jit  # both clippings in one compiled program (op by op they took ~20 s)
    def clipped(params):
        return tuple(pn.clipped_value_and_grad(CNN, params, state, x, y, chunk_size=size, **kwargs)[:2]
                     for size in (None, chunk_size))
    (value, grads), (value_c, grads_c) = clipped(params)
    np.testing.assert_allclose(value_c, value, rtol=1e-12)
    assert max(compare_trees(grads_c, grads).values()) <= 1e-12  # one draw of noise, on the batch's sum


def test_chunks_shrink_the_working_set_and_bad_sizes_are_named():
    params, state = pn.init(CNN, jax.random.key(0))
    x, y = jnp.ones((64, 6, 6, 2)), jnp.zeros(64, jnp.int32)

    def temp(chunk_size):
        fn = jax.jit(lambda p, x, y: pn.per_example_grad_norms(CNN, p, state, x, y, chunk_size=chunk_size))
        return fn.lower(params, x, y).compile().memory_analysis().temp_size_in_bytes

    assert temp(8) < temp(None) / 4
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
            pn.per_example_grad_norms(CNN, params, state, x, y, chunk_size=bad)
        with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
            pn.DPSGD(1.0, chunk_size=bad)


@pytest.mark.slow
def test_fit_with_chunked_dp_sgd_equals_the_whole_batch():
    data = pn.datasets.digits()
    net = pn.mlp([64, 16, 10])
    x = jnp.asarray(data.x_train[:192], jnp.float64)
    runs = [pn.fit(net, pn.optim.sgd(0.5), (x, data.y_train[:192]), key=jax.random.key(0),
                   epochs=2, batch_size=64, dp=pn.DPSGD(1.0, 0.5, chunk_size=k)) for k in (None, 16, 24)]
    for run in runs[1:]:
        assert max(compare_trees(run.params, runs[0].params).values()) <= 1e-9


# ---------------------------------------------------------------- which cache leaves hold one row per example


import dataclasses  # noqa: E402


@dataclasses.dataclass(frozen=True)
class CachesItsWeight(pn.Layer):
    """y = x W, caching W itself beside x: with in_dim equal to the batch size, W has n leading rows."""

    features: int = 3

    def init(self, key, in_shape, dtype=None):
        (d,) = pn.layers.base.as_shape(in_shape)
        return {"W": jax.random.normal(key, (d, self.features), dtype or jnp.float32) / 2}, {}, (self.features,)

    def forward(self, params, state, x, train=False, key=None):
        return x @ params["W"], state, (x, params["W"])

    def backward(self, params, cache, dy):
        x, w = cache
        return {"W": x.T @ dy}, dy @ w.T


@dataclasses.dataclass(frozen=True)
class FlattensPositions(pn.Layer):
    """y = x * g over (batch, T, d), caching x as (batch * T, d) rows: not sliceable per example."""

    def init(self, key, in_shape, dtype=None):
        shape = pn.layers.base.as_shape(in_shape)
        return {"g": jnp.ones(shape[-1:], dtype or jnp.float32)}, {}, shape

    def forward(self, params, state, x, train=False, key=None):
        return x * params["g"], state, x.reshape(-1, x.shape[-1])

    def backward(self, params, cache, dy):
        return {"g": jnp.sum(cache * dy.reshape(cache.shape), 0)}, dy * params["g"]


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_a_cached_parameter_with_batch_many_rows_is_not_sliced_per_example(chunk_size):
    """Defect: the generic path sliced every cache leaf whose leading axis equalled the batch size, so a
    layer caching its own (n, k) weight got wrong per-example norms at a batch (or chunk) of n."""
    n = 4  # CachesItsWeight's W is (n, 3); its dx feeds the Dense before it
    net = pn.Sequential([pn.Dense(n), pn.Tanh(), CachesItsWeight(3), pn.Tanh(), pn.Dense(2), pn.Softmax()])
    params, state = pn.init(net, jax.random.key(0), in_shape=5, dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (2 * n if chunk_size else n, 5), jnp.float64)
    y = jnp.arange(x.shape[0]) % 2
    per = jax.vmap(lambda xi, yi: jax.grad(lambda p: pn.loss(net, p, state, xi[None], yi[None])[0])(params))(x, y)
    norms = jnp.sqrt(sum(jnp.sum(g.reshape(x.shape[0], -1) ** 2, 1) for g in jax.tree_util.tree_leaves(per)))
    np.testing.assert_allclose(pn.per_example_grad_norms(net, params, state, x, y, chunk_size=chunk_size), norms,
                               rtol=1e-12)
    clip = float(jnp.median(norms))
    clipped = jax.tree_util.tree_map(
        lambda g: jnp.mean(g * jnp.minimum(1.0, clip / norms).reshape((-1,) + (1,) * (g.ndim - 1)), 0), per)
    got = pn.clipped_value_and_grad(net, params, state, x, y, clip_norm=clip, chunk_size=chunk_size)[1]
    chex.assert_trees_all_close(got, clipped, rtol=1e-10, atol=1e-14)
    chex.assert_trees_all_close(pn.per_example_grads(net, params, state, x, y)[1], per, rtol=1e-10, atol=1e-14)


def test_a_cache_leaf_that_is_neither_batched_nor_shared_is_an_error_that_asks_for_a_declaration():
    net = pn.Sequential([FlattensPositions(), pn.Dense(2), pn.Softmax()])
    params, state = pn.init(net, jax.random.key(0), in_shape=(3, 2))
    x, y = jax.random.normal(jax.random.key(1), (5, 3, 2)), jnp.zeros((5, 3), jnp.int32)
    with pytest.raises(ValueError, match=r"FlattensPositions's cache has a leaf of shape \(15, 2\).*cache_batch_axes"):
        pn.per_example_grad_norms(net, params, state, x, y)
