"""Gradient statistics from one forward and one backward pass: Fisher, noise scale, K-FAC, Gram.

Owning the backward pass means holding, at every layer, each example's
input h_i and output gradient dy_i (row i of N dL/d(output), the gradient
of example i's own loss L_i). The statistics below come out of those
directly, with no `vmap` of a gradient (memory batch x params) and, where
an identity allows, without forming any per-example gradient g_i:

    fisher_diagonal       (1/N) sum_i g_i**2                    Dense: (h**2)^T (dy**2), one matmul
    gradient_noise_scale  B_simple = tr(S) / |G|^2              from ||g_i||^2 (ghost norms) and G
    kfac_factors          A = E[a a^T], G = E[dy dy^T]          per dense product (`purenet.analysis.kfac`)
    gradient_gram         <g_i, g_j> for two batches            Dense: (H1 H2^T) * (D1 D2^T)

g_i is the gradient of example i's own loss, as `pn.per_example_grads`
defines it, of the data loss: the l2 penalty is a constant shift l2 W of
every g_i, which `gradient_noise_scale` takes (it leaves S unchanged and
enters G) and the others leave out (the Fisher, K-FAC's factors and TracIn's
inner products describe the data). Per-example statistics are undefined
through BatchNorm in training mode (it couples the examples): evaluate
with train=False.

The identities are rules per product kind (`SQUARE_RULES`, `COLUMN_RULES`,
`GRAM_RULES` below, K-FAC's in `purenet.analysis.kfac`), applied to the
products a layer declares (`purenet.layers.structure`); a kind without a
rule, and a layer that declares none, square or contract the per-example
gradients they form (correct, with more memory). Each is a visitor of the
one traversal (`purenet.layers.base.walk`).
"""
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from purenet.analysis import curvature
from purenet.analysis.curvature import COLUMNS
from purenet.analysis.kfac import kfac_eligible, layer_kfac_dims, layer_kfac_factors
from purenet.analysis.per_example import GRADS, per_example_backward, sq_norms_visit
from purenet.layers import base, conv, dense, structure
from purenet.layers.base import Array, KFACBlocks, KFACFactors, LayerLike, PyTree, Visit
from purenet.layers.defaults import has_params, sum_leaves
from purenet.layers.structure import Convolution, DenseProduct
from purenet.layers.traversal import walk
from purenet.losses import Loss
from purenet.network import _full_trees, add_l2, backward_pass, loss_pass

__all__ = ["COLUMN_RULES", "GRAM_RULES", "KFACBlocks", "KFACFactors", "NoiseScale", "SQUARE_RULES", "fisher_diagonal",
           "ggn_diagonal", "gradient_gram", "gradient_noise", "gradient_noise_scale", "hessian_diagonal", "kfac_factors",
           "kfac_value_and_grad", "kfac_zeros", "per_example_gram", "per_example_sq", "per_example_sq_columns"]


# ---------------------------------------------------------------- one layer: the rules per product kind


def _dense_sq(p: DenseProduct, params: PyTree) -> dict:
    """sum_i dW_i**2 and sum_i db_i**2 without forming dW_i for rows: (a**2)^T (g**2), one matmul
    (`purenet.layers.dense.per_example_sq`)."""
    sq = dense.per_example_sq(p.a, p.g, True)
    return structure.split_columns(p, params, sq["W"], sq["b"], ())


def _sq_from_grads(p, params):
    return {k: jnp.sum(g * g, axis=0) for k, g in GRADS[type(p)](p, params).items()}


def _conv_sq(p: Convolution, params: PyTree) -> dict:
    """sum_i dW_i**2, sum_i db_i**2, dW_i formed one tap at a time."""
    w = structure.conv_weight(p, params)
    taps, _ = conv.per_example_taps(p.conv, w, p.cache, p.g)
    out = {p.weight: jnp.stack([jnp.sum(d * d, axis=0) for d in taps]).reshape(params[p.weight].shape)}
    if p.bias is not None:
        out[p.bias] = jnp.sum(jnp.sum(p.g, axis=(1, 2)) ** 2, axis=0)
    return out


# sum over the examples of g_i**2 (elementwise) for one product's parameters; a kind absent forms its g_i.
SQUARE_RULES: dict[type, Callable[..., dict]] = {DenseProduct: _dense_sq, Convolution: _conv_sq}


def _dense_sq_columns(p: DenseProduct, params: PyTree, axis_name: str) -> dict:
    """For rows, (a**2)^T sum_c g_c**2: the cotangent columns c (the vmap axis `axis_name`) summed
    before the one matmul (BackPACK's DiagGGN einsum); with positions, each column's squares summed."""
    if p.a.ndim != 2:
        return jax.lax.psum(_dense_sq(p, params), axis_name)
    g2 = jax.lax.psum(p.g * p.g, axis_name)
    w = jax.lax.dot_general(p.a * p.a, g2, (((0,), (0,)), ((), ())))
    return structure.split_columns(p, params, w, jnp.sum(g2, axis=0), ())


# The same summed over the cotangent columns of a `vmap` named axis_name (curvature's column walk).
COLUMN_RULES: dict[type, Callable[..., dict]] = {DenseProduct: _dense_sq_columns}


def _dense_gram(pa: DenseProduct, pb: DenseProduct, params: PyTree) -> Array:
    """<g_i, g_j> = (Ha Hb^T) * (Ga Gb^T) for rows (summed over position pairs with positions, or dW_i
    formed when smaller: `purenet.layers.dense.per_example_gram`), plus the bias columns' products."""
    every = all(b is not None for b in pa.biases)  # every column biased (Dense, attention): one pass
    gram = dense.per_example_gram(pa.a, pa.g, pb.a, pb.g, every)
    biased = [] if every else [(s, n) for _, b, s, n in structure.columns(pa, params) if b is not None]
    if biased:
        da, db = structure.positions_of(pa.g).sum(axis=1), structure.positions_of(pb.g).sum(axis=1)
        gram = gram + sum(da[:, s:s + n] @ db[:, s:s + n].T for s, n in biased)
    return gram


