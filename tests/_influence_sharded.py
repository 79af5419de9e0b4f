"""Run by test_influence.py in a subprocess with 4 forced CPU devices: pn.influence on a mesh.

Every method's factors, pairwise scores and self-influence with the training
set's batches split over the mesh's data axis equal one device's in float64;
each check prints "ok <name>", any failure raises. Arguments name the checks
to run (mlp, cnn, mc, placement, divisibility; default all).
"""
import os
import sys

assert "--xla_force_host_platform_device_count=4" in os.environ.get("XLA_FLAGS", "")
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import numpy as np  # noqa: E402

import purenet as pn  # noqa: E402

assert jax.device_count() == 4, jax.devices()
METHODS = ("identity", "diagonal", "kfac", "ekfac")
only = set(sys.argv[1:])


def selected(name):
    return not only or name in only


def mlp_over_positions():
    """Dense-Tanh-Dense on T = 3 positions per example (the blocks' rows are examples x positions)."""
    net = pn.Sequential([pn.Dense(6), pn.Tanh(), pn.Dense(3), pn.Softmax()])
    params, state = pn.init(net, jax.random.key(0), (3, 4))
    rs = np.random.RandomState(0)
    return net, params, state, (rs.randn(40, 3, 4), rs.randint(0, 3, (40, 3))), (rs.randn(9, 3, 4),
                                                                                 rs.randint(0, 3, (9, 3)))


def cnn():
    """Conv(3x3, valid)-ReLU-Flatten-Dense on 4x4x1 images: more rows than features in every block, so
    no eigenvalue of A or G repeats (a repeated one leaves its eigenvectors free to differ)."""
    net = pn.Sequential([pn.Conv2D(2, 3, padding="VALID"), pn.ReLU(), pn.Flatten(), pn.Dense(3), pn.Softmax()])
    params, state = pn.init(net, jax.random.key(1), (4, 4, 1))
    rs = np.random.RandomState(1)
    return net, params, state, (rs.randn(30, 4, 4, 1), rs.randint(0, 3, 30)), (rs.randn(5, 4, 4, 1),
                                                                                rs.randint(0, 3, 5))


def close(got, want, rtol=1e-10):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-300)
    assert err <= rtol, err


def same_factors(a, b):
    """Equal blocks (eigenvectors up to their sign, which the eigendecomposition does not fix)."""
    assert str(a.method) == str(b.method) and int(a.examples) == int(b.examples)
    la, lb = jax.tree_util.tree_leaves_with_path(a.blocks), jax.tree_util.tree_leaves_with_path(b.blocks)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, u), (_, v) in zip(la, lb):
        if jax.tree_util.keystr(path).endswith(("q_a", "q_g")):
            u, v = np.abs(u), np.abs(v)
        close(u, v)
    return len(la)


def check_model(name, model, mesh, batch_size, methods=METHODS):
    net, params, state, train, queries = model()
    for method in methods:
        one = pn.influence.fit(net, params, state, train, method=method, batch_size=batch_size)
        many = pn.influence.fit(net, params, state, train, method=method, batch_size=batch_size, mesh=mesh)
        leaves = same_factors(many, one)
        assert leaves > 0 or method == "identity"
        kw = dict(batch_size=batch_size)  # kronfluence's heuristic damping
        close(pn.influence.scores(net, params, state, many, queries, train, mesh=mesh, **kw),
              pn.influence.scores(net, params, state, one, queries, train, **kw))
        close(pn.influence.self_influence(net, params, state, many, train, mesh=mesh, **kw),
              pn.influence.self_influence(net, params, state, one, train, **kw))
    print("ok", name, flush=True)


data_mesh = pn.distributed.data_mesh()  # 4 devices on one "data" axis
if selected("mlp"):
    check_model("mlp", mlp_over_positions, data_mesh, 8)  # 5 batches, the last padded
if selected("cnn"):
    check_model("cnn", cnn, pn.distributed.mesh({"data": 2, "model": 2}), 8, ("ekfac",))  # rows split over "data"

net, params, state, train, queries = mlp_over_positions()
if selected("mc"):  # the Monte Carlo Fisher: the same key draws the same labels on a mesh as on one device
    mc = dict(method="ekfac", fisher="mc", key=jax.random.key(5), batch_size=8)
    same_factors(pn.influence.fit(net, params, state, train, mesh=data_mesh, **mc),
                 pn.influence.fit(net, params, state, train, **mc))
    print("ok mc", flush=True)

if selected("placement"):  # the rows really are split over the data axis, the rest replicated
    from purenet.analysis import influence

    seen, original = [], influence._pass

    def recording(params, state, x, y, mask, key, inputs, **kw):
        replicated = all(leaf.sharding.is_fully_replicated for leaf in jax.tree_util.tree_leaves((params, inputs)))
        seen.append((x.sharding.spec, [s.data.shape[0] for s in x.addressable_shards], replicated))
        return original(params, state, x, y, mask, key, inputs, **kw)

    influence._pass = recording
    factors = pn.influence.fit(net, params, state, train, method="ekfac", batch_size=8, mesh=data_mesh)
    pn.influence.scores(net, params, state, factors, queries, train, batch_size=8, mesh=data_mesh)
    influence._pass = original
    assert len(seen) == 5 + 5 + 2 + 5, len(seen)  # covariance, lambda, queries, train: batches of 8
    assert all(spec == jax.sharding.PartitionSpec("data") and rows == [2] * 4 and replicated
               for spec, rows, replicated in seen), seen
    print("ok placement", flush=True)

if selected("divisibility"):
    factors = pn.influence.fit(net, params, state, train, method="identity")
    try:
        pn.influence.scores(net, params, state, factors, queries, train, batch_size=6, mesh=data_mesh)
    except ValueError as e:
        assert "batch_size 6 is not divisible" in str(e), e
    else:
        raise AssertionError("a batch_size that does not divide over the mesh was accepted")
    print("ok divisibility", flush=True)
