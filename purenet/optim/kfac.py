"""K-FAC (Martens & Grosse, 2015): gradients preconditioned by Kronecker-factored curvature.

For a dense product y = a W + b (a Dense layer; a convolution on its
patches: KFC, Grosse & Martens, 2016; the weight matrices of attention,
SwiGLU and the recurrent layers) the Fisher of the weights [W; b] is
approximated as A (x) G, with A = E[a a^T] over the product's
bias-augmented inputs and G = E[dy dy^T] over its per-example output
gradients: those of labels sampled from the model with `fisher="mc"` (the
default), the data's own with "empirical" (`pn.stats.kfac_factors` states
the scaling). Its inverse applied to the gradient is two small solves:

    (A (x) G)^-1 vec([dW; db]) = A^-1 [dW; db] G^-1

K-FAC is a transform of the one optimizer protocol with an extra per-step
argument, `factors` (as optax's GradientTransformationExtraArgs), so the
step stays a pure function of its arguments and every wrapper (`masked`,
`ema`, `apply_if_finite`, `chain`) composes around it. The train step
computes the factors with the gradient, from the same forward and backward
pass, because the optimizer's `extra_args` name them:

    opt = pn.optim.kfac(net, learning_rate=0.05)     # chain(scale_by_kfac(net, ...), momentum(0.05))
    opt_state = opt.init(params)
    value, grads, factors, state = pn.stats.kfac_value_and_grad(net, opt_state.params, state, x, y,
                                                                fisher="mc", key=key)  # opt.extra_options' Fisher
    opt_state = opt.step(opt_state, grads, factors=factors)

`pn.fit` does this by itself. Each step

    1. averages the factors:  F <- ema F + (1 - ema) F_batch  (the first step takes F_batch),
    2. every inverse_every steps (the first included) inverts the damped factors,
       with Tikhonov damping split between them (Martens & Grosse, 2015, sec. 6.3):
           pi = sqrt((tr A / dim A) / (tr G / dim G)),
           (A + pi sqrt(damping) I)^-1,   (G + sqrt(damping) / pi I)^-1,
    3. preconditions the gradient of each weight of a dense product (with
       its bias) by the stored inverses (other parameters, such as
       LayerNorm's, keep their plain gradient; layers inside pn.Frozen
       have no factors; a trainable weight K-FAC has no rule for, in a layer
       that declares no products, is named in a warning when the state is
       initialised),
    4. hands the result to the rest of the chain (momentum SGD in kfac).

Factors and inverses are kept in at least float32 (bfloat16 / float16 params too).
"""
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve

from purenet._checks import check_hyperparameter
from purenet.layers.base import KFACBlocks, KFACFactors, LayerLike, kfac_pair
from purenet.layers.roles import layer_roles
from purenet.layers.traversal import is_container
from purenet.layers.structure import flat, tree_of
from purenet.optim.base import Optimizer, Transform, chain
from purenet.optim.schedules import Schedule


class KFACState(NamedTuple):
    """K-FAC's slot: the running factors and the inverses of their damped versions.

    Attributes:
        factors: a tree like params with, in place of each K-FAC layer's
            params, its running `KFACFactors(A, G)` (A of shape (in + bias,
            in + bias), G of shape (out, out); a `KFACBlocks` of them for a
            layer of several weight matrices), None elsewhere.
        inverses: the same structure, `KFACFactors(A_damped^-1, G_damped^-1)`
            as of the last inversion step.
    """

    factors: Any   # tree like params: KFACFactors(A, G) (or KFACBlocks) per K-FAC layer, None elsewhere
    inverses: Any  # the same structure, KFACFactors(A_damped^-1, G_damped^-1)


def _is_factors(t):
    return t is None or isinstance(t, KFACFactors)


def _damped_inverses(f, damping):
    eye_a, eye_g = jnp.eye(f.A.shape[0], dtype=f.A.dtype), jnp.eye(f.G.shape[0], dtype=f.G.dtype)
    tiny = jnp.finfo(f.A.dtype).tiny
    mean_a = jnp.maximum(jnp.trace(f.A) / f.A.shape[0], tiny)
    mean_g = jnp.maximum(jnp.trace(f.G) / f.G.shape[0], tiny)
    pi = jnp.sqrt(mean_a / mean_g)
    root = jnp.sqrt(jnp.asarray(damping, f.A.dtype))
    return KFACFactors(_spd_inverse(f.A + pi * root * eye_a, eye_a), _spd_inverse(f.G + root / pi * eye_g, eye_g))


def _spd_inverse(m, eye):
    """The inverse of a symmetric positive definite matrix by its Cholesky factor: faster than LU's
    jnp.linalg.inv on XLA:CPU and as accurate (measured in benchmarks/README.md, "Measurements
    behind choices in the source")."""
    return cho_solve((jnp.linalg.cholesky(m), True), eye)


