"""pn.capture and pn.hooked: every layer's records equal autodiff of the loss with respect to that
layer's output and (through it alone) its input, in float64, over random networks; hooks and replaced
backward rules equal autodiff of the network whose layer passes through a `jax.custom_vjp`."""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import purenet as pn
from purenet import losses
from purenet.layers.base import Wrapper
from purenet.layers.traversal import is_container, map_layers
from purenet.testing.strategies import net_cases

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ---------------------------------------------------------------- references, by autodiff


@dataclasses.dataclass(frozen=True)
class _Perturbed(Wrapper):
    """block(x + din) + dout: autodiff with respect to din is dL/dx through the block alone, to dout dL/dy."""

    block: Any
    din: Any
    dout: Any
    seen: Any = None  # a list the forward appends (x, y) to

    def init(self, key, in_shape, dtype=None):
        return self.block.init(key, in_shape, dtype=dtype)

    def forward(self, params, state, x, train=False, key=None):
        y, state, cache = self.block.forward(params, state, x if self.din is None else x + self.din, train=train,
                                             key=key)
        if self.seen is not None:
            self.seen.append((x, y))
        return y + self.dout, state, cache


def _hook_identity(hook):
    @jax.custom_vjp
    def f(y):
        return y

    f.defvjp(lambda y: (y, None), lambda _, dy: (hook(dy),))
    return f


def _rule_layer(block, rule, state, train, key):
    """The block's output as a custom_vjp function of (params, x) whose backward is `rule`."""
    @jax.custom_vjp
    def f(params, x):
        return block.forward(params, state, x, train=train, key=key)[0]

    def fwd(params, x):
        y, _, cache = block.forward(params, state, x, train=train, key=key)
        return y, (params, cache)

    def bwd(res, dy):
        params, cache = res
        return rule(block, params, cache, dy)

    f.defvjp(fwd, bwd)
    return f


@dataclasses.dataclass(frozen=True)
class _CustomVJP(Wrapper):
    """The block with a hook (custom_vjp identity on its output) or a replaced backward (custom_vjp of it)."""

    block: Any
    hook: Any

    def init(self, key, in_shape, dtype=None):
        return self.block.init(key, in_shape, dtype=dtype)

    def forward(self, params, state, x, train=False, key=None):
        if isinstance(self.hook, pn.BackwardRule):
            y = _rule_layer(self.block, self.hook.rule, state, train, key)(params, x)
            return y, self.block.forward(params, state, x, train=train, key=key)[1], None
        y, state, cache = self.block.forward(params, state, x, train=train, key=key)
        return _hook_identity(self.hook)(y), state, cache


def _reference_records(net, params, state, x, y, loss, paths, train=False, key=None):
    """{path: Record} by autodiff: one perturbation pair per layer, the loss differentiated once."""
    shapes = {}

    def probe(path, layer):
        return _Perturbed(layer, None, 0.0, seen) if path in paths else layer
    seen: list = []
    order = []

    def record_order(path, layer):
        if path in paths:
            order.append(path)
        return probe(path, layer)
    probed = map_layers(net, record_order)
    probed.forward(params, state, x, train=train, key=key)
    for path, (xi, yi) in zip(order, seen):
        shapes[path] = (xi, yi)

    def total(deltas):
        def place(path, layer):
            return _Perturbed(layer, *deltas[path]) if path in paths else layer
        return pn.loss(map_layers(net, place), params, state, x, y, loss=loss, train=train, key=key)[0]
    zeros = {p: (jnp.zeros_like(shapes[p][0]) if jnp.issubdtype(shapes[p][0].dtype, jnp.floating) else None,
                 jnp.zeros_like(shapes[p][1])) for p in paths}
    grads = jax.grad(total)(zeros)
    return {p: pn.Record(shapes[p][0], shapes[p][1], grads[p][1], grads[p][0]) for p in paths}


def _close(got, want, tol=1e-10):
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        scale = max(float(jnp.max(jnp.abs(w))), 1e-12)
        assert float(jnp.max(jnp.abs(g - w))) <= tol * scale, (float(jnp.max(jnp.abs(g - w))), scale)