def _gram_from_grads(pa, pb, params):
    ga, gb = GRADS[type(pa)](pa, params), GRADS[type(pb)](pb, params)
    return sum(jnp.reshape(ga[k], (ga[k].shape[0], -1)) @ jnp.reshape(gb[k], (gb[k].shape[0], -1)).T for k in ga)


def _conv_gram(pa: Convolution, pb: Convolution, params: PyTree) -> Array:
    """<g_i, g_j> = sum_tap <dW_i[tap], dW_j[tap]> (+ <db_i, db_j>), one tap at a time."""
    w = structure.conv_weight(pa, params)
    ta, _ = conv.per_example_taps(pa.conv, w, pa.cache, pa.g)
    tb, _ = conv.per_example_taps(pb.conv, w, pb.cache, pb.g)
    gram = sum((jax.lax.dot_general(a, b, (((1, 2), (1, 2)), ((), ()))) for a, b in zip(ta, tb)),
               jnp.zeros((pa.g.shape[0], pb.g.shape[0]), pa.g.dtype))
    if pa.bias is not None:
        gram = gram + jnp.sum(pa.g, axis=(1, 2)) @ jnp.sum(pb.g, axis=(1, 2)).T
    return gram


# (na, nb) inner products <g_i, g_j> of one product's parameters over two batches.
GRAM_RULES: dict[type, Callable[..., Array]] = {DenseProduct: _dense_gram, Convolution: _conv_gram}


def per_example_sq(layer: Any, params: PyTree, cache: PyTree, dy: PyTree) -> tuple[PyTree, Any]:
    """(`sum_i g_i**2` elementwise, like params; dx): the layer's own method, its products' rules, or
    its per-example gradients squared.

    Args:
        layer: one leaf layer (not a container).
        params: the layer's parameters.
        cache: the cache of the layer's forward on the batch.
        dy: the per-example output gradients, shape `(batch, *out_shape)`: row i the gradient
            of example i's own loss with respect to the layer's output (N dL/d(output)).

    Returns:
        (sq, dx): sq like params, the sum over the examples of each entry's squared
            per-example gradient; dx the gradient with respect to the layer's input (None for
            integer ids).
    """
    if hasattr(layer, "per_example_sq"):
        return layer.per_example_sq(params, cache, dy)
    found = structure.declared(layer, params, cache, dy) if has_params(params) else None
    if found is not None:
        products, dx = found
        named = structure.flat(params)
        return structure.tree_of(params, [SQUARE_RULES.get(type(p), _sq_from_grads)(p, named)
                                          for p in products]), dx
    grads, dx = per_example_backward(layer, params, cache, dy)
    return jax.tree_util.tree_map(lambda g: jnp.sum(g * g, axis=0), grads), dx


def per_example_sq_columns(layer: Any, params: PyTree, cache: PyTree, dy: PyTree,
                           axis_name: str) -> tuple[PyTree, Any]:
    """(sum over the examples and the cotangent columns of `g**2`, like params; dx), inside a `vmap`
    over the columns named `axis_name` (`purenet.analysis.curvature.column_walk`): the layer's own
    method, its products' rules, or `per_example_sq` summed over the columns with `lax.psum`.

    Args:
        layer: one leaf layer (not a container).
        params: the layer's parameters.
        cache: the cache of the layer's forward on the batch.
        dy: this column's per-example output gradients, shape `(batch, *out_shape)`.
        axis_name: the name of the `vmap` axis over the cotangent columns (the sum runs over it).

    Returns:
        (sq, dx): sq like params, summed over the examples and the columns; dx this column's
            gradient with respect to the layer's input.
    """
    if hasattr(layer, "per_example_sq_columns"):
        return layer.per_example_sq_columns(params, cache, dy, axis_name)
    found = structure.declared(layer, params, cache, dy) if has_params(params) else None
    if found is not None:
        products, dx = found
        named = structure.flat(params)
        return structure.tree_of(params, [
            COLUMN_RULES[type(p)](p, named, axis_name) if type(p) in COLUMN_RULES
            else jax.lax.psum(SQUARE_RULES.get(type(p), _sq_from_grads)(p, named), axis_name)
            for p in products]), dx
    sq, dx = per_example_sq(layer, params, cache, dy)
    return jax.lax.psum(sq, axis_name), dx


def per_example_gram(layer: Any, params: PyTree, cache_a: PyTree, dy_a: PyTree, cache_b: PyTree,
                     dy_b: PyTree) -> tuple[Array, Any, Any]:
    """((na, nb) matrix of `<g_i, g_j>`, dxa, dxb): the layer's own method, its products' rules, or
    the products of its per-example gradients.

    Args:
        layer: one leaf layer (not a container).
        params: the layer's parameters.
        cache_a: the cache of the layer's forward on batch a.
        dy_a: batch a's per-example output gradients, shape `(na, *out_shape)`.
        cache_b: the cache of the layer's forward on batch b.
        dy_b: batch b's per-example output gradients, shape `(nb, *out_shape)`.

    Returns:
        (gram, dxa, dxb): gram (na, nb), entry (i, j) the inner product of example i's (batch a)
            and example j's (batch b) gradients of the layer's parameters; dxa, dxb the
            gradients with respect to the layer's input for each batch.
    """
    if hasattr(layer, "per_example_gram"):
        return layer.per_example_gram(params, cache_a, dy_a, cache_b, dy_b)
    na, nb = jax.tree_util.tree_leaves(dy_a)[0].shape[0], jax.tree_util.tree_leaves(dy_b)[0].shape[0]
    zero = jnp.zeros((na, nb), jax.tree_util.tree_leaves(dy_a)[0].dtype)
    found = structure.declared(layer, params, cache_a, dy_a) if has_params(params) else None
    if found is not None:
        (pas, dxa), (pbs, dxb) = found, structure.bound(layer, params, cache_b, dy_b)
        named = structure.flat(params)
        return sum((GRAM_RULES.get(type(pa), _gram_from_grads)(pa, pb, named) for pa, pb in zip(pas, pbs)),
                   zero), dxa, dxb
    ga, dxa = per_example_backward(layer, params, cache_a, dy_a)
    gb, dxb = per_example_backward(layer, params, cache_b, dy_b)
    products = jax.tree_util.tree_map(lambda u, v: jnp.reshape(u, (na, -1)) @ jnp.reshape(v, (nb, -1)).T, ga, gb)
    return sum_leaves(products, zero), dxa, dxb


