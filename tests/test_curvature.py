"""Curvature as the literature defines it: GGN and Hessian diagonals, Monte-Carlo and exact K-FAC.

References, in float64: autodiff (the diagonal of J^T H J from `jax.jacobian`,
the diagonal of `jax.hessian` of `pn.loss`) and BackPACK 1.7 (KFLR, KFAC,
DiagGGNExact, DiagGGNMC, DiagHessian and their per-sample versions).
"""
import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

import purenet as pn
from purenet.analysis.kfac import kfac_eligible, layer_kfac_factors
from purenet.analysis import curvature
from purenet.testing import compare_trees
from purenet.network import loss_pass
from tests.conftest import scaled

torch = pytest.importorskip("torch")
backpack = pytest.importorskip("backpack")
from backpack import extensions as bpx  # noqa: E402

torch.set_default_dtype(torch.float64)

N = 5
ACTIVATIONS = [pn.Tanh(), pn.Sigmoid(), pn.GELU(), pn.GELU(approximate=True), pn.SiLU(), pn.ELU(0.7),
               pn.Softplus(), pn.ReLU(), pn.LeakyReLU(0.1)]
LOSSES = {"cross_entropy": pn.Softmax(), "mse": None, "binary_cross_entropy": pn.Sigmoid()}


def _targets(loss, key, n=N, k=3):
    if loss == "cross_entropy":
        return jax.random.randint(key, (n,), 0, k)
    if loss == "mse":
        return jax.random.normal(key, (n, k))
    return jax.random.bernoulli(key, 0.5, (n, k)).astype(jnp.float64)


def _autodiff_ggn(net, params, state, x, y, loss):
    """The diagonal of J^T H J, flat, from jax.jacobian of the output and jax.hessian of the loss."""
    flat, unravel = ravel_pytree(params)
    p = loss_pass(net, params, state, x, loss)
    J = jax.jit(jax.jacobian(lambda f: loss_pass(net, unravel(f), state, x, loss).out))(flat)
    J = J.reshape(p.out.size, -1)
    H = jax.hessian(lambda o: p.loss_fn.value(o, y))(p.out).reshape(p.out.size, p.out.size)
    return jnp.diag(J.T @ H @ J)


def _autodiff_hessian(net, params, state, x, y, loss):
    """The diagonal of jax.hessian of pn.loss, flat."""
    flat, unravel = ravel_pytree(params)
    return jnp.diag(jax.jit(jax.hessian(lambda f: pn.loss(net, unravel(f), state, x, y, loss=loss)[0]))(flat))


def _flat(tree):
    return ravel_pytree(tree)[0]


def _factors(tree):
    """The KFACFactors of a factor tree, in order."""
    is_f = lambda t: isinstance(t, pn.stats.KFACFactors)  # noqa: E731
    return [f for f in jax.tree_util.tree_leaves(tree, is_leaf=is_f) if is_f(f)]


def _rows_mean(tree):
    return jax.tree_util.tree_map(lambda t: jnp.mean(t, axis=0), tree)