def _check_records(net, params, state, x, y, loss="cross_entropy", train=False, key=None, l2=0.0):
    """pn.capture against pn.value_and_grad and the autodiff records, all in one compiled program."""
    leaves = [p for p, layer in pn.layer_paths(net) if not is_container(layer)]
    by_path = dict(pn.layer_paths(net))  # GPT's ends are run by GPT itself: checked by the GPT test
    probed = [p for p in leaves if not _fused_head(net, loss, p) and not hasattr(by_path[p], "cached_io")]

    def compared(params, state, x, y, key):
        rec = pn.capture(net, params, state, x, y, loss=loss, train=train, key=key, l2=l2)
        plain = pn.value_and_grad(net, params, state, x, y, loss=loss, train=train, key=key, l2=l2)
        return rec, plain, _reference_records(net, params, state, x, y, loss, probed, train, key)
    rec, (value, grads, new_state), want = jax.jit(compared)(params, state, x, y, key)
    _close(rec.value, value)
    _close(rec.grads, grads)
    _close(rec.state, new_state)
    assert list(rec.layers) == leaves
    for path, r in want.items():
        got = rec.layers[path]
        _close(got.x, r.x)
        _close(got.y, r.y)
        _close(got.dy, r.dy)
        if r.dx is not None:
            _close(got.dx, r.dx)
    return rec


def _fused_head(net, loss, path):
    head = pn.network.output_head(net)
    return head is not None and isinstance(loss, str) and pn.network.fused_loss(head) == loss and \
        path == (len(net.children()) - 1,)


# ---------------------------------------------------------------- records equal autodiff


@settings(max_examples=5, deadline=None)
@given(net_cases(max_depth=2, compose=True, sequences=True))
def test_records_equal_autodiff_on_composed_networks(case):
    params, state, x, y = case.data()
    _check_records(case.net, params, state, x, y, loss=case.loss, l2=case.l2)


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(net_cases(max_depth=3, compose=True, sequences=True))
def test_records_equal_autodiff_on_many_composed_networks(case):
    params, state, x, y = case.data()
    _check_records(case.net, params, state, x, y, loss=case.loss, l2=case.l2)


@settings(max_examples=6, deadline=None)
@given(net_cases(max_depth=2, dropout=True, batchnorm=True))
def test_records_equal_autodiff_with_dropout_keys_and_batchnorm_state(case):
    params, state, x, y = case.data()
    _check_records(case.net, params, state, x, y, loss=case.loss, train=True, key=jax.random.key(7))


@settings(max_examples=4, deadline=None)
@given(net_cases(max_depth=1, images=True, batchnorm=True))
def test_records_equal_autodiff_on_cnns(case):
    params, state, x, y = case.data()
    _check_records(case.net, params, state, x, y, loss=case.loss)


def _ids_case(net, T=5, vocab=11, batch=2):
    params, state = pn.init(net, jax.random.key(0), in_shape=(T,), dtype=jnp.float64)
    ids = jax.random.randint(jax.random.key(1), (batch, T), 0, vocab)
    return params, state, ids, jnp.roll(ids, -1, axis=1)


