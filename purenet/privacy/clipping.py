"""DP-SGD's gradient: each example's gradient clipped, summed, noised (Abadi et al., 2016), in one backward.

    value, grads, state = pn.clipped_value_and_grad(net, params, state, x, y,
                                                    clip_norm=1.0, noise_multiplier=1.1, noise_key=k)
    fit(..., dp=pn.DPSGD(clip_norm=1.0, noise_multiplier=1.1))

Each example's gradient is linear in its row of dL/d(output), so the
clipped sum is the backward of the clip-scaled rows: the per-example norms
come from the layers' fast paths (`purenet.analysis.per_example`), and no
per-example gradient is formed.
"""
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from purenet._checks import check_hyperparameter, is_concrete
from purenet.chunks import check_chunk_size, mean_in_chunks
from purenet.layers import base, structure
from purenet.layers.base import Array, LayerLike, PyTree
from purenet.layers.defaults import has_params, scale_rows
from purenet.layers.structure import DenseProduct
from purenet.layers.traversal import walk
from purenet.losses import Loss
from purenet.network import add_l2, backward_pass, loss_pass
from purenet.analysis.per_example import (SQ_NORMS, _sq_norms, _sq_norms_from_grads, per_example_sq_norms,
                                          per_example_values, trainable_mask)
from purenet.privacy.noise import add_gaussian

__all__ = ["DPSGD", "SAMPLINGS", "WEIGHTED_SUMS", "clipped_value_and_grad", "sq_norms_and_weighted_sum"]

WeightedSum = Callable[[Array], PyTree]


# ---------------------------------------------------------------- one layer: the rules per product kind


def _dense_weighted_sum(p: DenseProduct, params: PyTree) -> tuple[Array, WeightedSum]:
    """(||g_i||^2, w -> sum_i w_i g_i) of a dense product.

    Where a sequence product's dW_i = sum_t a_t g_t^T is small (in * out <= 2 T (in + out): at most
    twice the memory of a and g), it is formed once, for its norm and for sum_i w_i dW_i, instead of
    the (T, T) Gram ghost norm followed by a second a^T (w g) matmul, which then costs more
    (benchmarks/README.md, section "DP-SGD step"). Rows, and wider products, keep the ghost norm
    and the batch gradient of the rescaled g.
    """
    a3, g3 = structure.positions_of(p.a), structure.positions_of(p.g)
    t, n_in, n_out = a3.shape[1], a3.shape[2], g3.shape[2]
    if p.a.ndim == 2 or n_in * n_out > 2 * t * (n_in + n_out):
        return _by_rescaling(p, params)
    acc = jnp.promote_types(g3.dtype, jnp.float32)  # bfloat16 activations sum over T positions in float32
    dw = jnp.einsum("bti,btj->bij", a3, g3, preferred_element_type=acc)
    db = jnp.sum(g3, axis=1, dtype=acc)
    grads = structure.split_columns(p, params, dw, db, (a3.shape[0],))
    grads = {k: g.astype(acc) for k, g in grads.items()}
    sq = sum((jnp.sum(jnp.reshape(g * g, (g.shape[0], -1)), axis=1) for g in grads.values()),
             jnp.zeros((a3.shape[0],), acc))

    def weighted_sum(w: Array) -> PyTree:
        return {k: jnp.tensordot(w.astype(acc), g, axes=1).astype(params[k].dtype) for k, g in grads.items()}

    return sq.astype(p.a.dtype), weighted_sum


def _by_rescaling(p: Any, params: PyTree) -> tuple[Array, WeightedSum]:
    """The product's norms rule, and sum_i w_i g_i as its batch gradient of the rescaled rows w_i g_i."""
    sq = SQ_NORMS.get(type(p), _sq_norms_from_grads)(p, params, 0.0, {})
    return sq, lambda w: structure.batch_grads(structure.scaled(p, w), params)


