"""pn.influence: influence functions against their definition and against kronfluence 1.0.1.

The definition: on tiny networks in float64, per-example gradients of each
example's own summed loss by `jax.grad`, each layer's input and output
gradient by autodiff, and the blocks' A, G, eigendecompositions, Lambda
and damping formed here in numpy from kronfluence's conventions (one block
per weight, a bias as an appended ones column, factors divided by examples x
positions, damping None = 0.1 x the mean of Lambda per block). Then
kronfluence itself on a PyTorch twin of the same MLP, CNN and sequence
model, in float64 throughout and with the empirical Fisher (nothing sampled).
"""
import copy
import logging
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import purenet as pn

METHODS = ("identity", "diagonal", "kfac", "ekfac")


# ---------------------------------------------------------------- the networks and data


def _mlp(seq=False):
    """A Dense-Tanh-Dense classifier on 4 features (rows, or T = 3 positions per example)."""
    net = pn.Sequential([pn.Dense(6), pn.Tanh(), pn.Dense(3), pn.Softmax()])
    in_shape = (3, 4) if seq else (4,)
    params, state = pn.init(net, jax.random.key(0), in_shape)
    rs = np.random.RandomState(0)
    lab = (3,) if seq else ()
    x, y = rs.randn(40, *in_shape), rs.randint(0, 3, (40, *lab))
    xq, yq = rs.randn(9, *in_shape), rs.randint(0, 3, (9, *lab))
    return net, params, state, (x, y), (xq, yq)


def _cnn():
    """Conv(pad 1)-ReLU-Conv(stride 2, valid)-Tanh-Flatten-Dense on 6x6x2 images."""
    net = pn.Sequential([pn.Conv2D(4, 3, padding=1), pn.ReLU(), pn.Conv2D(3, 3, strides=2, padding="VALID"),
                         pn.Tanh(), pn.Flatten(), pn.Dense(3), pn.Softmax()])
    params, state = pn.init(net, jax.random.key(1), (6, 6, 2))
    rs = np.random.RandomState(0)
    x, y = rs.randn(40, 6, 6, 2), rs.randint(0, 3, 40)
    xq, yq = rs.randn(9, 6, 6, 2), rs.randint(0, 3, 9)
    return net, params, state, (x, y), (xq, yq)


@partial(jax.jit, static_argnums=0)
def _per_example_grads(net, params, state, x, y):
    """Each example's own summed loss's gradient, by jax.grad (pn.loss averages over positions: times T)."""
    positions = int(np.prod(np.shape(y)[1:]))

    def own(p, xi, yi):
        return positions * pn.loss(net, p, state, xi[None], yi[None])[0]
    return jax.vmap(jax.grad(own), in_axes=(None, 0, 0))(params, x, y)


def _flat(grads, keep=None):
    """(n, P): the per-example gradients' leaves side by side (those `keep(path)` accepts)."""
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    return np.concatenate([np.reshape(g, (g.shape[0], -1)) for path, g in leaves
                           if keep is None or keep(jax.tree_util.keystr(path))], axis=1)


# ---------------------------------------------------------------- against the definition


def _mlp_rows(params, x, y):
    """Per layer (a_i with the ones column, g_i = d(example i's summed loss)/d(pre-activation)), by autodiff;
    rows (n, T, d)."""
    x = jnp.asarray(x).reshape(x.shape[0], -1, x.shape[-1])
    y = jnp.asarray(y).reshape(y.shape[0], -1)
    (p1, _, p2, _) = params

    def summed(e1, e2, xi, yi):
        z1 = xi @ p1["W"] + p1["b"] + e1
        z2 = jnp.tanh(z1) @ p2["W"] + p2["b"] + e2
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(z2), yi[:, None], axis=1))

    t = x.shape[1]
    g1, g2 = jax.vmap(jax.grad(summed, argnums=(0, 1)), in_axes=(None, None, 0, 0))(
        jnp.zeros((t, 6)), jnp.zeros((t, 3)), x, y)
    h = jnp.tanh(x @ p1["W"] + p1["b"])
    ones = jnp.ones(x.shape[:2] + (1,))
    return [(np.concatenate([x, ones], -1), np.asarray(g1)), (np.concatenate([h, ones], -1), np.asarray(g2))]


