"""Per-example gradients and their norms, from the handwritten backward (DP-SGD's clipping, which
reads the same caches, is `purenet.privacy.clipping`).

Owning the backward pass makes these cheap: the loss is a mean over the
batch, so row i of N * dL/d(output) is the gradient of example i's own loss
L_i, and every layer can keep examples apart on the way back instead of
summing over the batch. No vmap of a gradient is involved.

    values, grads = pn.per_example_grads(net, params, state, x, y)      # leaves (batch, ...)
    norms = pn.per_example_grad_norms(net, params, state, x, y)        # (batch,), no per-example grads formed
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp

from purenet.chunks import in_chunks
from purenet.layers import base, conv, dense, structure
from purenet.layers.base import Array, LayerLike
from purenet.layers.defaults import generic_per_example_backward, has_params, l2_tree, sq_norms_of
from purenet.layers.embedding import per_example_scatter, sq_norm_of_scatter
from purenet.layers.roles import DECAYED, layer_roles
from purenet.layers.structure import Convolution, DenseProduct, Lookup, ScaleShift, TiedTable
from purenet.losses import Loss
from purenet.network import add_l2, backward_pass, loss_pass

__all__ = [
    "DPSGD", "GRADS", "PER_EXAMPLE", "SQ_NORMS", "clipped_value_and_grad", "per_example_backward",
    "per_example_grad_norms", "per_example_grads", "per_example_sq_norms", "per_example_values", "sq_norms_visit",
    "trainable_mask",
]

PyTree = Any


# ---------------------------------------------------------------- one layer: the rules per product kind


def _dense_grads(p: DenseProduct, params: PyTree) -> dict:
    """dW_i = sum_t a_it^T g_it (an outer product per position t), db_i = sum_t g_it."""
    a3, g3 = structure.positions_of(p.a), structure.positions_of(p.g)
    return structure.split_columns(p, params, jnp.einsum("bti,btj->bij", a3, g3), jnp.sum(g3, axis=1), (a3.shape[0],))


def _scale_shift_grads(p: ScaleShift, params: PyTree) -> dict:
    """ds_i = sum_t xhat_it g_it, dt_i = sum_t g_it."""
    out = {p.scale: base.per_example_sum(p.g * p.xhat).astype(params[p.scale].dtype)}
    if p.shift is not None:
        out[p.shift] = base.per_example_sum(p.g).astype(params[p.shift].dtype)
    return out


def _lookup_grads(p: Lookup, params: PyTree) -> dict:
    """dE_i = sum_t onehot(ids_it) g_it^T: each example's own scatter, (n, rows, d)."""
    table = params[p.table]
    return {p.table: per_example_scatter(table.shape[0], p.ids, p.g).astype(table.dtype)}


def _conv_grads(p: Convolution, params: PyTree) -> dict:
    """dW_i[tap] = S_tap,i^T g_i (each tap's input slice against g_i, no patches formed), db_i = sum g_i;
    on the CPU PER_EXAMPLE_CHUNK examples at a time (`purenet.layers.conv.in_chunks`)."""
    w = structure.conv_weight(p, params)

    def grads_of(cache: Any, g: Array) -> dict:
        taps, _ = conv.per_example_taps(p.conv, w, cache, g)
        out = {p.weight: jnp.stack(taps, axis=1).reshape(g.shape[0], *params[p.weight].shape)}
        if p.bias is not None:
            out[p.bias] = jnp.sum(g, axis=(1, 2))
        return out

    return conv.in_chunks(grads_of, p.cache, p.g)


def _tied_grads(p: TiedTable, params: PyTree) -> dict:
    """dE_i = sum_t onehot(ids_it) g_it^T + sum_s g_out_is^T h_is: (n, rows, d)."""
    table = params[p.table]
    readout = jnp.einsum("bsv,bsd->bvd", structure.positions_of(p.g_out), structure.positions_of(p.h))
    return {p.table: (per_example_scatter(table.shape[0], p.ids, p.g) + readout).astype(table.dtype)}


# Each example's gradients of one product's parameters, {key: (n, *shape)}.
GRADS: dict[type, Callable[..., dict]] = {DenseProduct: _dense_grads, ScaleShift: _scale_shift_grads, Lookup: _lookup_grads,
         Convolution: _conv_grads, TiedTable: _tied_grads}


def _decayed_l2(l2: Any, key: str, roles: dict) -> Any:
    """l2 for a parameter whose role l2 covers (`DECAYED`), else 0."""
    return l2 if roles.get(key) in DECAYED else 0.0