# One-pass clipping's (||g_i||^2, w -> sum_i w_i g_i) over one product's parameters.
WEIGHTED_SUMS: dict[type, Callable[..., tuple[Array, WeightedSum]]] = {DenseProduct: _dense_weighted_sum}


def sq_norms_and_weighted_sum(layer: Any, params: PyTree, cache: PyTree, dy: PyTree) -> tuple[Array, Any, WeightedSum]:
    """(||g_i||^2 per example, dx, w -> sum_i w_i g_i): the pieces of one-pass clipping.

    g_i is linear in example i's rows of dy, so sum_i w_i g_i is the
    parameter gradient of the rescaled rows w_i dy_i. A layer that declares
    its products rescales each product's output gradient (attention's dL/d[q
    k v], a recurrent layer's step gradients) instead of running its whole
    backward twice; one that declares none runs its backward of w_i dy_i. A
    layer's own `sq_norms_and_weighted_sum` method comes first.
    """
    if hasattr(layer, "sq_norms_and_weighted_sum"):
        return layer.sq_norms_and_weighted_sum(params, cache, dy)
    found = structure.declared(layer, params, cache, dy) if has_params(params) else None
    if found is None:
        sq, dx = per_example_sq_norms(layer, params, cache, dy, 0.0)
        return sq, dx, lambda w: layer.backward(params, cache, scale_rows(w, dy))[0]
    products, dx = found
    named = structure.flat(params)
    parts = [WEIGHTED_SUMS.get(type(p), _by_rescaling)(p, named) for p in products]
    return (sum(sq for sq, _ in parts), dx,
            lambda w: structure.tree_of(params, [weighted(w) for _, weighted in parts]))


def _recording_visit(found: list) -> base.Visit:
    """Per-example squared norms at each leaf, recording its w -> sum_i w_i g_i in walk order."""
    def leaf(layer, params, caches, dys):
        (cache,), (dy,) = caches, dys
        sq, dx, weighted_sum = sq_norms_and_weighted_sum(layer, params, cache, dy)
        found.append(weighted_sum)
        return sq, (dx,)
    return base.Visit(leaf, lambda params, dys: jnp.zeros(dys[0].shape[:1], dys[0].dtype), shaped=False)


def _one_pass_grads(net, p, found, scale):
    """The clipped sum from what the norms' walk recorded, layer by layer: each layer's parameter
    gradient is linear in its own dy, so its part of sum_i scale_i g_i is its recorded weighted
    sum at the scales (`base.sq_norms_and_weighted_sum`). Placed like params by a walk in the
    same order."""
    it = iter(found)
    return p.grads(net, base.map_in_walk_order(p.body, lambda layer, params: next(it)(scale), p.body_params,
                                               base.zeros_like_tree))


def _check_per_example(net, params, train):
    """Per-example clipping needs examples that do not interact: BatchNorm in training mode mixes them."""
    if not train:
        return
    for leaf in base.leaves(net, params):
        if getattr(leaf.layer, "mixes_examples", False):
            raise ValueError(f"DP-SGD clips each example's own gradient, but {type(leaf.layer).__name__} in training "
                             f"mode mixes the examples of a batch (its statistics couple them), so there is no "
                             f"per-example gradient to clip: normalise each example on its own instead "
                             f"(pn.LayerNorm, or pn.GroupNorm for images), or drop the layer")