def _per_example_seed(p):
    """Row i: the gradient of example i's own loss with respect to the output."""
    return lambda dout: dout * p.out.shape[0]


# ---------------------------------------------------------------- Fisher and GGN diagonals


def _sq_leaf(layer, params, caches, dys):
    (cache,), (dy,) = caches, dys
    sq, dx = per_example_sq_columns(layer, params, cache, dy, COLUMNS)
    return sq, (dx,)


def _rows_sq_leaf(layer, params, caches, dys):
    (cache,), (dy,) = caches, dys
    grads, dx = per_example_backward(layer, params, cache, dy)
    return jax.lax.psum(jax.tree_util.tree_map(lambda g: g * g, grads), COLUMNS), (dx,)


def _per_example_zeros(params, dys):
    n = jax.tree_util.tree_leaves(dys)[0].shape[0]
    return jax.tree_util.tree_map(lambda t: jnp.zeros((n, *jnp.shape(t)), t.dtype), params)


# sum over examples and columns of g**2; and per example (rows), summed over columns only
SQUARES = Visit(_sq_leaf, lambda params, dys: base.zeros_like_tree(params))
ROW_SQUARES = Visit(_rows_sq_leaf, _per_example_zeros)


def _check_fisher_args(fisher: str) -> None:
    if fisher not in curvature.FISHERS:
        raise ValueError(f"fisher must be one of {curvature.FISHERS}, got {fisher!r}")


def _sampling_key(key: Array | None) -> Array | None:
    """The labels' key: `key` folded with 1, so a dropout forward drawing from `key` stays independent."""
    return None if key is None else jax.random.fold_in(key, 1)


def _squares(net, params, state, x, y, loss, fisher, key, samples, per_example, train):
    p = loss_pass(net, params, state, x, loss, train, key)
    columns = curvature.output_columns(p, y, fisher, _sampling_key(key), samples)
    sq = curvature.column_walk(p, ROW_SQUARES if per_example else SQUARES, columns)
    n = p.out.shape[0]
    return p.grads(net, sq if per_example else jax.tree_util.tree_map(lambda s: s / n, sq))


def fisher_diagonal(net: LayerLike, params: PyTree, state: PyTree, x: Array, y: Any,
                    loss: str | Loss = "cross_entropy", train: bool = False, key: Array | None = None,
                    fisher: str = "empirical", samples: int = 1) -> PyTree:
    """The Fisher's diagonal, `(1/N) sum_i sum_c (J_i^T s_ic)**2`, a tree like params.

    fisher="empirical" (the default, as before): one column, the data
    gradient, so this is `(1/N) sum_i g_i**2`, the empirical Fisher.
    fisher="mc": `samples` columns from labels drawn from the model (key;
    the labels use fold_in(key, 1), the forward's dropout `key` itself), an
    unbiased estimate of the GGN diagonal. fisher="exact": the GGN diagonal
    (`ggn_diagonal`). See `purenet.analysis.curvature` for the columns.

    Identity: for Dense rows dW_ic = h_i dy_ic^T, so `sum_ic dW_ic**2 =
    (h**2)^T sum_c (dy_c**2)`: one matmul, no per-example gradient formed
    (positions: a matmul over pairs of positions, or dW_i formed when
    smaller; see `purenet.layers.dense.per_example_sq`). Conv2D does the
    same on its patches; other layers square the per-example gradients they
    form (any layer without a fast path forms them with its own backward,
    vmapped). Data loss only (no l2 term); zero inside Frozen.

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters.
        state: its state (as `pn.init` returns it).
        x: inputs, shape `(batch, *in_shape)` (integer token ids when the network starts with
            an Embedding).
        y: targets for `loss`, one row per example (read by fisher="empirical").
        loss: a registered loss name ("cross_entropy", "mse", ...) or a `pn.Loss`.
        train: training mode (dropout, batch statistics); a Python bool. Keep it False with
            BatchNorm, whose training mode couples the examples.
        key: PRNG key for the forward's randomness (dropout) and, folded with 1, for the
            labels fisher="mc" draws; required by "mc".
        fisher: which output cotangents (`purenet.analysis.curvature`): "empirical" (the data
            gradient), "mc" (labels sampled from the model) or "exact" (the loss Hessian's
            square-root columns).
        samples: labels drawn per example with fisher="mc" (a positive int).

    Returns:
        The diagonal, a tree like params.

    Raises:
        ValueError: if `fisher` is not "empirical", "mc" or "exact"; if fisher="mc" has no
            `key` or `samples` is not a positive int; if "mc" or "exact" is asked of a loss
            that declares no sampling or Hessian square root;
            if `loss` is not a registered name or a `pn.Loss`, or `x` has no batch axis or
            is empty.
        TypeError: if `x` is not floating point (integer ids for a network that starts with
            an Embedding).
    """
    _check_fisher_args(fisher)
    return _squares(net, params, state, x, y, loss, fisher, key, samples, False, train)