def _is_zero(l2: Any) -> bool:
    return isinstance(l2, (int, float)) and l2 == 0


def _dense_sq_norms(p: DenseProduct, params: PyTree, l2: Any, roles: dict) -> Array:
    """||dW_i + l2 W||^2 + ||db_i||^2 by the ghost norm over positions, or dW_i formed, whichever is
    smaller (`purenet.layers.dense.per_example_sq_norms`); the bias columns' ||db_i||^2 and the l2
    terms of the decayed weights added."""
    cols = structure.columns(p, params)
    w = jnp.concatenate([jnp.reshape(params[k], (p.a.shape[-1], -1)) for k, *_ in cols], axis=1) \
        if len(cols) > 1 else jnp.reshape(params[cols[0][0]], (p.a.shape[-1], -1))
    every = all(b is not None for b in p.biases)  # every column biased (Dense, attention): one pass
    sq = dense.per_example_sq_norms(p.a, p.g, w, every)
    biased = [] if every else [(s, n) for _, b, s, n in cols if b is not None]
    if biased:
        db = structure.positions_of(p.g).sum(axis=1)
        sq = sq + sum(jnp.sum(db[:, s:s + n] ** 2, axis=-1) for s, n in biased)
    if _is_zero(l2) or not any(roles.get(k) in DECAYED for k, *_ in cols):
        return sq
    w_l2 = jnp.concatenate([w[:, s:s + n] * (1.0 if roles.get(k) in DECAYED else 0.0) for k, _, s, n in cols], axis=1)
    cross = jnp.sum(jnp.reshape((p.a @ w_l2) * p.g, (p.a.shape[0], -1)), axis=-1)  # <dW_i, W> = sum_t a_t W . g_t
    return sq + 2 * l2 * cross + l2 * l2 * jnp.sum(w_l2 * w_l2)


def _lookup_sq_norms(p: Lookup, params: PyTree, l2: Any, roles: dict) -> Array:
    """||dE_i||^2 = sum_{t,t'} [ids_t = ids_t'] g_t . g_t' (no (n, rows, d) table formed), when l2 does
    not cover the table (its role "embedding" is not decayed); else from the formed dE_i."""
    if _is_zero(_decayed_l2(l2, p.table, roles)):
        return sq_norm_of_scatter(p.ids, p.g)
    return _sq_norms_from_grads(p, params, l2, roles)


def _sq_norms_from_grads(p: Any, params: PyTree, l2: Any, roles: dict) -> Array:
    """||g_i + l2 W||^2 from the product's per-example gradients (a kind whose gradients are small)."""
    grads = GRADS[type(p)](p, params)
    return sq_norms_of({k: _decayed_l2(l2, k, roles) for k in grads}, grads, {k: params[k] for k in grads})


def _conv_sq_norms(p: Convolution, params: PyTree, l2: Any, roles: dict) -> Array:
    """By tap, or the ghost norm over the output pixels, whichever costs fewer flops
    (`purenet.layers.conv.tap_sq_norms`), in chunks on the CPU; plus ||db_i||^2."""
    w, l2w = structure.conv_weight(p, params), _decayed_l2(l2, p.weight, roles)
    sq = conv.in_chunks(lambda cache, g: conv.tap_sq_norms(p.conv, w, cache, g, l2w), p.cache, p.g)
    if p.bias is not None:
        sq = sq + jnp.sum(jnp.sum(p.g, axis=(1, 2)) ** 2, axis=-1)
    return sq


def _tied_sq_norms(p: TiedTable, params: PyTree, l2: Any, roles: dict) -> Array:
    """||A_i + B_i||^2 = ||A_i||^2 + ||B_i||^2 + 2 <A_i, B_i>, A_i the lookup's scatter, B_i = g_out_i^T h_i,
    with no (n, rows, d) tensor formed (when l2 does not cover the table, else from dE_i formed):

        <A_i, B_i> = sum_t g_it . B_i[ids_it] = sum_{t,s} (g_it . h_is) g_out_is[ids_it]
    """
    if not _is_zero(_decayed_l2(l2, p.table, roles)):
        return _sq_norms_from_grads(p, params, l2, roles)
    h, g_out = structure.positions_of(p.h), structure.positions_of(p.g_out)
    ids = jnp.reshape(p.ids, (p.ids.shape[0], -1))
    readout_sq = dense.per_example_sq_norms(h, g_out, params[p.table].T, False)
    gram = jnp.einsum("btd,bsd->bts", structure.positions_of(p.g), h)
    b, t = ids.shape
    picked = jnp.take_along_axis(g_out, jnp.broadcast_to(ids[:, None, :], (b, g_out.shape[1], t)), axis=2)
    cross = jnp.einsum("bts,bst->b", gram, picked)
    return sq_norm_of_scatter(p.ids, p.g) + readout_sq + 2 * cross