def _definition(method, net, params, state, train, queries, damping):
    """scores and self-influence of the MLP formed here from autodiff and the definitions."""
    def blocks(x, y):
        grads = _per_example_grads(net, params, state, x, y)
        return [np.concatenate([np.asarray(grads[i]["W"]), np.asarray(grads[i]["b"])[:, None]], axis=1)
                for i in (0, 2)]

    dw_train, dw_query = blocks(*train), blocks(*queries)
    rows = _mlp_rows(params, *train)
    out_q = np.zeros((queries[0].shape[0], train[0].shape[0]))
    out_self = np.zeros(train[0].shape[0])
    for (a, g), dwt, dwq in zip(rows, dw_train, dw_query):
        # the rows' per-example products are autodiff's per-example gradients
        np.testing.assert_allclose(np.einsum("nti,ntj->nij", a, g), dwt, rtol=1e-12, atol=1e-12)
        a2, g2 = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
        A, G = a2.T @ a2 / len(a2), g2.T @ g2 / len(g2)
        ea, qa = np.linalg.eigh(A)
        eg, qg = np.linalg.eigh(G)
        n = dwt.shape[0]
        rot = lambda d: np.einsum("ai,nab,bj->nij", qa, d, qg)  # noqa: E731
        back = lambda d: np.einsum("ai,nij,bj->nab", qa, d, qg)  # noqa: E731
        lam = {"diagonal": lambda: np.mean(dwt ** 2, axis=0), "kfac": lambda: np.outer(ea, eg),
               "ekfac": lambda: np.mean(rot(dwt) ** 2, axis=0), "identity": lambda: None}[method]()
        if method == "identity":
            pq, pt = dwq, dwt
        else:
            d = 0.1 * lam.mean() if damping is None else damping
            if method == "diagonal":
                pq, pt = dwq / (lam + d), dwt / (lam + d)
            else:
                pq, pt = back(rot(dwq) / (lam + d)), back(rot(dwt) / (lam + d))
        out_q += np.einsum("qij,nij->qn", pq, dwt)
        out_self += np.einsum("nij,nij->n", pt, dwt)
        assert n == train[0].shape[0]
    return out_q, out_self


@pytest.mark.parametrize("seq", [False, True], ids=["rows", "positions"])
@pytest.mark.parametrize("method", METHODS)
def test_against_the_definition(method, seq):
    """Every method's scores and self-influence equal the definitions formed from autodiff in float64
    (rows, and T = 3 positions per example: factors over N T rows, each example's loss summed)."""
    net, params, state, train, queries = _mlp(seq)
    factors = pn.influence.fit(net, params, state, train, method=method, batch_size=16)
    assert str(factors.method) == method and int(factors.examples) == 40
    for damping in (1e-3, None):
        want_q, want_self = _definition(method, net, params, state, train, queries, damping)
        got_q = pn.influence.scores(net, params, state, factors, queries, train, damping=damping, batch_size=16)
        got_self = pn.influence.self_influence(net, params, state, factors, train, damping=damping, batch_size=16)
        np.testing.assert_allclose(got_q, want_q, rtol=1e-10, atol=1e-10 * np.abs(want_q).max())
        np.testing.assert_allclose(got_self, want_self, rtol=1e-10, atol=1e-10 * np.abs(want_self).max())


def test_identity_is_the_gradient_dot_product_on_a_cnn():
    """"identity": scores = the per-example gradients' dot products (jax.grad), self = their squared norms."""
    net, params, state, train, queries = _cnn()
    factors = pn.influence.fit(net, params, state, train, method="identity", batch_size=16)
    gt = _flat(_per_example_grads(net, params, state, *train))
    gq = _flat(_per_example_grads(net, params, state, *queries))
    got = pn.influence.scores(net, params, state, factors, queries, train, batch_size=16)
    np.testing.assert_allclose(got, gq @ gt.T, rtol=1e-10, atol=1e-10 * np.abs(gq @ gt.T).max())
    np.testing.assert_allclose(pn.influence.self_influence(net, params, state, factors, train, batch_size=16),
                               np.sum(gt * gt, axis=1), rtol=1e-10)


def _attention_net():
    net = pn.Sequential([pn.Embedding(7, 4), pn.LayerNorm(), pn.MultiHeadAttention(2), pn.Frozen(pn.Dense(4)),
                         pn.Flatten(), pn.Dense(3), pn.Softmax()])
    params, state = pn.init(net, jax.random.key(2), (3,))
    rs = np.random.RandomState(3)
    return net, params, state, (rs.randint(0, 7, (12, 3)), rs.randint(0, 3, 12)), \
        (rs.randint(0, 7, (4, 3)), rs.randint(0, 3, 4))