def ggn_diagonal(net: LayerLike, params: PyTree, state: PyTree, x: Array, y: Any,
                 loss: str | Loss = "cross_entropy", per_example: bool = False, train: bool = False,
                 key: Array | None = None, fisher: str = "exact", samples: int = 1) -> PyTree:
    """The generalised Gauss-Newton's diagonal, diag((1/N) sum_i J_i^T H_i J_i), a tree like params.

    H_i = d^2 L_i / df^2, the loss Hessian of example i at its output, is
    factored as sum_c s_c s_c^T (softmax cross-entropy: diag(p) - p p^T;
    mse: 2 I; sigmoid cross-entropy: diag(p (1 - p))); each column runs
    through the handwritten backward and the per-example squares are summed
    over the columns: diag G = (1/N) sum_ic (J_i^T s_ic)**2 (BackPACK's
    DiagGGNExact). k outputs take k backward columns (P positions: P k).
    fisher="mc" draws `samples` columns from the model's predictive
    distribution instead (DiagGGNMC; key as in `fisher_diagonal`).
    per_example=True: each example's own diag(J_i^T H_i J_i), leaves
    (N, ...), whose mean over the rows is the default's result.
    The labels y are not read by "exact" / "mc" (the GGN does not depend on them).

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters.
        state: its state (as `pn.init` returns it).
        x: inputs, shape `(batch, *in_shape)` (integer token ids when the network starts with
            an Embedding).
        y: targets for `loss` (not read: the GGN does not depend on them).
        loss: a registered loss name ("cross_entropy", "mse", ...) or a `pn.Loss`.
        per_example: True for each example's own diagonal (leaves `(batch, *leaf_shape)`),
            False for their mean.
        train: training mode (dropout, batch statistics); a Python bool. Keep it False with
            BatchNorm, whose training mode couples the examples.
        key: PRNG key for the forward's randomness (dropout) and, folded with 1, for the
            labels fisher="mc" draws; required by "mc".
        fisher: "exact" (the loss Hessian's square-root columns) or "mc" (`samples` labels
            drawn from the model).
        samples: labels drawn per example with fisher="mc" (a positive int).

    Returns:
        The diagonal, a tree like params (leaves with a leading batch axis when
            `per_example`).

    Raises:
        ValueError: if fisher="empirical" (that is `fisher_diagonal`) or any other value
            than "exact" and "mc"; if fisher="mc" has no `key` or `samples` is not a positive
            int; if the loss declares no Hessian square root (or sampling, for "mc");
            if `loss` is not a registered name or a `pn.Loss`, or `x` has no batch axis or
            is empty.
        TypeError: if `x` is not floating point (integer ids for a network that starts with
            an Embedding).
    """
    if fisher == "empirical":
        raise ValueError("ggn_diagonal is the exact (or Monte-Carlo) GGN: use fisher='exact' or 'mc'; "
                         "the empirical Fisher is pn.stats.fisher_diagonal")
    _check_fisher_args(fisher)
    return _squares(net, params, state, x, y, loss, fisher, key, samples, per_example, train)


# ---------------------------------------------------------------- the Hessian's diagonal


class _HessianColumns(NamedTuple):
    """What flows back through a chain for the Hessian: the first-order gradient g (N, ...) and
    the signed square-root columns of the Hessian w.r.t. the current activation, H = P P^T - Q Q^T."""

    g: Array
    pos: Array  # (Mp, N, ...)
    neg: Array  # (Mn, N, ...)


def _second_order(layer: Any) -> Any:
    """None for a layer without a second-order term, else its second_derivative; an error otherwise."""
    if getattr(layer, "piecewise_linear", False):
        return None
    if hasattr(layer, "second_derivative"):
        return layer.second_derivative
    raise ValueError(
        f"hessian_diagonal: {type(layer).__name__} declares no second-order term. A layer linear in its "
        f"parameters and piecewise linear in its input sets `piecewise_linear = True`; an elementwise "
        f"h = g(a) defines `second_derivative(cache) -> g''(a)`. Layers that mix inputs nonlinearly "
        f"(norms, attention, softmax inside the network) are not supported; pn.stats.ggn_diagonal is")


def _column_squares(layer, params, cache, cols, per_example):
    """sum over the columns of the examples' summed g**2 (or each example's), and the columns' dx."""
    def one(dy):
        if per_example:
            grads, dx = per_example_backward(layer, params, cache, dy)
            return jax.tree_util.tree_map(lambda g: g * g, grads), dx
        return per_example_sq(layer, params, cache, dy)
    sq, dx = jax.vmap(one)(cols)
    return jax.tree_util.tree_map(lambda t: jnp.sum(t, axis=0), sq), dx


def _diagonal_columns(r: Array) -> tuple[Array, Array]:
    """diag(r) per example as signed columns: (sqrt(max(r, 0)) e_d, sqrt(max(-r, 0)) e_d), d over units."""
    shape = r.shape[1:]
    eye = jnp.eye(math.prod(shape), dtype=r.dtype).reshape(-1, 1, *shape)
    return eye * jnp.sqrt(jnp.maximum(r, 0))[None], eye * jnp.sqrt(jnp.maximum(-r, 0))[None]


def _hessian_visit(per_example: bool) -> Visit:
    def leaf(layer, params, caches, dys):
        (cache,), (h,) = caches, dys
        second = _second_order(layer)
        if base.has_params(params):
            sq_pos, dpos = _column_squares(layer, params, cache, h.pos, per_example)
            sq_neg, dneg = _column_squares(layer, params, cache, h.neg, per_example)
            diag = jax.tree_util.tree_map(jnp.subtract, sq_pos, sq_neg)
        else:
            diag = params
            dpos = jax.vmap(lambda d: layer.backward(params, cache, d)[1])(h.pos)
            dneg = jax.vmap(lambda d: layer.backward(params, cache, d)[1])(h.neg)
        _, g = layer.backward(params, cache, h.g)
        if dpos is None or g is None:  # the network's first layer (ids, or no input gradient)
            return diag, (None,)
        if second is not None:  # H_a = diag(g') H_h diag(g') + diag(g'' * dL/dh)
            more_pos, more_neg = _diagonal_columns(second(cache) * h.g)
            dpos, dneg = jnp.concatenate([dpos, more_pos]), jnp.concatenate([dneg, more_neg])
        return diag, (_HessianColumns(g, dpos, dneg),)

    zeros = _per_example_zeros if per_example else (lambda params, dys: base.zeros_like_tree(params))
    return Visit(leaf, zeros)


