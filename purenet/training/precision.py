"""Mixed precision: float32 master parameters, lower-precision activations and matmuls.

    fit(..., precision=pn.Precision(compute="bfloat16"))

Each step casts the float32 params and the inputs to `compute`, runs the
forward and the handwritten backward there, and casts the gradients back:
the optimizer and its slots stay in float32. Where precision matters the
layers widen on their own (purenet.layers.base.wide): Dense accumulates dW
in float32, LayerNorm / RMSNorm / BatchNorm take their statistics in float32
(BatchNorm's running statistics stay float32), and softmax cross-entropy
takes its log-sum-exp in float32.

float16's range is narrow (6e-5 to 65504): `loss_scale` multiplies the
seed gradient dL/dout before the backward (so small gradients do not flush
to zero) and divides the gradients after it; pair it with
`pn.optim.apply_if_finite(opt, "skip")` so a step that overflows is skipped.
"""
import dataclasses

import jax
import jax.numpy as jnp

from purenet import losses, network
from purenet._checks import check_hyperparameter


@dataclasses.dataclass(frozen=True)
class Precision:
    """compute: the dtype of activations and matmuls; params: the master dtype (params and
    optimizer slots); loss_scale: the factor on the seed gradient (float16 needs it)."""

    compute: str = "bfloat16"
    params: str = "float32"
    loss_scale: float = 1.0

    def __post_init__(self):
        for name in ("compute", "params"):
            dtype = jnp.dtype(getattr(self, name))
            if not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(f"Precision {name} must be a floating dtype, got {dtype}")
        check_hyperparameter("loss_scale", self.loss_scale, 0.0, None, low_open=True)


def _cast(tree, dtype):
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a, tree)


def mixed_precision(net, precision, loss="cross_entropy", l2=0.0):
    """A gradient function (see `purenet.training.gradients`) that computes in precision.compute.

    The loss value comes back in float32 (at least), the gradients in the
    params' dtype, the l2 term added in that dtype after unscaling.
    """
    compute, scale = jnp.dtype(precision.compute), precision.loss_scale

    def fn(params, state, x, y, key):
        p = network.loss_pass(net, _cast(params, compute), state, _cast(x, compute), loss, train=True, key=key)
        value = p.loss_fn.value(p.out, y)
        seed = (p.loss_fn.backward(p.out, y) * scale).astype(compute)
        body_grads, _ = p.body.backward(p.body_params, p.cache, seed)
        grads = jax.tree_util.tree_map(lambda g, w: g.astype(w.dtype) / scale, p.grads(net, body_grads), params)
        value = value.astype(jnp.promote_types(value.dtype, jnp.float32)) + losses.l2_penalty(params, l2)
        return value, losses.add_l2_gradient(grads, params, l2), p.state

    return fn
