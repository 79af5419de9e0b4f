"""purenet inside any JAX program: the custom_vjp bridge, input gradients, Hessian- and GGN-vector products.

The reference everywhere is autodiff of the same computation through
`pn.forward` / `pn.loss`; all comparisons run in float64.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import purenet as pn
from purenet.network import loss_pass
from purenet.testing import compare_trees, net_cases

RTOL = 1e-10


def assert_trees_close(actual, expected, rtol=RTOL):
    errors = compare_trees(actual, expected)
    assert max(errors.values(), default=0.0) <= rtol, errors


def jitted_pair(ours, ref, *args):
    """(ours(*args), ref(*args)) from one compiled program: one compile per hypothesis example."""
    return jax.jit(lambda *a: (ours(*a), ref(*a)))(*args)


def random_like(tree, seed):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
    return treedef.unflatten([jax.random.normal(k, jnp.shape(p), p.dtype) for k, p in zip(keys, leaves)])


def user_code(forward, state, train=False, key=None):
    """Arbitrary user code around a network: a nonlinear read-out of y, plus a term in x alone."""
    def objective(params, x):
        y, _ = forward(params, state, x, train, key)
        c = jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)
        return jnp.sum(jnp.sin(3 * y) * c) + 0.1 * jnp.sum(x ** 3)

    return objective


def reference_forward(net):
    return lambda params, state, x, train=False, key=None: pn.forward(net, params, state, x, train, key)


def bridge_and_reference_grads(net, params, state, x, train=False, key=None, jit=True):
    """Gradients (params, x) of the same user code through the bridge and through pn.forward."""
    ours = jax.grad(user_code(pn.as_function(net), state, train, key), argnums=(0, 1))
    ref = jax.grad(user_code(reference_forward(net), state, train, key), argnums=(0, 1))
    return jitted_pair(ours, ref, params, x) if jit else (ours(params, x), ref(params, x))


def assert_bridge_matches_autodiff(case, train=False, key=None):
    params, state, x, _ = case.data()
    assert_trees_close(*bridge_and_reference_grads(case.net, params, state, x, train, key))


# ---------------------------------------------------------------- as_function

@settings(max_examples=4)
@given(net_cases(compose=True, sequences=True))
def test_grad_through_the_bridge_equals_autodiff_of_forward(case):
    assert_bridge_matches_autodiff(case)


def test_bridge_without_jit_and_its_value():
    net = pn.Sequential([pn.Residual(pn.Sequential([pn.RMSNorm(), pn.Dense(4)])),
                         pn.Parallel([pn.Dense(2), pn.ELU()]), pn.Flatten(), pn.Dense(3), pn.Softmax()],
                        in_shape=(2, 4))
    params, state = pn.init(net, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, 2, 4))
    assert_trees_close(*bridge_and_reference_grads(net, params, state, x, jit=False))
    ours, ref = (user_code(f, state)(params, x) for f in (pn.as_function(net), reference_forward(net)))
    np.testing.assert_allclose(ours, ref, rtol=1e-12)


@settings(max_examples=4)
@given(net_cases(dropout=True, batchnorm=True))
def test_bridge_in_training_mode_with_dropout_and_batch_statistics(case):
    assert_bridge_matches_autodiff(case, train=True, key=jax.random.key(case.seed))


def test_bridge_accepts_raw_uint32_keys_and_returns_the_new_state():
    net = pn.mlp([3, 6, 2], dropout=0.5, batchnorm=True)
    params, state = pn.init(net, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (5, 3))
    key = jax.random.PRNGKey(7)
    y, new_state = pn.as_function(net)(params, state, x, train=True, key=key)
    y_ref, state_ref = pn.forward(net, params, state, x, train=True, key=key)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12)
    assert_trees_close(new_state, state_ref)
    assert_trees_close(*bridge_and_reference_grads(net, params, state, x, train=True, key=key))


def test_bridge_under_vmap_over_inputs_and_over_params():
    net = pn.Sequential([pn.Dense(6), pn.Tanh(), pn.Residual(pn.Sequential([pn.LayerNorm(), pn.Dense(6)])),
                         pn.Dense(2)], in_shape=4)
    apply, ref = pn.as_function(net), reference_forward(net)
    params, state = pn.init(net, jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (3, 5, 4))       # three batches of five rows

    def objective(forward):
        return lambda p, x: jnp.sum(jnp.tanh(forward(p, state, x)[0]) ** 2)

    def grads(forward):
        over_inputs = jax.vmap(jax.grad(objective(forward), argnums=(0, 1)), in_axes=(None, 0))(params, xs)
        # an ensemble: vmap over stacked params, and inside it over single examples (x_i[None])
        per_example = jax.vmap(jax.grad(lambda p, xi: objective(forward)(p, xi[None]), argnums=1),
                               in_axes=(None, 0))
        return over_inputs, jax.vmap(per_example, in_axes=(0, None))(ensemble, xs[0])

    ensemble = jax.vmap(lambda k: pn.init(net, k)[0])(jax.random.split(jax.random.key(2), 4))
    ours, expected = jitted_pair(lambda: grads(apply), lambda: grads(ref))
    assert_trees_close(ours, expected)
    no_jit = jax.vmap(jax.grad(objective(apply), argnums=(0, 1)), in_axes=(None, 0))(params, xs)
    assert_trees_close(no_jit, expected[0])


class WrongDense(pn.Dense):
    """A Dense whose backward is wrong on purpose: dparams doubled, dx tripled."""

    def backward(self, params, cache, dy):
        grads, dx = super().backward(params, cache, dy)
        return jax.tree_util.tree_map(lambda g: 2 * g, grads), 3 * dx


def test_the_bridge_runs_the_handwritten_backward_not_autodiff():
    net = pn.Sequential([pn.Dense(5), pn.Tanh(), WrongDense(3), pn.Sigmoid()], in_shape=4)
    params, state = pn.init(net, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (6, 4))
    ref_fn = user_code(reference_forward(net), state)
    ours = jax.grad(user_code(pn.as_function(net), state), argnums=(0, 1))(params, x)
    right_params, right_x = jax.grad(ref_fn, argnums=(0, 1))(params, x)
    right_x = right_x - 0.3 * x ** 2  # the x ** 3 term goes straight to x, around the network
    # exactly the wrong backward's errors: its own params x2, everything before it x3
    expected_params = (jax.tree_util.tree_map(lambda g: 3 * g, right_params[0]), {},
                       jax.tree_util.tree_map(lambda g: 2 * g, right_params[2]), {})
    assert_trees_close(ours[0], expected_params)
    assert_trees_close(ours[1], 3 * right_x + 0.3 * x ** 2)


def test_second_order_reverse_mode_maml_inner_step():
    net = pn.mlp([3, 8, 2], hidden="tanh", output="identity")
    params, state = pn.init(net, jax.random.key(0))
    x_in, x_out = jax.random.normal(jax.random.key(1), (2, 6, 3))
    t_in, t_out = jax.random.normal(jax.random.key(2), (2, 6, 2))

    def maml(forward):
        def task_loss(p, x, t):
            return jnp.mean((forward(p, state, x)[0] - t) ** 2)

        def outer(p):
            g = jax.grad(task_loss)(p, x_in, t_in)
            adapted = jax.tree_util.tree_map(lambda w, d: w - 0.5 * d, p, g)
            return task_loss(adapted, x_out, t_out)

        return outer

    ours, ref = (jax.grad(maml(f)) for f in (pn.as_function(net), reference_forward(net)))
    assert_trees_close(*jitted_pair(ours, ref, params))


def test_physics_informed_loss_with_derivatives_in_the_input():
    """u' = cos(x) on a grid: the residual holds du/dx, so the parameter gradient is second order."""
    net = pn.mlp([1, 16, 16, 1], hidden="tanh", output="identity")
    params, state = pn.init(net, jax.random.key(0))
    grid = jnp.linspace(-1.0, 3.0, 9)[:, None]  # asymmetric: on a symmetric grid the (odd) net's bias grads are 0

    def pinn(forward):
        def loss(p):
            u = lambda x: jnp.sum(forward(p, state, x)[0])  # rows are independent: d sum / dx_i = u'(x_i)
            residual = jax.grad(u)(grid) - jnp.cos(grid)
            boundary = forward(p, state, jnp.zeros((1, 1)))[0]
            return jnp.mean(residual ** 2) + jnp.sum(boundary ** 2)

        return loss

    ours, ref = (jax.grad(pinn(f)) for f in (pn.as_function(net), reference_forward(net)))
    assert_trees_close(*jitted_pair(ours, ref, params))