def _check_chain(net: Any) -> None:
    """The Hessian walk appends columns, which only chains (containers declaring `chain`, such as
    Sequential) pass on; branches (Residual, Parallel, GPT) and Frozen cannot merge them."""
    if not base.is_container(net):
        return
    if not getattr(net, "chain", False):
        raise ValueError(f"hessian_diagonal runs through chains of layers (pn.Sequential); "
                         f"{type(net).__name__} does not pass its second-order columns on; "
                         f"pn.stats.ggn_diagonal works on any network")
    for child in net.children():
        _check_chain(child)


def hessian_diagonal(net: LayerLike, params: PyTree, state: PyTree, x: Array, y: Any,
                     loss: str | Loss = "cross_entropy", per_example: bool = False, train: bool = False,
                     key: Array | None = None) -> PyTree:
    """The exact diagonal of the loss's Hessian d^2 L / d theta^2, a tree like params.

    The second-order backward (BackPACK's DiagHessian; Dangel et al. 2020):
    the Hessian with respect to each activation is carried back as signed
    square-root columns, H = P P^T - Q Q^T, per example. At the output
    P is the loss Hessian's root (as in `ggn_diagonal`). Through a layer
    with Jacobian J the columns become J^T P, J^T Q; an elementwise
    h = g(a) adds its residual term diag(g''(a) dL/dh), as columns
    sqrt(max(r, 0)) e_d to P and sqrt(max(-r, 0)) e_d to Q (one per unit).
    A layer's parameters, in which its output is linear, get
    `sum_c (J_theta^T p_c)**2 - sum_c (J_theta^T q_c)**2`. Each activation
    adds as many columns as it has units per example: meant for small
    networks and tests (the GGN is the scalable curvature).
    Supported: chains (Sequential) of layers that declare their second-order
    term (see `purenet.layers.base`); anything else is an error that names it.
    per_example=True: each example's own Hessian diagonal (leaves (N, ...)).

    Args:
        net: the network (a layer, or a `pn.Sequential` chain).
        params: its parameters.
        state: its state (as `pn.init` returns it).
        x: inputs, shape `(batch, *in_shape)` (integer token ids when the network starts with
            an Embedding).
        y: targets for `loss`, one row per example.
        loss: a registered loss name ("cross_entropy", "mse", ...) or a `pn.Loss`.
        per_example: True for each example's own diagonal (leaves `(batch, *leaf_shape)`),
            False for their mean.
        train: training mode (dropout, batch statistics); a Python bool. Keep it False with
            BatchNorm, whose training mode couples the examples.
        key: PRNG key for the forward's randomness (dropout), or None.

    Returns:
        The diagonal of the data loss's Hessian (no l2 term), a tree like params.

    Raises:
        ValueError: if the network is not a chain (a Residual, Parallel, GPT or Frozen
            inside), or a layer declares no second-order term (neither `piecewise_linear`
            nor `second_derivative`); if the loss declares no Hessian square root;
            if `loss` is not a registered name or a `pn.Loss`, or `x` has no batch axis or
            is empty.
        TypeError: if `x` is not floating point (integer ids for a network that starts with
            an Embedding).
    """
    _check_chain(net)
    p = loss_pass(net, params, state, x, loss, train, key)
    root = curvature.exact_columns(p)
    seed = p.per_example_seed(y)
    start = _HessianColumns(seed, root, jnp.zeros((0, *root.shape[1:]), root.dtype))
    diag, _ = walk(p.body, _hessian_visit(per_example), p.body_params, (p.cache,), (start,))
    n = p.out.shape[0]
    return p.grads(net, diag if per_example else jax.tree_util.tree_map(lambda s: s / n, diag))


# ---------------------------------------------------------------- noise scale


class NoiseScale(NamedTuple):
    """The parts of the gradient noise scale, from one batch of n examples.

    Attributes:
        b_simple: `trace_cov / grad_sq_norm`, the simple noise scale B_simple (a scalar).
        trace_cov: tr(S), S the unbiased sample covariance of the per-example gradients g_i.
        grad_sq_norm: `|G|^2`, G = (1/n) sum_i g_i the batch's gradient.
        mean_sq_norm: `(1/n) sum_i |g_i|^2`, the trace of the empirical Fisher (with l2 = 0).
    """

    b_simple: jnp.ndarray      # trace_cov / grad_sq_norm
    trace_cov: jnp.ndarray     # tr(S), S the unbiased sample covariance of the g_i
    grad_sq_norm: jnp.ndarray  # |G|^2, G = (1/n) sum_i g_i (the batch's gradient)
    mean_sq_norm: jnp.ndarray  # (1/n) sum_i |g_i|^2 = tr(empirical Fisher)


