"""Conv1D, ConvTranspose2D, Upsample2D, GroupNorm: handwritten backwards against jax.grad (float64),
PyTorch's conv1d / group_norm and lax.conv_transpose / jnp.repeat, per-example gradients and norms,
DP with GroupNorm, bad input. Shapes come from small fixed sets (each new one is a compile)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jax import lax

import purenet as pn
from purenet.layers import base
from tests.conftest import scaled

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _normal(data, shape):
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    return jax.random.normal(jax.random.key(seed), shape, jnp.float64)


def _t(a):
    return torch.tensor(np.asarray(a), requires_grad=True)


def _params(layer, in_shape, seed=0):
    """Params with nonzero biases and gains (init's zeros and ones would hide mistakes)."""
    params, _, out = layer.init(jax.random.key(seed), in_shape, dtype=jnp.float64)
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(params)))
    return {k: v if k == "W" else jax.random.normal(next(keys), v.shape, v.dtype) for k, v in params.items()}, out


def _layer_grads(layer, params, x, dy):
    y, _, cache = layer.forward(params, {}, x)
    grads, dx = layer.backward(params, cache, dy)
    return y, grads, dx


# ---------------------------------------------------------------- Conv1D


CONV1D_PADDINGS = ["SAME", "VALID", "CAUSAL", 1, (2, 0)]


@settings(max_examples=scaled(3))
@given(data=st.data())
def test_conv1d_backward_matches_autodiff(data):
    layer = pn.Conv1D(data.draw(st.sampled_from([1, 3])), data.draw(st.sampled_from([1, 2, 3])),
                      strides=data.draw(st.sampled_from([1, 2])), padding=data.draw(st.sampled_from(CONV1D_PADDINGS)),
                      dilation=data.draw(st.sampled_from([1, 2])), use_bias=data.draw(st.booleans()),
                      implementation=data.draw(st.sampled_from(["im2col", "xla", "taps"])))
    x = _normal(data, (data.draw(st.sampled_from([1, 2])), data.draw(st.sampled_from([5, 8])),
                       data.draw(st.sampled_from([1, 2]))))
    try:
        layer.init(jax.random.key(0), x.shape[1:])
    except ValueError:
        assume(False)
    assert pn.check_grads(layer, x).ok


@pytest.mark.parametrize("impl", ["im2col", "xla", "taps"])
@pytest.mark.parametrize("kernel,strides,padding,dilation", [(3, 1, "SAME", 1), (3, 2, 1, 2), (2, 1, "CAUSAL", 3),
                                                             (4, 3, "VALID", 1)])