def test_gan_players_each_differentiated_through_their_own_bridge():
    gen = pn.mlp([2, 8, 3], hidden="relu", output="identity")
    disc = pn.mlp([3, 8, 1], hidden="leaky_relu", output="sigmoid")
    pg, sg = pn.init(gen, jax.random.key(0))
    pd, sd = pn.init(disc, jax.random.key(1))
    z = jax.random.normal(jax.random.key(2), (8, 2))
    real = jax.random.normal(jax.random.key(3), (8, 3)) + 1.0

    def losses(g_fwd, d_fwd):
        def d_loss(pd, pg):
            fake = g_fwd(pg, sg, z)[0]
            return -jnp.mean(jnp.log(d_fwd(pd, sd, real)[0]) + jnp.log1p(-d_fwd(pd, sd, fake)[0]))

        def g_loss(pg, pd):
            return -jnp.mean(jnp.log(d_fwd(pd, sd, g_fwd(pg, sg, z)[0])[0]))

        return jax.grad(d_loss, argnums=(0, 1))(pd, pg), jax.grad(g_loss, argnums=(0, 1))(pg, pd)

    assert_trees_close(losses(pn.as_function(gen), pn.as_function(disc)),
                       losses(reference_forward(gen), reference_forward(disc)))


def test_vjp_of_the_bridge_is_the_layers_backward_with_no_cotangent_for_state_and_key():
    net = pn.mlp([4, 5, 3], batchnorm=True)
    params, state = pn.init(net, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (6, 4))
    key = jax.random.key(2)
    apply = pn.as_function(net)
    (y, new_state), pullback = jax.vjp(lambda p, s, xx: apply(p, s, xx, True, key), params, state, x)
    dy = jax.random.normal(jax.random.key(3), y.shape)
    dparams, dstate, dx = pullback((dy, random_like(new_state, 4)))  # the state's cotangent is dropped
    _, _, cache = net.forward(params, state, x, train=True, key=key)
    expected = net.backward(params, cache, dy)
    assert_trees_close((dparams, dx), expected, rtol=0.0)
    assert all(np.all(leaf == 0) for leaf in jax.tree_util.tree_leaves(dstate))
    # a key among the differentiated arguments gets a float0 cotangent, as autodiff gives
    for k in (key, jax.random.PRNGKey(2)):
        (dkey,) = jax.vjp(lambda kk: apply(params, state, x, True, kk)[0], k)[1](dy)
        assert dkey.dtype == jax.dtypes.float0


