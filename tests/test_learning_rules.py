"""pn.learning_rules: each rule's updates equal jax.grad of the plain network whose Dense / Conv2D layers are
`jax.custom_vjp` functions with that rule as their backward (float64); every weight gradient is backprop's
local formula for the dy the layer received; the fixed matrices stay fixed and survive a checkpoint; the
walks a rule does not serve are errors."""
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import purenet as pn
from purenet.layers.base import Wrapper

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

L = pn.learning_rules
BUILD = {
    "fa": L.feedback_alignment,
    "usf": L.sign_symmetry,
    "frsf": lambda net: L.sign_symmetry(net, magnitude="fixed_random"),
    "dfa": L.direct_feedback_alignment,
}
WEIGHTED = (pn.Dense, pn.Conv2D)


def _mlp():
    return pn.Sequential([pn.Dense(7), pn.LayerNorm(), pn.Tanh(), pn.Dense(6), pn.ReLU(), pn.Dropout(0.25),
                          pn.Dense(3), pn.Softmax()], in_shape=5)


def _cnn():  # the first Conv2D runs im2col on the CPU (2 channels), the second XLA's convolution (4)
    return pn.Sequential([pn.Conv2D(4, 3), pn.ReLU(), pn.MaxPool2D(2), pn.Conv2D(5, 3, padding="VALID"), pn.ReLU(),
                          pn.Flatten(), pn.Dense(3), pn.Softmax()], in_shape=(8, 8, 2))


def _data(net, n=4, seed=1):
    x = jax.random.normal(jax.random.key(seed), (n, *net.in_shape), jnp.float64)
    return x, jnp.arange(n) % 3


def _close(got, want, tol=1e-10):
    got, want = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        scale = max(float(jnp.max(jnp.abs(w))), 1e-12)
        assert float(jnp.max(jnp.abs(g - w))) <= tol * scale, (float(jnp.max(jnp.abs(g - w))), scale)


# ---------------------------------------------------------------- the reference: custom_vjp layers, autodiff


def _feedback_matrix(rule, layer, params, stored):
    """What the rule puts in place of W, written out here (uSF's scale: he_normal's sqrt(2 / fan_in))."""
    W = params["W"]
    if rule == "fa":
        return stored
    if rule == "frsf":
        return jnp.abs(stored) * jnp.sign(W)
    assert layer.initializer == "he_normal"
    return math.sqrt(2.0 / math.prod(W.shape[:-1])) * jnp.sign(W)


def _rule_function(block, dx_of):
    """The block's output as a custom_vjp function of (params, x): weight gradients by autodiff of its
    forward, dx = dx_of(params, x, dy)."""
    @jax.custom_vjp
    def f(params, x):
        return block.forward(params, {}, x)[0]

    def fwd(params, x):
        return f(params, x), (params, x)

    def bwd(res, dy):
        params, x = res
        (dparams,) = jax.vjp(lambda p: block.forward(p, {}, x)[0], params)[1](dy)
        return dparams, dx_of(params, x, dy)

    f.defvjp(fwd, bwd)
    return f


@dataclasses.dataclass(frozen=True, eq=False)
class _Ruled(Wrapper):
    block: Any
    dx_of: Any

    def init(self, key, in_shape, dtype=None):
        return self.block.init(key, in_shape, dtype=dtype)

    def forward(self, params, state, x, train=False, key=None):
        return _rule_function(self.block, self.dx_of)(params, x), state, None


def _output_error(net, params, state, x, y, loss, train, key, last):
    """e = dL/d(output of the last weight layer), by autodiff of the rest of the network's loss."""
    head = pn.Sequential(net.layers[:last + 1])
    z = pn.forward(head, params[:last + 1], state[:last + 1], x, train=train, key=key)[0]
    tail = pn.Sequential(net.layers[last + 1:])
    return jax.grad(lambda z: pn.loss(tail, params[last + 1:], state[last + 1:], z, y, loss=loss)[0])(z)


def _reference(rule, net, params, rule_state, x, y, loss="cross_entropy", l2=0.0, train=False, key=None):
    """jax.grad of the plain network's loss with every Dense / Conv2D a custom_vjp function whose backward is the
    rule."""
    state = pn.init(net, jax.random.key(0), dtype=jnp.float64)[1]
    at = [i for i, layer in enumerate(net.layers) if isinstance(layer, WEIGHTED)]
    e = _output_error(net, params, state, x, y, loss, train, key, at[-1]) if rule == "dfa" else None

    def dx_of(i, layer):
        stored = rule_state[i].get("B")
        if rule == "dfa":
            return lambda params, x, dy: (e.reshape(len(e), -1) @ stored).reshape(x.shape)
        return lambda params, x, dy: jax.vjp(
            lambda x: layer.forward({**params, "W": _feedback_matrix(rule, layer, params, stored)}, {}, x)[0],
            x)[1](dy)[0]
    ruled = pn.Sequential([_Ruled(layer, dx_of(i, layer)) if i in at else layer for i, layer in enumerate(net.layers)],
                          in_shape=net.in_shape)
    return jax.jit(jax.grad(lambda p: pn.loss(ruled, p, state, x, y, loss=loss, l2=l2, train=train, key=key)[0]))(
        params)