@settings(max_examples=scaled(2))
@pytest.mark.slow
@given(activation=st.sampled_from(ACTIVATIONS), loss=st.sampled_from(sorted(LOSSES)),
       depth=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_ggn_and_hessian_diagonals_equal_autodiff(activation, loss, depth, seed):
    layers = [pn.Dense(4), activation] * depth + [pn.Dense(3)] + ([LOSSES[loss]] if LOSSES[loss] else [])
    net = pn.Sequential(layers)
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params, state = pn.init(net, k1, 3)
    x = jax.random.normal(k2, (N, 3))
    y = _targets(loss, k3)
    ggn_ref, hess_ref = _autodiff_ggn(net, params, state, x, y, loss), _autodiff_hessian(net, params, state, x, y, loss)
    ggn, hess, rows, ggn_rows = jax.jit(lambda p: (
        pn.stats.ggn_diagonal(net, p, state, x, y, loss=loss), pn.stats.hessian_diagonal(net, p, state, x, y, loss=loss),
        pn.stats.hessian_diagonal(net, p, state, x, y, loss=loss, per_example=True),
        pn.stats.ggn_diagonal(net, p, state, x, y, loss=loss, per_example=True)))(params)
    scale = float(jnp.max(jnp.abs(hess_ref))) + 1e-300
    np.testing.assert_allclose(_flat(ggn), ggn_ref, rtol=1e-10, atol=1e-12 * scale)
    np.testing.assert_allclose(_flat(hess), hess_ref, rtol=1e-10, atol=1e-12 * scale)
    # per example: rows whose mean is the batch's diagonal, and each row is example i's own
    np.testing.assert_allclose(_flat(_rows_mean(rows)), hess_ref, rtol=1e-10, atol=1e-12 * scale)
    one = pn.stats.hessian_diagonal(net, params, state, x[1:2], y[1:2], loss=loss)
    np.testing.assert_allclose(_flat(jax.tree_util.tree_map(lambda t: t[1], rows)), _flat(one), rtol=1e-10,
                               atol=1e-12 * scale)
    np.testing.assert_allclose(_flat(_rows_mean(ggn_rows)), ggn_ref, rtol=1e-10, atol=1e-12 * scale)


def test_ggn_of_any_network_with_positions_equals_autodiff():
    """A GPT (Residual blocks, attention, LayerNorm, tied ends; outputs (N, T, V)): the exact GGN
    takes T V columns through the one traversal."""
    net = pn.gpt(vocab_size=5, context=4, layers=1, heads=2, features=4)
    params, state = pn.init(net, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 4), 0, 5)
    ggn_ref = _autodiff_ggn(net, params, state, ids, ids, "cross_entropy")
    ggn = jax.jit(lambda p: pn.stats.ggn_diagonal(net, p, state, ids, ids))(params)
    np.testing.assert_allclose(_flat(ggn), ggn_ref, rtol=1e-10, atol=1e-14)


def test_mc_is_unbiased_for_the_exact_ggn():
    net = pn.Sequential([pn.Dense(4), pn.Tanh(), pn.Dense(3), pn.Softmax()])
    params, state = pn.init(net, jax.random.key(0), 3)
    x = jax.random.normal(jax.random.key(1), (N, 3))
    y = jnp.arange(N) % 3
    exact = _flat(pn.stats.ggn_diagonal(net, params, state, x, y))
    mc = _flat(jax.jit(lambda k: pn.stats.ggn_diagonal(net, params, state, x, y, fisher="mc", key=k,
                                                       samples=20000))(jax.random.key(2)))
    # 20000 draws: the relative standard error of an entry is below sqrt(2 / 20000) = 1%
    big = exact > 0.05 * jnp.max(exact)
    np.testing.assert_allclose(mc[big], exact[big], rtol=0.05)


def test_mc_columns_are_the_data_gradients_at_sampled_labels():
    """fisher="mc" with `samples` draws = the mean over the draws of the empirical statistic at
    those labels (drawn from the model: p for softmax), exactly."""
    net = pn.mlp([3, 4, 3], hidden="tanh")
    params, state = pn.init(net, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (N, 3))
    y = jnp.arange(N) % 3
    key = jax.random.key(7)
    labels = curvature.sample_targets(loss_pass(net, params, state, x, "cross_entropy"),
                                      jax.random.fold_in(key, 1), 3)
    mc = pn.stats.fisher_diagonal(net, params, state, x, y, fisher="mc", key=key, samples=3)
    emp = [pn.stats.fisher_diagonal(net, params, state, x, t) for t in labels]
    chex_mean = jax.tree_util.tree_map(lambda *t: sum(t) / 3, *emp)
    np.testing.assert_allclose(_flat(mc), _flat(chex_mean), rtol=1e-12)
    f_mc = _factors(pn.stats.kfac_factors(net, params, state, x, y, fisher="mc", key=key, samples=3))
    f_emp = [_factors(pn.stats.kfac_factors(net, params, state, x, t)) for t in labels]
    for k in range(2):
        np.testing.assert_allclose(f_mc[k].A, f_emp[0][k].A, rtol=1e-12)
        np.testing.assert_allclose(f_mc[k].G, sum(f[k].G for f in f_emp) / 3, rtol=1e-12)
    # the labels follow the model's distribution: their frequencies over many draws approach p
    many = curvature.sample_targets(loss_pass(net, params, state, x, "cross_entropy"), key, 20000)
    freq = jax.vmap(lambda c: jnp.mean(many == c, axis=0), out_axes=-1)(jnp.arange(3))
    np.testing.assert_allclose(freq, pn.forward(net, params, state, x)[0], atol=0.015)  # 4 sigma at 20k draws


