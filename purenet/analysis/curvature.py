"""Curvature from the loss's Hessian: the cotangent columns that enter the backward.

For example i with output f_i and loss L_i (example i's own loss, as
`pn.per_example_grads` defines it), the generalised Gauss-Newton matrix is

    G_i = J_i^T H_i J_i,    H_i = d^2 L_i / d f_i^2,    J_i = d f_i / d theta.

Write H_i = sum_c s_ic s_ic^T. Then G_i = sum_c (J_i^T s_ic)(J_i^T s_ic)^T: each
column s_ic is a cotangent at the output, and J_i^T s_ic is what the
handwritten backward computes from it. So every curvature statistic is an
ordinary backward run once per column, with the per-example machinery
(ghost squares, K-FAC's G) summing over the columns. Three sets of columns,
chosen by `fisher`:

    "empirical"  one column, the data's own gradient  s_i = dL_i/df_i at the labels y
                 (the empirical Fisher: Kunstner et al. 2019 on why it is a poor proxy)
    "exact"      H_i's symmetric square root (BackPACK's KFLR / DiagGGNExact):
                   softmax cross-entropy:  H = diag(p) - p p^T,  s_c = sqrt(p_c) (e_c - p)
                   mse (sum of squares):   H = 2 I,              s_c = sqrt(2) e_c
                   sigmoid cross-entropy:  H = diag(p (1 - p)),  s_c = sqrt(p_c (1 - p_c)) e_c
    "mc"         `samples` gradients at labels drawn from the model's own predictive
                 distribution (Martens & Grosse 2015's K-FAC; BackPACK's KFAC / DiagGGNMC),
                 scaled by 1/sqrt(samples):  E[s s^T] = H, so "mc" is unbiased for "exact".
                   softmax: y ~ Categorical(p);  sigmoid: y ~ Bernoulli(p);
                   mse: y ~ N(f, I/2), whose negative log-likelihood is the squared error.

An output with P positions per example, (N, P.., k), has L_i = (1/P) sum_t l_it
(the losses average over every position), so H_i is block diagonal with blocks
H_t / P: "exact" takes P k columns (each nonzero at one position, scaled by
1/sqrt(P)); "mc" samples every position at once, one column a sample, scaled
so that E[s s^T] = H_i still (the cross-position terms vanish in expectation).
"empirical" stays the data gradient dL_i/df_i = dl_it / P.

The columns live on a leading axis (M, N, *out); `column_walk` maps the one
traversal over it with `vmap`, naming the axis COLUMNS, and a visitor sums
over the columns inside with `lax.psum(x, COLUMNS)`: a sum that JAX leaves
unbatched, so a fast path can sum first and multiply once (Dense's diagonal:
(h^2)^T sum_c dy_c^2, as BackPACK's einsum does).
"""
import math
from typing import Any

import jax
import jax.numpy as jnp

from purenet.layers.base import Array, PyTree, Visit
from purenet.layers.traversal import walk
from purenet.network import LossPass

__all__ = ["COLUMNS", "FISHERS", "column_walk", "exact_columns", "mc_columns", "output_columns", "sample_targets"]

COLUMNS = "columns"  # the vmap axis name of the cotangent columns
FISHERS = ("empirical", "mc", "exact")

def _declared(p: LossPass, what: str, fisher: str) -> Any:
    """The loss's `what` (hessian_sqrt or sample), or an error naming the losses that declare it."""
    fn = getattr(p.loss_fn, what, None)
    if fn is None:
        raise ValueError(
            f"fisher={fisher!r} needs the loss's {'Hessian square root' if what == 'hessian_sqrt' else 'sampling'}, "
            f"which cross-entropy on logits (after a Softmax, on a logits network, or 'softmax_cross_entropy'), "
            f"'mse' and binary cross-entropy on logits (after a Sigmoid, or 'sigmoid_binary_cross_entropy') "
            f"declare; this loss is {p.loss_fn}: use fisher='empirical', one of those losses, or a "
            f"pn.Loss(..., {what}=...)")
    return fn