def test_only_dense_and_conv_products_count():
    """As kronfluence tracks only Linear and Conv2d: a norm's gain and shift, an embedding's table and the
    layers inside pn.Frozen are left out of every score; attention's projections are covered."""
    net, params, state, train, queries = _attention_net()
    factors = pn.influence.fit(net, params, state, train, method="identity", batch_size=12)
    covered = [i for i, b in enumerate(factors.blocks) if b is not None]
    assert covered == [2, 5] and sorted(factors.blocks[2]) == ["Wk", "Wo", "Wq", "Wv"]

    def keep(path):
        return path.startswith("[2]") or path.startswith("[5]")
    gt = _flat(_per_example_grads(net, params, state, *train), keep)
    gq = _flat(_per_example_grads(net, params, state, *queries), keep)
    got = pn.influence.scores(net, params, state, factors, queries, train, batch_size=12)
    np.testing.assert_allclose(got, gq @ gt.T, rtol=1e-10, atol=1e-10 * np.abs(gq @ gt.T).max())


@pytest.mark.slow
def test_attention_through_every_pass():
    """EK-FAC on attention's projections (Wq, Wk, Wv sharing A over the positions, each its own G)."""
    net, params, state, train, _ = _attention_net()
    f = pn.influence.fit(net, params, state, train, method="ekfac", batch_size=5)
    s = pn.influence.scores(net, params, state, f, train, train, batch_size=5)
    np.testing.assert_allclose(np.diag(s), pn.influence.self_influence(net, params, state, f, train, batch_size=5),
                               rtol=1e-9)
    assert s.shape == (12, 12) and np.all(np.isfinite(s))
    assert f.blocks[2]["Wq"].q_a.shape == (5, 5) and f.blocks[2]["Wq"].lam.shape == (5, 4)


# ---------------------------------------------------------------- streaming, jit, checkpoints, float32


def test_batches_and_chunks_do_not_change_the_scores():
    """fit's batches and scores' chunks (the last padded and masked) change nothing but rounding."""
    net, params, state, train, queries = _mlp(seq=True)
    many = pn.influence.fit(net, params, state, train, method="ekfac", batch_size=16)  # 16 + 16 + 8 of 16
    one = pn.influence.fit(net, params, state, train, method="ekfac", batch_size=40)
    for a, b in zip(jax.tree_util.tree_leaves(one.blocks), jax.tree_util.tree_leaves(many.blocks)):
        np.testing.assert_allclose(jnp.abs(a), jnp.abs(b), rtol=1e-9, atol=1e-12)  # eigenvectors up to sign
    whole = pn.influence.scores(net, params, state, one, queries, train, batch_size=40)
    chunked = pn.influence.scores(net, params, state, many, queries, train, batch_size=16)
    np.testing.assert_allclose(chunked, whole, rtol=1e-9, atol=1e-11 * np.abs(whole).max())
    np.testing.assert_allclose(pn.influence.self_influence(net, params, state, many, train, batch_size=16),
                               np.diag(pn.influence.scores(net, params, state, many, train, train, batch_size=16)),
                               rtol=1e-10)


def test_jit_and_no_jit_agree():
    net, params, state, train, queries = _mlp()
    factors = pn.influence.fit(net, params, state, train, method="kfac", batch_size=16)
    jitted = pn.influence.scores(net, params, state, factors, queries, train, batch_size=16)
    with jax.disable_jit():
        eager_factors = pn.influence.fit(net, params, state, train, method="kfac", batch_size=16)
        eager = pn.influence.scores(net, params, state, eager_factors, queries, train, batch_size=16)
    np.testing.assert_allclose(eager, jitted, rtol=1e-10, atol=1e-10 * np.abs(jitted).max())


def test_factors_checkpoint_with_pn_save(tmp_path):
    net, params, state, train, queries = _mlp()
    factors = pn.influence.fit(net, params, state, train, method="kfac", batch_size=16)
    path = pn.save(tmp_path / "factors.ckpt", factors)
    loaded = pn.load(path)
    assert isinstance(loaded, pn.influence.Factors) and isinstance(loaded.blocks[0]["W"], pn.influence.Block)
    np.testing.assert_array_equal(pn.influence.scores(net, params, state, loaded, queries, train),
                                  pn.influence.scores(net, params, state, factors, queries, train))