def test_bridge_keeps_float32_cotangents_for_float32_params():
    net = pn.mlp([3, 4, 2])
    params, state = pn.init(net, jax.random.key(0), dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(1), (5, 3), jnp.float64)
    grads = jax.grad(lambda p, xx: jnp.sum(pn.as_function(net)(p, state, xx)[0][:, 0]), argnums=(0, 1))(params, x)
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads[0]))
    assert grads[1].dtype == jnp.float64


def test_bridge_errors_name_the_problem():
    net = pn.mlp([3, 4, 2])
    params, state = pn.init(net, jax.random.key(0))
    apply = pn.as_function(net)
    x = jnp.ones((2, 3))
    with pytest.raises(TypeError, match="train must be a Python bool"):
        jax.jit(lambda t: apply(params, state, x, t))(True)
    with pytest.raises(TypeError, match="floating-point"):
        apply(params, state, jnp.ones((2, 3), jnp.int32))
    assert apply.net is net


# ---------------------------------------------------------------- input_grad, hvp and ggn_vp

def reference_hvp(case, params, state, x, y, v, train=False, key=None):
    def grad(p):
        return jax.grad(lambda q: pn.loss(case.net, q, state, x, y, loss=case.loss, l2=case.l2,
                                          train=train, key=key)[0])(p)

    return jax.jvp(grad, (params,), (v,))[1]


def reference_ggn_vp(case, params, state, x, y, v):
    """J^T H_out J v by autodiff, with out the body's output (logits when the loss is fused)."""
    p = loss_pass(case.net, params, state, x, case.loss)
    out_fn = lambda q: loss_pass(case.net, q, state, x, case.loss).out
    _, jv = jax.jvp(out_fn, (params,), (v,))
    _, h_jv = jax.jvp(jax.grad(lambda o: p.loss_fn.value(o, y)), (p.out,), (jv,))
    gv = jax.vjp(out_fn, params)[1](h_jv)[0]
    return jax.tree_util.tree_map(jnp.add, gv, pn.losses.l2_backward(v, case.l2, pn.decay_mask(case.net, params)))