def _positions(out: Array) -> int:
    return math.prod(out.shape[1:-1])


def exact_columns(p: LossPass) -> Array:
    """H_i's square root as cotangent columns, from the loss's declared `hessian_sqrt`.

    Args:
        p: the loss pass (`purenet.network.loss_pass`): its output f (N, P.., k) and loss.

    Returns:
        (P k, N, *out) columns s_c with `sum_c s_c s_c^T = H_i` for every example i.

    Raises:
        ValueError: if the loss declares no Hessian square root.
    """
    out = p.out
    n, k, npos = out.shape[0], out.shape[-1], _positions(out)
    root = _declared(p, "hessian_sqrt", "exact")(out).reshape(n, npos, k, k)
    cols = jnp.einsum("pq,npck->pcnqk", jnp.eye(npos, dtype=out.dtype), root) / math.sqrt(npos)
    return cols.reshape(npos * k, *out.shape).astype(out.dtype)


def sample_targets(p: LossPass, key: Array, samples: int) -> Array:
    """Targets drawn from the model's predictive distribution by the loss's declared `sample`.

    Args:
        p: the loss pass: its output and loss.
        key: the random key of the draw.
        samples: how many targets per example.

    Returns:
        (samples, *targets' shape): class labels (softmax), 0/1 values (sigmoid), or f + N(0, I/2) (mse).

    Raises:
        ValueError: if the loss declares no sampling.
    """
    return _declared(p, "sample", "mc")(p.out, key, samples)


def mc_columns(p: LossPass, key: Array, samples: int) -> Array:
    """Monte-Carlo cotangent columns: the gradients at targets sampled from the model.

    Args:
        p: the loss pass: its output f (N, P.., k) and loss.
        key: the random key of the draw.
        samples: how many columns (sampled targets) per example.

    Returns:
        (samples, N, *out): `sqrt(P / samples) dL_i/df_i` at each sampled target, so `E[s s^T] = H_i`.
    """
    targets = sample_targets(p, key, samples)
    scale = math.sqrt(_positions(p.out) / samples)
    return jax.vmap(lambda t: p.per_example_seed(t) * scale)(targets)


def output_columns(p: LossPass, y: Any, fisher: str = "empirical", key: Array | None = None,
                   samples: int = 1) -> Array:
    """The cotangent columns for `fisher` (see the module): what the backward runs once per column.

    Args:
        p: the loss pass: its output f (N, P.., k) and loss.
        y: the labels (the "empirical" column is the gradient at them).
        fisher: "empirical", "mc" or "exact".
        key: the random key of "mc"'s sampled targets (required for "mc").
        samples: "mc"'s sampled targets per example.

    Returns:
        (M, N, *out): M = 1 ("empirical"), P k ("exact") or `samples` ("mc") columns.

    Raises:
        ValueError: for an unknown `fisher`, "mc" without a key, or `samples` not a positive int.
    """
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
    if fisher == "empirical":
        return p.per_example_seed(y)[None]
    if fisher == "exact":
        return exact_columns(p)
    if key is None:
        raise ValueError("fisher='mc' samples labels from the model: pass key=jax.random.key(...)")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int (Monte-Carlo labels per example), got {samples!r}")
    return mc_columns(p, key, samples)


def column_walk(p: LossPass, visit: Visit, columns: Array) -> PyTree:
    """The visitor's outs for the body's walk run once per column (vmap over axis COLUMNS).

    `visit` must sum over the columns itself (`lax.psum(., COLUMNS)`), so
    its outs are the same for every column: the first is returned.

    Args:
        p: the loss pass whose caches the walk reads.
        visit: the visitor at each leaf layer; it sums over the axis named COLUMNS.
        columns: (M, N, *out) cotangents at the body's output (`output_columns`).

    Returns:
        The visitor's outs, summed over the columns by the visitor.
    """
    outs = jax.vmap(lambda s: walk(p.body, visit, p.body_params, (p.cache,), (s,))[0],
                    axis_name=COLUMNS)(columns)
    return jax.tree_util.tree_map(lambda t: t[0], outs)