# jitted: one compilation instead of one per operation (the CNN's convolutions in float64 above all)
_value_and_grad = jax.jit(pn.value_and_grad, static_argnums=0, static_argnames=("loss", "train"))
_per_example_grads = jax.jit(pn.per_example_grads, static_argnums=0)


CASES = {"mlp": (_mlp, dict(train=True, key=jax.random.key(7), l2=0.05)), "cnn": (_cnn, {})}


@pytest.mark.parametrize("rule", BUILD)
@pytest.mark.parametrize("case", CASES)
def test_rule_updates_equal_autodiff_of_the_custom_vjp_network(rule, case):
    make, options = CASES[case]
    net = make()
    ruled = BUILD[rule](net)
    params, state = pn.init(ruled, jax.random.key(0), dtype=jnp.float64)
    _close(params, pn.init(net, jax.random.key(0), dtype=jnp.float64)[0], tol=0)  # the plain network's params
    x, y = _data(net)
    value, grads, _ = _value_and_grad(ruled, params, state, x, y, **options)  # a rule network is static for jit
    _close(value, pn.loss(net, params, pn.init(net, jax.random.key(0))[1], x, y, **options)[0])
    _close(grads, _reference(rule, net, params, state, x, y, **options))
    if (rule, case) == ("dfa", "mlp"):
        _close(pn.value_and_grad(ruled, params, state, x, y, **options)[1], grads)  # and eager


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_an_unfused_output_error_is_the_last_dense_layers_dy(rule):
    net = pn.mlp([5, 6, 4, 2], hidden="tanh", output="identity")
    ruled = BUILD[rule](net)
    params, state = pn.init(ruled, jax.random.key(0), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (4, 5))
    y = jax.random.normal(jax.random.key(2), (4, 2))
    _close(_value_and_grad(ruled, params, state, x, y, loss="mse")[1],
           _reference(rule, net, params, state, x, y, loss="mse"))


# ---------------------------------------------------------------- what each layer computes


def _local_weight_grads(layer, x, dy, params):
    """Backprop's weight gradients of the layer for the dy it received (autodiff of its forward)."""
    return jax.vjp(lambda p: layer.forward(p, {}, x)[0], params)[1](dy)[0]


@pytest.mark.parametrize("rule", BUILD)
def test_weight_gradients_are_local_and_records_show_the_feedback_sent(rule):
    net = _cnn()
    ruled = BUILD[rule](net)
    params, state = pn.init(ruled, jax.random.key(0), dtype=jnp.float64)
    x, y = _data(net)
    rec = pn.capture(ruled, params, state, x, y)
    at = [i for i, layer in enumerate(net.layers) if isinstance(layer, WEIGHTED)]
    e = rec.layers[(at[-1],)].dy
    for i in at:
        r, layer = rec.layers[(i,)], net.layers[i]
        _close(rec.grads[i], _local_weight_grads(layer, r.x, r.dy, params[i]))
        if isinstance(layer, pn.Dense):
            _close(rec.grads[i]["W"], r.x.T @ r.dy)
        if rule == "dfa":
            want = (e.reshape(len(e), -1) @ state[i]["B"]).reshape(r.x.shape)
        else:
            B = _feedback_matrix(rule, layer, params[i], state[i].get("B"))
            want = jax.vjp(lambda x: layer.forward({**params[i], "W": B}, {}, x)[0], r.x)[1](r.dy)[0]
        _close(r.dx, want)
        if i > 0:
            _close(rec.layers[(i - 1,)].dy, r.dx)  # what the layer below receives is the feedback sent
    _close(pn.input_grad(ruled, params, state, x, y), rec.layers[(0,)].dx)


