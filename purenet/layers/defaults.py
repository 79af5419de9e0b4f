"""The generic per-example defaults: each example's gradients from a layer's own `backward`.

    grads_i, dx = generic_per_example_backward(layer, params, cache, dy)   # leaves (batch, ...)
    sq, dx      = generic_per_example_sq_norms(layer, params, cache, dy, l2)  # ||g_i + l2 W||^2, (batch,)

The layer's `backward`, `vmap`ped over the examples of its cache and dy
(`cache_batch_axes` says which cache leaves follow the batch). Every
per-example feature falls back on these for a layer that declares no products
(`purenet.layers.structure`): per-example gradients and norms
(`purenet.analysis.per_example`), one-pass clipping (`purenet.privacy.clipping`),
sums of squares, curvature columns and Gram matrices (`purenet.analysis.stats`),
and the test suite proves every product rule equal to them.
"""
from typing import Any

import jax
import jax.numpy as jnp

from purenet.layers.base import Array, PyTree
from purenet.layers.roles import DECAYED, layer_roles

__all__ = [
    "cache_batch_axes", "feature_split", "generic_per_example_backward", "generic_per_example_sq_norms",
    "has_params", "l2_tree", "scale_rows", "sq_norms_of", "sum_leaves",
]


def _batch_size(dy: PyTree) -> int:
    return jax.tree_util.tree_leaves(dy)[0].shape[0]


def has_params(params: PyTree) -> bool:
    return bool(jax.tree_util.tree_leaves(params))


def cache_batch_axes(layer: Any, cache: PyTree, n: int, params: PyTree = None, dy: PyTree = None) -> list:
    """Per cache leaf: 0 when it carries the batch axis first, None when it is shared by all examples.

    The layer's own `cache_batch_axes(cache, n)` when it has one. Otherwise the forward says: given
    `params` and `dy`, the input's shape is that of the backward's dx, and the layer's cache is traced
    (`jax.eval_shape`, nothing computed) at batch sizes n and n + 1. A leaf whose leading axis follows
    the batch is batched; one whose shape does not change is shared (a cached parameter, even one
    with n rows); any other (a cache of n * T rows) cannot be sliced per example and is an error
    that asks the layer to declare its axes. Where the forward cannot be traced (no dx, an init
    that needs values), a leaf with n leading rows is batched, unless a parameter has its very
    shape: that is ambiguous, and an error too.
    """
    if hasattr(layer, "cache_batch_axes"):
        return list(layer.cache_batch_axes(cache, n))
    shapes = [jnp.shape(leaf) for leaf in jax.tree_util.tree_leaves(cache)]
    grown = None if params is None or dy is None else _cache_shapes_at(layer, params, cache, dy, n + 1)
    if grown is None:
        owned = {jnp.shape(p) for p in jax.tree_util.tree_leaves(params)}
        for shape in shapes:
            if len(shape) >= 1 and shape[0] == n and shape in owned:
                raise ValueError(_undeclared(layer, shape, n, "a parameter has the same shape"))
        return [0 if len(shape) >= 1 and shape[0] == n else None for shape in shapes]
    axes: list[int | None] = []
    for shape, other in zip(shapes, grown):
        if len(shape) >= 1 and shape[0] == n and other == (n + 1,) + shape[1:]:
            axes.append(0)
        elif shape == other:
            axes.append(None)
        else:
            raise ValueError(_undeclared(layer, shape, n, f"it has shape {other} for a batch of {n + 1}"))
    return axes


def _undeclared(layer: Any, shape: tuple, n: int, why: str) -> str:
    return (f"{type(layer).__name__}'s cache has a leaf of shape {shape} at a batch of {n} examples, and "
            f"{why}: the per-example path cannot tell whether it holds one row per example. Define "
            f"cache_batch_axes(self, cache, n) on the layer, returning per cache leaf 0 (batch axis first) "
            f"or None (shared by all examples), or give it a per_example_backward")


def _cache_shapes_at(layer: Any, params: PyTree, cache: PyTree, dy: PyTree, m: int) -> list | None:
    """The shapes of the layer's cache leaves for a batch of m examples (traced, nothing computed), or
    None where the forward cannot be traced from what the backward has, or does not reproduce `cache`."""
    def shaped(t: Any) -> Any:
        return jax.ShapeDtypeStruct(jnp.shape(t), jnp.result_type(t))

    try:
        dx = jax.eval_shape(lambda: layer.backward(params, cache, dy)[1])
        if not isinstance(dx, jax.ShapeDtypeStruct) or len(dx.shape) < 1:
            return None
        in_shape, n = dx.shape[1:], dx.shape[0]
        state = jax.eval_shape(lambda: layer.init(jax.random.key(0), in_shape, dx.dtype)[1])
        p = jax.tree_util.tree_map(shaped, params)
        actual = jax.tree_util.tree_structure(cache), [jnp.shape(t) for t in jax.tree_util.tree_leaves(cache)]
        for train in (True, False):
            def cache_of(batch: int) -> Any:
                x = jax.ShapeDtypeStruct((batch, *in_shape), dx.dtype)
                return jax.eval_shape(lambda p, s, x: layer.forward(p, s, x, train=train, key=jax.random.key(0))[2],
                                      p, state, x)
            at_n = cache_of(n)
            if (jax.tree_util.tree_structure(at_n), [t.shape for t in jax.tree_util.tree_leaves(at_n)]) == actual:
                return [t.shape for t in jax.tree_util.tree_leaves(cache_of(m))]
    except Exception:  # noqa: BLE001 - a forward that needs values or other inputs: the fallback decides
        return None
    return None