def gradient_noise(net: LayerLike, params: PyTree, state: PyTree, x: Array, y: Any,
                   loss: str | Loss = "cross_entropy", l2: float | Array = 0.0, train: bool = False,
                   key: Array | None = None) -> NoiseScale:
    """NoiseScale(b_simple, trace_cov, grad_sq_norm, mean_sq_norm) on the batch (x, y).

    McCandlish et al. (2018), "An Empirical Model of Large-Batch Training":
    B_simple = tr(S) / |G|^2, with S the per-example gradients' covariance.
    From n >= 2 examples:

        mean_sq  = (1/n) sum_i |g_i|^2     (per-example ghost norms, no g_i formed)
        |G|^2    = |(1/n) sum_i g_i|^2     (the ordinary backward)
        tr(S)    = n/(n-1) (mean_sq - |G|^2)      (unbiased)

    |G|^2 of one batch is biased high as an estimate of the true gradient's
    squared norm: E|G|^2 = |G_true|^2 + tr(S_true)/n. b_simple uses it as it
    is (so, for a small batch, it errs low); McCandlish et al.'s Appendix A
    removes the bias with two batch sizes, and `unbiased` in
    `gradient_noise_scale` uses |G|^2 - tr(S)/n from this one batch instead.
    With l2, every g_i shifts by l2 W: S is unchanged and G includes it.

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters.
        state: its state (as `pn.init` returns it).
        x: inputs, shape `(batch, *in_shape)` (integer token ids when the network starts with
            an Embedding).
        y: targets for `loss`, one row per example.
        loss: a registered loss name ("cross_entropy", "mse", ...) or a `pn.Loss`.
        l2: weight decay coefficient on the parameters whose role is "weight": every g_i
            (and so G) includes `l2 W`.
        train: training mode (dropout, batch statistics); a Python bool. Keep it False with
            BatchNorm, whose training mode couples the examples.
        key: PRNG key for the forward's randomness (dropout), or None.

    Returns:
        A `NoiseScale` of scalars.

    Raises:
        ValueError: if the batch has fewer than 2 examples;
            if `loss` is not a registered name or a `pn.Loss`, or `x` has no batch axis or
            is empty.
        TypeError: if `x` is not floating point (integer ids for a network that starts with
            an Embedding).
    """
    p = loss_pass(net, params, state, x, loss, train, key)
    n = p.out.shape[0]
    if n < 2:
        raise ValueError(f"the gradient noise scale needs a batch of at least 2 examples (a covariance), got {n}")
    sq = base.sum_leaves(backward_pass(p, net, y, sq_norms_visit(l2), seed=_per_example_seed(p)),
                         jnp.zeros((n,), p.out.dtype))
    _, grads = add_l2(net, params, l2, 0.0, backward_pass(p, net, y))
    g2 = base.sum_leaves(jax.tree_util.tree_map(lambda g: jnp.sum(g * g), grads), jnp.zeros((), p.out.dtype))
    mean_sq = jnp.mean(sq)
    trace = n / (n - 1) * (mean_sq - g2)
    return NoiseScale(trace / g2, trace, g2, mean_sq)


def gradient_noise_scale(net: LayerLike, params: PyTree, state: PyTree, x: Array, y: Any,
                         loss: str | Loss = "cross_entropy", l2: float | Array = 0.0, unbiased: bool = False,
                         train: bool = False, key: Array | None = None) -> Array:
    """B_simple = tr(S) / |G|^2 (McCandlish et al., 2018), a scalar: see `gradient_noise`.

    unbiased=True divides by |G|^2 - tr(S)/n, the unbiased estimate of the
    true gradient's squared norm, instead of the batch's |G|^2 (less biased,
    noisier, and negative when the batch's gradient is mostly noise).
    Identity: ||h_i dy_i^T||^2 = ||h_i||^2 ||dy_i||^2 (Goodfellow, 2015) via
    `pn.per_example_grad_norms`' machinery; no per-example gradient formed.

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters.
        state: its state (as `pn.init` returns it).
        x: inputs, shape `(batch, *in_shape)` (integer token ids when the network starts with
            an Embedding).
        y: targets for `loss`, one row per example.
        loss: a registered loss name ("cross_entropy", "mse", ...) or a `pn.Loss`.
        l2: weight decay coefficient on the parameters whose role is "weight" (see
            `gradient_noise`).
        unbiased: divide by `|G|^2 - tr(S)/n` instead of `|G|^2`.
        train: training mode (dropout, batch statistics); a Python bool. Keep it False with
            BatchNorm, whose training mode couples the examples.
        key: PRNG key for the forward's randomness (dropout), or None.

    Returns:
        B_simple, a scalar.

    Raises:
        ValueError: if the batch has fewer than 2 examples;
            if `loss` is not a registered name or a `pn.Loss`, or `x` has no batch axis or
            is empty.
        TypeError: if `x` is not floating point (integer ids for a network that starts with
            an Embedding).
    """
    parts = gradient_noise(net, params, state, x, y, loss=loss, l2=l2, train=train, key=key)
    if not unbiased:
        return parts.b_simple
    n = jnp.shape(x)[0]
    return parts.trace_cov / (parts.grad_sq_norm - parts.trace_cov / n)


# ---------------------------------------------------------------- gradient Gram matrix


def _gram_leaf(layer, params, caches, dys):
    (ca, cb), (da, db) = caches, dys
    gram, dxa, dxb = per_example_gram(layer, params, ca, da, cb, db)
    return gram, (dxa, dxb)


GRAM = Visit(_gram_leaf, lambda params, dys: jnp.zeros((dys[0].shape[0], dys[1].shape[0]), dys[0].dtype),
             shaped=False)