def test_dense_feedback_is_dy_times_b_transposed_and_usf_scales_the_signs():
    net = pn.mlp([5, 6, 3])
    x, y = _data(net)
    fa, usf = L.feedback_alignment(net), L.sign_symmetry(net)
    params, state = pn.init(fa, jax.random.key(0), dtype=jnp.float64)
    r = pn.capture(fa, params, state, x, y).layers[(2,)]
    _close(r.dx, r.dy @ state[2]["B"].T)
    assert state[2]["B"].shape == params[2]["W"].shape
    assert not np.allclose(state[2]["B"], params[2]["W"]) and not np.allclose(state[0]["B"][:3, :3], state[2]["B"][:3, :3])
    r = pn.capture(usf, params, pn.init(usf, jax.random.key(0))[1], x, y).layers[(2,)]
    _close(r.dx, r.dy @ (math.sqrt(2 / 6) * np.sign(params[2]["W"])).T)  # he_normal's std, sqrt(2 / fan_in)
    assert L.init_std("xavier_uniform", (3, 3, 4, 8)) == pytest.approx(math.sqrt(2 / (36 + 72)))
    r = pn.capture(L.sign_symmetry(net, scale=0.5), params, pn.init(usf, jax.random.key(0))[1], x, y).layers[(2,)]
    _close(r.dx, r.dy @ (0.5 * np.sign(params[2]["W"])).T)


def test_hooks_act_on_the_rule_and_dfa_ignores_the_dy_from_above():
    net = pn.mlp([5, 7, 6, 3])
    x, y = _data(net)
    for rule in ("fa", "dfa"):
        ruled = BUILD[rule](net)
        params, state = pn.init(ruled, jax.random.key(0), dtype=jnp.float64)
        plain = pn.value_and_grad(ruled, params, state, x, y)[1]
        hooked = pn.value_and_grad(pn.hooked(ruled, {(2,): lambda dy: -dy}), params, state, x, y)[1]
        _close(hooked[2], jax.tree_util.tree_map(jnp.negative, plain[2]))
        _close(hooked[4], plain[4])
        # feedback alignment sends (-dy) B^T down; direct feedback alignment sends e B_0 whatever dy is
        _close(hooked[0], jax.tree_util.tree_map(jnp.negative, plain[0]) if rule == "fa" else plain[0])


@pytest.mark.parametrize("rule, make", [("fa", _cnn), ("usf", _mlp), ("dfa", _mlp)])
def test_per_example_updates_are_each_examples_own(rule, make):
    net = make()
    ruled = BUILD[rule](net)
    params, state = pn.init(ruled, jax.random.key(0), dtype=jnp.float64)
    x, y = _data(net, n=2)
    _, per = _per_example_grads(ruled, params, state, x, y, l2=0.01)
    for i in range(len(x)):
        own = _value_and_grad(ruled, params, state, x[i:i + 1], y[i:i + 1], l2=0.01)[1]
        _close(jax.tree_util.tree_map(lambda g: g[i], per), own)


# ---------------------------------------------------------------- the fixed matrices


def test_the_matrices_are_fixed_while_training_and_kept_by_a_checkpoint(tmp_path):
    net = pn.mlp([5, 8, 3])
    x, y = _data(net, n=16)
    for rule in ("fa", "frsf", "dfa", "usf"):
        ruled = BUILD[rule](net)
        params, state = pn.init(ruled, jax.random.key(3), dtype=jnp.float64)
        again = pn.init(ruled, jax.random.key(3), dtype=jnp.float64)[1]
        _close(again, state, tol=0)  # drawn from the key: the same key, the same B
        if rule == "usf":
            assert state == ({}, {}, {}, {}), state  # uSF keeps no matrix: the current W's signs
        else:
            assert [sorted(s) for s in state] == [["B"], [], ["B"], []]
        if rule not in ("fa", "dfa"):
            continue
        result = pn.fit(ruled, pn.optim.sgd(0.5), (np.asarray(x), np.asarray(y)), key=jax.random.key(0), epochs=3,
                        batch_size=8, params=params, state=state)
        _close(result.state, state, tol=0)
        assert not np.allclose(result.params[0]["W"], params[0]["W"])
        assert result.history["loss"][-1] < result.history["loss"][0]
        path = pn.save(tmp_path / f"{rule}.ckpt", {"params": result.params, "state": result.state})
        loaded = pn.load(path)
        _close(loaded["state"], state, tol=0)
        _close(pn.value_and_grad(ruled, loaded["params"], loaded["state"], x, y)[1],
               pn.value_and_grad(ruled, result.params, result.state, x, y)[1], tol=0)


def test_backprop_gives_the_plain_network_back():
    net = _cnn()
    ruled = L.feedback_alignment(net)
    params, state = pn.init(ruled, jax.random.key(0), dtype=jnp.float64)
    plain, plain_state = L.backprop(ruled, state)
    assert plain == net and L.backprop(ruled) == net
    x, y = _data(net)
    _close(pn.value_and_grad(plain, params, plain_state, x, y)[1],
           jax.grad(lambda p: pn.loss(net, p, plain_state, x, y)[0])(params))