def test_exact_kfac_output_factor_is_the_mean_loss_hessian():
    net = pn.mlp([3, 4, 3], hidden="relu")
    params, state = pn.init(net, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (N, 3))
    p = pn.forward(net, params, state, x)[0]
    G = _factors(pn.stats.kfac_factors(net, params, state, x, jnp.zeros(N, int), fisher="exact"))[-1].G
    np.testing.assert_allclose(G, jnp.mean(jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p), axis=0),
                               rtol=1e-12)


# ---------------------------------------------------------------- against BackPACK


def _torch_net(net, params):
    """The same network in PyTorch (NCHW), sharing the weights; returns the extended module."""
    mods = []
    for layer, p in zip(net.layers, params):
        if isinstance(layer, pn.Dense):
            m = torch.nn.Linear(*p["W"].shape)
            m.weight.data = torch.tensor(np.asarray(p["W"]).T.copy())
            m.bias.data = torch.tensor(np.asarray(p["b"]).copy())
        elif isinstance(layer, pn.Conv2D):
            kh, kw, cin, cout = p["W"].shape
            m = torch.nn.Conv2d(cin, cout, (kh, kw))
            m.weight.data = torch.tensor(np.asarray(p["W"]).transpose(3, 2, 0, 1).copy())
            m.bias.data = torch.tensor(np.asarray(p["b"]).copy())
        elif isinstance(layer, pn.Softmax):
            continue
        else:
            m = {pn.Tanh: torch.nn.Tanh, pn.Sigmoid: torch.nn.Sigmoid, pn.Flatten: torch.nn.Flatten,
                 pn.MaxPool2D: lambda: torch.nn.MaxPool2d(2)}[type(layer)]()
        mods.append(m)
    return backpack.extend(torch.nn.Sequential(*mods))


def _ours_like_torch(value):
    """Our (in, out) / (kh, kw, in, out) layout in torch's (out, in) / (out, in, kh, kw)."""
    v = np.asarray(value)
    return v.T if v.ndim == 2 else (v.transpose(3, 2, 0, 1) if v.ndim == 4 else v)


def _fresh_nchw(x):
    """NHWC -> NCHW with fresh C-order strides (BackPACK's DiagHessian views need them)."""
    return torch.tensor(np.asarray(x).transpose(0, 3, 1, 2).reshape(-1)).reshape(x.shape[0], x.shape[3],
                                                                             *x.shape[1:3])


def _backpack_run(tm, lossf, xt, yt, *extensions, seed=0):
    tm.zero_grad()
    torch.manual_seed(seed)
    with backpack.backpack(*extensions):
        lossf(tm(xt), yt).backward()
    return [p for p in tm.parameters()]


MLP = pn.Sequential([pn.Dense(5), pn.Sigmoid(), pn.Dense(4), pn.Tanh(), pn.Dense(3)])
CNN = pn.Sequential([pn.Conv2D(3, 3, padding="VALID"), pn.Sigmoid(), pn.MaxPool2D(2),
                     pn.Conv2D(4, 2, padding="VALID"), pn.Tanh(), pn.Flatten(), pn.Dense(3)])


@pytest.mark.parametrize("model, loss", [("mlp", "cross_entropy"), ("mlp", "mse"),
                                         pytest.param("cnn", "cross_entropy", marks=pytest.mark.slow)])
