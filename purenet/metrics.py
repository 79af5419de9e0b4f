"""Evaluation metrics, computed in fixed-size chunks so that a large
evaluation set never needs one huge forward pass."""
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from purenet._checks import check_float_input
from purenet.layers.base import Array, LayerLike, PyTree
from purenet.layers.roles import id_layer
from purenet.network import evaluation_body, fused_loss, output_head

__all__ = ["accuracy", "confusion_matrix", "per_class_accuracy", "predict", "predicted_classes"]


def _one_program(*static: str) -> Callable[[Callable], Callable]:
    """Run an evaluation function of (net, params, state, x, ...) as one compiled program (`jax.jit`, the
    network and `static` arguments static) instead of one small program per operation when called
    eagerly, after checking x while it is concrete (token ids against the vocabulary). A network that
    cannot be hashed (a layer holding arrays) runs as it is."""
    def wrap(fn: Callable) -> Callable:
        jitted = jax.jit(fn, static_argnames=("net", *static))

        @functools.wraps(fn)
        def run(net: LayerLike, params: PyTree, state: PyTree, x: Array, *args: Any, **kwargs: Any) -> Any:
            check_float_input(x, ids=id_layer(net))
            try:
                hash(net)
            except TypeError:
                return fn(net, params, state, x, *args, **kwargs)
            return jitted(net, params, state, x, *args, **kwargs)
        return run
    return wrap