# ---------------------------------------------------------------- errors


def test_unsupported_networks_and_layers_are_errors():
    with pytest.raises(TypeError, match="pn.Sequential"):
        L.feedback_alignment(pn.Dense(3))
    with pytest.raises(ValueError, match="container"):
        L.feedback_alignment(pn.Sequential([pn.Dense(4), pn.Residual(pn.Dense(4)), pn.Dense(2)], in_shape=4))
    with pytest.raises(ValueError, match="no Dense or Conv2D"):
        L.direct_feedback_alignment(pn.Sequential([pn.ReLU(), pn.LayerNorm()], in_shape=4))
    with pytest.raises(ValueError, match="already learns by feedback alignment"):
        L.sign_symmetry(L.feedback_alignment(pn.mlp([4, 3])))
    with pytest.raises(ValueError, match="magnitude"):
        L.sign_symmetry(pn.mlp([4, 3]), magnitude="batchwise")
    with pytest.raises(ValueError, match="positive"):
        L.sign_symmetry(pn.mlp([4, 3]), scale=-1.0)
    with pytest.raises(ValueError, match="initializer"):
        L.feedback_alignment(pn.mlp([4, 3]), init="glorot")
    with pytest.raises(ValueError, match="has none; pass scale="):
        L.sign_symmetry(pn.Sequential([pn.Dense(3, init="zeros")], in_shape=4))
    for other in (pn.LSTM(4), pn.Conv1D(3, 2), pn.MultiHeadAttention(2)):
        shape = (5, 4)
        net = L.feedback_alignment(pn.Sequential([pn.Dense(4), other, pn.Dense(2)], in_shape=shape))
        with pytest.raises(ValueError, match=f"layer 1 \\({type(other).__name__}\\) has weight matrices"):
            pn.init(net, jax.random.key(0))
    ruled = L.feedback_alignment(pn.mlp([4, 3]))
    with pytest.raises(ValueError, match="initialise the rule network itself"):
        pn.value_and_grad(ruled, pn.init(ruled, jax.random.key(0))[0], ({}, {}), jnp.ones((2, 4)), jnp.array([0, 1]))
    lone = L.Feedback(pn.Dense(3), "dfa")
    params, _, _ = lone.init(jax.random.key(0), 4)
    _, _, cache = lone.forward(params, {"B": jnp.ones((3, 4))}, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="RuleSequential delivers"):
        lone.backward(params, cache, jnp.ones((2, 3)))


def test_walks_a_rule_does_not_serve_are_errors():
    net = pn.mlp([5, 6, 3])
    x, y = _data(net, n=8)
    refused = "backward gives the rule's updates, not the loss's gradient"
    for rule in ("dfa", "fa"):
        ruled = BUILD[rule](net)
        params, state = pn.init(ruled, jax.random.key(0), dtype=jnp.float64)
        calls = [lambda: pn.per_example_grad_norms(ruled, params, state, x, y),
                 lambda: pn.stats.fisher_diagonal(ruled, params, state, x, y),
                 lambda: pn.stats.ggn_diagonal(ruled, params, state, x, y),
                 lambda: pn.stats.hessian_diagonal(ruled, params, state, x, y),
                 lambda: pn.stats.gradient_noise(ruled, params, state, x, y),
                 lambda: pn.stats.kfac_factors(ruled, params, state, x, y),
                 lambda: pn.influence.fit(ruled, params, state, (x, y)),
                 lambda: pn.fit(ruled, pn.optim.sgd(0.1), (np.asarray(x), np.asarray(y)), key=jax.random.key(0),
                                epochs=1, batch_size=4, params=params, state=state, dp=pn.DPSGD(1.0, 1.0)),
                 lambda: pn.fit(ruled, pn.optim.kfac(ruled, 0.1), (np.asarray(x), np.asarray(y)),
                                key=jax.random.key(0), epochs=1, batch_size=4, params=params, state=state)]
        for call in calls if rule == "dfa" else calls[:2]:  # the walk refuses whichever rule: two suffice for FA
            with pytest.raises(ValueError, match=refused):
                call()
        for curvature in (pn.hvp, pn.ggn_vp):
            with pytest.raises(ValueError, match="learns by .*backprop\\(net, state\\)"):
                curvature(ruled, params, state, x, y, params)
        flow = pn.diagnostics.gradient_flow(ruled, params, state, x, y)  # reads caches and the rule's updates
        assert np.isfinite(np.asarray(flow["grad_norm"])).all()