def test_against_backpack(model, loss):
    """Same weights in PyTorch. BackPACK's MSELoss(reduction="sum") is N times purenet's "mse" (a mean
    over examples); its per-sample quantities are each example's term of the batch loss, 1/N of
    example i's own loss (purenet's rows, which average to the batch's value)."""
    net = MLP if model == "mlp" else CNN
    in_shape = (6,) if model == "mlp" else (6, 6, 1)
    fused = pn.Sequential(list(net.layers) + [pn.Softmax()]) if loss == "cross_entropy" else net
    params, state = pn.init(fused, jax.random.key(0), in_shape)
    x = jax.random.normal(jax.random.key(1), (N, *in_shape))
    y = _targets(loss, jax.random.key(2))
    tm = _torch_net(fused, params)
    lossf = backpack.extend(torch.nn.CrossEntropyLoss() if loss == "cross_entropy"
                            else torch.nn.MSELoss(reduction="sum"))
    scale = 1.0 if loss == "cross_entropy" else 1.0 / N
    xt = torch.tensor(np.asarray(x)) if model == "mlp" else _fresh_nchw(x)
    yt = torch.tensor(np.asarray(y))
    ours_at = [i for i, layer in enumerate(fused.layers) if kfac_eligible(layer, params[i])]
    theirs = [m for m in tm if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]

    def check(ours, attr, factor, per_example=False):
        for i, m in zip(ours_at, theirs):
            for name, tp in (("W", m.weight), ("b", m.bias)):
                ref = getattr(tp, attr).numpy() * factor
                mine = np.asarray(ours[i][name])
                mine = np.stack([_ours_like_torch(r) for r in mine]) if per_example else _ours_like_torch(mine)
                np.testing.assert_allclose(mine, ref, rtol=1e-9, atol=1e-13 * np.abs(ref).max(), err_msg=attr)

    _backpack_run(tm, lossf, xt, yt, bpx.DiagGGNExact(), bpx.BatchDiagGGNExact(), bpx.DiagHessian(),
                  bpx.BatchDiagHessian(), bpx.KFLR())
    ours = jax.jit(lambda p: {
        "diag_ggn_exact": pn.stats.ggn_diagonal(fused, p, state, x, y, loss=loss),
        "diag_ggn_exact_batch": pn.stats.ggn_diagonal(fused, p, state, x, y, loss=loss, per_example=True),
        "diag_h": pn.stats.hessian_diagonal(fused, p, state, x, y, loss=loss),
        "diag_h_batch": pn.stats.hessian_diagonal(fused, p, state, x, y, loss=loss, per_example=True),
        "kflr": pn.stats.kfac_factors(fused, p, state, x, y, loss=loss, fisher="exact")})(params)
    for attr in ("diag_ggn_exact", "diag_ggn_exact_batch", "diag_h", "diag_h_batch"):
        rows = attr.endswith("_batch")
        check(ours[attr], attr, scale * N if rows else scale, per_example=rows)
    exact = ours["kflr"]
    for i, m in zip(ours_at, theirs):
        G_bp, A_bp = m.weight.kflr
        A = np.asarray(exact[i].A)[:-1, :-1]  # ours carries the bias row and column
        if isinstance(m, torch.nn.Linear):
            np.testing.assert_allclose(A, A_bp.numpy(), rtol=1e-10)
            np.testing.assert_allclose(exact[i].G, G_bp.numpy() * scale, rtol=1e-10, atol=1e-14)
        else:  # BackPACK sums A over the T output positions: T times KFC's mean (documented);
            # its patches are ordered (in, kh, kw), ours (kh, kw, in) like W.reshape(-1, out)
            cout, cin, kh, kw = m.weight.shape
            order = [(a * kw + b) * cin + c for c in range(cin) for a in range(kh) for b in range(kw)]
            positions = int(np.prod(_conv_out_hw(fused, params, x, i)))
            np.testing.assert_allclose(A[np.ix_(order, order)] * positions, A_bp.numpy(), rtol=1e-10)
    if loss == "cross_entropy":  # Monte Carlo: BackPACK's labels, drawn from torch's generator, reproduced
        i, m = ours_at[-1], theirs[-1]
        _backpack_run(tm, lossf, xt, yt, bpx.KFAC(mc_samples=1), seed=3)
        at_labels = pn.stats.kfac_factors(fused, params, state, x, _torch_labels(tm, xt, seed=3))
        np.testing.assert_allclose(at_labels[i].G, m.weight.kfac[0].numpy(), rtol=1e-10, atol=1e-14)
        _backpack_run(tm, lossf, xt, yt, bpx.DiagGGNMC(mc_samples=1), seed=4)
        check(pn.stats.fisher_diagonal(fused, params, state, x, _torch_labels(tm, xt, seed=4)), "diag_ggn_mc", 1.0)


