"""Gradient statistics (pn.stats) against their vmap(jax.grad) definitions, and K-FAC."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import purenet as pn
from purenet.testing import compare_trees, net_cases, relative_error
from tests.conftest import scaled


def per_example_reference(net, params, state, x, y, loss, l2=0.0):
    """Each example's own gradient by jax.vmap(jax.grad), flattened: (n, params)."""
    def one(xi, yi):
        return jax.grad(lambda p: pn.loss(net, p, state, xi[None], yi[None], loss=loss, l2=l2)[0])(params)

    grads = jax.vmap(one)(x, y)
    leaves = jax.tree_util.tree_leaves(grads)
    flat = jnp.concatenate([g.reshape(x.shape[0], -1) for g in leaves], axis=1) if leaves else jnp.zeros((x.shape[0], 0))
    return grads, flat


def check_statistics(case):
    """Every statistic against its vmap(jax.grad) definition, all in one jitted program per network
    (one compile instead of one per operation and shape)."""
    params, state, x, y = case.data()
    net, loss, n, l2 = case.net, case.loss, case.batch, case.l2
    rev = (x[::-1], y[::-1])  # a second batch: the same examples in another order

    @jax.jit
    def compute(params, x, y):
        grads, flat = per_example_reference(net, params, state, x, y, loss)
        ours = {"fisher": pn.stats.fisher_diagonal(net, params, state, x, y, loss=loss),
                "gram": pn.stats.gradient_gram(net, params, state, (x, y), rev, loss=loss)}
        refs = {"fisher": jax.tree_util.tree_map(lambda g: jnp.mean(g * g, axis=0), grads),
                "gram": flat @ flat[::-1].T}
        if n >= 2:
            ours["noise"] = pn.stats.gradient_noise(net, params, state, x, y, loss=loss, l2=l2)
            decay = jax.tree_util.tree_leaves(pn.losses.l2_backward(params, l2, pn.decay_mask(net, params)))  # g_i + l2 W, as per_example_grads
            flat_l2 = flat + jnp.concatenate([jnp.reshape(d, -1) for d in decay])[None] if decay else flat
            mean = jnp.mean(flat_l2, axis=0)
            refs["noise"] = (jnp.sum(mean ** 2), jnp.mean(jnp.sum(flat_l2 ** 2, axis=1)),
                             jnp.sum(jnp.var(flat_l2, axis=0, ddof=1)))
        return ours, refs

    ours, refs = compute(params, x, y)
    assert max(compare_trees(ours["fisher"], refs["fisher"]).values(), default=0.0) <= 1e-10
    assert relative_error(ours["gram"], refs["gram"]) <= 1e-10
    if n >= 2:
        noise, (g2, mean_sq, trace) = ours["noise"], refs["noise"]
        assert relative_error(noise.grad_sq_norm, g2) <= 1e-10
        assert relative_error(noise.mean_sq_norm, mean_sq) <= 1e-10
        # tr(S) is a difference of two sums of squares: its rounding scales with mean_i |g_i|^2
        assert abs(noise.trace_cov - trace) <= 1e-10 * max(float(mean_sq), 1e-300)
        if float(g2) > 1e-6 * float(mean_sq):
            np.testing.assert_allclose(noise.b_simple, trace / g2, rtol=1e-6)


@settings(max_examples=scaled(6))
@given(net_cases(max_depth=2))
def test_statistics_equal_vmap_of_grad_on_mlps(case):
    check_statistics(case)


@settings(max_examples=scaled(6))
@given(net_cases(max_depth=2, compose=True, sequences=True))
def test_statistics_equal_vmap_of_grad_through_residual_parallel_norms_and_sequences(case):
    check_statistics(case)


@settings(max_examples=scaled(3))
@given(net_cases(max_depth=2, images=True, batchnorm=True))
def test_statistics_equal_vmap_of_grad_on_cnns(case):
    check_statistics(case)


def test_statistics_jit_and_fallback_agree():
    """Under jit, and for a layer lacking the identities (no structure: only its own per_example_backward),
    the same numbers."""
    def strip(layer):
        own = {k: getattr(layer, k) for k in ("init", "forward", "backward")}
        own["per_example_backward"] = staticmethod(lambda p, c, d: pn.layers.base.per_example_backward(layer, p, c, d))
        return type("Bare", (), own)()

    dense = pn.Dense(4)
    bare = strip(dense)
    net, bare_net = (pn.Sequential([d, pn.Tanh(), pn.Dense(3), pn.Softmax()], in_shape=(2, 5)) for d in (dense, bare))
    params, state = pn.init(net, jax.random.key(0))
    x, y = jax.random.normal(jax.random.key(1), (6, 2, 5)), jnp.arange(12).reshape(6, 2) % 3
    for fn in (pn.stats.fisher_diagonal, lambda *a: pn.stats.gradient_gram(*a[:3], a[3:], (a[3][:2], a[4][:2]))):
        eager = fn(net, params, state, x, y)
        jitted = jax.jit(fn, static_argnums=0)(net, params, state, x, y)
        fallback = fn(bare_net, params, state, x, y)
        assert max(compare_trees(jitted, eager).values()) <= 1e-12
        assert max(compare_trees(fallback, eager).values()) <= 1e-12
    assert pn.stats.kfac_factors(bare_net, params, state, x, y)[0] is None  # no factors without the method


