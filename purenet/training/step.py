"""One training step, pure: step((opt_state, model_state), (x, y, key)) -> ((opt_state, model_state), loss)."""
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from purenet import distributed
from purenet.layers.base import Array
from purenet.optim import current_loss_scale, tree
from purenet.training.gradients import GradFn, as_grad_fn

__all__ = ["Step", "make_step"]


@dataclasses.dataclass(frozen=True)
class Step:
    """A training step, step(carry, batch) -> (carry, loss), and whether it skips non-finite updates.

    Calling it calls `fn`. carry is (opt_state, model_state); batch is
    (x, y, key) or, for DP-SGD's Poisson batches, (x, y, key, weight).

    Args:
        fn: the step function `(carry, batch) -> (carry, loss)`.
        skips: whether it skips non-finite updates (an optimizer guarded by
            apply_if_finite(..., "skip")); an epoch then averages the loss
            over the steps it applied (a skipped step reports NaN).
    """

    fn: Callable[[tuple, tuple], tuple[tuple, Array]]
    skips: bool = False

    def __call__(self, carry: tuple, batch: tuple) -> tuple[tuple, Array]:
        return self.fn(carry, batch)


def make_step(grad_fn: Callable[..., tuple], opt: Any, augment: Callable[..., tuple[Array, Array]] | None = None,
              mesh: Mesh | None = None, strategy: str | None = None,
              net: Any = None) -> Step:
    """A training step from a gradient function (see `purenet.training.gradients`) and an optimizer.

    The step's key splits in two: dropout (and DP noise) draw from the
    first, `augment(key, x, y) -> (x, y)` from the second. With a `mesh`
    (see purenet.distributed) the batch is split over its devices and XLA
    reduces the gradients across them. With an optimizer guarded by
    apply_if_finite(..., "skip"), a step whose gradients are not finite
    leaves the model state (BatchNorm's running statistics) as it was, as
    the optimizer leaves params and slots. When the optimizer state keeps a
    dynamic loss scale (pn.optim.dynamic_loss_scale) the step passes it to
    grad_fn as `loss_scale=`; a grad_fn that does not take it is an error.
    What grad_fn takes and provides is its contract (`GradFn`; a plain
    function takes and provides nothing else): an optimizer with per-step
    arguments (`opt.extra_args`, K-FAC's factors) needs a grad_fn that
    provides them (it returns (loss, grads, state, {name: value}) and the
    step passes them to `opt.step`); a batch with a fourth entry (a Poisson
    batch's marks) needs one that takes "weight"; one that takes "count"
    gets the optimizer's step count.

    strategy="fsdp" | "tensor" | "fsdp+tensor" (with a `mesh` from
    pn.distributed.mesh, and the `net` whose layers say how they split) keeps
    the gradients, the params and every params-shaped part of the optimizer
    state split as `pn.distributed.shard_params` places them: the gradients
    are pinned to the params' sharding, so XLA reduce-scatters them (FSDP)
    instead of all-reducing them, and each device updates only its part.

    Args:
        grad_fn: the gradient function `(params, state, x, y, key, **taken) -> (loss, grads, state[, provided])`,
            a `GradFn` or a plain function.
        opt: the optimizer (its state carries the params).
        augment: an augmentation `(key, x, y) -> (x, y)` applied to each batch, or None.
        mesh: a device mesh to split each batch over, or None (one device).
        strategy: "fsdp", "tensor" or "fsdp+tensor" to keep params, gradients
            and slots sharded (needs `mesh` and `net`), or None.
        net: the network, needed with `strategy`.

    Returns:
        A `Step`: `step((opt_state, model_state), (x, y, key[, weight])) -> ((opt_state, model_state), loss)`.

    Raises:
        ValueError: if the optimizer needs per-step arguments that grad_fn does
            not provide, `strategy` is unknown or lacks its mesh axes, or
            `strategy` is given without `net`. The step itself raises a
            ValueError when a batch has Poisson marks and grad_fn takes no
            "weight", or the optimizer keeps a dynamic loss scale and grad_fn
            takes no "loss_scale".
    """
    grad_fn = as_grad_fn(grad_fn)
    needed = tuple(getattr(opt, "extra_args", ()))
    if set(needed) - set(grad_fn.provides):
        raise ValueError(f"the optimizer's step needs {needed} beside the gradient, which this gradient function "
                         f"does not provide; build the step with pn.training.build_step (it computes them)")

    skips = getattr(opt, "guard", None) == "skip"
    if strategy is not None:
        distributed.check_strategy(strategy, mesh)
        if net is None:
            raise ValueError(f"make_step(..., strategy={strategy!r}) needs net= (its layers say how their "
                             f"parameters split); pn.training.build_step passes it")

    def step(carry, batch):
        opt_state, model_state = carry
        x, y, key, *weight = batch  # a fourth entry: a padded Poisson batch's 0/1 marks (DP-SGD)
        k_grad, k_aug = jax.random.split(key)
        if mesh is not None:
            x, y = (jax.lax.with_sharding_constraint(v, distributed.batch_sharding(mesh)) for v in (x, y))
        if augment is not None:
            x, y = augment(k_aug, x, y)
        if weight and "weight" not in grad_fn.takes:
            raise ValueError("the batch carries Poisson marks (a fourth entry), but the gradient function takes no "
                             "weight=: Poisson batches are DP-SGD's (pn.training.dp_sgd)")
        marks = {"weight": weight[0]} if weight else {}
        if "count" in grad_fn.takes:  # K-FAC's factors on every k-th step only
            marks["count"] = opt_state.count
        out = grad_fn(opt_state.params, model_state, x, y, k_grad, **_scale_for(grad_fn, opt_state), **marks)
        value, grads, new_state = out[:3]
        extra = {n: out[3][n] for n in needed}
        if strategy is not None:
            shardings = distributed.param_shardings(net, opt_state.params, mesh, strategy)
            grads = distributed.constrain(grads, shardings)
        if skips:  # a skipped step keeps the model state too (BatchNorm's), and reports no loss
            finite = tree.all_finite(grads)
            new_state = tree.where(finite, new_state, model_state)
            value = jnp.where(finite, value, jnp.nan)
        new_opt_state = opt.step(opt_state, grads, **extra)
        if strategy is not None:
            new_opt_state = distributed.constrain(new_opt_state, distributed.tree_shardings(
                net, new_opt_state, opt_state.params, mesh, strategy))
        return (new_opt_state, new_state), value

    return Step(step, skips)


def _scale_for(grad_fn: GradFn, opt_state: Any) -> dict:
    """{"loss_scale": S} when opt_state keeps a dynamic loss scale S, else {}."""
    scale = current_loss_scale(opt_state)
    if scale is None:
        return {}
    if "loss_scale" not in grad_fn.takes:
        raise ValueError("the optimizer keeps a dynamic loss scale (pn.optim.dynamic_loss_scale), but the "
                         "gradient function takes no loss_scale=: train in float16 with "
                         "precision=pn.Precision(compute='float16') (pn.training.mixed_precision), or declare "
                         "your own function's as pn.training.GradFn(fn, takes={'loss_scale'})")
    return {"loss_scale": scale}