def test_conv1d_equals_torch(kernel, strides, padding, dilation, impl):
    layer = pn.Conv1D(4, kernel, strides, padding, dilation, implementation=impl)
    x = jax.random.normal(jax.random.key(1), (2, 9, 3), jnp.float64)
    params, (lo, c) = _params(layer, (9, 3))
    dy = jax.random.normal(jax.random.key(2), (2, lo, c), jnp.float64)
    y, grads, dx = _layer_grads(layer, params, x, dy)

    xt, wt, bt = _t(x), _t(params["W"]), _t(params["b"])
    span = (kernel - 1) * dilation
    if padding == "CAUSAL":
        pads = (span, 0)
    elif padding == "SAME":
        pads = (span // 2, span - span // 2)  # stride 1 here
    elif padding == "VALID":
        pads = (0, 0)
    else:
        pads = (padding, padding)
    yt = F.conv1d(F.pad(xt.permute(0, 2, 1), pads), wt.permute(2, 1, 0), bt, stride=strides, dilation=dilation)
    yt.backward(torch.tensor(np.asarray(dy)).permute(0, 2, 1))
    np.testing.assert_allclose(y, yt.detach().permute(0, 2, 1).numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads["W"], wt.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads["b"], bt.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_conv1d_causal_output_reads_only_the_past():
    layer = pn.Conv1D(2, 3, padding="CAUSAL", dilation=2)
    params, _ = _params(layer, (8, 1))
    x = jnp.zeros((1, 8, 1)).at[0, 5, 0].set(1.0)
    y = layer.forward(params, {}, x)[0] - params["b"]
    assert jnp.all(y[0, :5] == 0) and jnp.any(y[0, 5:] != 0)


# ---------------------------------------------------------------- ConvTranspose2D, Upsample2D


def _conv_transpose(layer, params, x):
    y = lax.conv_transpose(x, params["W"], layer.strides, layer.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + params["b"] if layer.use_bias else y


@settings(max_examples=scaled(3))
@given(data=st.data())
def test_conv_transpose_forward_and_backward_match_autodiff_of_lax_conv_transpose(data):
    layer = pn.ConvTranspose2D(data.draw(st.sampled_from([1, 3])), data.draw(st.sampled_from([1, 2, 3, (2, 3)])),
                               strides=data.draw(st.sampled_from([1, 2, (2, 1), 3])),
                               padding=data.draw(st.sampled_from(["SAME", "VALID", ((1, 0), (3, 2))])),
                               use_bias=data.draw(st.booleans()))
    x = _normal(data, (data.draw(st.sampled_from([1, 2])), *data.draw(st.sampled_from([(3, 3), (4, 5)])),
                       data.draw(st.sampled_from([1, 2]))))
    params, _ = _params(layer, x.shape[1:])
    dy = jax.random.normal(jax.random.key(3), layer.forward(params, {}, x)[0].shape, jnp.float64)
    y, grads, dx = jax.jit(lambda p, v: _layer_grads(layer, p, v, dy))(params, x)  # one program each side
    ref_y, ref = jax.jit(lambda p, v: (_conv_transpose(layer, p, v), jax.grad(
        lambda p, v: jnp.sum(_conv_transpose(layer, p, v) * dy), argnums=(0, 1))(p, v)))(params, x)
    np.testing.assert_allclose(y, ref_y, rtol=1e-12, atol=1e-12)
    for path, err in pn.testing.compare_trees({"p": grads, "x": dx}, {"p": ref[0], "x": ref[1]}).items():
        assert err <= 1e-10, path


@settings(max_examples=scaled(2))
@given(data=st.data())
def test_upsample_matches_autodiff_of_repeat(data):
    factor = data.draw(st.sampled_from([1, 2, (2, 3), (3, 1)]))
    layer = pn.Upsample2D(factor)
    x = _normal(data, (2, *data.draw(st.sampled_from([(3, 3), (2, 5)])), 2))
    fh, fw = (factor, factor) if isinstance(factor, int) else factor

    def reference(v):
        return jnp.repeat(jnp.repeat(v, fh, axis=1), fw, axis=2)

    y = layer.forward({}, {}, x)[0]
    np.testing.assert_array_equal(y, reference(x))
    dy = jax.random.normal(jax.random.key(4), y.shape, jnp.float64)
    np.testing.assert_allclose(layer.backward({}, layer.forward({}, {}, x)[2], dy)[1],
                               jax.grad(lambda v: jnp.sum(reference(v) * dy))(x), rtol=1e-12)


# ---------------------------------------------------------------- GroupNorm


@settings(max_examples=scaled(2))
@given(data=st.data())
def test_group_norm_backward_matches_autodiff(data):
    shape = data.draw(st.sampled_from([(2, 6), (2, 3, 6), (1, 3, 4, 6)]))
    layer = pn.GroupNorm(data.draw(st.sampled_from([1, 2, 3, 6])), eps=data.draw(st.sampled_from([1e-5, 0.1])))
    x = _normal(data, shape) * 3 + 1
    params, _ = _params(layer, shape[1:])
    assert pn.check_grads(layer, x, params=params).ok


@pytest.mark.parametrize("shape,groups", [((2, 4, 5, 6), 3), ((3, 7, 4), 2), ((2, 6), 6), ((2, 2, 3, 2, 4), 1)])
def test_group_norm_equals_torch_on_the_nchw_transpose(shape, groups):
    layer = pn.GroupNorm(groups)
    x = jax.random.normal(jax.random.key(5), shape, jnp.float64) * 2 + 0.5
    params, _ = _params(layer, shape[1:])
    dy = jax.random.normal(jax.random.key(6), shape, jnp.float64)
    y, grads, dx = _layer_grads(layer, params, x, dy)
    to_first = (0, len(shape) - 1, *range(1, len(shape) - 1))  # channels last -> channels first
    back = tuple(np.argsort(to_first))
    xt, gt, bt = _t(x), _t(params["gamma"]), _t(params["beta"])
    yt = F.group_norm(xt.permute(*to_first), groups, gt, bt, eps=1e-5)
    yt.backward(torch.tensor(np.asarray(dy)).permute(*to_first))
    np.testing.assert_allclose(y, yt.detach().permute(*back).numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads["gamma"], gt.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads["beta"], bt.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_group_norm_of_huge_inputs_is_finite_and_scale_free():
    layer = pn.GroupNorm(2)
    params, _, _ = layer.init(jax.random.key(0), (3, 4), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (2, 3, 4), jnp.float32)
    small, big = layer.forward(params, {}, x)[0], layer.forward(params, {}, x * 1e20)[0]
    assert jnp.all(jnp.isfinite(big))
    np.testing.assert_allclose(small, big, rtol=1e-4, atol=1e-4)  # eps / c^2 vanishes for the big one


# ---------------------------------------------------------------- per-example gradients and norms, DP


def _seq_net():
    return pn.Sequential([pn.Conv1D(4, 3, padding="CAUSAL", implementation="im2col"), pn.GroupNorm(2), pn.Tanh(),
                          pn.Conv1D(4, 2, strides=2, dilation=1, implementation="xla"), pn.Flatten(), pn.Dense(3),
                          pn.Softmax()], in_shape=(6, 2))


def _image_net():
    return pn.Sequential([pn.Conv2D(4, 3, strides=2), pn.GroupNorm(2), pn.ReLU(), pn.ConvTranspose2D(3, 3, 2),
                          pn.Tanh(), pn.Upsample2D(2), pn.ConvTranspose2D(2, 2, 1, "VALID", use_bias=False),
                          pn.GroupNorm(1), pn.Flatten(), pn.Dense(3), pn.Softmax()], in_shape=(4, 4, 2))


def _grads_both_ways(net, params, state, x, y, l2):
    """(handwritten, autodiff): the batch gradient, per-example gradients and their norms, each side one
    jitted program (check_grads and check_per_example run op by op: ~4x the time on these nets)."""
    @jax.jit
    def ours(p):
        _, g, _ = pn.value_and_grad(net, p, state, x, y, l2=l2)
        _, per = pn.per_example_grads(net, p, state, x, y, l2=l2)
        return g, per, pn.per_example_grad_norms(net, p, state, x, y, l2=l2)

    @jax.jit
    def reference(p):
        def grad(xs, ys):
            return jax.grad(lambda q: pn.loss(net, q, state, xs, ys, l2=l2)[0])(p)
        per = jax.vmap(lambda xi, yi: grad(xi[None], yi[None]))(x, y)
        norms = jnp.sqrt(sum(jnp.sum(v.reshape(v.shape[0], -1) ** 2, 1) for v in jax.tree_util.tree_leaves(per)))
        return grad(x, y), per, norms

    return ours(params), reference(params)


@pytest.mark.parametrize("make", [_seq_net, _image_net])
def test_networks_match_autodiff_and_vmap_of_grad_per_example(make):
    net = make()
    params, state = pn.init(net, jax.random.key(0), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (3, *net.in_shape), jnp.float64)
    ours, reference = _grads_both_ways(net, params, state, x, jnp.array([0, 2, 1]), 0.1)
    for path, err in pn.testing.compare_trees(ours, reference).items():
        assert err <= 1e-10, path


def test_dp_clipping_of_a_group_norm_cnn_in_training_mode():
    net = pn.Sequential([pn.Conv2D(4, 3), pn.GroupNorm(2), pn.ReLU(), pn.MaxPool2D(2), pn.Flatten(), pn.Dense(3),
                         pn.Softmax()], in_shape=(4, 4, 1))
    params, state = pn.init(net, jax.random.key(0), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (4, 4, 4, 1), jnp.float64)
    y = jnp.array([0, 1, 2, 1])

    @jax.jit
    def both(p):
        _, clipped, _ = pn.clipped_value_and_grad(net, p, state, x, y, clip_norm=0.05, train=True)
        _, g = pn.per_example_grads(net, p, state, x, y, train=True)
        norms = jnp.sqrt(sum(jnp.sum(v.reshape(4, -1) ** 2, 1) for v in jax.tree_util.tree_leaves(g)))
        scale = jnp.minimum(1.0, 0.05 / norms)
        return clipped, jax.tree_util.tree_map(lambda v: jnp.mean(v * scale.reshape(-1, *[1] * (v.ndim - 1)), 0), g)

    clipped, expected = both(params)
    for path, err in pn.testing.compare_trees(clipped, expected).items():
        assert err <= 1e-10, path


# ---------------------------------------------------------------- bad input


def test_bad_input_names_the_layer_and_the_shapes():
    with pytest.raises(ValueError, match=r"GroupNorm\(num_groups=4.*6 channels.*example, shape \(5, 6\).*4 groups"):
        pn.GroupNorm(4).init(jax.random.key(0), (5, 6))
    with pytest.raises(ValueError, match=r"GroupNorm.*6 channels.*\(2, 5, 6\).*4 groups"):
        pn.GroupNorm(4).forward({"gamma": jnp.ones(6), "beta": jnp.zeros(6)}, {}, jnp.ones((2, 5, 6)))
    with pytest.raises(ValueError, match=r"GroupNorm.*\(batch, \.\.\., channels\).*\(6,\)"):
        pn.GroupNorm(2).forward({"gamma": jnp.ones(6), "beta": jnp.zeros(6)}, {}, jnp.ones(6))
    with pytest.raises(ValueError, match="num_groups must be a positive int"):
        pn.GroupNorm(0)
    with pytest.raises(ValueError, match=r"Conv1D\(features=2, kernel_size=5.*spanning 5 positions.*length 3"):
        pn.Conv1D(2, 5, padding="VALID").init(jax.random.key(0), (3, 1))
    with pytest.raises(ValueError, match=r"Conv1D.*spanning 9 positions.*length 6 padded by \(1, 0\)"):
        pn.Conv1D(2, 5, padding=(1, 0), dilation=2).forward({"W": jnp.ones((5, 1, 2)), "b": jnp.zeros(2)}, {},
                                                           jnp.ones((2, 6, 1)))
    with pytest.raises(ValueError, match=r"Conv1D.*\(length, channels\).*\(4, 4, 1\)"):
        pn.Conv1D(2, 3).init(jax.random.key(0), (4, 4, 1))
    with pytest.raises(ValueError, match=r"Conv1D.*\(batch, length, channels\).*\(2, 4, 4, 1\)"):
        pn.Conv1D(2, 3).forward({"W": jnp.ones((3, 1, 2)), "b": jnp.zeros(2)}, {}, jnp.ones((2, 4, 4, 1)))
    with pytest.raises(ValueError, match=r"Conv1D.*expects 1 input channels.*\(2, 4, 3\)"):
        pn.Conv1D(2, 3).forward({"W": jnp.ones((3, 1, 2)), "b": jnp.zeros(2)}, {}, jnp.ones((2, 4, 3)))
    with pytest.raises(ValueError, match="Conv1D padding must be"):
        pn.Conv1D(2, 3, padding="FULL")
    with pytest.raises(ValueError, match=r"ConvTranspose2D.*expects images.*\(4, 4\)"):
        pn.ConvTranspose2D(2, 3).init(jax.random.key(0), (4, 4))
    with pytest.raises(ValueError, match=r"ConvTranspose2D.*\(batch, height, width, channels\).*\(4, 4, 1\)"):
        pn.ConvTranspose2D(2, 3).forward({"W": jnp.ones((3, 3, 1, 2)), "b": jnp.zeros(2)}, {}, jnp.ones((4, 4, 1)))
    with pytest.raises(ValueError, match=r"ConvTranspose2D.*input of \(1, 1\) pixels.*leaves no output"):
        pn.ConvTranspose2D(2, 4, padding=0).init(jax.random.key(0), (1, 1, 1))
    with pytest.raises(ValueError, match=r"ConvTranspose2D.*expects 3 input channels.*\(1, 4, 4, 2\)"):
        pn.ConvTranspose2D(2, 3).forward({"W": jnp.ones((3, 3, 3, 2)), "b": jnp.zeros(2)}, {}, jnp.ones((1, 4, 4, 2)))
    with pytest.raises(ValueError, match=r"Upsample2D.*\(batch, height, width, channels\).*\(4, 4\)"):
        pn.Upsample2D(2).forward({}, {}, jnp.ones((4, 4)))
    with pytest.raises(ValueError, match="Upsample2D factor must be"):
        pn.Upsample2D(0)


def test_layers_are_hashable_and_declare_roles():
    for layer, shape in [(pn.Conv1D(2, 3), (5, 1)), (pn.ConvTranspose2D(2, 3), (3, 3, 1)), (pn.GroupNorm(1), (3, 2))]:
        hash(layer)
        params, _, _ = layer.init(jax.random.key(0), shape)
        roles = base.layer_roles(layer, params)
        assert set(roles.values()) <= {"weight", "bias", "gain"} and roles.get("W", "weight") == "weight"
    assert base.layer_roles(pn.GroupNorm(1), {"gamma": 0, "beta": 0}) == {"gamma": "gain", "beta": "bias"}
    assert pn.Conv1D(2, 3) == pn.Conv1D(2, 3) and hash(pn.Conv1D(2, 3)) == hash(pn.Conv1D(2, 3))
