"""Forward values and gradients equal PyTorch's (torch.nn.functional) in float64.

Each case runs the purenet layer forward and its handwritten backward with a
random cotangent, and the same computation in PyTorch with autograd.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import purenet as pn

torch = pytest.importorskip("torch")
F = torch.nn.functional

SHAPE = (3, 4, 6)  # (batch, positions, features)


def _purenet(layer, x, dy, params=None):
    if params is None:
        params, _, _ = layer.init(jax.random.key(0), x.shape[1:], dtype=jnp.float64)
    y, _, cache = layer.forward(params, {}, x)
    grads, dx = layer.backward(params, cache, dy)
    return np.asarray(y), np.asarray(dx), grads


def _torch(fn, x, dy, *tensors):
    xt = torch.tensor(np.asarray(x), requires_grad=True)
    ts = [torch.tensor(np.asarray(t), requires_grad=True) for t in tensors]
    y = fn(xt, *ts)
    y.backward(torch.tensor(np.asarray(dy)))
    return y.detach().numpy(), xt.grad.numpy(), [t.grad.numpy() for t in ts]


def _data(seed=0, scale=3.0):
    kx, kd = jax.random.split(jax.random.key(seed))
    x = scale * jax.random.normal(kx, SHAPE, jnp.float64)
    return x.at[0, 0, 0].set(0.0), jax.random.normal(kd, SHAPE, jnp.float64)  # a kink at 0 too


ACTIVATIONS = [
    (pn.GELU(), lambda x: F.gelu(x)),
    (pn.GELU(approximate=True), lambda x: F.gelu(x, approximate="tanh")),
    (pn.SiLU(), F.silu),
    (pn.ELU(), F.elu),
    (pn.ELU(alpha=0.3), lambda x: F.elu(x, alpha=0.3)),
    (pn.Softplus(), F.softplus),  # torch switches to x above 20; the inputs stay well below
    (pn.ReLU(), F.relu),
    (pn.LeakyReLU(0.1), lambda x: F.leaky_relu(x, 0.1)),
    (pn.Sigmoid(), torch.sigmoid),
    (pn.Tanh(), torch.tanh),
]


@pytest.mark.parametrize("layer,reference", ACTIVATIONS, ids=[repr(layer) for layer, _ in ACTIVATIONS])
def test_activation_equals_torch(layer, reference):
    x, dy = _data()
    y, dx, _ = _purenet(layer, x, dy)
    ty, tdx, _ = _torch(reference, x, dy)
    np.testing.assert_allclose(y, ty, rtol=1e-13, atol=1e-14)  # atol: a few ulps of the outputs' scale
    if isinstance(layer, pn.LeakyReLU):
        # The one documented difference: at exactly 0, leaky_relu'(0) = 1 as jax.nn defines it;
        # PyTorch takes the negative slope there.
        np.testing.assert_allclose([dx[0, 0, 0], tdx[0, 0, 0]], [dy[0, 0, 0], 0.1 * dy[0, 0, 0]], rtol=1e-15)
        dx, tdx = dx.ravel()[1:], tdx.ravel()[1:]
    np.testing.assert_allclose(dx, tdx, rtol=1e-12, atol=1e-13)  # gelu-tanh cancels in 1 + tanh at x << 0


@pytest.mark.parametrize("use_bias", [True, False])
def test_layer_norm_equals_torch(use_bias):
    x, dy = _data(1)
    layer = pn.LayerNorm(eps=1e-5, use_bias=use_bias)
    k1, k2 = jax.random.split(jax.random.key(2))
    params = {"gamma": 1 + 0.1 * jax.random.normal(k1, (6,), jnp.float64)}
    if use_bias:
        params["beta"] = jax.random.normal(k2, (6,), jnp.float64)
    y, dx, grads = _purenet(layer, x, dy, params)
    tensors = [params["gamma"]] + ([params["beta"]] if use_bias else [])
    ty, tdx, tgrads = _torch(lambda v, *wb: F.layer_norm(v, (6,), *wb, eps=1e-5), x, dy, *tensors)
    np.testing.assert_allclose(y, ty, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dx, tdx, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(grads["gamma"], tgrads[0], rtol=1e-12)
    if use_bias:
        np.testing.assert_allclose(grads["beta"], tgrads[1], rtol=1e-12)


def test_rms_norm_equals_torch():
    x, dy = _data(3)
    params = {"gamma": 1 + 0.1 * jax.random.normal(jax.random.key(4), (6,), jnp.float64)}
    y, dx, grads = _purenet(pn.RMSNorm(eps=1e-6), x, dy, params)
    ty, tdx, (tgamma,) = _torch(lambda v, w: F.rms_norm(v, (6,), w, eps=1e-6), x, dy, params["gamma"])
    np.testing.assert_allclose(y, ty, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dx, tdx, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(grads["gamma"], tgamma, rtol=1e-12)
