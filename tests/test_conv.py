"""Conv2D and the pools: handwritten backward against jax.grad (float64) and PyTorch,
both formulations, per-example gradients and norms, CNNs, bad input."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import purenet as pn
from tests.conftest import scaled
from purenet.testing import check_per_example, net_cases

IMPLS = ["im2col", "xla", "taps"]
KERNELS = st.sampled_from([1, 2, 3, (2, 3), (3, 1)])
PADDINGS = st.sampled_from(["SAME", "VALID", 1, ((0, 2), (1, 0))])


def _images(data, channels=None, ties=False):
    shape = (data.draw(st.sampled_from([1, 3]), label="batch"), *data.draw(st.sampled_from([(5, 5), (6, 7)])),
             channels or data.draw(st.sampled_from([1, 2, 3]), label="channels"))
    x = jax.random.normal(jax.random.key(data.draw(st.integers(0, 2**31 - 1), label="seed")), shape, jnp.float64)
    return jnp.round(x) if ties else x  # rounded: windows hold their maximum more than once


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=scaled(3))
@given(data=st.data())
def test_conv2d_backward_matches_autodiff(impl, data):
    layer = pn.Conv2D(data.draw(st.sampled_from([1, 2, 4])), data.draw(KERNELS),
                      strides=data.draw(st.sampled_from([1, 2, (1, 2)])), padding=data.draw(PADDINGS),
                      dilation=data.draw(st.sampled_from([1, 2, (2, 1)])), use_bias=data.draw(st.booleans()),
                      implementation=impl)
    x = _images(data)
    try:
        layer.init(jax.random.key(0), x.shape[1:])
    except ValueError:
        assume(False)  # the window does not fit this input
    assert pn.check_grads(layer, x).ok


POOLS = {
    "max": lambda d: pn.MaxPool2D(d.draw(st.sampled_from([2, 3, (1, 2)])), strides=d.draw(st.sampled_from([None, 1, 2])),
                                  padding=d.draw(st.sampled_from(["VALID", "SAME"]))),
    "avg": lambda d: pn.AvgPool2D(d.draw(st.sampled_from([2, 3, (2, 1)])), strides=d.draw(st.sampled_from([None, 1])),
                                  padding=d.draw(st.sampled_from(["VALID", "SAME", 1]))),
    "global": lambda d: pn.GlobalAvgPool2D(),
}


@pytest.mark.parametrize("name", sorted(POOLS))
@settings(max_examples=scaled(3))
@given(data=st.data())
def test_pool_backward_matches_autodiff_including_ties(name, data):
    layer = POOLS[name](data)
    x = _images(data, ties=data.draw(st.booleans(), label="ties"))
    assert pn.check_grads(layer, x).ok


@settings(max_examples=scaled(3))
@given(net_cases(max_depth=3, images=True, batchnorm=True))
def test_cnns_match_autodiff(case):
    params, state, x, y = case.data()
    report = pn.check_grads(case.net, x, y, loss=case.loss, params=params, state=state, l2=case.l2)
    assert report.ok, f"{case}\n{report}"


@settings(max_examples=scaled(2))
@given(net_cases(max_depth=2, images=True))
def test_cnn_per_example_grads_and_norms_equal_vmap_of_grad(case):
    params, state, x, y = case.data()
    check_per_example(case.net, x, y, loss=case.loss, params=params, state=state, l2=case.l2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("out_channels", [2, 40])  # T (K + F) < K F picks the ghost norm (40); else dW_i (2)
def test_conv_per_example_paths_in_chunks_equal_the_generic_default(out_channels, impl):
    """T = 9 output pixels, so both formulations of the norms. A batch of 37 on the CPU runs the
    per-example paths PER_EXAMPLE_CHUNK (16) examples at a time, then the remaining 5: gradients and
    norms (l2 = 0.1) equal the layer's own backward vmapped over the examples, and dx the batch's."""
    from purenet.layers import base, conv
    assert conv.PER_EXAMPLE_CHUNK.get(jax.default_backend()) in (None, 16)
    layer = pn.Conv2D(out_channels, 3, padding="VALID", implementation=impl)
    params, _, _ = layer.init(jax.random.key(0), (5, 5, 3))
    x = jax.random.normal(jax.random.key(1), (37, 5, 5, 3))
    dy = jax.random.normal(jax.random.key(2), (37, 3, 3, out_channels))

    @jax.jit
    def paths(params, x, dy):
        _, _, cache = layer.forward(params, {}, x)
        return (base.per_example_backward(layer, params, cache, dy), base.per_example_sq_norms(layer, params, cache, dy, 0.1),
                base.generic_per_example_backward(layer, params, cache, dy), layer.backward(params, cache, dy)[1])

    (grads, dx), (sq, dx2), (ref, _), dx_ref = paths(params, x, dy)
    chex.assert_trees_all_close(grads, ref, rtol=1e-10, atol=1e-12)
    explicit = jnp.sum((ref["W"] + 0.1 * params["W"]) ** 2, axis=(1, 2, 3, 4)) + jnp.sum(ref["b"] ** 2, 1)
    np.testing.assert_allclose(sq, explicit, rtol=1e-10)
    chex.assert_trees_all_close((dx, dx2), (dx_ref, dx_ref), rtol=1e-12, atol=1e-12)


def test_the_formulations_agree_and_auto_picks_one():
    x = jax.random.normal(jax.random.key(0), (2, 9, 8, 3))
    a, b, t, auto = (pn.Conv2D(5, 3, strides=2, implementation=i) for i in ("im2col", "xla", "taps", "auto"))
    params, _, _ = a.init(jax.random.key(1), x.shape[1:])
    (ya, _, ca), (yb, _, cb), (yt, _, ct), (yc, _, _) = (layer.forward(params, {}, x) for layer in (a, b, t, auto))
    np.testing.assert_allclose(ya, yb, rtol=1e-12)
    np.testing.assert_allclose(yt, yb, rtol=1e-12)
    np.testing.assert_allclose(yc, yb, rtol=1e-12)
    dy = jax.random.normal(jax.random.key(2), ya.shape)
    chex.assert_trees_all_close(a.backward(params, ca, dy), b.backward(params, cb, dy), rtol=1e-12)
    chex.assert_trees_all_close(t.backward(params, ct, dy), b.backward(params, cb, dy), rtol=1e-12)
    if jax.default_backend() == "cpu":
        # auto: taps (x cached) up to kh kw C = 32, im2col (patches cached) for <= 3 channels, xla (x cached) above
        assert auto._impl(params["W"]) == "taps" and auto.forward(params, {}, x)[2].inputs.shape == x.shape
        wide = pn.Conv2D(5, 5, strides=2)
        p5, _, _ = wide.init(jax.random.key(1), x.shape[1:])
        assert wide._impl(p5["W"]) == "im2col" and wide.forward(p5, {}, x)[2].inputs.shape == (2, 5, 4, 75)
        x4 = jnp.concatenate([x, x[..., :1]], axis=-1)
        p4, _, _ = auto.init(jax.random.key(1), x4.shape[1:])
        assert auto._impl(p4["W"]) == "xla" and auto.forward(p4, {}, x4)[2].inputs.shape == x4.shape


def test_conv_initializers_count_the_receptive_field_as_jax_does():
    key = jax.random.key(3)
    for name, ref in [("he_normal", jax.nn.initializers.he_normal()),
                      ("xavier_uniform", jax.nn.initializers.glorot_uniform()),
                      ("lecun_normal", jax.nn.initializers.lecun_normal())]:
        params, _, out = pn.Conv2D(6, (3, 5), init=name).init(key, (8, 8, 4), dtype=jnp.float32)
        np.testing.assert_array_equal(params["W"], ref(key, (3, 5, 4, 6), jnp.float32), err_msg=name)
        assert out == (8, 8, 6)


def test_batchnorm_on_images_normalises_each_channel():
    x = 3 + 2 * jax.random.normal(jax.random.key(0), (4, 5, 5, 3))
    params, state = pn.init(pn.BatchNorm(), jax.random.key(1), (5, 5, 3))
    y, new_state = pn.forward(pn.BatchNorm(), params, state, x, train=True)
    np.testing.assert_allclose(jnp.mean(y, axis=(0, 1, 2)), 0, atol=1e-12)
    np.testing.assert_allclose(jnp.var(y, axis=(0, 1, 2)), 1, rtol=1e-4)
    np.testing.assert_allclose(new_state["mean"], 0.1 * jnp.mean(x, axis=(0, 1, 2)), rtol=1e-12)


# ------------------------------------------------------------------ PyTorch, float64


torch = pytest.importorskip("torch")
F = torch.nn.functional


def _torch_grads(fn, x, dy, *tensors):
    xt = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2), requires_grad=True)
    ts = [torch.tensor(np.asarray(t), requires_grad=True) for t in tensors]
    y = fn(xt, *ts)
    y.backward(torch.tensor(np.asarray(dy).transpose(0, 3, 1, 2)))
    return y.detach().numpy().transpose(0, 2, 3, 1), xt.grad.numpy().transpose(0, 2, 3, 1), [t.grad for t in ts]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("strides,padding,dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2), ((2, 1), ((1, 1), (0, 0)), 1)])
def test_conv2d_equals_torch(impl, strides, padding, dilation):
    layer = pn.Conv2D(4, 3, strides=strides, padding=padding, dilation=dilation, implementation=impl)
    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3), jnp.float64)
    params, _, _ = layer.init(jax.random.key(1), x.shape[1:], dtype=jnp.float64)
    params["b"] = jax.random.normal(jax.random.key(2), (4,), jnp.float64)
    y, _, cache = layer.forward(params, {}, x)
    dy = jax.random.normal(jax.random.key(3), y.shape, jnp.float64)
    grads, dx = layer.backward(params, cache, dy)
    pads = layer._geometry(x.shape[1:3]).pads
    w = np.asarray(params["W"]).transpose(3, 2, 0, 1)  # HWIO -> OIHW
    ty, tdx, (tw, tb) = _torch_grads(
        lambda v, w_, b_: F.conv2d(F.pad(v, (*pads[1], *pads[0])), w_, b_, stride=layer.strides,
                                   dilation=layer.dilation), x, dy, w, params["b"])
    np.testing.assert_allclose(y, ty, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dx, tdx, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(grads["W"], tw.numpy().transpose(2, 3, 1, 0), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(grads["b"], tb.numpy(), rtol=1e-12)


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("window,strides,padding", [(2, None, "VALID"), (3, 2, 1), ((2, 3), 1, "VALID")])
def test_pools_equal_torch(kind, window, strides, padding):
    layer = (pn.MaxPool2D if kind == "max" else pn.AvgPool2D)(window, strides=strides, padding=padding)
    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3), jnp.float64)
    y, _, cache = layer.forward({}, {}, x)
    dy = jax.random.normal(jax.random.key(1), y.shape, jnp.float64)
    _, dx = layer.backward({}, cache, dy)
    pad = 0 if padding == "VALID" else padding
    fn = F.max_pool2d if kind == "max" else F.avg_pool2d
    ty, tdx, _ = _torch_grads(lambda v: fn(v, window, stride=strides or window, padding=pad), x, dy)
    np.testing.assert_allclose(y, ty, rtol=1e-13)
    np.testing.assert_allclose(dx, tdx, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ bad input


def test_conv_errors_name_the_layer_and_shapes():
    conv = pn.Conv2D(4, 3)
    params, state = pn.init(conv, jax.random.key(0), (8, 8, 3))
    with pytest.raises(ValueError, match=r"expects 3 input channels \(W has shape \(3, 3, 3, 4\)\), got x of shape "
                                         r"\(2, 8, 8, 1\)"):
        pn.forward(conv, params, state, jnp.ones((2, 8, 8, 1)))
    with pytest.raises(ValueError, match=r"expects images of shape \(batch, height, width, channels\), got x of "
                                         r"shape \(2, 64\)"):
        pn.forward(conv, params, state, jnp.ones((2, 64)))
    with pytest.raises(ValueError, match=r"layer 1 \(Conv2D\).*window spanning \(5, 5\) pixels does not fit the "
                                         r"input of \(4, 4\) pixels"):
        pn.init(pn.Sequential([pn.Conv2D(2, 3, padding="VALID"), pn.Conv2D(2, 5, padding="VALID")]),
                jax.random.key(0), (6, 6, 1))
    with pytest.raises(ValueError, match=r"expects images: an example shape \(height, width, channels\), got \(64,\)"):
        pn.init(pn.MaxPool2D(2), jax.random.key(0), 64)
    with pytest.raises(ValueError, match="kernel_size must be a positive int or a pair"):
        pn.Conv2D(4, 0)
    with pytest.raises(ValueError, match="padding must be 'SAME', 'VALID'"):
        pn.Conv2D(4, 3, padding="FULL")
    with pytest.raises(ValueError, match="implementation must be one of"):
        pn.Conv2D(4, 3, implementation="cudnn")


MNIST = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def test_mnist_as_images():
    if not (MNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"the shared MNIST files are not at {MNIST}")
    images, labels = pn.datasets.mnist(MNIST, shape="image")
    rows, _ = pn.datasets.mnist(MNIST)
    assert images.shape == (10000, 28, 28, 1) and images.dtype == np.float32
    np.testing.assert_array_equal(images.reshape(10000, -1), rows)
    with pytest.raises(ValueError, match="shape must be 'rows' or 'image'"):
        pn.datasets.mnist(MNIST, shape="nchw")
