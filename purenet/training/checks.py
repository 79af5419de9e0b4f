"""Eager checks every entry point (fit, train, sweep) runs before training."""
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from purenet import distributed, losses, network
from purenet._checks import check_finite_rows, check_float_input, check_hyperparameter
from purenet.layers.base import Array, LayerLike, PyTree
from purenet.layers.roles import id_layer
from purenet.training.early_stopping import EarlyStopping

__all__ = [
    "batch_size_of", "check_arguments", "check_data", "check_divisible", "check_inputs", "check_monitor", "is_int",
]


def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def batch_size_of(n: int, batch_size: int | None) -> int:
    if batch_size is None:
        return n
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or None (full batch), got {batch_size!r}")
    return min(int(batch_size), n)


def check_arguments(epochs: int, batch_size: int | None, l2: float | Array, checkpoint_every: int = 1,
                    accumulate: int = 1) -> None:
    """Eager checks of the run's arguments, each error naming the argument."""
    if not is_int(accumulate) or accumulate < 1:
        raise ValueError(f"accumulate must be a positive integer (micro-batches per batch), got {accumulate!r}")
    if not is_int(epochs) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    batch_size_of(1, batch_size)
    check_hyperparameter("l2", l2, 0.0, None)
    if not is_int(checkpoint_every) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive integer (epochs), got {checkpoint_every!r}")


def check_data(net: LayerLike, x: Array, y: Array, loss: str | losses.Loss, params: PyTree, state: PyTree,
               name: str = "x") -> None:
    """Eager checks every entry point runs before training: dtypes, shapes, finiteness, label ranges.

    params and state may be abstract (jax.ShapeDtypeStruct); value checks
    run when x and y are concrete.
    """
    check_float_input(x, name, ids=id_layer(net))
    if jnp.ndim(y) == 0:
        raise ValueError(f"{name}'s targets must have a batch axis, got a scalar")
    if jnp.shape(y)[0] != jnp.shape(x)[0]:
        raise ValueError(f"{name} has {jnp.shape(x)[0]} rows but its targets have {jnp.shape(y)[0]}")
    check_finite_rows(x, name)
    out = jax.eval_shape(lambda p, s, x: network.forward(net, p, s, x)[0], params, state,
                         jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)))
    loss_fn = losses.get(loss)
    if loss_fn.targets is None:  # a loss that declares no target kind judges its own (its shapes are checked)
        jax.eval_shape(losses.checked(loss_fn).backward, out, jax.ShapeDtypeStruct(jnp.shape(y), jnp.result_type(y)))
        return
    target_check = losses.class_targets if loss_fn.targets == "classes" else losses.value_targets
    target_check(str(loss), jnp.zeros(out.shape, out.dtype), y)


def check_inputs(net: LayerLike, x: Array, y: Array, validation: tuple[Array, Array] | None, loss: str | losses.Loss,
                 params: PyTree, state: PyTree) -> None:
    """check_data on the training data and the validation data, if any."""
    check_data(net, x, y, loss, params, state)
    if validation is not None:
        check_data(net, *validation, loss, params, state, name="validation x")


def check_monitor(early_stopping: EarlyStopping | None, validation: tuple[Array, Array] | None) -> None:
    if early_stopping is not None and early_stopping.monitor != "loss" and validation is None:
        raise ValueError(f"EarlyStopping monitors {early_stopping.monitor!r}, which needs validation data")


def check_divisible(mesh: Mesh | None, n: int, batch_size: int | None) -> None:
    if mesh is not None:
        distributed.check_divisible(batch_size_of(n, batch_size), mesh)