def test_noise_scale_needs_two_examples_and_unbiased_option():
    net = pn.mlp([3, 4, 2])
    params, state = pn.init(net, jax.random.key(0))
    with pytest.raises(ValueError, match="at least 2 examples"):
        pn.stats.gradient_noise_scale(net, params, state, jnp.ones((1, 3)), jnp.zeros(1, jnp.int32))
    x, y = jax.random.normal(jax.random.key(1), (8, 3)), jnp.arange(8) % 2
    parts = pn.stats.gradient_noise(net, params, state, x, y)
    unbiased = pn.stats.gradient_noise_scale(net, params, state, x, y, unbiased=True)
    np.testing.assert_allclose(unbiased, parts.trace_cov / (parts.grad_sq_norm - parts.trace_cov / 8), rtol=1e-12)


# ---------------------------------------------------------------- K-FAC factors


def first_layer_reference(net, params, state, x, y, loss):
    """(a, dy) of the first layer from their definitions: its bias-augmented input rows (patches for
    Conv2D) and N dL/d(its output) by autodiff through the rest of the network."""
    first, rest = net.layers[0], pn.Sequential(net.layers[1:])
    out, _, _ = first.forward(params[0], state[0], x)
    dy = jax.grad(lambda o: pn.loss(rest, params[1:], state[1:], o, y, loss=loss)[0])(out) * x.shape[0]
    if isinstance(first, pn.Conv2D):  # each output pixel's patch, as autodiff sees it: d y[t, 0] / d W[..., 0]
        jac = jax.jacobian(lambda W: first.forward({**params[0], "W": W}, state[0], x)[0][..., 0])(params[0]["W"])
        h = jac[..., 0].reshape(*out.shape[:3], -1)
    else:
        h = x
    h = h.reshape(-1, h.shape[-1])
    return jnp.concatenate([h, jnp.ones((h.shape[0], 1))], axis=1), dy.reshape(-1, dy.shape[-1])


@pytest.mark.parametrize("first,in_shape", [
    (pn.Dense(4), (5,)),
    (pn.Dense(4), (3, 5)),  # positions
    (pn.Conv2D(3, 3, strides=2, implementation="im2col"), (5, 6, 2)),
    pytest.param(pn.Conv2D(3, (2, 3), dilation=2, padding="VALID", implementation="xla"), (5, 6, 2),
                 marks=pytest.mark.slow),
])
def test_kfac_factors_equal_their_definition(first, in_shape):
    net = pn.Sequential([first, pn.Tanh(), pn.Flatten(), pn.Dense(3), pn.Softmax()], in_shape=in_shape)
    params, state = pn.init(net, jax.random.key(0))
    x, y = jax.random.normal(jax.random.key(1), (7, *in_shape)), jnp.arange(7) % 3
    a, dy = first_layer_reference(net, params, state, x, y, "cross_entropy")
    factors = pn.stats.kfac_factors(net, params, state, x, y)
    assert relative_error(factors[0].A, a.T @ a / a.shape[0]) <= 1e-10
    assert relative_error(factors[0].G, dy.T @ dy / 7) <= 1e-10
    assert factors[1] is None and factors[4] is None
    value, grads, both, _ = pn.stats.kfac_value_and_grad(net, params, state, x, y, l2=0.1)
    v_ref, g_ref, _ = pn.value_and_grad(net, params, state, x, y, l2=0.1)
    assert max(compare_trees(grads, g_ref).values()) <= 1e-10
    np.testing.assert_allclose(value, v_ref, rtol=1e-12)


def test_kronecker_product_of_the_factors_is_the_fisher_for_one_example():
    """One example of one position: F = vec(g) vec(g)^T = (a a^T) (x) (dy dy^T) = A (x) G exactly."""
    net = pn.mlp([4, 3, 2])
    params, state = pn.init(net, jax.random.key(0))
    x, y = jax.random.normal(jax.random.key(1), (1, 4)), jnp.array([1])
    grads, _ = per_example_reference(net, params, state, x, y, "cross_entropy")
    for i in (0, 2):
        g = jnp.concatenate([grads[i]["W"][0], grads[i]["b"][0][None]], axis=0).reshape(-1)  # [W; b], row-major
        f = pn.stats.kfac_factors(net, params, state, x, y)[i]
        assert relative_error(jnp.kron(f.A, f.G), jnp.outer(g, g)) <= 1e-10