# Each example's ||g_i + l2 W||^2 over one product's parameters, (n,); a kind absent forms its gradients.
SQ_NORMS: dict[type, Callable[..., Array]] = {DenseProduct: _dense_sq_norms, Lookup: _lookup_sq_norms, Convolution: _conv_sq_norms,
            TiedTable: _tied_sq_norms}


def per_example_backward(layer: Any, params: PyTree, cache: PyTree, dy: PyTree) -> tuple[PyTree, Any]:
    """One layer's per-example gradients: its own method, its products' rules, or the generic default.

    The layer's own `per_example_backward` comes first, then the rules of the
    products it declares (`purenet.layers.structure`, `GRADS`), then the
    generic default (its backward, vmapped over the examples).

    Args:
        layer: a leaf layer.
        params: its parameters.
        cache: its forward's cache.
        dy: dL/dy, batch first; row i the gradient of example i's own loss.

    Returns:
        (grads, dx): grads like params with a leading batch axis on every leaf; dx = dL/dx.
    """
    if hasattr(layer, "per_example_backward"):
        return layer.per_example_backward(params, cache, dy)
    if not has_params(params):
        return params, layer.backward(params, cache, dy)[1]
    found = structure.declared(layer, params, cache, dy)
    if found is None:
        return generic_per_example_backward(layer, params, cache, dy)
    products, dx = found
    named = structure.flat(params)
    return structure.tree_of(params, [GRADS[type(p)](p, named) for p in products]), dx


def per_example_sq_norms(layer: Any, params: PyTree, cache: PyTree, dy: PyTree, l2: Any = 0.0) -> tuple[Array, Any]:
    """One layer's per-example squared gradient norms, without forming the gradients where a rule can.

    The layer's own method first, then its products' rules (`SQ_NORMS`), else
    the norms of its per-example gradients.

    Args:
        layer: a leaf layer.
        params: its parameters.
        cache: its forward's cache.
        dy: dL/dy, batch first; row i the gradient of example i's own loss.
        l2: the weight decay added to the gradient of the parameters whose role it covers (W).

    Returns:
        (sq, dx): sq (batch,) = `||g_i + l2 W||^2`; dx = dL/dx.
    """
    if hasattr(layer, "per_example_sq_norms"):
        return layer.per_example_sq_norms(params, cache, dy, l2)
    found = structure.declared(layer, params, cache, dy) if has_params(params) else None
    if found is None:
        grads, dx = per_example_backward(layer, params, cache, dy)
        n = jax.tree_util.tree_leaves(dy)[0].shape[0]
        if not has_params(params):
            return jnp.zeros((n,), jax.tree_util.tree_leaves(dy)[0].dtype), dx
        return sq_norms_of(l2_tree(layer, params, l2), grads, params), dx
    products, dx = found
    named, roles = structure.flat(params), structure.flat(layer_roles(layer, params))
    n = jax.tree_util.tree_leaves(dy)[0].shape[0]
    return sum((SQ_NORMS.get(type(p), _sq_norms_from_grads)(p, named, l2, roles) for p in products),
               jnp.zeros((n,), jax.tree_util.tree_leaves(dy)[0].dtype)), dx


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


PER_EXAMPLE = base.Visit(_one_stream(per_example_backward), _frozen_per_example)


def sq_norms_visit(l2: Any) -> base.Visit:
    """The visitor of per-example squared norms: `||g_i + l2 W||^2` at each leaf layer.

    Args:
        l2: the weight decay coefficient (`per_example_sq_norms`).

    Returns:
        A `Visit` whose out at each leaf is a (batch,) array (zero inside Frozen).
    """
    def leaf(layer, params, cache, dy):
        return per_example_sq_norms(layer, params, cache, dy, l2)
    return base.Visit(_one_stream(leaf), lambda params, dys: jnp.zeros(dys[0].shape[:1], dys[0].dtype),
                      shaped=False)


