"""Mixed precision: float32 master parameters, lower-precision activations and matmuls.

    fit(..., precision=pn.Precision(compute="bfloat16"))
    fit(..., precision=pn.Precision(compute="float16", loss_scale="dynamic"))

Each step casts the float32 params and the inputs to `compute`, runs the
forward and the handwritten backward there, and casts the gradients back:
the optimizer and its slots stay in float32. Where precision matters the
layers widen on their own (purenet.layers.base.wide): Dense accumulates dW
in float32, LayerNorm / RMSNorm / BatchNorm take their statistics in float32
(BatchNorm's running statistics stay float32), and softmax cross-entropy
takes its log-sum-exp in float32.

float16's range is narrow (6e-5 to 65504). A loss scale S multiplies the
seed gradient dL/dout before the backward (every gradient is linear in the
seed: small gradients are S times larger and do not flush to zero) and
divides the gradients, in float32, after it:

    seed = S * dL/dout  (in compute),    grads = backward(seed) / S  (in params' dtype)

loss_scale=S (a float) is static: pair it with `pn.optim.apply_if_finite(opt,
"skip")` so a step that overflows is skipped. loss_scale="dynamic" puts
`pn.optim.dynamic_loss_scale()` first in the optimizer (`Precision.optimizer`):
S lives in the optimizer state, starts at 2^15, halves (and the step is
skipped, params and slots bit-identical) whenever a gradient overflows,
and doubles after 2000 finite steps in a row. The step reads S from the
state (`pn.optim.current_loss_scale`) and passes it as `loss_scale=` to the
gradient function; a loss-scale slot, from either route, replaces the
static factor. For other settings chain `pn.optim.dynamic_loss_scale(...)`
into the optimizer yourself and keep the static factor at 1. `fit` and
`train` record S after each epoch as the history's "loss_scale".
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from purenet import network, optim
from purenet._checks import check_hyperparameter
from purenet.layers.base import Array, LayerLike
from purenet.losses import Loss
from purenet.training.gradients import GradFn

__all__ = ["Precision", "mixed_precision", "optimizer_for"]


@dataclasses.dataclass(frozen=True)
class Precision:
    """Mixed precision's settings: the compute dtype, the master dtype and the loss scale.

    Args:
        compute: the dtype of activations and matmuls, a floating dtype name
            ("bfloat16", "float16", "float32").
        params: the master dtype (params and optimizer slots), a floating dtype name.
        loss_scale: the factor on the seed gradient (float16 needs one), a
            positive float or "dynamic" (see the module docstring).

    Raises:
        ValueError: if `compute` or `params` is not a floating dtype, or
            `loss_scale` is neither a finite positive number nor "dynamic".
    """

    compute: str = "bfloat16"
    params: str = "float32"
    loss_scale: float | str = 1.0

    def __post_init__(self) -> None:
        for name in ("compute", "params"):
            dtype = jnp.dtype(getattr(self, name))
            if not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(f"Precision {name} must be a floating dtype, got {dtype}")
        if isinstance(self.loss_scale, str):
            if self.loss_scale != "dynamic":
                raise ValueError(f"Precision loss_scale must be a positive number or 'dynamic', "
                                 f"got {self.loss_scale!r}")
        else:
            check_hyperparameter("loss_scale", self.loss_scale, 0.0, None, low_open=True)

    @property
    def dynamic(self) -> bool:
        """Whether the loss scale is dynamic (kept in the optimizer state)."""
        return isinstance(self.loss_scale, str)

    def optimizer(self, opt: Any) -> Any:
        """The optimizer training in this precision uses; initialise its state from it.

        Args:
            opt: the optimizer (a `pn.optim.Optimizer` for loss_scale="dynamic").

        Returns:
            `opt`, or with loss_scale="dynamic"
                `chain(pn.optim.dynamic_loss_scale(), opt)` (guard "skip").

        Raises:
            ValueError: with loss_scale="dynamic", if `opt` is not a `pn.optim.Optimizer`.
        """
        if not self.dynamic:
            return opt
        if not isinstance(opt, optim.Optimizer):
            raise ValueError(f"Precision(loss_scale='dynamic') keeps its scale in a chain of transforms "
                             f"(pn.optim.Optimizer), got {type(opt).__name__}")
        return optim.chain(optim.dynamic_loss_scale(), opt)


def optimizer_for(opt: Any, precision: Precision | None) -> Any:
    """`precision.optimizer(opt)`, and `opt` itself without a precision.

    Args:
        opt: the optimizer.
        precision: the mixed precision, or None.

    Returns:
        The optimizer to build the state with and step.

    Raises:
        ValueError: as `Precision.optimizer`.
    """
    return opt if precision is None else precision.optimizer(opt)


def _cast(tree, dtype):
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a, tree)


def mixed_precision(net: LayerLike, precision: Precision, loss: str | Loss = "cross_entropy",
                    l2: float | Array = 0.0) -> GradFn:
    """A gradient function (see `purenet.training.gradients`) that computes in precision.compute.

    fn(params, state, x, y, key, loss_scale=None): `loss_scale` (a scalar,
    e.g. the dynamic scale the training step reads from the optimizer state)
    replaces precision.loss_scale; with loss_scale="dynamic" it is required.
    The loss value comes back in float32 (at least), the gradients in the
    params' dtype (unscaled in float32 at least), the l2 term added in that
    dtype after unscaling.

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        precision: the compute dtype and the loss scale (`Precision`).
        loss: the loss, a name or a `Loss`.
        l2: weight decay coefficient on the parameters whose role is "weight".

    Returns:
        A `GradFn` `fn(params, state, x, y, key, loss_scale=None) -> (loss, grads, state)`
            that takes "loss_scale"; calling it without `loss_scale` under
            loss_scale="dynamic" raises a ValueError.
    """
    compute = jnp.dtype(precision.compute)

    def fn(params, state, x, y, key, loss_scale=None):
        if loss_scale is None and precision.dynamic:
            raise ValueError("Precision(loss_scale='dynamic') keeps the scale in the optimizer state: build "
                             "the state with precision.optimizer(opt) (make_step then passes loss_scale=), or "
                             "pass loss_scale=pn.optim.current_loss_scale(opt_state)")
        scale = precision.loss_scale if loss_scale is None else loss_scale
        p = network.loss_pass(net, _cast(params, compute), state, _cast(x, compute), loss, train=True, key=key)
        value = p.loss_fn.value(p.out, y)
        grads = network.backward_pass(p, net, y, seed=lambda dout: (dout * scale).astype(compute))
        grads = jax.tree_util.tree_map(lambda g, w: _unscale(g, scale, w.dtype), grads, params)
        value, grads = network.add_l2(net, params, l2, value.astype(jnp.promote_types(value.dtype, jnp.float32)),
                                      grads)
        return value, grads, p.state

    return GradFn(fn, takes=frozenset({"loss_scale"}))


def _unscale(g, scale, dtype):
    """g / scale in at least float32, then in `dtype` (NaN and inf stay so: the step is skipped)."""
    wide = jnp.promote_types(dtype, jnp.float32)
    return (g.astype(wide) / jnp.asarray(scale, wide)).astype(dtype)
