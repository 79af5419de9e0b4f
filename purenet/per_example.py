"""Per-example gradients, their norms, and DP-SGD clipping, from the handwritten backward.

Owning the backward pass makes these cheap: the loss is a mean over the
batch, so row i of N * dL/d(output) is the gradient of example i's own loss
L_i, and every layer can keep examples apart on the way back instead of
summing over the batch. No vmap of a gradient is involved.

    values, grads = pn.per_example_grads(net, params, state, x, y)      # leaves (batch, ...)
    norms = pn.per_example_grad_norms(net, params, state, x, y)        # (batch,), no per-example grads formed
    value, grads, state = pn.clipped_value_and_grad(net, params, state, x, y,
                                                    clip_norm=1.0, noise_multiplier=1.1, noise_key=k)
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from purenet._checks import check_hyperparameter
from purenet.chunks import check_chunk_size, in_chunks, mean_in_chunks
from purenet.layers import base
from purenet.layers.base import Array, LayerLike
from purenet.losses import Loss
from purenet.network import add_l2, backward_pass, loss_pass

__all__ = [
    "DPSGD", "PER_EXAMPLE", "clipped_value_and_grad", "per_example_grad_norms", "per_example_grads", "sq_norms_visit",
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


def _per_example_values(p, y):
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
    values, grads = add_l2(net, params, l2, _per_example_values(p, y), grads)
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


def _clipped_mean(net, params, state, x, y, clip_norm, loss, train, key):
    """(mean loss, mean of the clipped per-example gradients, state) over one batch."""
    p = loss_pass(net, params, state, x, loss, train, key)
    norms = jnp.sqrt(jnp.maximum(_sq_norms(net, p, y, 0.0), 0.0))
    scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, jnp.finfo(norms.dtype).tiny))

    def clip(dout):
        return dout * scale.reshape((-1,) + (1,) * (dout.ndim - 1)).astype(dout.dtype)

    return p.loss_fn.value(p.out, y), backward_pass(p, net, y, seed=clip), p.state


def clipped_value_and_grad(net: LayerLike, params: PyTree, state: PyTree, x: Array, y: Any, *, clip_norm: float,
                           noise_multiplier: float = 0.0, noise_key: Array | None = None,
                           loss: str | Loss = "cross_entropy", l2: float | Array = 0.0, train: bool = False,
                           key: Array | None = None, chunk_size: int | None = None) -> tuple[Array, PyTree, PyTree]:
    """DP-SGD's gradient (Abadi et al., 2016): clip each example, sum, add noise, average.

        g = (1/N) [ sum_i g_i min(1, C / ||g_i||) + sigma C z ],   z ~ N(0, I)

    with C = clip_norm and sigma = noise_multiplier. Each g_i is linear in
    row i of dL/d(output), so scaling that row by its clip factor and running
    the ordinary backward once gives the clipped sum (norms come from
    `per_example_grad_norms`, so no per-example gradient is ever formed).
    The l2 term is added after clipping, unclipped. Returns (value, grads, state).

    chunk_size=k clips and sums k examples at a time (`mean_in_chunks`) and
    adds the noise once, to the whole batch's sum: the same gradient with a
    working set of k examples (model state threads through the chunks, so
    BatchNorm in training mode normalises each chunk by its own statistics).
    """
    check_hyperparameter("clip_norm", clip_norm, 0.0, None, low_open=True)
    check_hyperparameter("noise_multiplier", noise_multiplier, 0.0, None)

    def clipped(state, x, y, key):
        return _clipped_mean(net, params, state, x, y, clip_norm, loss, train, key)

    value, grads, state = mean_in_chunks(clipped, chunk_size, state, x, y, key)
    if not (isinstance(noise_multiplier, (int, float)) and noise_multiplier == 0):
        if noise_key is None:
            raise ValueError("clipped_value_and_grad with noise_multiplier > 0 needs a noise_key")
        leaves, treedef = jax.tree_util.tree_flatten(grads)
        keys = jax.random.split(noise_key, len(leaves))
        n = x.shape[0]
        leaves = [g + noise_multiplier * clip_norm / n * jax.random.normal(k, g.shape, g.dtype)
                  for g, k in zip(leaves, keys)]
        grads = jax.tree_util.tree_unflatten(treedef, leaves)
    value, grads = add_l2(net, params, l2, value, grads)
    return value, grads, state


@dataclasses.dataclass(frozen=True)
class DPSGD:
    """A training option for `fit`/`train`: per-example clipping to `clip_norm`
    and Gaussian noise of std noise_multiplier * clip_norm, as in
    `clipped_value_and_grad`; `chunk_size` clips that many examples at a
    time (the same gradient, a smaller working set)."""

    clip_norm: float
    noise_multiplier: float = 0.0
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        check_hyperparameter("clip_norm", self.clip_norm, 0.0, None, low_open=True)
        check_hyperparameter("noise_multiplier", self.noise_multiplier, 0.0, None)
        check_chunk_size(self.chunk_size)
