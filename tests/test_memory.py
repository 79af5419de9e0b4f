"""The handwritten backward stores no more than autodiff does (compiled memory, not timing)."""
import jax
import jax.numpy as jnp
import pytest

import purenet as pn


def temp_bytes(fn, *args):
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    if analysis is None:  # pragma: no cover - backends without the analysis
        pytest.skip("this backend reports no memory analysis")
    return analysis.temp_size_in_bytes


@pytest.mark.parametrize("hidden", ["relu", "sigmoid", "tanh", "leaky_relu"])
def test_train_step_memory_is_no_larger_than_jax_grad(hidden):
    net = pn.mlp([256, 512, 512, 10], hidden=hidden)
    params, state = pn.init(net, jax.random.key(0), dtype=jnp.float32)
    x = jnp.ones((256, 256), jnp.float32)
    y = jnp.zeros(256, jnp.int32)
    ours = temp_bytes(lambda p, xx: pn.value_and_grad(net, p, state, xx, y)[:2], params, x)
    reference = temp_bytes(jax.value_and_grad(lambda p, xx: pn.loss(net, p, state, xx, y)[0]), params, x)
    assert ours <= reference, (ours, reference)
