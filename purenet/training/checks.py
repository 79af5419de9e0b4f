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
    """Whether `value` is a Python or numpy integer (bools are not).

    Args:
        value: anything.

    Returns:
        True for an int or np.integer that is not a bool.
    """
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def batch_size_of(n: int, batch_size: int | None) -> int:
    """The batch size a run of `n` examples uses: `batch_size`, capped at n; None is n (full batch).

    Args:
        n: the number of training examples.
        batch_size: a positive int, or None for full-batch training.

    Returns:
        min(batch_size, n), or n.

    Raises:
        ValueError: if `batch_size` is not a positive int or None.
    """
    if batch_size is None:
        return n
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or None (full batch), got {batch_size!r}")
    return min(int(batch_size), n)


def check_arguments(epochs: int, batch_size: int | None, l2: float | Array, checkpoint_every: int = 1,
                    accumulate: int = 1) -> None:
    """Eager checks of the run's arguments, each error naming the argument.

    Args:
        epochs: the number of epochs, an int >= 0.
        batch_size: a positive int, or None (full batch).
        l2: the weight decay coefficient, a finite number >= 0 (or an array).
        checkpoint_every: epochs between checkpoints, a positive int.
        accumulate: micro-batches per batch, a positive int.

    Raises:
        ValueError: naming the first argument out of its range or not an int.
    """
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
    run when x and y are concrete. The network's output shape comes from
    `jax.eval_shape`, so nothing is computed.

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        x: inputs, shape (batch, *in_shape): floats, or integer ids for a
            network that starts with an embedding.
        y: targets, shape (batch, ...): integer labels or distributions for a
            classification loss, the output's shape for a value loss.
        loss: the loss, a name (e.g. "cross_entropy") or a `Loss`.
        params: the parameters (arrays or `jax.ShapeDtypeStruct`s).
        state: the model state (arrays or `jax.ShapeDtypeStruct`s).
        name: how the error messages name x ("validation x", ...).

    Raises:
        TypeError: if x is not floating point (integer ids for an id network),
            or integer labels are expected and y holds something else.
        ValueError: if x or y has no batch axis, x is empty, their rows differ,
            a row of x is not finite, an id or label is out of range, or y's
            shape does not fit the network's output.
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
    """check_data on the training data and the validation data, if any.

    Args:
        net: the network.
        x: training inputs, shape (batch, *in_shape).
        y: training targets, shape (batch, ...).
        validation: (x_val, y_val), or None.
        loss: the loss, a name or a `Loss`.
        params: the parameters (arrays or `jax.ShapeDtypeStruct`s).
        state: the model state (arrays or `jax.ShapeDtypeStruct`s).

    Raises:
        TypeError: as `check_data`.
        ValueError: as `check_data`.
    """
    check_data(net, x, y, loss, params, state)
    if validation is not None:
        check_data(net, *validation, loss, params, state, name="validation x")


def check_monitor(early_stopping: EarlyStopping | None, validation: tuple[Array, Array] | None) -> None:
    """Raise when early stopping monitors a validation metric and there is no validation data.

    Args:
        early_stopping: the early stopping, or None.
        validation: (x_val, y_val), or None.

    Raises:
        ValueError: if `early_stopping.monitor` is not "loss" and `validation` is None.
    """
    if early_stopping is not None and early_stopping.monitor != "loss" and validation is None:
        raise ValueError(f"EarlyStopping monitors {early_stopping.monitor!r}, which needs validation data")


def check_divisible(mesh: Mesh | None, n: int, batch_size: int | None) -> None:
    """With a mesh, raise unless the run's batch splits evenly over the mesh's data axis.

    Args:
        mesh: the device mesh, or None (nothing to check).
        n: the number of training examples.
        batch_size: a positive int, or None (full batch).

    Raises:
        ValueError: if the batch size (`batch_size_of(n, batch_size)`) does not
            divide by the size of the mesh's data axis.
    """
    if mesh is not None:
        distributed.check_divisible(batch_size_of(n, batch_size), mesh)