def _precondition(inverse: Any, grads: Any, roles: Any) -> Any:
    """A^-1 [dW; db] G^-1 for one K-FAC layer's gradient dict: W its "weight" (any shape (..., out)),
    b its "bias" if it has one (the layer's roles say which is which, never the key names); for a
    layer of several weights (KFACBlocks) each weight with the bias the layer pairs it with."""
    if inverse is None:
        return grads
    named, roles = flat(grads), flat(roles)  # a layer of nested parameters keys them by path
    if isinstance(inverse, KFACBlocks):
        out = dict(named)
        for key, block in inverse.factors.items():
            out.update(_precondition_pair(block, named, *kfac_pair(key)))
    else:
        (w,) = [k for k, r in roles.items() if r == "weight"]
        out = {**named, **_precondition_pair(inverse, named, w, [k for k, r in roles.items() if r == "bias"])}
    return tree_of(grads, [out])


def _precondition_tree(net: Any, inverses: Any, grads: Any, params: Any) -> Any:
    """Each leaf layer's gradients preconditioned by its inverses, walking the network as the factor
    tree was built (a container may place a leaf's factors where its params have several keys)."""
    if not jax.tree_util.tree_leaves(inverses):  # no K-FAC layer below (None, a Frozen subtree, {"token": None})
        return grads
    if is_container(net):
        parts = zip(net.children(), net.split(inverses), net.split(grads), net.split(params))
        return net.join([_precondition_tree(*part) for part in parts])
    return _precondition(inverses, grads, layer_roles(net, params))


def _precondition_pair(inverse: KFACFactors, grads: Any, w: str, bias: list) -> dict:
    """{w: ..., b: ...}: the weight's and its bias's rows of A^-1 [dW; db] G^-1."""
    W = grads[w]
    rows = [W.reshape(-1, W.shape[-1])] + [grads[k][None, :] for k in bias]
    m = jnp.concatenate(rows, axis=0) if len(rows) > 1 else rows[0]
    m = (inverse.A @ m.astype(inverse.A.dtype) @ inverse.G).astype(W.dtype)  # in the factors' (>= float32) dtype
    out = {w: m[: rows[0].shape[0]].reshape(W.shape)}
    for k in bias:
        out[k] = m[-1].astype(grads[k].dtype)
    return out


def _check_factors(layer_factors, slot_factors):
    """The batch's factors must have this network's layers and widths; name the first that does not."""
    if jax.tree_util.tree_structure(layer_factors, is_leaf=_is_factors) != \
            jax.tree_util.tree_structure(slot_factors, is_leaf=_is_factors):
        raise ValueError("the factors do not match this optimizer's network: compute them with the net "
                         "that pn.optim.kfac was given")
    pairs = jax.tree_util.tree_leaves_with_path(
        jax.tree_util.tree_map(lambda a, b: (a, b), layer_factors, slot_factors, is_leaf=_is_factors),
        is_leaf=lambda t: isinstance(t, tuple) and len(t) == 2 and _is_factors(t[0]))
    for path, (new, old) in pairs:
        if new is not None and (new.A.shape != old.A.shape or new.G.shape != old.G.shape):
            raise ValueError(f"K-FAC factors at {jax.tree_util.keystr(path)} have shapes A {new.A.shape}, "
                             f"G {new.G.shape}; this optimizer's layer there needs A {old.A.shape}, "
                             f"G {old.G.shape}")