def assert_curvature_and_input_grad_match(case, train=False, key=None, ggn=True):
    """hvp (1e-9), input_grad (1e-10) and, in evaluation, ggn_vp (1e-9) against autodiff, in one program."""
    params, state, x, y = case.data()
    v = random_like(params, case.seed + 1)
    kw = dict(loss=case.loss, train=train, key=key)

    def ours(v, x):
        return (pn.hvp(case.net, params, state, x, y, v, l2=case.l2, **kw),
                pn.input_grad(case.net, params, state, x, y, **kw),
                pn.ggn_vp(case.net, params, state, x, y, v, l2=case.l2, **kw) if ggn else None)

    def ref(v, x):
        dx = jax.grad(lambda z: pn.loss(case.net, params, state, z, y, l2=case.l2, **kw)[0])(x)
        return (reference_hvp(case, params, state, x, y, v, train, key), dx,
                reference_ggn_vp(case, params, state, x, y, v) if ggn else None)

    (hv, dx, gv), (hv_ref, dx_ref, gv_ref) = jitted_pair(ours, ref, v, x)
    assert_trees_close(hv, hv_ref, rtol=1e-9)
    assert_trees_close(dx, dx_ref)
    assert_trees_close(gv, gv_ref, rtol=1e-9)


@settings(max_examples=5)
@given(net_cases(compose=True, sequences=True))
def test_hvp_ggn_vp_and_input_grad_equal_autodiff(case):
    assert_curvature_and_input_grad_match(case)


@settings(max_examples=4)
@given(net_cases(batchnorm=True))
def test_hvp_and_input_grad_with_batchnorm_in_evaluation_mode(case):
    assert_curvature_and_input_grad_match(case)


def test_hvp_and_input_grad_in_training_mode_through_batch_statistics_and_dropout():
    net = pn.mlp([4, 6, 6, 3], hidden="tanh", dropout=0.25, batchnorm=True)
    case = pn.testing.NetCase(net, (4,), 6, "softmax", "cross_entropy", 0.1, 3)
    assert_curvature_and_input_grad_match(case, train=True, key=jax.random.key(5), ggn=False)


def test_hvp_is_symmetric_and_vmaps_over_directions():
    net = pn.mlp([3, 5, 4], hidden="silu")
    params, state = pn.init(net, jax.random.key(0))
    x, y = jax.random.normal(jax.random.key(1), (7, 3)), jnp.arange(7) % 4
    u, w = random_like(params, 2), random_like(params, 3)
    dot = lambda a, b: sum(jnp.vdot(p, q) for p, q in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    hvp = jax.jit(lambda v: pn.hvp(net, params, state, x, y, v, l2=0.01))
    np.testing.assert_allclose(dot(u, hvp(w)), dot(hvp(u), w), rtol=1e-10)
    both = jax.vmap(hvp)(jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), u, w))
    assert_trees_close(jax.tree_util.tree_map(lambda t: t[1], both), hvp(w))


@pytest.mark.parametrize("output,loss", [("softmax", "cross_entropy"), ("identity", "mse"),
                                         ("sigmoid", "binary_cross_entropy")])
def test_ggn_equals_the_hessian_when_the_output_is_linear_in_params(output, loss):
    net = pn.mlp([4, 3], output=output)  # logits = x W + b: no second derivative of the network
    params, state = pn.init(net, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (6, 4))
    y = jnp.arange(6) % 3 if loss == "cross_entropy" else jax.random.uniform(jax.random.key(2), (6, 3))
    v = random_like(params, 3)
    assert_trees_close(pn.ggn_vp(net, params, state, x, y, v, loss=loss, l2=0.1),
                       pn.hvp(net, params, state, x, y, v, loss=loss, l2=0.1), rtol=1e-12)


def test_curvature_products_check_v_against_params():
    net = pn.mlp([3, 4, 2])
    params, state = pn.init(net, jax.random.key(0))
    x, y = jnp.ones((2, 3)), jnp.array([0, 1])
    v = random_like(params, 1)
    with pytest.raises(ValueError, match=r"v leaf \[0\]\['W'\] has shape \(4, 3\)"):
        pn.hvp(net, params, state, x, y, ({**v[0], "W": v[0]["W"].T},) + v[1:])
    with pytest.raises(ValueError, match="structure of params"):
        pn.ggn_vp(net, params, state, x, y, v[:2])
    # a float32 v for float64 params is cast, not refused
    hv32 = pn.hvp(net, params, state, x, y, jax.tree_util.tree_map(lambda t: t.astype(jnp.float32), v))
    assert all(t.dtype == jnp.float64 for t in jax.tree_util.tree_leaves(hv32))
