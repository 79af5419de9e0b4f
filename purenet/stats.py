"""Gradient statistics from one forward and one backward pass: Fisher, noise scale, K-FAC, Gram.

Owning the backward pass means holding, at every layer, each example's
input h_i and output gradient dy_i (row i of N dL/d(output), the gradient
of example i's own loss L_i). The statistics below come out of those
directly, with no `vmap` of a gradient (memory batch x params) and, where
an identity allows, without forming any per-example gradient g_i:

    fisher_diagonal       (1/N) sum_i g_i**2                    Dense: (h**2)^T (dy**2), one matmul
    gradient_noise_scale  B_simple = tr(S) / |G|^2              from ||g_i||^2 (ghost norms) and G
    kfac_factors          A = E[a a^T], G = E[dy dy^T]          per Dense / Conv2D layer
    gradient_gram         <g_i, g_j> for two batches            Dense: (H1 H2^T) * (D1 D2^T)

g_i is the gradient of example i's own loss, as `pn.per_example_grads`
defines it, of the data loss: the l2 penalty is a constant shift l2 W of
every g_i, which `gradient_noise_scale` takes (it leaves S unchanged and
enters G) and the others leave out (the Fisher, K-FAC's factors and TracIn's
inner products describe the data). Per-example statistics are undefined
through BatchNorm in training mode (it couples the examples): evaluate
with train=False.

Layers supply the identities through optional methods (`per_example_sq`,
`per_example_gram`, `kfac_factors`; see `purenet.layers.base`); a layer
without them falls back on its `per_example_backward`, squaring or
contracting the per-example gradients it forms (correct, with more memory).
Containers walk their children with `map_backward`.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from purenet import losses
from purenet.layers.base import KFACFactors, map_backward
from purenet.network import _full_trees, loss_pass

__all__ = ["KFACFactors", "NoiseScale", "fisher_diagonal", "gradient_gram", "gradient_noise",
           "gradient_noise_scale", "kfac_factors", "kfac_value_and_grad", "kfac_zeros"]


def _per_example_dout(p, y):
    """Row i: the gradient of example i's own loss with respect to the output."""
    return p.loss_fn.backward(p.out, y) * p.out.shape[0]


def _sum_leaves(tree, zero):
    leaves = jax.tree_util.tree_leaves(tree)
    total = zero
    for leaf in leaves:
        total = total + leaf
    return total


# ---------------------------------------------------------------- Fisher diagonal


def _fisher_leaf(layer, params, caches, dys):
    (cache,), (dy,) = caches, dys
    if hasattr(layer, "per_example_sq"):
        sq, dx = layer.per_example_sq(params, cache, dy)
    else:  # fallback: form the per-example gradients and square them
        grads, dx = layer.per_example_backward(params, cache, dy)
        sq = jax.tree_util.tree_map(lambda g: jnp.sum(g * g, axis=0), grads)
    return sq, (dx,)


def fisher_diagonal(net, params, state, x, y, loss="cross_entropy", train=False, key=None):
    """The empirical Fisher's diagonal, (1/N) sum_i g_i**2, a tree like params.

    Identity: for Dense rows dW_i = h_i dy_i^T, so sum_i dW_i**2 =
    (h**2)^T (dy**2): one matmul, no per-example gradient formed (positions:
    a matmul over pairs of positions, or dW_i formed when smaller; see
    `purenet.layers.dense.per_example_sq`). Conv2D does the same on its
    patches; other layers square the per-example gradients they form (for
    LayerNorm, RMSNorm and BatchNorm these are only 2 x features per
    example). Data loss only (no l2 term).
    """
    p = loss_pass(net, params, state, x, loss, train, key)
    n = p.out.shape[0]
    sq, _ = map_backward(p.body, _fisher_leaf, p.body_params, (p.cache,), (_per_example_dout(p, y),))
    return p.grads(net, jax.tree_util.tree_map(lambda s: s / n, sq))


# ---------------------------------------------------------------- noise scale


class NoiseScale(NamedTuple):
    """The parts of the gradient noise scale, from one batch of n examples."""

    b_simple: jnp.ndarray      # trace_cov / grad_sq_norm
    trace_cov: jnp.ndarray     # tr(S), S the unbiased sample covariance of the g_i
    grad_sq_norm: jnp.ndarray  # |G|^2, G = (1/n) sum_i g_i (the batch's gradient)
    mean_sq_norm: jnp.ndarray  # (1/n) sum_i |g_i|^2 = tr(empirical Fisher)