def test_kfac_step_is_the_damped_kronecker_solve():
    net = pn.mlp([3, 4, 2])
    params, state = pn.init(net, jax.random.key(0))
    x, y = jax.random.normal(jax.random.key(1), (16, 3)), jnp.arange(16) % 2
    opt = pn.optim.chain(pn.optim.scale_by_kfac(net, damping=0.01, ema=0.9, inverse_every=1), pn.optim.sgd(0.5))
    opt_state = opt.init(params)
    _, grads, factors, _ = pn.stats.kfac_value_and_grad(net, params, state, x, y)
    new = opt.step(opt_state, grads, factors=factors)
    for i in (0, 2):
        f = factors[i]
        pi = jnp.sqrt((jnp.trace(f.A) / f.A.shape[0]) / (jnp.trace(f.G) / f.G.shape[0]))
        a = f.A + pi * 0.1 * jnp.eye(f.A.shape[0])
        g = f.G + 0.1 / pi * jnp.eye(f.G.shape[0])
        m = jnp.concatenate([grads[i]["W"], grads[i]["b"][None]], axis=0)
        step = jnp.linalg.solve(a, jnp.linalg.solve(g, m.T).T)
        assert relative_error(new.params[i]["W"], params[i]["W"] - 0.5 * step[:-1]) <= 1e-10
        assert relative_error(new.params[i]["b"], params[i]["b"] - 0.5 * step[-1]) <= 1e-10
    again = opt.step(new, grads, factors=factors)  # the running factors: ema of the same factors stays put
    chex_equal = jax.tree_util.tree_map(lambda u, v: float(jnp.max(jnp.abs(u - v))), again.slots[0].factors,
                                        new.slots[0].factors)
    assert max(jax.tree_util.tree_leaves(chex_equal)) <= 1e-12


def test_kfac_errors_name_the_problem():
    net = pn.mlp([3, 4, 2])
    params, _ = pn.init(net, jax.random.key(0))
    opt = pn.optim.kfac(net, 0.1)
    state = opt.init(params)
    with pytest.raises(TypeError, match="missing \\['factors'\\]"):
        opt.step(state, params)
    with pytest.raises(ValueError, match="do not match"):
        opt.step(state, params, factors=(None,))
    with pytest.raises(ValueError, match="damping"):
        pn.optim.kfac(net, 0.1, damping=0.0)
    with pytest.raises(ValueError, match="inverse_every"):
        pn.optim.kfac(net, 0.1, inverse_every=0)


def test_kfac_trains_the_digits_mlp_to_97_percent_with_fit_and_fit_records_the_noise_scale():
    data = pn.datasets.digits()
    net = pn.mlp([64, 128, 10])
    probe = (data.x_test[:256], data.y_test[:256])
    result = pn.fit(net, pn.optim.kfac(net, 0.1, damping=1.0, inverse_every=10), (data.x_train, data.y_train),
                    key=jax.random.key(0), epochs=6, batch_size=64, statistics=probe)
    accuracy = float(pn.metrics.accuracy(net, result.params, result.state, data.x_test, data.y_test))
    assert accuracy >= 0.97, accuracy
    assert result.history["noise_scale"].shape == (6,)
    last = pn.stats.gradient_noise_scale(net, result.params, result.state, *probe)
    np.testing.assert_allclose(result.history["noise_scale"][-1], last, rtol=1e-4)


# ---------------------------------------------------------------- memory


def temp_bytes(fn, *args):
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    if analysis is None:  # pragma: no cover - backends without the analysis
        pytest.skip("this backend reports no memory analysis")
    return analysis.temp_size_in_bytes


def test_statistics_take_far_less_memory_than_vmap_of_grad():
    net = pn.mlp([256, 256, 256, 10])
    params, state = pn.init(net, jax.random.key(0), dtype=jnp.float32)
    x, y = jnp.ones((256, 256), jnp.float32), jnp.zeros(256, jnp.int32)

    def per_example(p, x, y):
        return jax.vmap(lambda xi, yi: jax.grad(lambda q: pn.loss(net, q, state, xi[None], yi[None])[0])(p))(x, y)

    def fisher_ref(p, x, y):
        return jax.tree_util.tree_map(lambda g: jnp.mean(g * g, 0), per_example(p, x, y))

    reference = temp_bytes(fisher_ref, params, x, y)
    ours = temp_bytes(lambda p, x, y: pn.stats.fisher_diagonal(net, p, state, x, y), params, x, y)
    gram = temp_bytes(lambda p, x, y: pn.stats.gradient_gram(net, p, state, (x, y)), params, x, y)
    noise = temp_bytes(lambda p, x, y: pn.stats.gradient_noise_scale(net, p, state, x, y), params, x, y)
    assert max(ours, gram, noise) * 10 <= reference, (ours, gram, noise, reference)