def generic_per_example_backward(layer: Any, params: PyTree, cache: PyTree, dy: PyTree) -> tuple[PyTree, Any]:
    """Each example's gradients by the layer's own backward, vmapped over the examples.

    Example i's backward sees its slice of every batched cache leaf and of dy,
    with a batch axis of one, and the shared leaves whole. The batch's dx is
    the examples' dx rows (a layer that mixes examples, like BatchNorm in
    training, must not use this path).
    """
    n = _batch_size(dy)
    leaves_, treedef = jax.tree_util.tree_flatten(cache)
    axes = cache_batch_axes(layer, cache, n, params, dy)

    def one(batched: list, dy_i: PyTree) -> tuple[PyTree, Any]:
        it = iter(batched)
        full = [next(it)[None] if ax == 0 else leaf for leaf, ax in zip(leaves_, axes)]
        g, dx = layer.backward(params, jax.tree_util.tree_unflatten(treedef, full),
                               jax.tree_util.tree_map(lambda t: t[None], dy_i))
        return g, jax.tree_util.tree_map(lambda t: t[0], dx)

    batched = [leaf for leaf, ax in zip(leaves_, axes) if ax == 0]
    return jax.vmap(one)(batched, dy)


def sum_leaves(tree: PyTree, zero: Array) -> Array:
    total = zero
    for leaf in jax.tree_util.tree_leaves(tree):
        total = total + leaf
    return total


def _rows_sq(g: Array) -> Array:
    return jnp.sum(jnp.reshape(g * g, (g.shape[0], -1)), axis=-1)


def sq_norms_of(l2s: PyTree, grads: PyTree, params: PyTree) -> Array:
    """sum over the leaves of ||g_i + l2 W||^2 per example: grads with a leading batch axis, l2s a tree
    like params of each parameter's l2 (0 where l2 does not cover it)."""
    def one(l2: Any, g: Array, p: Array) -> Array:
        return _rows_sq(g if isinstance(l2, (int, float)) and l2 == 0 else g + l2 * p)
    n = jax.tree_util.tree_leaves(grads)[0].shape[0]
    zero = jnp.zeros((n,), jax.tree_util.tree_leaves(grads)[0].dtype)
    return sum_leaves(jax.tree_util.tree_map(one, l2s, grads, params), zero)


def l2_tree(layer: Any, params: PyTree, l2: Any) -> PyTree:
    """A tree like params: l2 where the parameter's role is one l2 covers (`DECAYED`), else 0."""
    return jax.tree_util.tree_map(lambda r: l2 if r in DECAYED else 0.0, layer_roles(layer, params))


def generic_per_example_sq_norms(layer: Any, params: PyTree, cache: PyTree, dy: PyTree,
                                 l2: Any = 0.0) -> tuple[Array, Any]:
    """||g_i + l2 W||^2 from the generic per-example gradients (W: the parameters whose role l2 covers)."""
    n = _batch_size(dy)
    if not has_params(params):
        return jnp.zeros((n,), jax.tree_util.tree_leaves(dy)[0].dtype), layer.backward(params, cache, dy)[1]
    grads, dx = generic_per_example_backward(layer, params, cache, dy)
    return sq_norms_of(l2_tree(layer, params, l2), grads, params), dx


def scale_rows(w: Array, t: PyTree) -> PyTree:
    """Each array of t with row i (its leading slice) multiplied by w_i."""
    return jax.tree_util.tree_map(lambda a: a * w.reshape((-1,) + (1,) * (a.ndim - 1)).astype(a.dtype), t)


def feature_split(params: PyTree, split_in: bool) -> tuple[PyTree, bool]:
    """Megatron's split of  y = x W + b  (W: (..., in, out)) over a "model" axis of size m.

    Input whole: column parallel, W[..., :, j-block] and b[j-block] per device,
    y comes out split over its features (no collective). Input split: row
    parallel, W[..., i-block, :] per device, b whole; each device's x_i W_i
    is a partial sum of y, which one all-reduce adds (and b is added once).
    The backward is the dual: dL/dx = dy W^T is split (row) or a partial sum
    to all-reduce (column).
    """
    if split_in:
        return {k: (-2 if k == "W" else None) for k in params}, False
    return {k: (-1 if k == "W" else 0) for k in params}, True