def _clipped_mean(net, params, state, x, y, clip_norm, loss, train, key, one_pass):
    """(mean over rows of w_i L_i, mean over rows of w_i min(1, C/|g_i|) g_i, state) over one batch;
    y is (labels, w) for a weighted (Poisson) batch, labels alone for w = 1."""
    labels, weight = y if isinstance(y, tuple) else (y, None)
    p = loss_pass(net, params, state, x, loss, train, key)
    n = p.out.shape[0]
    seed = p.per_example_seed(labels)  # row i: dL_i/dout
    found: list = []
    if one_pass:
        outs, _ = walk(p.body, _recording_visit(found), p.body_params, (p.cache,), (seed,))
        sq = base.sum_leaves(outs, jnp.zeros((n,), seed.dtype))
    else:
        sq = _sq_norms(net, p, labels, 0.0)
    norms = jnp.sqrt(jnp.maximum(sq, 0.0))
    scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, jnp.finfo(norms.dtype).tiny))
    if weight is not None:
        scale = scale * weight.astype(scale.dtype)
    if one_pass:
        grads = jax.tree_util.tree_map(lambda g: g / n, _one_pass_grads(net, p, found, scale))
    else:
        grads = backward_pass(p, net, labels, seed=lambda dout: base.scale_rows(scale, dout))
    if weight is None:
        value = p.loss_fn.value(p.out, labels)
    else:
        value = jnp.mean(per_example_values(p, labels) * weight.astype(p.out.dtype))
    return value, grads, p.state