def test_float32():
    """float32 parameters give float32 scores near the float64 ones (the eigendecomposition runs in float64)."""
    net, params, state, train, queries = _mlp()
    p32 = jax.tree_util.tree_map(lambda t: t.astype(jnp.float32), params)
    t32 = (train[0].astype(np.float32), train[1])
    q32 = (queries[0].astype(np.float32), queries[1])
    f32 = pn.influence.fit(net, p32, state, t32, method="ekfac", batch_size=16)
    s32 = pn.influence.scores(net, p32, state, f32, q32, t32, batch_size=16)
    s64 = pn.influence.scores(net, params, state, pn.influence.fit(net, params, state, train, batch_size=16),
                              queries, train, batch_size=16)
    assert s32.dtype == jnp.float32
    np.testing.assert_allclose(s32, s64, rtol=1e-3, atol=1e-4 * np.abs(s64).max())


def test_monte_carlo_fisher():
    """fisher="mc": labels drawn from the model (a key required); the same key gives the same factors."""
    net, params, state, train, queries = _mlp()
    with pytest.raises(ValueError, match="key"):
        pn.influence.fit(net, params, state, train, fisher="mc")
    a = pn.influence.fit(net, params, state, train, fisher="mc", key=jax.random.key(4), batch_size=16)
    b = pn.influence.fit(net, params, state, train, fisher="mc", key=jax.random.key(4), batch_size=16)
    e = pn.influence.fit(net, params, state, train, batch_size=16)
    assert str(a.fisher) == "mc"
    sa, sb = (pn.influence.scores(net, params, state, f, queries, train, batch_size=16) for f in (a, b))
    np.testing.assert_array_equal(sa, sb)
    assert np.all(np.isfinite(sa))
    assert not np.allclose(a.blocks[2]["W"].lam, e.blocks[2]["W"].lam)


def test_bad_input_is_named():
    net, params, state, train, queries = _mlp()
    fit, scores = pn.influence.fit, pn.influence.scores
    with pytest.raises(ValueError, match="method"):
        fit(net, params, state, train, method="lissa")
    with pytest.raises(ValueError, match="fisher"):
        fit(net, params, state, train, fisher="exact")
    with pytest.raises(ValueError, match="batch_size"):
        fit(net, params, state, train, batch_size=0)
    with pytest.raises(ValueError, match="examples"):
        fit(net, params, state, (train[0], train[1][:5]))
    with pytest.raises(ValueError, match="pair"):
        fit(net, params, state, train[0])
    with pytest.raises(ValueError, match="dense or convolution"):
        fit(pn.Sequential([pn.LayerNorm(), pn.Softmax()]), *pn.init(pn.Sequential([pn.LayerNorm(), pn.Softmax()]),
                                                                   jax.random.key(0), (3,)), train)
    factors = fit(net, params, state, train, method="diagonal", batch_size=16)
    with pytest.raises(ValueError, match="damping"):
        scores(net, params, state, factors, queries, train, damping=-1.0)
    with pytest.raises(TypeError, match="Factors"):
        scores(net, params, state, factors.blocks, queries, train)
    wider = pn.Sequential([pn.Dense(7), pn.Tanh(), pn.Dense(3), pn.Softmax()])
    wp, ws = pn.init(wider, jax.random.key(0), (4,))
    with pytest.raises(ValueError, match="shape"):
        scores(wider, wp, ws, factors, queries, train)
    deeper = pn.Sequential([pn.Dense(6), pn.Tanh(), pn.Dense(6), pn.Tanh(), pn.Dense(3), pn.Softmax()])
    dp, ds = pn.init(deeper, jax.random.key(0), (4,))
    with pytest.raises(ValueError, match="not fitted on this network"):
        scores(deeper, dp, ds, factors, queries, train)
    with pytest.raises(ValueError, match="q_a"):
        scores(net, params, state, factors._replace(method="ekfac"), queries, train)
    own = pn.Loss(pn.losses.cross_entropy, pn.losses.cross_entropy_backward)  # through the Softmax, unfused
    custom = fit(net, params, state, train, loss=own, method="identity")
    with pytest.raises(ValueError, match="loss="):
        scores(net, params, state, custom, queries, train)
    np.testing.assert_allclose(
        scores(net, params, state, custom, queries, train, loss=own, batch_size=16),
        scores(net, params, state, fit(net, params, state, train, method="identity"), queries, train, batch_size=16),
        rtol=1e-10)


# ---------------------------------------------------------------- against kronfluence 1.0.1