@_one_program("batch_size")
def predict(net: LayerLike, params: PyTree, state: PyTree, x: Array, batch_size: int = 1024) -> Array:
    """The network's outputs on x (evaluation mode), `batch_size` rows at a time.

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters.
        state: its state (read in evaluation mode, never updated).
        x: inputs (n, *in_shape): floats, or integer ids for a network that
            starts with an embedding.
        batch_size: rows per forward pass (default 1024); larger inputs run
            in chunks of this size under `lax.map`.

    Returns:
        The outputs (n, *out_shape), as `pn.forward` with train=False gives them.

    Raises:
        TypeError: if `x` is not floating point (integer for a network that
            reads ids).
        ValueError: if `x` has no batch axis or an empty one, an id lies
            outside the vocabulary, or a layer refuses the input.
    """
    n = x.shape[0]
    if n <= batch_size:  # one chunk: no loop, no padding
        return net.forward(params, state, x, train=False)[0]
    size = batch_size
    chunks = -(-n // size)
    padded = jnp.concatenate([x, jnp.zeros((chunks * size - n,) + x.shape[1:], x.dtype)])

    def one(xb):
        return net.forward(params, state, xb, train=False)[0]

    out = jax.lax.map(one, padded.reshape((chunks, size) + x.shape[1:]))
    return out.reshape((chunks * size,) + out.shape[2:])[:n]


@_one_program("batch_size")
def predicted_classes(net: LayerLike, params: PyTree, state: PyTree, x: Array, batch_size: int = 1024) -> Array:
    """The most probable class of each row.

    The argmax of the outputs, or for a single output unit, class 1 when
    p > 1/2. A final Softmax or Sigmoid is monotone, so it is skipped and
    the logits decide (argmax z, or z > 0): the same classes without the
    exponentials, and no ties from rounding.

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters.
        state: its state (read in evaluation mode, never updated).
        x: inputs (n, *in_shape): floats, or integer ids for a network that
            starts with an embedding.
        batch_size: rows per forward pass (default 1024); larger inputs run
            in chunks of this size under `lax.map`.

    Returns:
        Integer classes: (n,) for outputs (n, k); (n, T) for sequence outputs
            (n, T, k).

    Raises:
        TypeError: if `x` is not floating point (integer for a network that
            reads ids).
        ValueError: if `x` has no batch axis or an empty one, an id lies
            outside the vocabulary, or a layer refuses the input.
    """
    head = output_head(net)
    if head is not None and head is not net:  # the logits decide: the chain without its output layer
        net, params, state, _, _ = evaluation_body(net, params, state, fused_loss(head))
    return classes_of(predict(net, params, state, x, batch_size), head if head is not net else None)


def classes_of(out: Array, head: Any = None) -> Array:
    """The classes `predicted_classes` reads from outputs: argmax over several units; one unit is
    class 1 when its logit is > 0 (`head` a Sigmoid that was left out), its value > 1/2 (no such
    head), or always (a Softmax over one unit is 1 everywhere)."""
    if out.shape[-1] > 1:
        return jnp.argmax(out, axis=-1)
    kind = fused_loss(head)
    if kind == "cross_entropy":  # a softmax over one unit
        return jnp.ones(out.shape[0], jnp.int32)
    return (out[:, 0] > (0.0 if kind == "binary_cross_entropy" else 0.5)).astype(jnp.int32)


@_one_program("batch_size")
def accuracy(net: LayerLike, params: PyTree, state: PyTree, x: Array, y: Any, batch_size: int = 1024) -> Array:
    """Fraction of rows whose most probable class is the label (labels or distributions).

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters.
        state: its state (read in evaluation mode, never updated).
        x: inputs (n, *in_shape): floats, or integer ids for a network that
            starts with an embedding.
        y: the labels: integer classes (n,) (or (n, T) for a sequence
            model), distributions over the classes (n, k) (their argmax is the
            label), or one unit's targets (n, 1) (class 1 where the target is
            above 1/2).
        batch_size: rows per forward pass (default 1024); larger inputs run
            in chunks of this size under `lax.map`.

    Returns:
        The accuracy, a float scalar in [0, 1].

    Raises:
        TypeError: if `x` is not floating point (integer for a network that
            reads ids).
        ValueError: if `x` has no batch axis or an empty one, an id lies
            outside the vocabulary, or a layer refuses the input.
    """
    return jnp.mean(predicted_classes(net, params, state, x, batch_size) == labels_of(y))


def labels_of(y: Any) -> Array:
    """Class labels from integer labels of any shape ((n,), a sequence model's (n, T)), from
    distributions over the classes (floats (n, ..., k): their argmax), or from one unit's (n, 1)
    targets (class 1 where the target is above 1/2)."""
    y = jnp.asarray(y)
    if y.ndim == 2 and y.shape[-1] == 1:  # one unit's targets (binary cross-entropy's (n, 1)): class 1 above 1/2
        return (y[:, 0] > 0.5).astype(jnp.int32)
    if jnp.issubdtype(y.dtype, jnp.integer) or y.ndim == 1:
        return y
    return jnp.argmax(y, axis=-1)


@_one_program("num_classes", "batch_size")
def confusion_matrix(net: LayerLike, params: PyTree, state: PyTree, x: Array, y: Any, num_classes: int,
                     batch_size: int = 1024) -> Array:
    """The confusion matrix: C[i, j] = number of examples of class i predicted as class j.

    Labels or predictions outside [0, num_classes) are not counted (the
    scatter drops them).

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters.
        state: its state (read in evaluation mode, never updated).
        x: inputs (n, *in_shape): floats, or integer ids for a network that
            starts with an embedding.
        y: the labels: integer classes (n,) (or (n, T) for a sequence
            model), distributions over the classes (n, k) (their argmax is the
            label), or one unit's targets (n, 1) (class 1 where the target is
            above 1/2).
        num_classes: k, the number of classes (the matrix is k x k).
        batch_size: rows per forward pass (default 1024); larger inputs run
            in chunks of this size under `lax.map`.

    Returns:
        C, int32 (num_classes, num_classes): rows are true classes, columns
            predicted ones.

    Raises:
        TypeError: if `x` is not floating point (integer for a network that
            reads ids).
        ValueError: if `x` has no batch axis or an empty one, an id lies
            outside the vocabulary, or a layer refuses the input.
    """
    pred = predicted_classes(net, params, state, x, batch_size)
    return jnp.zeros((num_classes, num_classes), jnp.int32).at[labels_of(y), pred].add(1)


def per_class_accuracy(confusion: Array) -> Array:
    """Recall of each class from a confusion matrix (NaN for a class with no examples).

    Args:
        confusion: C (k, k) from `confusion_matrix`, rows the true classes.

    Returns:
        (k,) floats: C[i, i] / sum_j C[i, j] for each class i, NaN where the
            row sums to zero.
    """
    totals = jnp.sum(confusion, axis=1)
    return jnp.diagonal(confusion) / jnp.where(totals == 0, jnp.nan, totals)