def gradient_gram(net: LayerLike, params: PyTree, state: PyTree, batch1: tuple[Array, Any],
                  batch2: tuple[Array, Any] | None = None, loss: str | Loss = "cross_entropy", train: bool = False,
                  key: Array | None = None) -> Array:
    """The (n1, n2) matrix of per-example gradient inner products `<g_i, g_j>`, i in batch1, j in batch2.

    batch1 = (x1, y1), batch2 = (x2, y2) (default: batch1 again). Each batch
    runs forward and its own per-example backward; at every Dense layer the
    contribution is, for rows,

        <h_i dy_i^T, h_j dy_j^T> = (h_i . h_j)(dy_i . dy_j):   (H1 H2^T) * (D1 D2^T)

    (+ D1 D2^T for the bias), and for T positions sum_{t,s} (h_it . h_js)(dy_it . dy_js)
    (or the per-example dW formed when smaller; see `purenet.layers.dense.per_example_gram`).
    No g_i is formed for Dense or Conv2D; other layers contract the
    per-example gradients they form. This is TracIn's (Pruthi et al., 2020)
    inner product between training and test examples. Data loss only.

    The larger batch is walked first (the result transposed back): with
    the smaller one first, jaxlib 0.10.2's XLA:CPU miscomputes the columns
    beyond 16,384 unless `pn.xla_flags.configure()` ran (jax issue 39103).

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters.
        state: its state (as `pn.init` returns it).
        batch1: (x1, y1), inputs `(n1, *in_shape)` and their targets.
        batch2: (x2, y2), inputs `(n2, *in_shape)` and their targets; None for batch1 again.
        loss: a registered loss name ("cross_entropy", "mse", ...) or a `pn.Loss`.
        train: training mode (dropout, batch statistics); a Python bool. Keep it False with
            BatchNorm, whose training mode couples the examples.
        key: PRNG key for the forward's randomness (dropout), or None.

    Returns:
        (n1, n2) the inner products of the data loss's per-example gradients.

    Raises:
        TypeError: if a batch is not a pair (x, y), or an `x` is not floating point (integer
            ids for a network that starts with an Embedding).
        ValueError: if `loss` is not a registered name or a `pn.Loss`, or an `x` has no batch
            axis or is empty.
    """
    batch2 = batch1 if batch2 is None else batch2
    for name, batch in (("batch1", batch1), ("batch2", batch2)):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"gradient_gram takes each batch as a pair (x, y): {name} is "
                            f"{type(batch).__name__}"
                            + (f" of length {len(batch)}" if hasattr(batch, "__len__") else "")
                            + "; call gradient_gram(net, params, state, (x1, y1), (x2, y2))")
    (x1, y1), (x2, y2) = batch1, batch2
    if jnp.shape(x2)[0] > jnp.shape(x1)[0]:  # the larger batch first, as rows: jax issue 39103's miscompile
        return gradient_gram(net, params, state, batch2, batch1, loss, train, key).T  # hits the other layout
    p1 = loss_pass(net, params, state, x1, loss, train, key)
    p2 = loss_pass(net, params, state, x2, loss, train, key)
    dys = (p1.per_example_seed(y1), p2.per_example_seed(y2))
    grams, _ = walk(p1.body, GRAM, p1.body_params, (p1.cache, p2.cache), dys)
    return base.sum_leaves(grams, jnp.zeros((p1.out.shape[0], p2.out.shape[0]), p1.out.dtype))


# ---------------------------------------------------------------- K-FAC


def _kfac_visit(found: list) -> Visit:
    """The plain backward, and at each K-FAC layer its factors, appended to `found` in walk order."""
    def leaf(layer, params, caches, dys):
        (cache,), (dy,) = caches, dys
        grads, dx = layer.backward(params, cache, dy)
        if kfac_eligible(layer, params):
            found.append(layer_kfac_factors(layer, params, cache, dy)[0])
        return grads, (dx,)
    return Visit(leaf, lambda params, dys: base.zeros_like_tree(params))


def _factor_tree(net, params, factors):
    """A tree like params with factors[k] in place of the k-th K-FAC layer's params (walk order), None
    elsewhere (and inside Frozen). `factors=None` gives zero matrices."""
    it = iter(factors) if factors is not None else None

    def leaf(layer, p):
        if not kfac_eligible(layer, p):
            return None
        if it is not None:
            return next(it)
        dims = layer_kfac_dims(layer, p)
        dtype = jnp.promote_types(jax.tree_util.tree_leaves(p)[0].dtype, jnp.float32)  # factors in >= float32

        def zeros(ag):
            a, g = ag
            return KFACFactors(jnp.zeros((a, a), dtype), jnp.zeros((g, g), dtype))
        if isinstance(dims, KFACBlocks):
            return KFACBlocks({key: zeros(ag) for key, ag in dims.factors.items()})
        return zeros(dims)

    return base.map_in_walk_order(net, leaf, params)


def kfac_zeros(net: LayerLike, params: PyTree) -> PyTree:
    """A factor tree like `kfac_factors`' with zero matrices (K-FAC's optimizer state starts from it).

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters (their shapes fix the factors' sizes).

    Returns:
        A tree like params with `KFACFactors` (or `KFACBlocks`) of zero matrices, at least
            float32, in place of each K-FAC layer's params, and None elsewhere.
    """
    return _factor_tree(net, params, None)


def _kfac_columns_leaf(layer, params, caches, dys):
    """At a K-FAC layer its factors, G summed over the columns (A does not depend on them)."""
    (cache,), (dy,) = caches, dys
    if kfac_eligible(layer, params):
        f, dx = layer_kfac_factors(layer, params, cache, dy)
        return jax.tree_util.tree_map(lambda t: KFACFactors(t.A, jax.lax.psum(t.G, COLUMNS)), f,
                                      is_leaf=lambda t: isinstance(t, KFACFactors)), (dx,)
    return None, (layer.backward(params, cache, dy)[1],)


KFAC_COLUMNS = Visit(_kfac_columns_leaf, lambda params, dys: None)