def clipped_value_and_grad(net: LayerLike, params: PyTree, state: PyTree, x: Array, y: Any, *, clip_norm: float,
                           noise_multiplier: float = 0.0, noise_key: Array | None = None,
                           loss: str | Loss = "cross_entropy", l2: float | Array = 0.0, train: bool = False,
                           key: Array | None = None, chunk_size: int | None = None, weight: Array | None = None,
                           expected_batch_size: float | None = None, one_pass: bool = True,
                           canaries: Any = None, canary_marks: Array | None = None) -> tuple[Array, PyTree, PyTree]:
    """DP-SGD's gradient (Abadi et al., 2016): clip each example, sum, add noise, average.

        g = (1/N) [ sum_i g_i min(1, C / ||g_i||) + sigma C z ],   z ~ N(0, I)

    with C = clip_norm and sigma = noise_multiplier. Each g_i is linear in
    row i of dL/d(output), and so is every layer's parameter gradient in that
    layer's own output gradient. One pass (one_pass=True, the book-keeping
    technique of Bu et al., 2023): a single backward keeps each layer's
    cache and output gradient dy, takes the per-example norms from them
    (Dense's ghost norm, ...), and then each layer's clipped part is its own
    backward on min(1, C/|g_i|)-scaled rows of dy: no second backward through
    the network (XLA drops the unused input gradients). one_pass=False
    runs the reference: the norms' backward, then the ordinary backward on a
    rescaled dL/d(output). The two are tested equal. No per-example gradient
    is ever formed (except by a layer without a norm fast path). The l2 term
    is added after clipping, unclipped. Returns (value, grads, state).

    weight (N,) in {0, 1} marks the examples of a padded Poisson batch (see
    `pn.privacy.poisson_batch`): only they are clipped and summed, and the
    sum and the noise are divided by `expected_batch_size` (q n, as Opacus
    does) instead of N; the value is then the mean loss of the marked examples.
    Marks other than 0 and 1 are an error (a traced weight is clipped to
    [0, 1]: no example ever contributes more than C), and
    expected_batch_size must be positive.

    The noise goes to the trainable parameters only: a parameter inside
    `pn.Frozen` keeps its zero gradient. `noise_key` must be independent of
    the forward's `key` (dropout); the same key for both is an error.

    chunk_size=k clips and sums k examples at a time (`mean_in_chunks`) and
    adds the noise once, to the whole batch's sum: the same gradient with a
    working set of k examples. BatchNorm in training mode (which mixes the
    examples) is an error.

    canaries (`pn.privacy.gradient_canaries`) with canary_marks (count,) 0/1
    add the marked canaries' gradients, clip_norm e_c each, to the clipped
    sum before the noise (a privacy audit's white-box canaries, as if they
    were examples of the batch).

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters.
        state: its state (as `pn.init` returns it).
        x: inputs, shape `(batch, *in_shape)` (integer token ids when the network starts with
            an Embedding).
        y: targets for `loss`, one row per example.
        clip_norm: C, the bound on each example's gradient norm (> 0).
        noise_multiplier: sigma, the noise's std over C (>= 0; 0 adds no noise).
        noise_key: PRNG key for the noise, independent of `key`; required when
            noise_multiplier > 0.
        loss: a registered loss name ("cross_entropy", "mse", ...) or a `pn.Loss`.
        l2: weight decay coefficient on the parameters whose role is "weight", added after
            clipping (unclipped, unnoised).
        train: training mode (dropout); a Python bool. A layer that mixes the examples in
            training mode (BatchNorm) is an error.
        key: PRNG key for the forward's randomness (dropout), or None.
        chunk_size: examples clipped and summed at a time (a positive int), or None for the
            whole batch.
        weight: (batch,) 0/1 marks of a padded Poisson batch's examples, or None (every row
            counts).
        expected_batch_size: q n, the divisor of the sum and the noise with `weight`
            (required then, > 0).
        one_pass: True for the one-backward book-keeping clipping, False for the two-backward
            reference.
        canaries: `GradientCanaries` to add to the clipped sum, or None.
        canary_marks: (count,) 0/1, which canaries join this batch (`canaries.marks(key)`);
            required with `canaries`.

    Returns:
        (value, grads, state): the mean loss (of the marked examples with `weight`) plus the
            l2 penalty; the noisy clipped sum divided by N (by expected_batch_size with
            `weight`) plus `l2 W`, a tree like params; the network's new state.

    Raises:
        ValueError: if clip_norm <= 0, noise_multiplier < 0, or either is NaN; if
            noise_multiplier > 0 without a noise_key, or noise_key equals key; if `weight`
            is not (batch,) or holds values other than 0 and 1, or comes without a positive
            expected_batch_size; if train=True and a layer mixes the examples; if
            canary_marks is missing, misshaped, not 0/1 or marks a non-member, or a canary
            sits inside `pn.Frozen`; if chunk_size is neither None nor a positive int; if
            `loss` is unknown or `x` has no batch axis.
        TypeError: if `x` is not floating point (integer ids for a network that starts with
            an Embedding).
    """
    check_hyperparameter("clip_norm", clip_norm, 0.0, None, low_open=True)
    check_hyperparameter("noise_multiplier", noise_multiplier, 0.0, None)
    _check_per_example(net, params, train)
    _check_independent_keys(key, noise_key)
    n = x.shape[0]
    if weight is not None:
        weight = _checked_marks(weight, n)
        if expected_batch_size is None:
            raise ValueError("a weighted (Poisson) batch needs expected_batch_size (q n) to normalise by")
        check_hyperparameter("expected_batch_size", expected_batch_size, 0.0, None, low_open=True)
    divisor: float = n if expected_batch_size is None or weight is None else expected_batch_size

    def clipped(state, x, y, key):
        return _clipped_mean(net, params, state, x, y, clip_norm, loss, train, key, one_pass)

    value, grads, state = mean_in_chunks(clipped, chunk_size, state, x, y if weight is None else (y, weight), key)
    if weight is not None:  # means over the N rows -> sums -> divided by the expected batch size
        grads = jax.tree_util.tree_map(lambda g: g * (n / divisor), grads)
        value = value * n / jnp.maximum(jnp.sum(weight), 1).astype(value.dtype)
    if canaries is not None:
        grads = canaries.add(grads, _checked_canary_marks(canaries, canary_marks, net, params), clip_norm / divisor)
    if not (isinstance(noise_multiplier, (int, float)) and noise_multiplier == 0):
        if noise_key is None:
            raise ValueError("clipped_value_and_grad with noise_multiplier > 0 needs a noise_key")
        grads = _add_noise_to_trainable(net, params, grads, noise_key, noise_multiplier * clip_norm / divisor)
    value, grads = add_l2(net, params, l2, value, grads)
    return value, grads, state