def _kronfluence_scores(tmp_path, model, train, queries, method, dampings):
    """kronfluence's pairwise and self-influence scores for each damping, float64 throughout, empirical Fisher."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("kronfluence")
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Summed(Task):
        """Each batch's loss summed over its examples (and positions): kronfluence's convention."""

        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

    f64 = torch.float64
    task = Summed()
    model = prepare_model(copy.deepcopy(model), task)
    analyzer = Analyzer("purenet", model, task, cpu=True, disable_tqdm=True, output_dir=str(tmp_path),
                        log_level=logging.WARNING)
    factor_args = FactorArguments(strategy=method, use_empirical_fisher=True, activation_covariance_dtype=f64,
                                  gradient_covariance_dtype=f64, eigendecomposition_dtype=f64,
                                  per_sample_gradient_dtype=f64, lambda_dtype=f64)
    data = TensorDataset(torch.tensor(train[0]), torch.tensor(train[1]))
    query_data = TensorDataset(torch.tensor(queries[0]), torch.tensor(queries[1]))
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's GradScaler deprecation, inside kronfluence
        analyzer.fit_all_factors("factors", data, per_device_batch_size=16, factor_args=factor_args,
                                 overwrite_output_dir=True)
        for i, damping in enumerate(dampings):
            score_args = ScoreArguments(damping_factor=damping, per_sample_gradient_dtype=f64,
                                        precondition_dtype=f64, score_dtype=f64, query_gradient_svd_dtype=f64)
            analyzer.compute_pairwise_scores(f"pairwise{i}", "factors", query_data, data,
                                             per_device_query_batch_size=9, per_device_train_batch_size=40,
                                             score_args=score_args, overwrite_output_dir=True)
            analyzer.compute_self_scores(f"self{i}", "factors", data, per_device_train_batch_size=40,
                                         score_args=score_args, overwrite_output_dir=True)
            out.append((analyzer.load_pairwise_scores(f"pairwise{i}")["all_modules"].numpy(),
                        analyzer.load_self_scores(f"self{i}")["all_modules"].numpy()))
    return out


def _twin(kind, params):
    """The PyTorch twin of _mlp / _cnn with the same weights (Linear's weight is W^T; Conv2d's is
    W (kh, kw, C, F) as (F, C, kh, kw)); images NHWC in, as purenet's."""
    import torch
    from torch import nn

    def dense(p):
        layer = nn.Linear(*p["W"].shape).double()
        with torch.no_grad():
            layer.weight.copy_(torch.tensor(np.asarray(p["W"]).T))
            layer.bias.copy_(torch.tensor(np.asarray(p["b"])))
        return layer

    def conv(p, **kw):
        w = np.asarray(p["W"])
        layer = nn.Conv2d(w.shape[2], w.shape[3], w.shape[:2], **kw).double()
        with torch.no_grad():
            layer.weight.copy_(torch.tensor(w.transpose(3, 2, 0, 1)))
            layer.bias.copy_(torch.tensor(np.asarray(p["b"])))
        return layer

    if kind in ("mlp", "positions"):
        return nn.Sequential(dense(params[0]), nn.Tanh(), dense(params[2]))

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.fc = conv(params[0], padding=1), conv(params[2], stride=2), dense(params[5])

        def forward(self, x):
            h = torch.tanh(self.c2(torch.relu(self.c1(x.permute(0, 3, 1, 2)))))
            return self.fc(h.permute(0, 2, 3, 1).reshape(x.shape[0], -1))
    return Twin()


# The default run: EK-FAC on the MLP with kronfluence's heuristic damping (~7 s, a third of it importing
# torch and kronfluence). Both dampings for every method on the MLP, the CNN and the MLP over positions
# are slow (5-10 s each). In the default run the definition tests cover every method with both dampings
# (rows and positions), and test_identity_is_the_gradient_dot_product_on_a_cnn the CNN's rows (patches).
LIGHT = [("mlp", "ekfac", (None,))]
SLOW = [(kind, method, (1e-3, None)) for kind in ("mlp", "cnn", "positions") for method in METHODS]