def kfac_value_and_grad(net: LayerLike, params: PyTree, state: PyTree, x: Array, y: Any,
                        loss: str | Loss = "cross_entropy", l2: float | Array = 0.0, train: bool = False,
                        key: Array | None = None, fisher: str = "empirical",
                        samples: int = 1) -> tuple[Array, PyTree, PyTree, PyTree]:
    """(value, grads, factors, state): `pn.value_and_grad` and `kfac_factors` from one forward.

    fisher="empirical": one backward on the per-example output gradients
    N dL/d(output) (linear, so the gradient is that pass's result over N),
    each Dense and Conv2D layer reading its factors on the way. "mc" /
    "exact": the gradient's backward, then the factors' G from the
    columns of `purenet.analysis.curvature` (one more backward per column; A is the
    same). grads include the l2 term; the factors do not. BatchNorm in
    training mode is allowed here (the factors use each row's
    backpropagated gradient as it is).

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters.
        state: its state (as `pn.init` returns it).
        x: inputs, shape `(batch, *in_shape)` (integer token ids when the network starts with
            an Embedding).
        y: targets for `loss`, one row per example.
        loss: a registered loss name ("cross_entropy", "mse", ...) or a `pn.Loss`.
        l2: weight decay coefficient on the parameters whose role is "weight" (in the value
            and grads, not in the factors).
        train: training mode (dropout, batch statistics); a Python bool.
        key: PRNG key for the forward's randomness (dropout) and, folded with 1, for the
            labels fisher="mc" draws; required by "mc".
        fisher: which output cotangents (`purenet.analysis.curvature`): "empirical" (the data
            gradient), "mc" (labels sampled from the model) or "exact" (the loss Hessian's
            square-root columns).
        samples: labels drawn per example with fisher="mc" (a positive int).

    Returns:
        (value, grads, factors, state): the loss (with the l2 penalty); grads like params;
            factors as `kfac_factors` returns them; the network's new state.

    Raises:
        ValueError: if `fisher` is not "empirical", "mc" or "exact"; if fisher="mc" has no
            `key` or `samples` is not a positive int; if "mc" or "exact" is asked of a loss
            that declares no sampling or Hessian square root;
            if `loss` is not a registered name or a `pn.Loss`, or `x` has no batch axis or
            is empty.
        TypeError: if `x` is not floating point (integer ids for a network that starts with
            an Embedding).
    """
    _check_fisher_args(fisher)
    p = loss_pass(net, params, state, x, loss, train, key)
    n = p.out.shape[0]
    if fisher == "empirical":
        found: list = []
        grads = backward_pass(p, net, y, _kfac_visit(found), seed=_per_example_seed(p))
        grads = jax.tree_util.tree_map(lambda g: g / n, grads)
        factors = _factor_tree(p.body, p.body_params, [_wide_factors(f) for f in found])
    else:
        grads = backward_pass(p, net, y)
        columns = curvature.output_columns(p, y, fisher, _sampling_key(key), samples)
        factors = jax.tree_util.tree_map(_wide_factors, curvature.column_walk(p, KFAC_COLUMNS, columns),
                                         is_leaf=lambda t: isinstance(t, KFACFactors))
    value, grads = add_l2(net, params, l2, p.loss_fn.value(p.out, y), grads)
    return value, grads, _full_trees(net, p.fused, factors, None), p.state


def _wide_factors(f):
    return jax.tree_util.tree_map(base.wide, f)


def kfac_factors(net: LayerLike, params: PyTree, state: PyTree, x: Array, y: Any,
                 loss: str | Loss = "cross_entropy", train: bool = False, key: Array | None = None,
                 fisher: str = "empirical", samples: int = 1) -> PyTree:
    """K-FAC's Kronecker factors of every Dense and Conv2D layer: a tree like params holding
    KFACFactors(A, G) in place of each such layer's params (None for other layers).

    With N examples of T positions each (T = 1 for rows; Ho Wo output pixels
    with the patches as h for Conv2D), a = [h, 1] (bias-augmented; h alone
    without a bias) and dy_it row (i, t) of N dL/d(output), the gradient of
    example i's own loss:

        A = 1/(N T) sum_{i,t} a_it a_it^T,    G = 1/N sum_{i,t} dy_it dy_it^T.

    Scaling: the empirical Fisher of the layer's weights [W; b] (W as (in, out),
    vec row-major), (1/N) sum_i vec(g_i) vec(g_i)^T, is approximated by
    A (x) G: exact for one example of one position, K-FAC's independence
    assumption across examples (Martens & Grosse, 2015), and with T > 1 KFC's
    (Grosse & Martens, 2016) spatially uncorrelated gradients. The
    preconditioned gradient (A (x) G)^-1 vec(g) is A^-1 [dW; db] G^-1.
    Cost: one matmul per factor; no per-example gradient formed.

    `fisher` picks the output cotangents dy (`purenet.analysis.curvature`):
    "empirical" (the default) the data's per-example gradients as above;
    "mc" Martens & Grosse's K-FAC proper, G = 1/N sum_{i,s,t} dy dy^T over
    `samples` labels drawn from the model (key; BackPACK's KFAC); "exact"
    the loss Hessian's square-root columns (BackPACK's KFLR). Convolutions
    follow KFC (A averages over the output positions, G sums over them);
    BackPACK's KFAC / KFLR for Conv2d sums A over the positions instead, so
    its A is T times ours and its G is ours / T (the product agrees).

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters.
        state: its state (as `pn.init` returns it).
        x: inputs, shape `(batch, *in_shape)` (integer token ids when the network starts with
            an Embedding).
        y: targets for `loss`, one row per example.
        loss: a registered loss name ("cross_entropy", "mse", ...) or a `pn.Loss`.
        train: training mode (dropout, batch statistics); a Python bool.
        key: PRNG key for the forward's randomness (dropout) and, folded with 1, for the
            labels fisher="mc" draws; required by "mc".
        fisher: which output cotangents (`purenet.analysis.curvature`): "empirical" (the data
            gradient), "mc" (labels sampled from the model) or "exact" (the loss Hessian's
            square-root columns).
        samples: labels drawn per example with fisher="mc" (a positive int).

    Returns:
        A tree like params holding, in place of each K-FAC layer's params, `KFACFactors(A, G)`
            (A `(in + 1, in + 1)` with a bias, else `(in, in)`; G `(out, out)`; at least
            float32), or `KFACBlocks` for a layer with several weight matrices (attention);
            None for other layers and inside Frozen.

    Raises:
        ValueError: if `fisher` is not "empirical", "mc" or "exact"; if fisher="mc" has no
            `key` or `samples` is not a positive int; if "mc" or "exact" is asked of a loss
            that declares no sampling or Hessian square root;
            if `loss` is not a registered name or a `pn.Loss`, or `x` has no batch axis or
            is empty.
        TypeError: if `x` is not floating point (integer ids for a network that starts with
            an Embedding).
    """
    _, _, factors, _ = kfac_value_and_grad(net, params, state, x, y, loss=loss, train=train, key=key,
                                           fisher=fisher, samples=samples)
    return factors