def gradient_noise(net, params, state, x, y, loss="cross_entropy", l2=0.0, train=False, key=None):
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
    """
    p = loss_pass(net, params, state, x, loss, train, key)
    n = p.out.shape[0]
    if n < 2:
        raise ValueError(f"the gradient noise scale needs a batch of at least 2 examples (a covariance), got {n}")
    sq, _ = p.body.per_example_sq_norms(p.body_params, p.cache, _per_example_dout(p, y), l2)
    grads, _ = p.body.backward(p.body_params, p.cache, p.loss_fn.backward(p.out, y))
    grads = losses.add_l2_gradient(p.grads(net, grads), params, l2)
    g2 = _sum_leaves(jax.tree_util.tree_map(lambda g: jnp.sum(g * g), grads), jnp.zeros((), p.out.dtype))
    mean_sq = jnp.mean(sq)
    trace = n / (n - 1) * (mean_sq - g2)
    return NoiseScale(trace / g2, trace, g2, mean_sq)


def gradient_noise_scale(net, params, state, x, y, loss="cross_entropy", l2=0.0, unbiased=False, train=False,
                         key=None):
    """B_simple = tr(S) / |G|^2 (McCandlish et al., 2018), a scalar: see `gradient_noise`.

    unbiased=True divides by |G|^2 - tr(S)/n, the unbiased estimate of the
    true gradient's squared norm, instead of the batch's |G|^2 (less biased,
    noisier, and negative when the batch's gradient is mostly noise).
    Identity: ||h_i dy_i^T||^2 = ||h_i||^2 ||dy_i||^2 (Goodfellow, 2015) via
    `pn.per_example_grad_norms`' machinery; no per-example gradient formed.
    """
    parts = gradient_noise(net, params, state, x, y, loss=loss, l2=l2, train=train, key=key)
    if not unbiased:
        return parts.b_simple
    n = jnp.shape(x)[0]
    return parts.trace_cov / (parts.grad_sq_norm - parts.trace_cov / n)


# ---------------------------------------------------------------- gradient Gram matrix


def _gram_leaf(layer, params, caches, dys):
    (ca, cb), (da, db) = caches, dys
    if hasattr(layer, "per_example_gram"):
        gram, dxa, dxb = layer.per_example_gram(params, ca, da, cb, db)
        return gram, (dxa, dxb)
    ga, dxa = layer.per_example_backward(params, ca, da)  # fallback: form them and contract
    gb, dxb = layer.per_example_backward(params, cb, db)
    products = jax.tree_util.tree_map(lambda u, v: u.reshape(u.shape[0], -1) @ v.reshape(v.shape[0], -1).T, ga, gb)
    return _sum_leaves(products, jnp.zeros((da.shape[0], db.shape[0]), da.dtype)), (dxa, dxb)


def gradient_gram(net, params, state, batch1, batch2=None, loss="cross_entropy", train=False, key=None):
    """The (n1, n2) matrix of per-example gradient inner products <g_i, g_j>, i in batch1, j in batch2.

    batch1 = (x1, y1), batch2 = (x2, y2) (default: batch1 again). Each batch
    runs forward and its own per-example backward; at every Dense layer the
    contribution is, for rows,

        <h_i dy_i^T, h_j dy_j^T> = (h_i . h_j)(dy_i . dy_j):   (H1 H2^T) * (D1 D2^T)

    (+ D1 D2^T for the bias), and for T positions sum_{t,s} (h_it . h_js)(dy_it . dy_js)
    (or the per-example dW formed when smaller; see `purenet.layers.dense.per_example_gram`).
    No g_i is formed for Dense or Conv2D; other layers contract the
    per-example gradients they form. This is TracIn's (Pruthi et al., 2020)
    inner product between training and test examples. Data loss only.
    """
    batch2 = batch1 if batch2 is None else batch2
    (x1, y1), (x2, y2) = batch1, batch2
    p1 = loss_pass(net, params, state, x1, loss, train, key)
    p2 = loss_pass(net, params, state, x2, loss, train, key)
    dys = (_per_example_dout(p1, y1), _per_example_dout(p2, y2))
    grams, _ = map_backward(p1.body, _gram_leaf, p1.body_params, (p1.cache, p2.cache), dys)
    return _sum_leaves(grams, jnp.zeros((p1.out.shape[0], p2.out.shape[0]), p1.out.dtype))


# ---------------------------------------------------------------- K-FAC


class _Both(NamedTuple):
    grads: object
    factors: object


def _kfac_leaf(layer, params, caches, dys):
    (cache,), (dy,) = caches, dys
    grads, dx = layer.backward(params, cache, dy)
    factors = layer.kfac_factors(params, cache, dy)[0] if hasattr(layer, "kfac_factors") else None
    return _Both(grads, factors), (dx,)


def _kfac_init_leaf(layer, params, caches, dys):
    if not hasattr(layer, "kfac_factors"):
        return None, ()
    a, g = layer.kfac_dims(params)
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    return KFACFactors(jnp.zeros((a, a), dtype), jnp.zeros((g, g), dtype)), ()


def kfac_zeros(net, params):
    """A factor tree like `kfac_factors`' with zero matrices (K-FAC's optimizer state starts from it)."""
    outs, _ = map_backward(net, _kfac_init_leaf, params, (), ())
    return outs


def _is_both(t):
    return isinstance(t, _Both)


def kfac_value_and_grad(net, params, state, x, y, loss="cross_entropy", l2=0.0, train=False, key=None):
    """(value, grads, factors, state): `pn.value_and_grad` and `kfac_factors` from one forward and backward.

    The backward runs once on the per-example output gradients N dL/d(output)
    (linear, so the gradient is that pass's result over N); each Dense and
    Conv2D layer also reads its K-FAC factors from its input and output
    gradient on the way. grads include the l2 term; the factors do not.
    BatchNorm in training mode is allowed here (the factors use each row's
    backpropagated gradient as it is).
    """
    p = loss_pass(net, params, state, x, loss, train, key)
    n = p.out.shape[0]
    outs, _ = map_backward(p.body, _kfac_leaf, p.body_params, (p.cache,), (_per_example_dout(p, y),))
    grads = jax.tree_util.tree_map(lambda b: jax.tree_util.tree_map(lambda g: g / n, b.grads), outs, is_leaf=_is_both)
    factors = jax.tree_util.tree_map(lambda b: b.factors, outs, is_leaf=_is_both)
    grads = losses.add_l2_gradient(p.grads(net, grads), params, l2)
    value = p.loss_fn.value(p.out, y) + losses.l2_penalty(params, l2)
    return value, grads, _full_trees(net, p.fused, factors, None), p.state


def kfac_factors(net, params, state, x, y, loss="cross_entropy", train=False, key=None):
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
    """
    _, _, factors, _ = kfac_value_and_grad(net, params, state, x, y, loss=loss, train=train, key=key)
    return factors