def _checked_marks(weight: Array, n: int) -> Array:
    """A Poisson batch's marks as 0/1 factors: shape (n,), values in {0, 1} (checked when concrete).

    A mark is how many times an example counts, so a 2 would double its clipped contribution (a
    sensitivity of 2C the accountant does not know about). Traced marks cannot be checked and are
    clipped to [0, 1], so no example ever contributes more than C."""
    if jnp.shape(weight) != (n,):
        raise ValueError(f"weight must have shape ({n},) (one 0/1 mark per example), got {jnp.shape(weight)}")
    if is_concrete(weight):
        values = np.asarray(weight)
        bad = ~((values == 0) | (values == 1))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"weight must hold 0/1 marks (is example i in the Poisson batch?), got "
                             f"{values[i]!r} at row {i}: a mark above 1 multiplies that example's clipped "
                             f"contribution beyond clip_norm, which the privacy accounting does not cover")
    return jnp.clip(weight, 0, 1)


def _checked_canary_marks(canaries: Any, marks: Any, net: LayerLike, params: PyTree) -> Array:
    """The step's canary marks, checked: shape (count,), 0/1, members only (when concrete), canaries on
    trainable leaves only (a frozen leaf gets no noise, so a canary there would be released bare)."""
    if marks is None or jnp.shape(marks) != (canaries.count,):
        raise ValueError(f"canaries need canary_marks of shape ({canaries.count},): which of them join this batch")
    trainable = jax.tree_util.tree_leaves(trainable_mask(net, params))
    frozen = sorted({int(i) for i in canaries.leaf if not trainable[int(i)]})
    if frozen:
        raise ValueError(f"canaries sit on frozen parameters (leaves {frozen}, inside pn.Frozen): those get no noise, "
                         f"so the canaries would be released as they are; make them with "
                         f"pn.privacy.gradient_canaries(..., net=net)")
    if is_concrete(marks):
        values = np.asarray(marks)
        if not np.all((values == 0) | (values == 1)) or np.any(values[~canaries.members] != 0):
            raise ValueError("canary_marks must be 0/1 and 0 for every non-member canary (canaries.marks(key) draws "
                             "them)")
    return jnp.clip(marks, 0, 1)


def _check_independent_keys(key: Array | None, noise_key: Array | None) -> None:
    """The noise must not be a function of the randomness the forward draws (dropout masks)."""
    if key is None or noise_key is None or not (is_concrete(key) and is_concrete(noise_key)):
        return
    if np.array_equal(np.asarray(jax.random.key_data(key)), np.asarray(jax.random.key_data(noise_key))):
        raise ValueError("noise_key is the forward's key: the DP noise would repeat the dropout masks' random "
                         "bits; split one key into independent branches, e.g. "
                         "key, noise_key = jax.random.split(step_key)")


def _add_noise_to_trainable(net, params, grads, key, std):
    """grads + std * N(0, I) on the trainable leaves; frozen leaves keep their zero gradient, so a
    frozen parameter never moves (the noise of the trainable leaves is what it would be without
    them: the same draws in the same order)."""
    leaves, treedef = jax.tree_util.tree_flatten(grads)
    mask = jax.tree_util.tree_leaves(trainable_mask(net, params))
    noised = iter(add_gaussian([g for g, m in zip(leaves, mask) if m], key, std))
    return jax.tree_util.tree_unflatten(treedef, [next(noised) if m else g for g, m in zip(leaves, mask)])


SAMPLINGS = ("poisson", "shuffle")