@pytest.mark.parametrize("tied", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_records_on_gpt_equal_autodiff_and_the_ends_are_recorded(tied):
    net = pn.gpt(vocab_size=11, context=5, layers=1, heads=2, features=8, tie_embeddings=tied)
    params, state, ids, labels = _ids_case(net)
    rec = _check_records(net, params, state, ids, labels)
    (ids_in, h), (h0, logits) = rec.layers[(0, 0)].x, rec.layers[(0, 0)].y
    assert (ids_in == ids).all()
    _close(h0, params[0]["token"]["E"][ids])
    _close(logits, rec.layers[(1,)].x)  # the Softmax's input
    _close(h, rec.layers[(0, 1, 2)].y)  # the final LayerNorm's output
    _close(rec.layers[(0, 0)].dy[1], rec.layers[(1,)].dx)
    _close(rec.layers[(0, 0)].dy[0], rec.layers[(0, 1, 0)].dx)  # dL/dh0 is the positional embedding's dx
    with pytest.raises(ValueError, match="recorded but not hooked"):
        pn.capture(net, params, state, ids, labels, hooks={(0, 0): lambda dy: dy})


@pytest.mark.slow
def test_records_on_llama():
    llama = pn.llama(vocab_size=11, context=5, layers=1, heads=2, features=8, kv_heads=1)
    _check_records(llama, *_ids_case(llama))


def test_records_on_lstm_and_remat_frozen_networks():
    lstm = pn.Sequential([pn.LSTM(4), pn.Dense(3), pn.Softmax()], in_shape=(4, 2))
    params, state = pn.init(lstm, jax.random.key(0), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (3, 4, 2))
    _check_records(lstm, params, state, x, jnp.array([[0, 1, 2, 0]] * 3))
    net = pn.Sequential([pn.Frozen(pn.Sequential([pn.Dense(5), pn.Tanh()])),
                         pn.Remat(pn.Sequential([pn.Dense(5), pn.GELU()])), pn.Dense(3), pn.Softmax()], in_shape=4)
    params, state = pn.init(net, jax.random.key(0), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (3, 4))
    rec = _check_records(net, params, state, x, jnp.array([0, 1, 2]))
    assert not any(jnp.any(g != 0) for g in jax.tree_util.tree_leaves(rec.grads[0]))  # frozen: no gradient
    assert float(jnp.abs(rec.layers[(0, 0, 0)].dy).max()) > 0  # but its records are there


def test_fused_softmax_is_recorded_as_logits_probabilities_and_both_gradients():
    net = pn.mlp([4, 6, 3])
    params, state = pn.init(net, jax.random.key(0), dtype=jnp.float64)
    x, y = jax.random.normal(jax.random.key(1), (5, 4)), jnp.array([0, 1, 2, 0, 1])
    r = pn.capture(net, params, state, x, y).layers[(3,)]
    _close(r.y, jax.nn.softmax(r.x))
    _close(r.dy, jax.grad(lambda p: losses.get("cross_entropy").value(p, y))(r.y))
    _close(r.dx, jax.grad(lambda z: losses.get("softmax_cross_entropy").value(z, y))(r.x))


def test_selection_jit_and_errors():
    net = pn.Sequential([pn.Dense(6), pn.ReLU(), pn.Residual(pn.Sequential([pn.Dense(6), pn.Tanh()])),
                         pn.Dense(3), pn.Softmax()], in_shape=4)
    params, state = pn.init(net, jax.random.key(0), dtype=jnp.float64)
    x, y = jax.random.normal(jax.random.key(1), (5, 4)), jnp.array([0, 1, 2, 0, 1])
    full = pn.capture(net, params, state, x, y)
    some = jax.jit(lambda p: pn.capture(net, p, state, x, y, layers=[(2, 0, 1), (0,)]))(params)
    assert list(some.layers) == [(0,), (2, 0, 1)]  # forward order
    _close(some.layers[(2, 0, 1)], full.layers[(2, 0, 1)])
    picked = pn.capture(net, params, state, x, y, layers=lambda path, layer: isinstance(layer, pn.Dense))
    assert list(picked.layers) == [(0,), (2, 0, 0), (3,)]
    block = pn.capture(net, params, state, x, y, layers=[(2,)]).layers[(2,)]  # a container records too
    _close(block.dy, full.layers[(3,)].dx)
    _close(block.dx, full.layers[(2, 0, 0)].dx + block.dy)  # the Residual's dx: its block's plus the skip path
    with pytest.raises(ValueError, match=r"\(7,\) names no layer"):
        pn.capture(net, params, state, x, y, layers=[(7,)])
    with pytest.raises(ValueError, match="whole network"):
        pn.capture(net, params, state, x, y, layers=[()])
    with pytest.raises(TypeError, match="tuple of child indices"):
        pn.capture(net, params, state, x, y, layers=["dense"])
    with pytest.raises(TypeError, match="neither a function"):
        pn.capture(net, params, state, x, y, hooks={(0,): 3.0})


# ---------------------------------------------------------------- hooks equal the custom_vjp reference


HOOKS = {
    "reversal": lambda dy: -0.5 * dy,
    "stop": jnp.zeros_like,
    "clip": lambda dy: dy * jnp.minimum(1.0, 0.01 / (jnp.linalg.norm(dy) + 1e-12)),
}


def _relu_sign_rule(layer, params, cache, dy):
    """Sign symmetry on a Dense: weight gradients its own, dx through sign(W)."""
    grads, _ = layer.backward(params, cache, dy)
    _, dx = layer.backward({**params, "W": jnp.sign(params["W"])}, cache, dy)
    return grads, dx


@pytest.mark.parametrize("name", [*HOOKS, "rule"])
def test_hooks_equal_autodiff_of_the_custom_vjp_network(name):
    hook = pn.BackwardRule(_relu_sign_rule) if name == "rule" else HOOKS[name]
    net = pn.Sequential([pn.Dense(6), pn.Tanh(), pn.Residual(pn.Sequential([pn.LayerNorm(), pn.Dense(6)])),
                         pn.Dense(5), pn.ReLU(), pn.Dense(3), pn.Softmax()], in_shape=4)
    params, state = pn.init(net, jax.random.key(0), dtype=jnp.float64)
    x, y = jax.random.normal(jax.random.key(1), (5, 4)), jnp.array([0, 1, 2, 0, 1])
    at = {(3,): hook, (2, 0, 1): hook} if name != "rule" else {(3,): hook, (5,): hook}
    ref_net = map_layers(net, lambda path, layer: _CustomVJP(layer, at[path]) if path in at else layer)
    want = jax.grad(lambda p: pn.loss(ref_net, p, state, x, y, l2=0.1)[0])(params)
    rec = pn.capture(net, params, state, x, y, l2=0.1, hooks=at)
    _close(rec.grads, want)
    _close(rec.value, pn.loss(net, params, state, x, y, l2=0.1)[0])
    _close(pn.value_and_grad(pn.hooked(net, at), params, state, x, y, l2=0.1)[1], want)
    plain = pn.capture(net, params, state, x, y)
    if name != "rule":  # the record's dy is the hooked one; the layers above see the plain backward
        _close(rec.layers[(3,)].dy, hook(plain.layers[(3,)].dy))
        _close(rec.layers[(4,)].dy, plain.layers[(4,)].dy)


def test_a_hooked_output_softmax_computes_the_loss_unfused():
    net = pn.mlp([4, 6, 3])
    params, state = pn.init(net, jax.random.key(0), dtype=jnp.float64)
    x, y = jax.random.normal(jax.random.key(1), (5, 4)), jnp.array([0, 1, 2, 0, 1])
    at = {(3,): HOOKS["reversal"]}
    ref_net = map_layers(net, lambda path, layer: _CustomVJP(layer, at[path]) if path in at else layer)
    want = jax.grad(lambda p: pn.loss(ref_net, p, state, x, y, loss=losses.get("cross_entropy"))[0])(params)
    _close(pn.capture(net, params, state, x, y, hooks=at).grads, want)


def test_hooked_network_trains_and_a_rule_refuses_per_example_walks():
    net = pn.mlp([4, 6, 3])
    params, state = pn.init(net, jax.random.key(0), dtype=jnp.float64)
    x, y = jax.random.normal(jax.random.key(1), (6, 4)), jnp.array([0, 1, 2, 0, 1, 2])
    reversed_net = pn.hooked(net, {(1,): lambda dy: -dy})
    g = pn.value_and_grad(net, params, state, x, y)[1]
    gr = pn.value_and_grad(reversed_net, params, state, x, y)[1]
    _close(gr[0]["W"], -g[0]["W"])
    _close(gr[2], g[2])
    _, per = pn.per_example_grads(reversed_net, params, state, x, y)  # a callable hook acts on each example's dy
    _close(jnp.mean(per[0]["W"], axis=0), gr[0]["W"])
    ruled = pn.hooked(net, {(2,): pn.BackwardRule(_relu_sign_rule)})
    with pytest.raises(ValueError, match="batch gradient only"):
        pn.per_example_grads(ruled, params, state, x, y)
    result = pn.fit(reversed_net, pn.optim.sgd(0.1), (np.asarray(x), np.asarray(y)), key=jax.random.key(0),
                    epochs=1, batch_size=3, params=params, state=state)
    assert np.isfinite(result.history["loss"]).all()


def test_capturing_one_layer_adds_its_record_to_the_outputs_and_no_temporaries():
    """Compiled sizes (not timings): the program's outputs grow by the selected layer's four arrays,
    and its temporaries by no more than that (no second pass keeps activations alive)."""
    net = pn.mlp([32, 64, 64, 10])
    params, state = pn.init(net, jax.random.key(0), dtype=jnp.float64)
    x, y = jax.random.normal(jax.random.key(1), (16, 32)), jnp.arange(16) % 10

    def memory(fn):
        return jax.jit(fn).lower(params).compile().memory_analysis()
    plain = memory(lambda p: pn.value_and_grad(net, p, state, x, y))
    one = memory(lambda p: pn.capture(net, p, state, x, y, layers=[(2,)]))
    record = sum(a.nbytes for a in pn.capture(net, params, state, x, y, layers=[(2,)]).layers[(2,)])
    grown = one.output_size_in_bytes - plain.output_size_in_bytes
    assert record <= grown <= record + 4 * 8  # and XLA's output tuple: one 8-byte pointer per added array
    assert one.temp_size_in_bytes <= plain.temp_size_in_bytes + record