def _torch_labels(tm, xt, seed):
    """The labels BackPACK's MC extensions draw after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return jnp.asarray(torch.distributions.Categorical(torch.softmax(tm(xt), 1)).sample(torch.Size([1]))[0])


def _conv_out_hw(net, params, x, i):
    h = x
    for layer, p in zip(net.layers[:i + 1], params[:i + 1]):
        h = layer.forward(p, {}, h)[0]
    return h.shape[1:3]


def test_curvature_errors_name_the_problem():
    x, y = jnp.ones((2, 3)), jnp.array([0, 1])
    for net, match in ((pn.Sequential([pn.Residual(pn.Dense(3)), pn.Dense(2), pn.Softmax()]), "chains"),
                       (pn.Sequential([pn.Dense(3), pn.LayerNorm(), pn.Dense(2), pn.Softmax()]), "second-order")):
        params, state = pn.init(net, jax.random.key(0), 3)
        with pytest.raises(ValueError, match=match):
            pn.stats.hessian_diagonal(net, params, state, x, y)
        pn.stats.ggn_diagonal(net, params, state, x, y)  # the GGN runs on any network
    net = pn.mlp([3, 2])
    params, state = pn.init(net, jax.random.key(0))
    huber = pn.Loss(lambda o, t: jnp.sum(o) / o.shape[0], lambda o, t: jnp.ones_like(o) / o.shape[0])
    with pytest.raises(ValueError, match="Hessian"):
        pn.stats.ggn_diagonal(net, params, state, x, jnp.ones((2, 2)), loss=huber)
    with pytest.raises(ValueError, match="key"):
        pn.stats.fisher_diagonal(net, params, state, x, y, fisher="mc")
    with pytest.raises(ValueError, match="fisher_diagonal"):
        pn.stats.ggn_diagonal(net, params, state, x, y, fisher="empirical")
    with pytest.raises(ValueError, match="fisher must be one of"):
        pn.stats.kfac_factors(net, params, state, x, y, fisher="true")
    with pytest.raises(ValueError, match="samples"):
        pn.stats.fisher_diagonal(net, params, state, x, y, fisher="mc", key=jax.random.key(0), samples=0)
    with pytest.raises(ValueError, match="factors_every"):
        pn.optim.kfac(net, 0.1, factors_every=0)


def test_kfac_optimizer_defaults_to_the_true_fisher_and_updates_factors_every_k_steps():
    from purenet.optim.kfac import KFACState
    from purenet.training.loop import build_step

    net = pn.mlp([3, 4, 3], hidden="tanh")
    params, state = pn.init(net, jax.random.key(0))
    assert pn.optim.kfac(net, 0.1).extra_options == {"fisher": "mc", "samples": 1, "factors_every": 1}
    opt = pn.optim.kfac(net, 0.1, factors_every=2, ema=0.5)
    step = jax.jit(build_step(net, opt))
    x = jax.random.normal(jax.random.key(1), (8, 3))
    y = jnp.arange(8) % 3
    carry, seen = (opt.init(params), state), []
    for i in range(4):
        carry, _ = step(carry, (x, y, jax.random.key(i)))
        seen.append(_factors(pn.optim.find_slot(carry[0], KFACState).factors)[0].G)
    # steps 0 and 2 fold new factors in; steps 1 and 3 keep them
    np.testing.assert_array_equal(seen[1], seen[0])
    np.testing.assert_array_equal(seen[3], seen[2])
    assert not np.allclose(seen[2], seen[1])
    # step 0's G is the MC G of the first batch with the step's sampling key
    k_grad = jax.random.split(jax.random.key(0))[0]
    first = _factors(pn.stats.kfac_factors(net, params, state, x, y, train=True, key=k_grad, fisher="mc"))[0]
    np.testing.assert_allclose(seen[0], first.G, rtol=1e-12)


@pytest.mark.slow
def test_attention_projections_get_kfac_factors_by_their_definition(tmp_path):
    """Wq, Wk, Wv, Wo are four Dense maps over the positions: A = E[a a^T] of their inputs (a = [x, 1]),
    G = (1/N) sum_{i,t} dz dz^T of dL/dz at their outputs, dz from autodiff of the attention math."""
    layer = pn.MultiHeadAttention(2)
    n, t, d = 3, 4, 4
    params, _, _ = layer.init(jax.random.key(0), (t, d))
    x = jax.random.normal(jax.random.key(1), (n, t, d))
    dy = jax.random.normal(jax.random.key(2), (n, t, d))

    def heads(z):
        return jnp.transpose(z.reshape(n, t, 2, d // 2), (0, 2, 1, 3))

    def attend(qkv):
        q, k, v = (heads(qkv[..., i * d:(i + 1) * d]) for i in range(3))
        p = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / jnp.sqrt(d / 2), axis=-1)
        return jnp.transpose(p @ v, (0, 2, 1, 3)).reshape(n, t, d)

    w = jnp.concatenate([params[f"W{c}"] for c in "qkv"], 1)
    qkv = x @ w + jnp.concatenate([params[f"b{c}"] for c in "qkv"])
    o = attend(qkv)
    y, _, cache = layer.forward(params, {}, x)
    np.testing.assert_allclose(y, o @ params["Wo"] + params["bo"], rtol=1e-12)  # the same layout
    dqkv = jax.grad(lambda z: jnp.sum((attend(z) @ params["Wo"]) * dy))(qkv)
    blocks, _ = layer_kfac_factors(layer, params, cache, dy)
    assert sorted(blocks.factors) == ["Wk|bk", "Wo|bo", "Wq|bq", "Wv|bv"]  # each weight with its bias

    def factors(inputs, grads):
        a = jnp.concatenate([inputs, jnp.ones((n, t, 1))], -1).reshape(-1, d + 1)
        g = grads.reshape(-1, grads.shape[-1])
        return a.T @ a / (n * t), g.T @ g / n

    for name, (inputs, grads) in {"Wq": (x, dqkv[..., :d]), "Wk": (x, dqkv[..., d:2 * d]),
                                  "Wv": (x, dqkv[..., 2 * d:]), "Wo": (o, dy)}.items():
        A, G = factors(inputs, grads)
        key = f"{name}|b{name[1]}"
        np.testing.assert_allclose(blocks.factors[key].A, A, rtol=1e-10, err_msg=name)
        np.testing.assert_allclose(blocks.factors[key].G, G, rtol=1e-10, atol=1e-14, err_msg=name)
    # the optimizer preconditions each projection with its own factors, and trains a GPT
    net = pn.gpt(vocab_size=11, context=8, layers=1, heads=2, features=8)
    gp, gs = pn.init(net, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (8, 8), 0, 11)
    result = pn.fit(net, pn.optim.kfac(net, 0.05), (ids, ids), key=jax.random.key(0), epochs=2, batch_size=8,
                    params=gp, state=gs)
    assert result.history["loss"][-1] < result.history["loss"][0]
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), result.params, gp)
    (att,) = [leaf.params for leaf in pn.layers.base.leaves(net, moved)
              if isinstance(leaf.layer, pn.MultiHeadAttention)]
    assert min(att[k] for k in ("Wq", "Wv", "Wo")) > 0
    pn.save(tmp_path / "kfac.pn", result.opt_state)  # the state with its KFACBlocks saves and loads
    back = pn.load(tmp_path / "kfac.pn")
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(result.opt_state)


def test_kfac_names_the_layers_whose_weights_it_leaves_on_the_plain_gradient():
    """K-FAC on pn.llama once left SwiGLU (two thirds of a block's weights) unpreconditioned without a
    word; now every layer that declares dense products is covered, and any weight left over is named."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # llama, an LSTM / GRU network: every weight preconditioned
        for net, shape in ((pn.llama(vocab_size=7, context=4, layers=1, heads=2, features=4), None),
                           (pn.Sequential([pn.LSTM(3), pn.GRU(2), pn.Dense(2), pn.Softmax()]), (3, 2))):
            pn.optim.kfac(net, 0.1).init(pn.init(net, jax.random.key(0), in_shape=shape)[0])
    untied = pn.gpt(vocab_size=7, context=4, layers=1, heads=2, features=4, tie_embeddings=False)
    with warnings.catch_warnings():  # GPT's untied head is a dense product of its ends: preconditioned too
        warnings.simplefilter("error")
        params, state = pn.init(untied, jax.random.key(0))
        ids = jax.random.randint(jax.random.key(1), (2, 4), 0, 7)
        result = pn.fit(untied, pn.optim.kfac(untied, 0.05), (ids, ids), params=params, state=state, epochs=3,
                        batch_size=2, key=jax.random.key(2))
    assert result.history["loss"][-1] < result.history["loss"][0]

    @dataclasses.dataclass(frozen=True)
    class Scaled(pn.Layer):  # a weight matrix, no structure declared: the generic path, no K-FAC
        roles = {"M": "weight"}

        def init(self, key, in_shape, dtype=None):
            return {"M": jnp.eye(in_shape[-1])}, {}, in_shape

        def forward(self, params, state, x, train=False, key=None):
            return x @ params["M"], state, x

        def backward(self, params, x, dy):
            return {"M": x.T @ dy}, dy @ params["M"].T

    custom = pn.Sequential([Scaled(), pn.Dense(2), pn.Softmax()])
    with pytest.warns(UserWarning, match=r"Scaled at \(0,\) \(\['M'\]\)"):
        pn.optim.kfac(custom, 0.1).init(pn.init(custom, jax.random.key(0), in_shape=3)[0])
    frozen = pn.Sequential([pn.Frozen(custom.layers[0]), pn.LayerNorm(), pn.Dense(2), pn.Softmax()])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # frozen layers and gains are nothing to precondition
        pn.optim.kfac(frozen, 0.1).init(pn.init(frozen, jax.random.key(0), in_shape=3)[0])


def test_a_loss_declares_its_hessian_root_and_sampling_and_the_curvature_reads_them():
    """fisher="exact" / "mc" ask the loss (`hessian_sqrt`, `sample`), never which function it is: a user's
    Loss that declares them gets the same GGN as the registered name; one that does not is named."""
    net = pn.Sequential([pn.Dense(3), pn.Tanh(), pn.Dense(2)])
    params, state = pn.init(net, jax.random.key(0), in_shape=4)
    x, y = jax.random.normal(jax.random.key(1), (5, 4)), jax.random.normal(jax.random.key(2), (5, 2))
    mine = pn.Loss(pn.losses.mse, pn.losses.mse_backward, name="my mse", targets="values",
                   hessian_sqrt=pn.losses.mse_hessian_sqrt, sample=pn.losses.mse_sample)
    ref = pn.stats.ggn_diagonal(net, params, state, x, y, loss="mse")
    assert max(compare_trees(pn.stats.ggn_diagonal(net, params, state, x, y, loss=mine), ref).values()) <= 1e-12
    key = jax.random.key(3)
    np.testing.assert_allclose(pn.stats.kfac_factors(net, params, state, x, y, loss=mine, fisher="mc", key=key)[0].G,
                               pn.stats.kfac_factors(net, params, state, x, y, loss="mse", fisher="mc", key=key)[0].G,
                               rtol=1e-12)
    bare = pn.Loss(pn.losses.mse, pn.losses.mse_backward, name="bare mse")
    with pytest.raises(ValueError, match=r"fisher='exact' needs the loss's Hessian square root.*bare mse"):
        pn.stats.ggn_diagonal(net, params, state, x, y, loss=bare)
    with pytest.raises(ValueError, match=r"fisher='mc' needs the loss's sampling.*bare mse"):
        pn.stats.fisher_diagonal(net, params, state, x, y, loss=bare, fisher="mc", key=key)