@dataclasses.dataclass(frozen=True)
class DPSGD:
    """A training option for `fit`/`train`: DP-SGD with per-example clipping to `clip_norm` and
    Gaussian noise of std noise_multiplier * clip_norm on the clipped sum (`clipped_value_and_grad`).

    sampling="poisson" (the default: only it has privacy accounting): each
    step, every training example joins the batch independently with
    probability q = batch_size / n, into a padded batch of static size
    `pn.privacy.poisson_batch_bound(n, q)`; the noisy clipped sum is divided
    by the expected batch size q n (as Opacus does). An epoch is n /
    batch_size steps; `fit` records history["epsilon"] after each epoch
    (`pn.privacy.epsilon` with `accountant`, at `delta`, default 1e-5) and
    history["poisson_overflow"] (sampled examples beyond the bound: 0 but
    with probability <= 1e-9 a step). sampling="shuffle" keeps fixed-size
    batches of a shuffle: the same clipping and noise, but no accounting
    exists for it (no epsilon is recorded). `chunk_size` clips that many
    examples at a time (the same gradient, a smaller working set);
    `one_pass=False` uses the two-backward reference clipping.

    Each step's key splits into independent branches for the forward
    (dropout, chunks) and the noise. Every DP run needs its own key: two
    runs with the same key draw the same batches and the same noise, and
    the difference of their updates then carries no noise at all.
    Only the trainable parameters are noised (not those in `pn.Frozen`).
    A layer that couples the examples of a batch says so with
    `mixes_examples = True` (BatchNorm in training) and is refused; an
    augmentation that mixes examples (mixup) is refused too.

    `canaries` (`pn.privacy.gradient_canaries`, Poisson sampling only) puts
    white-box gradient canaries into the run for a privacy audit: each step
    the member canaries join with the canaries' sample rate (which `fit`
    checks is batch_size / n) and are summed with the clipped gradients
    before the noise (see `purenet.privacy.canaries`).

    Args:
        clip_norm: C, the bound on each example's gradient norm (> 0).
        noise_multiplier: sigma, so that the noise's std is `sigma * C` on the clipped sum (>= 0).
        chunk_size: examples clipped at a time (a positive int), or None for the whole batch.
        sampling: "poisson" (with privacy accounting) or "shuffle" (fixed-size batches, none).
        delta: the delta epsilon is reported at, in (0, 1); None for 1e-5.
        accountant: "pld" or "rdp" (`pn.privacy.epsilon`).
        one_pass: True for the one-backward clipping, False for the two-backward reference.
        canaries: `GradientCanaries` from `pn.privacy.gradient_canaries` (Poisson sampling
            only), or None.

    Raises:
        ValueError: if clip_norm <= 0 or noise_multiplier < 0 (or NaN), chunk_size is neither
            None nor a positive int, sampling, delta or accountant is out of range, or
            canaries come with sampling="shuffle".
        TypeError: if canaries are not `GradientCanaries`.
    """

    clip_norm: float
    noise_multiplier: float = 0.0
    chunk_size: int | None = None
    sampling: str = "poisson"
    delta: float | None = None
    accountant: str = "pld"
    one_pass: bool = True
    canaries: Any = None

    def __post_init__(self) -> None:
        check_hyperparameter("clip_norm", self.clip_norm, 0.0, None, low_open=True)
        check_hyperparameter("noise_multiplier", self.noise_multiplier, 0.0, None)
        for name in ("clip_norm", "noise_multiplier"):  # numpy / jax scalars -> float: hashable, and what
            value = getattr(self, name)                  # the accountant reads
            if is_concrete(value) and np.ndim(value) == 0 and type(value) not in (bool, int, float):
                object.__setattr__(self, name, float(value))
        check_chunk_size(self.chunk_size)
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"DPSGD sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if self.delta is not None and not (isinstance(self.delta, (int, float)) and 0 < self.delta < 1):
            raise ValueError(f"DPSGD delta must be in (0, 1), got {self.delta!r}")
        if self.accountant not in ("pld", "rdp"):
            raise ValueError(f"DPSGD accountant must be 'pld' or 'rdp', got {self.accountant!r}")
        if self.canaries is not None:
            from purenet.privacy.canaries import GradientCanaries
            if not isinstance(self.canaries, GradientCanaries):
                raise TypeError(f"DPSGD canaries must come from pn.privacy.gradient_canaries, got "
                                f"{type(self.canaries).__name__}")
            if self.sampling != "poisson":
                raise ValueError("DPSGD canaries join each step's batch with the Poisson rate, so they need "
                                 "sampling='poisson'")

    @property
    def target_delta(self) -> float:
        """The delta epsilon is reported at: `delta`, or 1e-5."""
        return 1e-5 if self.delta is None else self.delta