@pytest.mark.parametrize("kind,method,dampings", LIGHT + [pytest.param(*case, marks=pytest.mark.slow) for case in SLOW],
                         ids=lambda v: "+".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_matches_kronfluence(tmp_path, kind, method, dampings):
    """Pairwise scores and self-influence equal kronfluence 1.0.1's in float64 (empirical Fisher), with a
    fixed damping and with its heuristic (damping_factor=None): relative errors ~1e-14 (asserted 1e-10)."""
    net, params, state, train, queries = _cnn() if kind == "cnn" else _mlp(seq=kind == "positions")
    reference = _kronfluence_scores(tmp_path, _twin(kind, params), train, queries, method, dampings)
    factors = pn.influence.fit(net, params, state, train, method=method, batch_size=16)
    for damping, (want_q, want_self) in zip(dampings, reference):
        got_q = pn.influence.scores(net, params, state, factors, queries, train, damping=damping, batch_size=16)
        got_self = pn.influence.self_influence(net, params, state, factors, train, damping=damping, batch_size=16)
        assert np.abs(got_q - want_q).max() <= 1e-10 * np.abs(want_q).max()
        assert np.abs(got_self - want_self).max() <= 1e-10 * np.abs(want_self).max()
        np.testing.assert_allclose(got_q, want_q, rtol=1e-8, atol=1e-12 * np.abs(want_q).max())
        np.testing.assert_allclose(got_self, want_self, rtol=1e-10)


# ---------------------------------------------------------------- on a mesh, progress, checkpoints, top-k


# The MLP over positions, every method (~10 s: each stage compiles for one device and for the mesh), in the
# default run; the CNN on a 2 x 2 mesh (rows over "data" only) and the Monte Carlo Fisher in `-m slow`.
@pytest.mark.parametrize("checks", [("mlp", "placement", "divisibility"),
                                    pytest.param(("cnn", "mc"), marks=pytest.mark.slow)], ids="+".join)
def test_sharded_over_a_mesh_equals_one_device(checks):
    """On 4 CPU devices (a subprocess, so the rest of the suite keeps one): every method's factors, scores
    and self-influence with the batches split over the mesh's data axis equal one device's in float64."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = pn.xla_flags.environ(dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
                                    JAX_PLATFORMS="cpu"))
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("_influence_sharded.py")), *checks],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in checks:
        assert f"ok {name}" in out.stdout


def test_mesh_errors_name_the_fix():
    net, params, state, train, queries = _mlp()
    device = jax.devices()[0]
    two = pn.distributed.data_mesh([device, device])  # a mesh of 2 (the same device twice): batch_size must be even
    with pytest.raises(ValueError, match="batch_size 3 is not divisible by the 2 devices"):
        pn.influence.fit(net, params, state, train, batch_size=3, mesh=two)
    factors = pn.influence.fit(net, params, state, train, method="identity")
    with pytest.raises(ValueError, match="batch_size 3 is not divisible"):
        pn.influence.scores(net, params, state, factors, queries, train, batch_size=3, mesh=two)
    with pytest.raises(ValueError, match="batch_size 5 is not divisible"):
        pn.influence.self_influence(net, params, state, factors, train, batch_size=5, mesh=two)
    with pytest.raises(TypeError, match="jax.sharding.Mesh"):
        pn.influence.fit(net, params, state, train, mesh="data")


class _Counted:
    """x whose batches are counted as fit reads them; past `limit` reads it raises (an interrupted fit)."""

    def __init__(self, x, limit=None):
        self.x, self.limit, self.reads = x, limit, 0
        self.shape, self.ndim = x.shape, x.ndim

    def __getitem__(self, index):
        self.reads += 1
        if self.limit is not None and self.reads > self.limit:
            raise KeyboardInterrupt("interrupted")
        return self.x[index]


def test_checkpoint_resumes_without_recomputing_finished_stages(tmp_path, capsys):
    """An EK-FAC fit interrupted in its second pass resumes from the stage saved after the first: it reads
    the data once more (not twice) and gives bit-identical factors; a finished file reads no data."""
    net, params, state, train, queries = _mlp(seq=True)
    path = tmp_path / "factors.ckpt"
    want = pn.influence.fit(net, params, state, train, batch_size=16)  # 3 batches per pass
    x = _Counted(train[0], limit=4)  # the covariance pass (3 batches), then 1 batch of the lambda pass
    with pytest.raises(KeyboardInterrupt):
        pn.influence.fit(net, params, state, (x, train[1]), batch_size=16, checkpoint=path)
    partial_factors = pn.load(path)
    assert partial_factors.blocks[0]["W"].q_a is not None and partial_factors.blocks[0]["W"].lam is None

    x = _Counted(train[0])
    got = pn.influence.fit(net, params, state, (x, train[1]), batch_size=16, checkpoint=path, progress=True)
    assert x.reads == 3  # the lambda pass alone
    assert "covariance, eigendecomposition: read from the checkpoint" in capsys.readouterr().err
    for a, b in zip(jax.tree_util.tree_leaves(got.blocks), jax.tree_util.tree_leaves(want.blocks), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(pn.influence.scores(net, params, state, got, queries, train),
                                  pn.influence.scores(net, params, state, want, queries, train))

    x = _Counted(train[0])
    again = pn.influence.fit(net, params, state, (x, train[1]), batch_size=16, checkpoint=path)
    assert x.reads == 0
    for a, b in zip(jax.tree_util.tree_leaves(again.blocks), jax.tree_util.tree_leaves(want.blocks), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_mismatched_checkpoint_is_named_and_left_alone(tmp_path):
    net, params, state, train, _ = _mlp()
    path = tmp_path / "factors.ckpt"
    pn.influence.fit(net, params, state, train, method="kfac", batch_size=16, checkpoint=path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"method='kfac', this fit has method='ekfac'.*left as it is"):
        pn.influence.fit(net, params, state, train, method="ekfac", checkpoint=path)
    with pytest.raises(ValueError, match="fisher='empirical', this fit has fisher='mc'"):
        pn.influence.fit(net, params, state, train, method="kfac", fisher="mc", key=jax.random.key(0),
                         checkpoint=path)
    with pytest.raises(ValueError, match="examples=40, this fit has examples=39"):
        pn.influence.fit(net, params, state, (train[0][:39], train[1][:39]), method="kfac", checkpoint=path)
    wider = pn.Sequential([pn.Dense(7), pn.Tanh(), pn.Dense(3), pn.Softmax()])
    wp, ws = pn.init(wider, jax.random.key(0), (4,))
    with pytest.raises(ValueError, match="does not match this network.*shape"):
        pn.influence.fit(wider, wp, ws, train, method="kfac", checkpoint=path)
    assert path.read_bytes() == before
    other = pn.save(tmp_path / "params.ckpt", params)
    with pytest.raises(ValueError, match="holds a tuple, not the Factors"):
        pn.influence.fit(net, params, state, train, method="kfac", checkpoint=other)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read back as influence factors"):
        pn.influence.fit(net, params, state, train, method="kfac", checkpoint=tmp_path / "junk.ckpt")


def test_progress_prints_one_line_per_stage(capsys):
    net, params, state, train, queries = _mlp()
    factors = pn.influence.fit(net, params, state, train, batch_size=16, progress=True)
    pn.influence.scores(net, params, state, factors, queries, train, batch_size=16, progress=True)
    pn.influence.self_influence(net, params, state, factors, train, batch_size=16, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = [line.split("\r")[-1] for line in captured.err.strip("\n").split("\n")]  # each line as it was last drawn
    assert [line.split(":")[0] for line in lines] == [
        "fit covariance", "fit eigendecomposition", "fit lambda", "scores queries", "scores train",
        "self_influence data"]
    assert "3/3 batches" in lines[0] and "2/2 blocks" in lines[1] and "1/1 batches" in lines[3]
    assert all(line.endswith(" s") and "|########################|" in line for line in lines)
    pn.influence.fit(net, params, state, train, batch_size=16)
    assert capsys.readouterr().err == ""


def _top_k_reference(s, k):
    helpful = np.argsort(-s, axis=1, kind="stable")[:, :k]
    harmful = np.argsort(s, axis=1, kind="stable")[:, :k]
    return helpful, np.take_along_axis(s, helpful, 1), harmful, np.take_along_axis(s, harmful, 1)


def test_top_k_is_a_stable_sort_by_sign():
    """Helpful = the largest scores (kronfluence's sign: positive helps), harmful = the most negative; ties
    to the lower index, as numpy's stable argsort."""
    rs = np.random.RandomState(0)
    s = rs.randn(5, 12)
    s[1] = np.round(s[1])  # many ties
    s[2] = 0.0  # every score tied
    s[3, [2, 7, 9]] = s[3].max()  # the largest tied three times
    for k in (1, 4, 12):
        got = pn.influence.top_k(s, k)
        for g, w in zip(got, _top_k_reference(s, k), strict=True):
            assert g.shape == (5, k)
            np.testing.assert_array_equal(g, w)
    helpful, helpful_scores, harmful, harmful_scores = pn.influence.top_k(s, 3)
    np.testing.assert_array_equal(helpful[3], [2, 7, 9])
    np.testing.assert_array_equal(helpful[2], [0, 1, 2])
    assert np.all(np.diff(helpful_scores, axis=1) <= 0) and np.all(np.diff(harmful_scores, axis=1) >= 0)
    with pytest.raises(ValueError, match="k must be an int in \\[1, n_train = 12\\]"):
        pn.influence.top_k(s, 13)
    with pytest.raises(ValueError, match="k must be"):
        pn.influence.top_k(s, 0)
    with pytest.raises(ValueError, match="scores\\[None\\]"):
        pn.influence.top_k(s[0], 2)
    # on influence scores: the helpful rows are each query's largest scores
    net, params, state, train, queries = _mlp()
    f = pn.influence.fit(net, params, state, train, method="identity")
    scores = np.asarray(pn.influence.scores(net, params, state, f, queries, train))
    for g, w in zip(pn.influence.top_k(scores, 5), _top_k_reference(scores, 5), strict=True):
        np.testing.assert_array_equal(g, w)


# ---------------------------------------------------------------- a GPT


def _gpt(tied):
    net = pn.gpt(vocab_size=7, context=3, layers=1, heads=2, features=4, tie_embeddings=tied)
    params, state = pn.init(net, jax.random.key(6))
    rs = np.random.RandomState(6)
    return net, params, state, (rs.randint(0, 7, (10, 3)), rs.randint(0, 7, (10, 3))), \
        (rs.randint(0, 7, (3, 3)), rs.randint(0, 7, (3, 3)))


def _covered_on_a_gpt(path):
    """Every dense product of a GPT is covered (attention's Wq..Wo and their biases, the MLP's Dense, an
    untied head's W); its norms' gains and shifts, the positional table P and the token table E are not."""
    return not any(name in path for name in ("['beta']", "['gamma']", "['P']", "['E']"))


# ~20 s each (a GPT's passes compile once per stage and method): the untied one, which also covers the
# head's dense product, in the default run; the tied one (its table left out) in `-m slow`.
@pytest.mark.parametrize("tied", [pytest.param(True, marks=pytest.mark.slow), False], ids=["tied", "untied"])
def test_a_gpt_against_the_definition(tmp_path, tied):
    """A tiny pn.gpt, tied and untied: "identity" scores are the dot products of the covered parameters'
    per-example gradients (autodiff; the tied table E left out, as kronfluence leaves out whatever is not a
    Linear), "diagonal" with a fixed damping divides them by the mean squared gradient plus the damping;
    EK-FAC's scores are symmetric with its self-influence on their diagonal; the factors round-trip through
    pn.save."""
    net, params, state, train, queries = _gpt(tied)
    both = _flat(_per_example_grads(net, params, state, *(np.concatenate(v) for v in zip(train, queries))),
                 _covered_on_a_gpt)
    gt, gq = both[:10], both[10:]
    assert gt.shape[1] == 4 * (4 * 4 + 4) + (4 * 16 + 16) + (16 * 4 + 4) + (0 if tied else 4 * 7)
    scores, self_influence = pn.influence.scores, pn.influence.self_influence
    identity = pn.influence.fit(net, params, state, train, method="identity", batch_size=4)
    want = gq @ gt.T
    np.testing.assert_allclose(scores(net, params, state, identity, queries, train, batch_size=4), want,
                               rtol=1e-10, atol=1e-10 * np.abs(want).max())
    diagonal = pn.influence.fit(net, params, state, train, method="diagonal", batch_size=4)
    lam = np.mean(gt ** 2, axis=0)
    want = (gq / (lam + 1e-3)) @ gt.T
    np.testing.assert_allclose(scores(net, params, state, diagonal, queries, train, 1e-3, batch_size=4), want,
                               rtol=1e-10, atol=1e-10 * np.abs(want).max())
    ekfac = pn.influence.fit(net, params, state, train, batch_size=4)
    assert ("ends" in ekfac.blocks[0]) != tied  # the untied head's block {"head/W": Block} stands for the ends
    loaded = pn.load(pn.save(tmp_path / "gpt.ckpt", ekfac))
    s = scores(net, params, state, loaded, train, train, batch_size=4)
    np.testing.assert_allclose(s, s.T, rtol=1e-9, atol=1e-12 * np.abs(s).max())
    np.testing.assert_allclose(np.diag(s), self_influence(net, params, state, ekfac, train, batch_size=4), rtol=1e-9)