def per_example_values(p: Any, y: Any) -> Array:
    """Each example's own loss L_i from a loss pass.

    Args:
        p: the loss pass (`purenet.network.loss_pass`).
        y: the labels, batch first.

    Returns:
        (batch,) the losses L_i.
    """
    return jax.vmap(lambda o, t: p.loss_fn.value(o[None], t[None]))(p.out, jnp.asarray(y))


def per_example_grads(net: LayerLike, params: PyTree, state: PyTree, x: Array, y: Any,
                      loss: str | Loss = "cross_entropy", l2: float | Array = 0.0, train: bool = False,
                      key: Array | None = None) -> tuple[Array, PyTree]:
    """(values, grads): each example's own loss L_i (+ l2 penalty) and its gradient.

    grads has params' structure with a leading batch axis on every leaf; its
    mean over the batch is `pn.value_and_grad`'s gradient.

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters.
        state: its state (as `pn.init` returns it).
        x: inputs, shape `(batch, *in_shape)` (integer token ids when the network starts with
            an Embedding).
        y: targets for `loss`, one row per example.
        loss: a registered loss name ("cross_entropy", "mse", ...) or a `pn.Loss`.
        l2: weight decay coefficient on the parameters whose role is "weight": each example's
            loss gets the penalty `l2/2 sum W^2` and its gradient `l2 W`.
        train: training mode (dropout, batch statistics); a Python bool. BatchNorm in training
            mode couples the examples, so per-example gradients are not defined through it.
        key: PRNG key for the forward's randomness (dropout), or None.

    Returns:
        (values, grads): values (batch,) each example's loss L_i (plus the l2 penalty); grads
            like params with a leading batch axis, leaves `(batch, *leaf_shape)`.

    Raises:
        ValueError: if `loss` is not a registered name or a `pn.Loss`, or `x` has no batch
            axis or is empty.
        TypeError: if `x` is not floating point (integer ids for a network that starts with
            an Embedding).
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
    """`||grad of L_i||` for every example i, without forming the per-example gradients.

    Dense products (Dense, attention's projections, SwiGLU, the recurrent
    layers' steps) use ||h_i dy_i^T|| = ||h_i|| ||dy_i|| (Goodfellow, 2015)
    or the ghost norm over positions, so memory is O(batch x (in + out))
    rather than O(batch x params); Conv2D forms dW_i one kernel tap at a
    time, or takes the ghost norm (the `SQ_NORMS` rules above); a layer that
    declares no structure forms its own per-example gradients (its
    backward, vmapped over the examples).

    chunk_size=k runs the batch k examples at a time, one chunk after
    another (see `in_chunks`): the working set (activations, their
    gradients) shrinks by batch / k and the norms are the same.

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters.
        state: its state (as `pn.init` returns it).
        x: inputs, shape `(batch, *in_shape)` (integer token ids when the network starts with
            an Embedding).
        y: targets for `loss`, one row per example.
        loss: a registered loss name ("cross_entropy", "mse", ...) or a `pn.Loss`.
        l2: weight decay coefficient on the parameters whose role is "weight": the norms
            are of `g_i + l2 W`, W the parameters l2 covers.
        train: training mode (dropout, batch statistics); a Python bool. BatchNorm in training
            mode couples the examples, so per-example gradients are not defined through it.
        key: PRNG key for the forward's randomness (dropout), or None.
        chunk_size: examples per chunk (a positive int), or None for the whole batch at once.

    Returns:
        (batch,) the norm of each example's gradient.

    Raises:
        ValueError: if `loss` is not a registered name or a `pn.Loss`, or `x` has no batch
            axis or is empty, or if `chunk_size` is neither None nor a positive int.
        TypeError: if `x` is not floating point (integer ids for a network that starts with
            an Embedding).
    """
    def norms(x, y, key):
        p = loss_pass(net, params, state, x, loss, train, key)
        return jnp.sqrt(jnp.maximum(_sq_norms(net, p, y, l2), 0.0))

    return in_chunks(norms, chunk_size, x, y, key)


def trainable_mask(net: LayerLike, params: PyTree) -> PyTree:
    """Which parameters training moves.

    Args:
        net: the network.
        params: its parameters.

    Returns:
        A tree like params: True for every parameter that training moves, False inside `pn.Frozen`.
    """
    return base.map_leaves(net, lambda layer, p, frozen: jax.tree_util.tree_map(lambda _: not frozen, p), params)


# DP-SGD's clipping lives in purenet.privacy.clipping; its names stay importable from here
from purenet.privacy.clipping import DPSGD, clipped_value_and_grad  # noqa: E402
