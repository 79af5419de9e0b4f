"""Per-example gradients and their norms, from the handwritten backward (DP-SGD's clipping, which
reads the same caches, is `purenet.privacy.clipping`).

Owning the backward pass makes these cheap: the loss is a mean over the
batch, so row i of N * dL/d(output) is the gradient of example i's own loss
L_i, and every layer can keep examples apart on the way back instead of
summing over the batch. No vmap of a gradient is involved.

    values, grads = pn.per_example_grads(net, params, state, x, y)      # leaves (batch, ...)
    norms = pn.per_example_grad_norms(net, params, state, x, y)        # (batch,), no per-example grads formed
"""
from typing import Any

import jax
import jax.numpy as jnp

from purenet.chunks import in_chunks
from purenet.layers import base
from purenet.layers.base import Array, LayerLike
from purenet.losses import Loss
from purenet.network import add_l2, backward_pass, loss_pass

__all__ = [
    "DPSGD", "PER_EXAMPLE", "clipped_value_and_grad", "per_example_grad_norms", "per_example_grads",
    "per_example_values", "sq_norms_visit", "trainable_mask",
]

PyTree = Any


def _one_stream(fn):
    """A leaf visitor for one stream from fn(layer, params, cache, dy) -> (out, dx)."""
    def leaf(layer, params, caches, dys):
        (cache,), (dy,) = caches, dys
        out, dx = fn(layer, params, cache, dy)
        return out, (dx,)
    return leaf


def _frozen_per_example(params, dys):
    n = dys[0].shape[0]
    return jax.tree_util.tree_map(lambda p: jnp.zeros((n, *p.shape), p.dtype), params)


PER_EXAMPLE = base.Visit(_one_stream(base.per_example_backward), _frozen_per_example)


def sq_norms_visit(l2: Any) -> base.Visit:
    """||g_i + l2 W||^2 at each leaf layer (a (batch,) array per leaf; zero inside Frozen)."""
    def leaf(layer, params, cache, dy):
        return base.per_example_sq_norms(layer, params, cache, dy, l2)
    return base.Visit(_one_stream(leaf), lambda params, dys: jnp.zeros(dys[0].shape[:1], dys[0].dtype),
                      shaped=False)


def per_example_values(p: Any, y: Any) -> Array:
    """(batch,) each example's own loss L_i from a loss pass (`network.loss_pass`)."""
    return jax.vmap(lambda o, t: p.loss_fn.value(o[None], t[None]))(p.out, jnp.asarray(y))


def per_example_grads(net: LayerLike, params: PyTree, state: PyTree, x: Array, y: Any,
                      loss: str | Loss = "cross_entropy", l2: float | Array = 0.0, train: bool = False,
                      key: Array | None = None) -> tuple[Array, PyTree]:
    """(values, grads): each example's own loss L_i (+ l2 penalty) and its gradient.

    grads has params' structure with a leading batch axis on every leaf; its
    mean over the batch is pn.value_and_grad's gradient.
    """
    p = loss_pass(net, params, state, x, loss, train, key)
    grads = backward_pass(p, net, y, PER_EXAMPLE, seed=lambda d: d * p.out.shape[0])
    values, grads = add_l2(net, params, l2, per_example_values(p, y), grads)
    n = p.out.shape[0]
    return values, jax.tree_util.tree_map(lambda g: jnp.broadcast_to(g, (n,) + g.shape[1:]), grads)


def _sq_norms(net, p, y, l2):
    outs = backward_pass(p, net, y, sq_norms_visit(l2), seed=lambda d: d * p.out.shape[0])
    return base.sum_leaves(outs, jnp.zeros(p.out.shape[:1], p.out.dtype))


def per_example_grad_norms(net: LayerLike, params: PyTree, state: PyTree, x: Array, y: Any,
                           loss: str | Loss = "cross_entropy", l2: float | Array = 0.0, train: bool = False,
                           key: Array | None = None, chunk_size: int | None = None) -> Array:
    """||grad of L_i|| for every example i, without forming the per-example gradients.

    Dense layers use ||h_i dy_i^T|| = ||h_i|| ||dy_i|| (Goodfellow, 2015), so
    memory is O(batch x (in + out)) rather than O(batch x params); Conv2D
    forms dW_i one kernel tap at a time, or takes the ghost norm; a layer
    without a fast path forms its own per-example gradients (its backward,
    vmapped over the examples).

    chunk_size=k runs the batch k examples at a time, one chunk after
    another (see `in_chunks`): the working set (activations, their
    gradients) shrinks by batch / k and the norms are the same.
    """
    def norms(x, y, key):
        p = loss_pass(net, params, state, x, loss, train, key)
        return jnp.sqrt(jnp.maximum(_sq_norms(net, p, y, l2), 0.0))

    return in_chunks(norms, chunk_size, x, y, key)


def trainable_mask(net: LayerLike, params: PyTree) -> PyTree:
    """True for every parameter that training moves: False inside `pn.Frozen`, a tree like params."""
    return base.map_leaves(net, lambda layer, p, frozen: jax.tree_util.tree_map(lambda _: not frozen, p), params)


# DP-SGD's clipping lives in purenet.privacy.clipping; its names stay importable from here
from purenet.privacy.clipping import DPSGD, clipped_value_and_grad  # noqa: E402