def _check_every(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _warn_unpreconditioned(net: LayerLike, params: Any) -> None:
    """Warn, naming them, about trainable weights (role "weight") that K-FAC leaves on the plain
    gradient (their layer has no K-FAC rule for them), so a partly preconditioned network is never silent."""
    from purenet.analysis.kfac import uncovered_weights
    from purenet.layers.traversal import leaves

    plain = [f"{type(leaf.layer).__name__} at {leaf.path} ({', '.join(missing)})" for leaf in leaves(net, params)
             if not leaf.frozen and (missing := uncovered_weights(leaf.layer, leaf.params))]
    if plain:
        warnings.warn(f"pn.optim.kfac preconditions the weights of dense products (Dense, convolutions, "
                      f"attention, SwiGLU, LSTM, GRU, ...); these weights keep the plain gradient (their layer "
                      f"declares no product K-FAC has a rule for): {'; '.join(plain)}", UserWarning, stacklevel=4)


def scale_by_kfac(net: LayerLike, damping: float = 1.0, ema: float = 0.95, inverse_every: int = 10,
                  fisher: str = "mc", samples: int = 1, factors_every: int = 1) -> Transform:
    """K-FAC's preconditioning as a transform: `direction = A^-1 [dW; db] G^-1` per K-FAC layer.

    Its slot is a KFACState; its update takes the batch's `factors`
    (`pn.stats.kfac_value_and_grad`). See the module docstring for the steps.
    `fisher`, `samples` and `factors_every` are its `options`: the training
    step computes the factors with that Fisher ("mc" by default, K-FAC as
    defined; "exact", "empirical") on every `factors_every`-th step
    (kfac-jax's curvature_update_period), and the slot's running factors
    move only on those steps.

    Args:
        net: the network whose layers' factors the steps receive (a layer or
            a container, e.g. `pn.Sequential`): the one the params belong to.
        damping: the Tikhonov damping (> 0), split between A and G.
        ema: the running factors' decay, in [0, 1).
        inverse_every: steps between inversions (a positive int; step 0 inverts).
        fisher: "mc", "exact" or "empirical": which Fisher the factors approximate.
        samples: labels sampled per example for `fisher="mc"` (a positive int).
        factors_every: steps between factor computations (a positive int).

    Returns:
        A `Transform` with `extra_args` ("factors",) and a `KFACState` slot.
            Its `init` warns (UserWarning) naming any trainable weight left on the
            plain gradient; its `update` raises ValueError when the factors do not
            match `net`'s layers or widths.

    Raises:
        ValueError: if `damping` is not positive and finite, `ema` is outside
            [0, 1), `inverse_every`, `factors_every` or `samples` is not a
            positive int, or `fisher` is not one of "empirical", "mc", "exact".
    """
    from purenet.analysis.curvature import FISHERS
    from purenet.analysis.stats import kfac_zeros

    check_hyperparameter("damping", damping, 0.0, None, low_open=True)
    check_hyperparameter("ema", ema, 0.0, 1.0)
    _check_every("inverse_every", inverse_every)
    _check_every("factors_every", factors_every)
    _check_every("samples", samples)
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")

    def init(params):
        _warn_unpreconditioned(net, params)
        zeros = kfac_zeros(net, params)
        return KFACState(zeros, zeros)

    def update(grads, slot, params, count, factors):
        _check_factors(factors, slot.factors)
        weight = jnp.where(count == 0, 0.0, jnp.where(count % factors_every == 0, ema, 1.0))
        running = jax.tree_util.tree_map(
            lambda old, new: (weight * old + (1 - weight) * new.astype(old.dtype)).astype(old.dtype),
            slot.factors, factors)
        inverses = jax.lax.cond(
            count % inverse_every == 0,
            lambda f: jax.tree_util.tree_map(lambda t: None if t is None else _damped_inverses(t, damping),
                                             f, is_leaf=_is_factors),
            lambda f: slot.inverses, running)
        return _precondition_tree(net, inverses, grads, params), KFACState(running, inverses)

    return Transform(init=init, update=update, extra_args=("factors",),
                     options={"fisher": fisher, "samples": samples, "factors_every": factors_every})


def kfac(net: LayerLike, learning_rate: float | jax.Array | Schedule, momentum: float = 0.9, damping: float = 1.0,
         ema: float = 0.95, inverse_every: int = 10, fisher: str = "mc", samples: int = 1,
         factors_every: int = 1) -> Optimizer:
    """K-FAC with momentum SGD after it (plain SGD for momentum=0): an Optimizer like any other.

        chain(scale_by_kfac(net, damping, ema, inverse_every, fisher, samples, factors_every),
              momentum(learning_rate, momentum))

    fisher="mc" (the default) is K-FAC as Martens & Grosse (2015) define it:
    G from labels sampled from the model's predictive distribution.
    "exact" uses the loss Hessian's square root (KFLR), "empirical" the
    data's own gradients (purenet's default before; Kunstner et al. 2019).

    damping is all that bounds the step along a factor's null directions: a
    layer with fewer examples (x positions) per step than its input width has
    a singular A, the preconditioned gradient grows like 1 / damping there,
    and a small damping diverges (a float32 Cholesky of a barely damped
    singular factor breaks down outright, to NaN). No check can see this
    before the data do, so it is not refused and not warned about: keep
    damping at the scale of the factors (Martens & Grosse adapt it from 150;
    the default 1.0 suits inputs of unit scale), or raise the batch. The
    symptom is a loss that explodes or turns NaN from the first inversion
    on; `apply_if_finite` does not catch it (the gradients stay finite).

    Args:
        net: the network whose layers' factors the steps receive (a layer or
            a container, e.g. `pn.Sequential`): the one the params belong to.
        learning_rate: the step size: a float, a traced scalar, or a schedule
            step -> rate (`pn.schedules`).
        momentum: the momentum SGD's beta, in [0, 1); 0 for plain SGD.
        damping: the Tikhonov damping (> 0), split between A and G.
        ema: the running factors' decay, in [0, 1).
        inverse_every: steps between inversions (a positive int; step 0 inverts).
        fisher: "mc", "exact" or "empirical": which Fisher the factors approximate.
        samples: labels sampled per example for `fisher="mc"` (a positive int).
        factors_every: steps between factor computations (a positive int).

    Returns:
        An `Optimizer` whose `step` takes `factors=` (`extra_args` ("factors",)).

    Raises:
        ValueError: if a hyperparameter is out of range (see `scale_by_kfac`;
            `momentum` outside [0, 1), a concrete `learning_rate` negative,
            NaN or infinite).
    """
    from purenet.optim.alias import momentum as momentum_sgd
    from purenet.optim.alias import sgd

    inner = sgd(learning_rate) if momentum == 0 else momentum_sgd(learning_rate, momentum)
    return chain(scale_by_kfac(net, damping, ema, inverse_every, fisher, samples, factors_every), inner)


__all__ = ["KFACState", "kfac", "scale_by_kfac"]
