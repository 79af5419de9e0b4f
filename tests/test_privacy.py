"""Differential privacy a paper can report: the accountant against Opacus, Poisson batches,
one-pass clipping against the two-pass reference and vmap(jax.grad), BatchNorm refused."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import purenet as pn
from purenet import privacy

jax.config.update("jax_enable_x64", True)

SETTINGS = [(256 / 60000, 1.12, 14062, 1e-5), (0.01, 0.8, 1000, 1e-6), (0.05, 2.0, 300, 1e-5)]


@pytest.mark.parametrize("q,sigma,steps,delta", SETTINGS)
def test_epsilon_agrees_with_opacus_and_pld_is_tighter(q, sigma, steps, delta):
    from opacus.accountants import RDPAccountant

    opacus = RDPAccountant()
    opacus.history = [(sigma, q, steps)]
    reference = opacus.get_epsilon(delta)
    rdp = privacy.epsilon(sigma, q, steps, delta, accountant="rdp")
    assert abs(rdp - reference) <= 0.03 * reference
    pld = privacy.epsilon(sigma, q, steps, delta)
    assert pld <= rdp


def test_tf_privacy_mnist_numbers():
    q, sigma, steps, delta = SETTINGS[0]
    np.testing.assert_allclose(privacy.epsilon(sigma, q, steps, delta), 2.31, atol=0.01)
    np.testing.assert_allclose(privacy.epsilon(sigma, q, steps, delta, "rdp"), 2.52, atol=0.01)


@pytest.mark.parametrize("q,sigma,steps,delta", SETTINGS[1:])
def test_pld_epsilon_is_exactly_dp_accountings_pld_accountant(q, sigma, steps, delta):
    """privacy.epsilon builds the one-step distribution once per (sigma, q) and composes it; the number
    is the PLDAccountant's own, to the bit, at every step count (fit asks for one after each epoch)."""
    import dp_accounting as dp

    event = dp.PoissonSampledDpEvent(q, dp.GaussianDpEvent(sigma))
    for n in (1, steps // 3, steps):
        accountant = dp.pld.PLDAccountant()
        accountant.compose(dp.SelfComposedDpEvent(event, n))
        assert privacy.epsilon(sigma, q, n, delta) == accountant.get_epsilon(delta)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_noise_multiplier_for_inverts_epsilon(accountant):
    q, steps, delta = 0.02, 500, 1e-5
    sigma = privacy.noise_multiplier_for(2.0, delta, q, steps, accountant)
    assert privacy.epsilon(sigma, q, steps, delta, accountant) <= 2.0
    assert privacy.epsilon(sigma / 1.01, q, steps, delta, accountant) > 2.0


def test_noise_multiplier_for_a_loose_target_is_the_smallest_sigma_above_the_floor():
    """A loose epsilon over few steps: sigma below 0.5 is bisected (0.5 was once returned whenever it
    reached the target), and the floor 0.25 is returned when it already reaches it."""
    q, steps, delta = 0.01, 10, 1e-5
    sigma = privacy.noise_multiplier_for(14.8, delta, q, steps, "rdp")
    assert 0.25 < sigma < 0.5
    assert privacy.epsilon(sigma, q, steps, delta, "rdp") <= 14.8 < privacy.epsilon(sigma / 1.01, q, steps, delta, "rdp")
    assert privacy.noise_multiplier_for(1e4, delta, q, steps, "rdp") == 0.25


def test_accounting_edge_cases_and_errors():
    with pytest.raises(ValueError, match="accountant must be one of"):  # even with nothing to account
        privacy.epsilon_of([], 1e-5, accountant="prv")
    assert privacy.epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    assert privacy.epsilon(0.0, 0.1, 10, 1e-5) == float("inf")
    for kwargs, match in [(dict(sample_rate=1.5), "sample_rate"), (dict(delta=0.0), "delta"),
                          (dict(steps=2.5), "steps"), (dict(accountant="gdp"), "accountant")]:
        args = dict(noise_multiplier=1.0, sample_rate=0.1, steps=10, delta=1e-5) | kwargs
        with pytest.raises(ValueError, match=match):
            privacy.epsilon(**args)
    with pytest.raises(ValueError, match="sampling"):
        pn.DPSGD(1.0, sampling="uniform")


# ---------------------------------------------------------------- Poisson batches


def test_poisson_batches_have_the_inclusion_rate_and_count_overflows():
    n, q = 1000, 0.05
    bound = privacy.poisson_batch_bound(n, q)
    assert 50 + 6 * np.sqrt(50 * 0.95) <= bound <= 2 * 50 + 60
    keys = jax.random.split(jax.random.key(0), 400)
    batches = jax.vmap(lambda k: privacy.poisson_batch(k, n, q, bound))(keys)
    sizes = np.asarray(batches.weight.sum(axis=1))
    np.testing.assert_allclose(sizes.mean(), n * q, rtol=0.03)  # 400 draws: sd of the mean ~0.35
    np.testing.assert_allclose(sizes.var(), n * q * (1 - q), rtol=0.25)
    counts = np.zeros(n)
    for index, weight in zip(np.asarray(batches.rows), np.asarray(batches.weight)):
        counts[index[weight > 0]] += 1
        assert len(set(index[weight > 0])) == int(weight.sum())  # no example twice in a batch
    np.testing.assert_allclose(counts.mean() / 400, q, rtol=0.03)
    assert int(batches.overflow.sum()) == 0
    tiny = privacy.poisson_batch(jax.random.key(1), n, q, 10)
    assert int(tiny.overflow) > 0 and float(tiny.weight.sum()) == 10


def _net_case(kind):
    k1, k2 = jax.random.split(jax.random.key(3))
    if kind == "dense":
        net = pn.mlp([5, 4, 3])
        x, y, shape = jax.random.normal(k1, (6, 5)), jnp.array([0, 1, 2, 0, 1, 2]), 5
    elif kind == "conv":
        net = pn.Sequential([pn.Conv2D(2, 3), pn.ReLU(), pn.GlobalAvgPool2D(), pn.Dense(3), pn.Softmax()])
        x, y, shape = jax.random.normal(k1, (6, 5, 5, 1)), jnp.array([0, 1, 2, 0, 1, 2]), (5, 5, 1)
    elif kind == "attention":
        net = pn.Sequential([pn.Dense(4), pn.LayerNorm(), pn.MultiHeadAttention(2, causal=True), pn.Dense(3),
                             pn.Softmax()])
        x, y, shape = jax.random.normal(k1, (6, 3, 2)), jax.random.randint(k2, (6, 3), 0, 3), (3, 2)
    elif kind == "embedding":
        net = pn.gpt(vocab_size=7, context=4, layers=1, heads=2, features=4)
        x = jax.random.randint(k1, (6, 4), 0, 7)
        y, shape = jnp.roll(x, -1, 1), (4,)
    elif kind == "recurrent":
        net = pn.Sequential([pn.LSTM(3), pn.GRU(3), pn.Dense(3), pn.Softmax()])
        x, y, shape = jax.random.normal(k1, (6, 3, 2)), jax.random.randint(k2, (6, 3), 0, 3), (3, 2)
    elif kind == "llama":  # SwiGLU, RoPE and grouped-query attention, a logits model
        net = pn.llama(vocab_size=7, context=4, layers=1, heads=2, features=4, kv_heads=1)
        x = jax.random.randint(k1, (6, 4), 0, 7)
        y, shape = jnp.roll(x, -1, 1), (4,)
    else:  # a layer with only init, forward, backward: the generic path
        net = pn.Sequential([Gain(), pn.Dense(3), pn.Softmax()])
        x, y, shape = jax.random.normal(k1, (6, 5)), jnp.array([0, 1, 2, 0, 1, 2]), 5
    params, state = pn.init(net, jax.random.key(0), in_shape=shape, dtype=jnp.float64)
    x = x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return net, params, state, x, y


@dataclasses.dataclass(frozen=True)
class Gain:
    def init(self, key, in_shape, dtype=None):
        return {"g": jnp.linspace(0.5, 1.5, in_shape[-1] if isinstance(in_shape, tuple) else in_shape)}, {}, \
            in_shape

    def forward(self, params, state, x, train=False, key=None):
        return jnp.tanh(x * params["g"]), state, (x, jnp.tanh(x * params["g"]))

    def backward(self, params, cache, dy):
        x, t = cache
        da = dy * (1 - t * t)
        return {"g": jnp.sum(da * x, axis=0)}, da * params["g"]


@pytest.mark.parametrize("features,shape", [(3, (4,)), (5, (3, 4)), (9, (1, 8))])
def test_dense_one_pass_pieces_are_the_per_example_gradients(features, shape):
    """Rows; positions with dW_i formed once (in * out <= 2 T (in + out)); positions with the Gram ghost
    norm and the backward of the rescaled dy (wider than that): the norms, dx and sum_i w_i g_i."""
    layer = pn.Dense(features)
    params, _, out = layer.init(jax.random.key(0), shape, jnp.float64)
    x = jax.random.normal(jax.random.key(1), (3, *shape), jnp.float64)
    dy = jax.random.normal(jax.random.key(2), (3, *out), jnp.float64)
    w = jnp.array([0.5, 1.0, 0.25])
    sq, dx, weighted_sum = pn.layers.base.sq_norms_and_weighted_sum(layer, params, x, dy)
    grads = pn.layers.base.generic_per_example_backward(layer, params, x, dy)[0]
    np.testing.assert_allclose(sq, sum(jnp.sum(g.reshape(3, -1) ** 2, 1) for g in grads.values()), rtol=1e-12)
    np.testing.assert_allclose(dx, layer.backward(params, x, dy)[1], rtol=1e-12)
    chex.assert_trees_all_close(weighted_sum(w), {k: jnp.tensordot(w, g, axes=1) for k, g in grads.items()},
                                rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["dense", "generic", *(pytest.param(kind, marks=pytest.mark.slow) for kind in
                                                         ("conv", "attention", "embedding", "recurrent", "llama"))])
def test_one_pass_clipping_equals_two_pass_and_autodiff(kind):
    net, params, state, x, y = _net_case(kind)
    per = jax.vmap(lambda xi, yi: jax.grad(lambda p: pn.loss(net, p, state, xi[None], yi[None])[0])(params))(x, y)
    norms = jnp.sqrt(sum(jnp.sum(g.reshape(6, -1) ** 2, 1) for g in jax.tree_util.tree_leaves(per)))
    clip = float(jnp.median(norms))
    weight = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    factor = jnp.minimum(1.0, clip / norms) * weight
    expected = 4.5  # the expected batch size divides the sum
    ref = jax.tree_util.tree_map(lambda g: jnp.sum(g * factor.reshape((-1,) + (1,) * (g.ndim - 1)), 0) / expected,
                                 per)
    got = {}
    for one_pass in (True, False):
        _, got[one_pass], _ = pn.clipped_value_and_grad(net, params, state, x, y, clip_norm=clip, weight=weight,
                                                        expected_batch_size=expected, one_pass=one_pass)
        chex.assert_trees_all_close(got[one_pass], ref, rtol=1e-10, atol=1e-13)
    # the unweighted mean too, and masked examples contribute nothing whatever they hold
    _, plain, _ = pn.clipped_value_and_grad(net, params, state, x, y, clip_norm=clip)
    plain_ref = jax.tree_util.tree_map(
        lambda g: jnp.mean(g * jnp.minimum(1.0, clip / norms).reshape((-1,) + (1,) * (g.ndim - 1)), 0), per)
    chex.assert_trees_all_close(plain, plain_ref, rtol=1e-10, atol=1e-13)
    other = x.at[1].set(x[4]) if kind in ("embedding", "llama") else x.at[1].multiply(7.0)
    _, moved, _ = pn.clipped_value_and_grad(net, params, state, other, y, clip_norm=clip, weight=weight,
                                            expected_batch_size=expected)
    chex.assert_trees_all_close(moved, got[True], rtol=1e-12, atol=1e-15)


def test_the_noise_is_divided_by_the_expected_batch_size():
    net = pn.mlp([5, 100, 3])
    params, state = pn.init(net, jax.random.key(0), dtype=jnp.float64)
    x, y = jax.random.normal(jax.random.key(1), (6, 5), jnp.float64), jnp.arange(6) % 3
    weight = jnp.ones(6)
    kw = dict(clip_norm=0.5, weight=weight, expected_batch_size=3.0)
    _, quiet, _ = pn.clipped_value_and_grad(net, params, state, x, y, **kw)
    _, noisy, _ = pn.clipped_value_and_grad(net, params, state, x, y, noise_multiplier=2.0,
                                            noise_key=jax.random.key(5), **kw)
    noise = jnp.concatenate([jnp.ravel(a - b) for a, b in zip(jax.tree_util.tree_leaves(noisy),
                                                               jax.tree_util.tree_leaves(quiet))])
    np.testing.assert_allclose(jnp.std(noise), 2.0 * 0.5 / 3.0, rtol=0.1)  # ~900 draws: sd 2.4%


def test_batchnorm_in_training_is_refused_under_dp():
    net = pn.mlp([4, 6, 3], batchnorm=True)
    params, state = pn.init(net, jax.random.key(0))
    x, y = jax.random.normal(jax.random.key(1), (8, 4)), jnp.arange(8) % 3
    with pytest.raises(ValueError, match=r"BatchNorm in training mode mixes the examples.*pn\.LayerNorm"):
        pn.clipped_value_and_grad(net, params, state, x, y, clip_norm=1.0, train=True)
    with pytest.raises(ValueError, match="GroupNorm"):
        pn.fit(net, pn.optim.sgd(0.1), (x, y), key=jax.random.key(0), epochs=1, batch_size=4, dp=pn.DPSGD(1.0))
    pn.clipped_value_and_grad(net, params, state, x, y, clip_norm=1.0, train=False)  # evaluation mode: fine


def test_fit_records_epsilon_and_poisson_training_learns():
    data = pn.datasets.digits()
    net = pn.mlp([64, 32, 10])
    dp = pn.DPSGD(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5, accountant="rdp")
    n, bs = data.x_train.shape[0], 64
    result = pn.fit(net, pn.optim.adam(3e-3), (data.x_train, data.y_train), key=jax.random.key(0), epochs=3,
                    batch_size=bs, dp=dp, validation=(data.x_test, data.y_test))
    steps = n // bs
    expected = [privacy.epsilon(1.0, bs / n, steps * e, 1e-5, "rdp") for e in (1, 2, 3)]
    np.testing.assert_allclose(result.history["epsilon"], expected, rtol=1e-12)
    np.testing.assert_array_equal(result.history["poisson_overflow"], 0)
    assert result.history["val_accuracy"][-1] > 0.5
    shuffled = pn.fit(net, pn.optim.adam(3e-3), (data.x_train, data.y_train), key=jax.random.key(0), epochs=1,
                      batch_size=bs, dp=dataclasses.replace(dp, sampling="shuffle"))
    assert "epsilon" not in shuffled.history  # no accounting exists for shuffled batches


# ---------------------------------------------------------------- hardening: DP meets the rest of the library


@dataclasses.dataclass(frozen=True)
class KeyRecorder(pn.Layer):
    """Identity that records the key its forward is given (through jax.debug.callback: inside scans too)."""

    seen: list = dataclasses.field(default_factory=list, hash=False, compare=False)

    def init(self, key, in_shape, dtype=None):
        return {}, {}, pn.layers.base.as_shape(in_shape)

    def forward(self, params, state, x, train=False, key=None):
        if key is not None:
            jax.debug.callback(lambda k: self.seen.append(tuple(np.asarray(k).ravel())), jax.random.key_data(key))
        return x, state, None

    def backward(self, params, cache, dy):
        return {}, dy


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_dp_noise_draws_from_no_key_the_forward_draws_from(monkeypatch, chunk_size):
    """Defect: dp_sgd drew the noise from fold_in(key, 2), which is Sequential's key for layer 2 (and
    mean_in_chunks' key for chunk 2): the noise shared random bits with the dropout masks."""
    from purenet import noise
    from purenet.training.gradients import dp_sgd

    recorders = [KeyRecorder() for _ in range(4)]
    net = pn.Sequential([pn.Dense(4), recorders[0], recorders[1], pn.Dropout(0.2), recorders[2],
                         pn.Sequential([recorders[3], pn.Dense(3)]), pn.Softmax()])
    params, state = pn.init(net, jax.random.key(0), in_shape=5)
    x, y = jax.random.normal(jax.random.key(1), (6, 5)), jnp.arange(6) % 3
    noise_keys = []
    original = noise.standard_normal_like

    def recording(tree, key):  # the key add_gaussian is given, and the two it splits into
        for k in (key, *jax.random.split(key)):
            noise_keys.append(tuple(np.asarray(jax.random.key_data(k)).ravel()))
        return original(tree, key)

    monkeypatch.setattr(noise, "standard_normal_like", recording)
    fn = dp_sgd(net, pn.DPSGD(1.0, noise_multiplier=1.0, chunk_size=chunk_size))
    for step_key in jax.random.split(jax.random.key(7), 3):
        fn(params, state, x, y, step_key)
    jax.effects_barrier()
    forward_keys = {k for r in recorders for k in r.seen}
    assert len(forward_keys) >= 4 * 3 and len(noise_keys) == 3 * 3
    assert not forward_keys & set(noise_keys)


def test_clipped_value_and_grad_refuses_the_same_key_for_noise_and_forward():
    net = pn.mlp([5, 4, 3], dropout=0.5)
    params, state = pn.init(net, jax.random.key(0))
    x, y = jax.random.normal(jax.random.key(1), (6, 5)), jnp.arange(6) % 3
    k = jax.random.key(3)
    with pytest.raises(ValueError, match="noise_key is the forward's key"):
        pn.clipped_value_and_grad(net, params, state, x, y, clip_norm=1.0, noise_multiplier=1.0, noise_key=k,
                                  train=True, key=k)


def test_dp_sgd_leaves_frozen_parameters_where_they_are():
    """Defect: the noise went to every leaf, so pn.Frozen weights moved under DP-SGD."""
    body = pn.Sequential([pn.Dense(8), pn.ReLU()])
    net = pn.Sequential([pn.Frozen(body), pn.Dense(10), pn.Softmax()])
    data = pn.datasets.digits()
    x, y = data.x_train[:128], data.y_train[:128]
    params, state = pn.init(net, jax.random.key(0), in_shape=64)
    result = pn.fit(net, pn.optim.sgd(0.1), (x, y), key=jax.random.key(1), epochs=2, batch_size=32,
                    params=params, state=state, dp=pn.DPSGD(1.0, noise_multiplier=2.0))
    chex.assert_trees_all_equal(result.params[0], params[0])
    assert not np.allclose(result.params[1]["W"], params[1]["W"])
    # the trainable leaves get the noise they would get in a network without the frozen part's leaves
    _, noisy, _ = pn.clipped_value_and_grad(net, params, state, x[:8], y[:8], clip_norm=1.0, noise_multiplier=1.0,
                                            noise_key=jax.random.key(4))
    _, quiet, _ = pn.clipped_value_and_grad(net, params, state, x[:8], y[:8], clip_norm=1.0)
    chex.assert_trees_all_equal(noisy[0], quiet[0])
    expected = pn.noise.add_gaussian(jax.tree_util.tree_leaves(quiet[1:]), jax.random.key(4), 1.0 / 8)
    chex.assert_trees_all_close(jax.tree_util.tree_leaves(noisy[1:]), expected, rtol=1e-6)


def test_clipped_value_and_grad_checks_marks_and_the_expected_batch_size():
    """Defect: any weight was accepted (a mark of 2 doubles an example's contribution to 2C) and any
    expected_batch_size (0 divides by zero, a negative one flips the gradient)."""
    net = pn.mlp([5, 4, 3])
    params, state = pn.init(net, jax.random.key(0), dtype=jnp.float64)
    x, y = jax.random.normal(jax.random.key(1), (6, 5), jnp.float64), jnp.arange(6) % 3
    marks = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    for bad in (marks.at[0].set(2.0), marks.at[0].set(0.5), marks.at[1].set(-1.0)):
        with pytest.raises(ValueError, match="0/1 marks"):
            pn.clipped_value_and_grad(net, params, state, x, y, clip_norm=0.1, weight=bad, expected_batch_size=4.0)
    for bad in (0.0, -4.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="expected_batch_size"):
            pn.clipped_value_and_grad(net, params, state, x, y, clip_norm=0.1, weight=marks, expected_batch_size=bad)
    # traced marks cannot be checked: they are clipped to [0, 1], so no example counts more than once
    fn = jax.jit(lambda w: pn.clipped_value_and_grad(net, params, state, x, y, clip_norm=0.1, weight=w,
                                                     expected_batch_size=4.0)[1])
    chex.assert_trees_all_close(fn(marks.at[0].set(2.0)), fn(marks), rtol=1e-14)
    bool_marks = marks.astype(bool)
    chex.assert_trees_all_close(
        pn.clipped_value_and_grad(net, params, state, x, y, clip_norm=0.1, weight=bool_marks,
                                  expected_batch_size=4.0)[1], fn(marks), rtol=1e-12)


def _digits_dp_case(n=256):
    data = pn.datasets.digits()
    return pn.mlp([64, 16, 10]), (data.x_train[:n], data.y_train[:n]), (data.x_test[:64], data.y_test[:64])


def test_mixing_augmentations_are_refused_under_dp():
    """Defect: augment=mixup was accepted with dp=: one example reaches two rows (sensitivity above C)."""
    net, data, _ = _digits_dp_case()
    mix = pn.augment.mixup(0.4, 10)
    assert pn.augment.mixes_examples(mix) and pn.augment.mixes_examples(pn.augment.compose(
        pn.augment.gaussian_noise(0.1), mix))
    assert not pn.augment.mixes_examples(pn.augment.gaussian_noise(0.1))
    for augment in (mix, pn.augment.compose(pn.augment.gaussian_noise(0.1), mix)):
        for sampling in ("poisson", "shuffle"):
            with pytest.raises(ValueError, match="mixes examples"):
                pn.fit(net, pn.optim.sgd(0.1), data, key=jax.random.key(0), epochs=1, batch_size=32,
                       augment=augment, dp=pn.DPSGD(1.0, 1.0, sampling=sampling))
    result = pn.fit(net, pn.optim.sgd(0.1), data, key=jax.random.key(0), epochs=1, batch_size=32,
                    augment=pn.augment.gaussian_noise(0.1), dp=pn.DPSGD(1.0, 1.0))
    assert np.isfinite(result.history["epsilon"]).all()


def test_a_resumed_dp_run_is_accounted_as_the_run_it_was(tmp_path):
    """Defect: resuming with another noise multiplier or batch size recomputed every epoch's epsilon
    from the new settings, rewriting the privacy history."""
    import dp_accounting

    net, data, _ = _digits_dp_case()
    path, n = str(tmp_path / "run.ckpt"), data[0].shape[0]
    kw = dict(key=jax.random.key(0), checkpoint=path)
    pn.fit(net, pn.optim.sgd(0.1), data, epochs=2, batch_size=32, dp=pn.DPSGD(1.0, 1.0, accountant="rdp"), **kw)
    resumed = pn.fit(net, pn.optim.sgd(0.1), data, epochs=4, batch_size=64, resume=True,
                     dp=pn.DPSGD(1.0, 2.0, accountant="rdp"), **kw)

    def rdp(phases):
        acc = dp_accounting.rdp.RdpAccountant()
        for sigma, b, epochs in phases:
            acc.compose(dp_accounting.PoissonSampledDpEvent(b / n, dp_accounting.GaussianDpEvent(sigma)),
                        epochs * (n // b))
        return acc.get_epsilon(1e-5)

    expected = [rdp([(1.0, 32, 1)]), rdp([(1.0, 32, 2)]), rdp([(1.0, 32, 2), (2.0, 64, 1)]),
                rdp([(1.0, 32, 2), (2.0, 64, 2)])]
    np.testing.assert_allclose(resumed.history["epsilon"], expected, rtol=1e-12)
    assert expected[-1] > rdp([(2.0, 64, 4)]) * 1.5  # what the history said before: the new settings throughout
    with pytest.raises(pn.CheckpointError, match="written by a DP-SGD run.*dp="):
        pn.fit(net, pn.optim.sgd(0.1), data, epochs=5, batch_size=64, resume=True, **kw)
    plain = str(tmp_path / "plain.ckpt")
    pn.fit(net, pn.optim.sgd(0.1), data, epochs=1, batch_size=32, key=jax.random.key(0), checkpoint=plain)
    with pytest.raises(pn.CheckpointError, match="without DP-SGD.*no privacy guarantee"):
        pn.fit(net, pn.optim.sgd(0.1), data, epochs=2, batch_size=32, key=jax.random.key(0), checkpoint=plain,
               resume=True, dp=pn.DPSGD(1.0, 1.0))


def test_epsilon_of_phases_equals_dp_accountings_composition():
    import dp_accounting

    phases = [(1.1, 0.02, 30), (1.1, 0.02, 20), (2.0, 0.05, 40)]
    event = dp_accounting.ComposedDpEvent([dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), t) for s, q, t in phases])
    pld = dp_accounting.pld.PLDAccountant()
    pld.compose(event)
    # consecutive phases of one setting compose as one self-composition (their PLD tails truncate
    # once, not twice: the same composition to 1e-10); distinct settings compose exactly as the accountant
    np.testing.assert_allclose(privacy.epsilon_of(phases, 1e-5), pld.get_epsilon(1e-5), rtol=1e-9)
    distinct = dp_accounting.pld.PLDAccountant()
    distinct.compose(dp_accounting.ComposedDpEvent(event.events[:1] + event.events[2:]))
    assert privacy.epsilon_of(phases[:1] + phases[2:], 1e-5) == distinct.get_epsilon(1e-5)
    rdp = dp_accounting.rdp.RdpAccountant()
    rdp.compose(event)
    np.testing.assert_allclose(privacy.epsilon_of(phases, 1e-5, "rdp"), rdp.get_epsilon(1e-5), rtol=1e-12)
    assert privacy.epsilon_of([(1.0, 0.1, 0), (0.0, 0.1, 0)], 1e-5) == 0.0
    assert privacy.epsilon_of([(1.0, 0.1, 3), (0.0, 0.1, 1)], 1e-5) == float("inf")


def test_the_accounting_is_checked_before_training_and_takes_numpy_and_jax_scalars(monkeypatch):
    """Defect: a numpy or jax scalar noise_multiplier passed DPSGD, trained every epoch, then killed fit
    in the accountant after the last epoch (the result lost)."""
    net, data, _ = _digits_dp_case()
    for sigma in (np.float32(1.25), jnp.float32(1.25), np.float64(1.25)):
        dp = pn.DPSGD(1.0, sigma, accountant="rdp")
        assert type(dp.noise_multiplier) is float and hash(dp)
        result = pn.fit(net, pn.optim.sgd(0.1), data, key=jax.random.key(0), epochs=1, batch_size=32, dp=dp)
        assert result.history["epsilon"][0] == privacy.epsilon(1.25, 32 / 256, 8, 1e-5, "rdp")
    assert privacy.epsilon(np.float32(1.25), np.float64(0.125), np.int64(8), 1e-5, "rdp") == \
        privacy.epsilon(1.25, 0.125, 8, 1e-5, "rdp")
    epochs_run = []
    monkeypatch.setattr(privacy, "epsilon", lambda *a, **k: (_ for _ in ()).throw(ValueError("accountant says no")))
    with pytest.raises(ValueError, match="accountant says no"):
        pn.fit(net, pn.optim.sgd(0.1), data, key=jax.random.key(0), epochs=3, batch_size=32,
               dp=pn.DPSGD(1.0, 1.0), progress=False, early_stopping=None,
               augment=lambda k, x, y: (epochs_run.append(1), (x, y))[1])
    assert not epochs_run  # refused before the first step was even traced


def test_the_privacy_helpers_check_their_arguments():
    """Defect: epsilon(noise_multiplier=inf) died inside dp_accounting; poisson_batch_bound checked nothing."""
    for kwargs, match in [(dict(noise_multiplier=float("inf")), "noise_multiplier"),
                          (dict(noise_multiplier=float("nan")), "noise_multiplier"),
                          (dict(noise_multiplier=True), "noise_multiplier"),
                          (dict(noise_multiplier="1.0"), "noise_multiplier"),
                          (dict(sample_rate=float("nan")), "sample_rate"), (dict(steps=True), "steps"),
                          (dict(steps=-1), "steps"), (dict(delta=1.0), "delta")]:
        with pytest.raises(ValueError, match=match):
            privacy.epsilon(**(dict(noise_multiplier=1.0, sample_rate=0.1, steps=10, delta=1e-5) | kwargs))
    with pytest.raises(ValueError, match="epsilon"):
        privacy.noise_multiplier_for(float("inf"), 1e-5, 0.1, 10)
    for args, match in [((0, 0.1), "n must be"), ((10.5, 0.1), "n must be"), ((100, 0.0), "sample_rate"),
                        ((100, 1.5), "sample_rate"), ((100, float("nan")), "sample_rate"),
                        ((100, 0.1, 0.0), "overflow"), ((100, 0.1, 1.0), "overflow")]:
        with pytest.raises(ValueError, match=match):
            privacy.poisson_batch_bound(*args)
    assert privacy.poisson_batch_bound(np.int64(1000), np.float32(0.05)) == privacy.poisson_batch_bound(1000, 0.05)


def test_dp_metrics_may_not_be_computed_on_training_examples():
    """Decision: the history's per-epoch metrics are private (post-processing of the DP params) only on
    data that are not training data; a probe holding training examples is refused under dp=."""
    net, data, validation = _digits_dp_case()
    for option in ("validation", "diagnostics", "statistics"):
        with pytest.raises(ValueError, match=f"{option}= holds 16 of the training examples"):
            pn.fit(net, pn.optim.sgd(0.1), data, key=jax.random.key(0), epochs=1, batch_size=32,
                   dp=pn.DPSGD(1.0, 1.0), **{option: (data[0][:16], data[1][:16])})
    result = pn.fit(net, pn.optim.sgd(0.1), data, key=jax.random.key(0), epochs=1, batch_size=32,
                    dp=pn.DPSGD(1.0, 1.0), validation=validation, diagnostics=validation)
    assert {"epsilon", "val_loss", "update_ratio"} <= set(result.history)
