"""purenet inside any JAX program: a differentiable bridge, and curvature products.

This is the one library module allowed any of JAX's autodiff machinery, and
only two pieces of it (DESIGN.md's house rule):

- `as_function` wraps a network in `jax.custom_vjp`. Its forward pass keeps
  the layers' caches as residuals and its backward pass calls the layers'
  handwritten `backward`, so autodiff of any user code around it runs
  purenet's backward for the network part.
- `hvp` and `ggn_vp` use `jax.jvp` (forward mode) on functions that are
  themselves handwritten derivatives: the gradient of `pn.value_and_grad`,
  and the loss's `dL/dout`. `ggn_vp` also takes the forward-mode derivative
  of the network's output (J v), never of the loss.

Neither differentiates the loss by reverse-mode autodiff: every gradient of
the loss that enters here comes from the handwritten backward passes.

    apply = pn.as_function(net)
    y, state = apply(params, state, x, train=False, key=None)   # autodiff's grad/vjp, jit, vmap accept it
    hv = pn.hvp(net, params, state, x, y, v, loss="cross_entropy")      # Hessian-vector product
    gv = pn.ggn_vp(net, params, state, x, y, v, loss="cross_entropy")   # Gauss-Newton-vector product
"""
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from purenet import losses
from purenet._checks import check_float_input
from purenet.layers.base import Array, LayerLike, PyTree
from purenet.layers.roles import decay_mask, id_layer
from purenet.layers.traversal import layer_paths
from purenet.network import _body_trees, _full_trees, _prepare, value_and_grad

__all__ = ["as_function", "ggn_vp", "hvp"]


# ---------------------------------------------------------------- the bridge

def _static_bool(train):
    if isinstance(train, jax.core.Tracer):
        raise TypeError("train must be a Python bool (it selects the computation, e.g. batch or running "
                        "statistics), not a traced value; close over it or mark it static in jit")
    return bool(train)


def _cast_like(tree, like):
    """Cotangents in the dtypes of their primals (autodiff's convention)."""
    return jax.tree_util.tree_map(lambda t, p: t.astype(jnp.result_type(p)), tree, like)


def as_function(net: LayerLike) -> Callable[..., tuple[Array, PyTree]]:
    """The network as a plain JAX function whose reverse-mode derivative is the handwritten backward.

        apply = pn.as_function(net)
        y, new_state = apply(params, state, x, train=False, key=None)

    computes what `pn.forward(net, params, state, x, train, key)` computes.
    It is a `jax.custom_vjp`: differentiating user code around it (autodiff's
    grad, vjp, jacrev; under jit and vmap too) keeps the layers' caches from
    the forward pass and, on the way back, turns dL/dy into

        dL/dparams, dL/dx = net.backward(params, cache, dL/dy),

    the same backward that `pn.value_and_grad` runs. Second-order reverse
    mode (a gradient of a gradient, as in MAML) differentiates that backward,
    which is plain JAX.

    Not differentiated: `state` and `key` get zero cotangents (None), and
    gradients do not flow through the returned state (running statistics
    are updates, not functions to optimise: its cotangent is dropped).
    `train` selects the computation and must be a Python bool. Forward mode
    (jvp, jacfwd, hessian) is not defined for a custom_vjp; for curvature
    of the loss use `pn.hvp` or `pn.ggn_vp`.

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).

    Returns:
        `apply(params, state, x, train=False, key=None) -> (y, new_state)`, a plain JAX
            function (its `net` attribute is the network). Calling it raises TypeError when
            `train` is a traced value or `x` has the wrong dtype, and ValueError when `x`
            has no batch axis.
    """
    bridge = _bridge(net)

    def apply(params, state, x, train=False, key=None):
        """y, new_state: pn.forward of the network, differentiated by its handwritten backward."""
        check_float_input(x, ids=id_layer(net))
        return bridge(params, state, x, _static_bool(train), key)

    apply.net = net  # type: ignore[attr-defined]  # the wrapped network, for whoever inspects apply
    return apply


def _bridge(net):
    """custom_vjp(params, state, x, train, key) -> (y, new_state); train is static."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
    def run(params, state, x, train, key):
        y, new_state, _ = net.forward(params, state, x, train=train, key=key)
        return y, new_state

    def run_forward(params, state, x, train, key):
        y, new_state, cache = net.forward(params, state, x, train=train, key=key)
        return (y, new_state), (params, cache, x)

    def run_backward(train, residuals, cotangents):
        del train  # the cache already holds what the forward's mode needs
        params, cache, x = residuals
        dy, _ = cotangents  # the new state's cotangent is dropped (see as_function)
        dparams, dx = net.backward(params, cache, dy)
        if dx is None:  # integer ids have no gradient: their cotangent is float0 zeros (JAX's convention)
            dx = np.zeros(jnp.shape(x), jax.dtypes.float0)
        else:
            dx = dx.astype(x.dtype)
        return _cast_like(dparams, params), None, dx, None

    run.defvjp(run_forward, run_backward)
    return run


# ---------------------------------------------------------------- curvature

def _refuse_learning_rules(net: Any, what: str) -> None:
    """A network trained by a learning rule (`pn.learning_rules`) has a backward that is not its loss's
    gradient, so the curvature built on that backward would silently be something else."""
    for path, layer in layer_paths(net):
        rule = getattr(layer, "learning_rule", None)
        if rule:
            raise ValueError(f"{what}: the network at {path} learns by {rule}, whose backward is the rule's update, "
                             f"not the loss's gradient; take the curvature of the plain network "
                             f"(pn.learning_rules.backprop(net, state)) with the same params")


def _tangent(params, v):
    """v checked against params (same key paths and shapes), in params' dtypes."""
    p_leaves = jax.tree_util.tree_leaves_with_path(params)
    v_leaves = jax.tree_util.tree_leaves_with_path(v)
    p_paths = [jax.tree_util.keystr(k) for k, _ in p_leaves]
    v_paths = [jax.tree_util.keystr(k) for k, _ in v_leaves]
    if p_paths != v_paths or jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(v):
        raise ValueError(f"v must have the structure of params: params has leaves {p_paths}, v has {v_paths}")
    for path, (_, p), (_, t) in zip(p_paths, p_leaves, v_leaves):
        if jnp.shape(t) != jnp.shape(p):
            raise ValueError(f"v leaf {path} has shape {jnp.shape(t)}, but the param has shape {jnp.shape(p)}")
    return _cast_like(v, params)


def hvp(net: LayerLike, params: PyTree, state: PyTree, x: Array, y: Any, v: PyTree,
        loss: str | losses.Loss = "cross_entropy", l2: float | Array = 0.0, train: bool = False,
        key: Array | None = None) -> PyTree:
    """The Hessian of the loss (with its l2 term) times v: a tree like params.

        H v = d/dt  grad L(params + t v)  at t = 0

    is the forward-mode derivative (`jax.jvp`) of the handwritten gradient
    `pn.value_and_grad` along v. That gradient is plain JAX code, so its
    forward-mode derivative is exact; no reverse-mode autodiff of the loss is
    involved, and no Hessian is formed (it costs a small multiple of one
    `value_and_grad`: the primal and its tangent together). `v` has params' structure
    and shapes; state, x, y, train and key are held fixed (as in
    `pn.value_and_grad`, e.g. batch statistics are functions of params in
    training mode).

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters, the point at which the curvature is taken.
        state: its state (held fixed).
        x: inputs, shape `(batch, *in_shape)` (integer token ids when the network starts with
            an Embedding).
        y: targets for `loss`.
        v: the vector, a tree with params' structure and leaf shapes (cast to params' dtypes).
        loss: a registered loss name ("cross_entropy", "mse", ...) or a `pn.Loss`.
        l2: weight decay coefficient on the parameters whose role is "weight"; its penalty
            `l2/2 sum W^2` is part of the loss differentiated.
        train: training mode (dropout, batch statistics); a Python bool.
        key: PRNG key for the forward's randomness (dropout), or None; held fixed.

    Returns:
        H v, a tree like params.

    Raises:
        ValueError: if `v` does not have params' structure and leaf shapes; if `loss` is not
            a registered name or a `pn.Loss`; if `x` has no batch axis or is empty; if the
            network learns by a rule other than backprop (`pn.learning_rules`).
        TypeError: if `x` is not floating point (integer ids for a network that starts with
            an Embedding).
    """
    _refuse_learning_rules(net, "pn.hvp")
    v = _tangent(params, v)

    def grad(p):
        return value_and_grad(net, p, state, x, y, loss=loss, l2=l2, train=train, key=key)[1]

    return jax.jvp(grad, (params,), (v,))[1]


def ggn_vp(net: LayerLike, params: PyTree, state: PyTree, x: Array, y: Any, v: PyTree,
           loss: str | losses.Loss = "cross_entropy", l2: float | Array = 0.0, train: bool = False,
           key: Array | None = None) -> PyTree:
    """The generalised Gauss-Newton matrix times v (Schraudolph, 2002): a tree like params.

        G v = J^T H_out J v  (+ l2 v on the weights "W")

    with J = d out / d params the network's Jacobian and H_out = d^2 L / d out^2
    the loss's Hessian in its output. The output is the logits when the loss
    is fused with a final Softmax or Sigmoid (then H_out is positive
    semi-definite and so is G). G drops from H the terms that carry the
    network's second derivatives; it equals H when the output is linear in
    params. In three steps, none of them an autodiff gradient of the loss:

        J v          forward-mode derivative (`jax.jvp`) of the forward along v
        H_out (J v)  forward-mode derivative of the handwritten dL/dout along J v
        J^T (...)    the layers' handwritten backward, with the forward's caches

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters, the point at which the curvature is taken.
        state: its state (held fixed).
        x: inputs, shape `(batch, *in_shape)` (integer token ids when the network starts with
            an Embedding).
        y: targets for `loss`.
        v: the vector, a tree with params' structure and leaf shapes (cast to params' dtypes).
        loss: a registered loss name ("cross_entropy", "mse", ...) or a `pn.Loss`.
        l2: weight decay coefficient on the parameters whose role is "weight": adds `l2 v` on those
            parameters (the penalty's Hessian).
        train: training mode (dropout, batch statistics); a Python bool.
        key: PRNG key for the forward's randomness (dropout), or None; held fixed.

    Returns:
        G v, a tree like params.

    Raises:
        ValueError: if `v` does not have params' structure and leaf shapes; if `loss` is not
            a registered name or a `pn.Loss`; if `x` has no batch axis or is empty; if the
            network learns by a rule other than backprop (`pn.learning_rules`).
        TypeError: if `x` is not floating point (integer ids for a network that starts with
            an Embedding).
    """
    _refuse_learning_rules(net, "pn.ggn_vp")
    v = _tangent(params, v)
    check_float_input(x, ids=id_layer(net))
    body, fused, loss_fn = _prepare(net, loss)
    body_params, body_state = _body_trees(net, fused, params, state)
    body_v, _ = _body_trees(net, fused, v, state)

    def out_and_cache(p):
        out, _, cache = body.forward(p, body_state, x, train=train, key=key)
        return out, cache

    out, jv, cache = jax.jvp(out_and_cache, (body_params,), (body_v,), has_aux=True)
    _, h_jv = jax.jvp(lambda o: loss_fn.backward(o, y), (out,), (jv,))
    body_gv, _ = body.backward(body_params, cache, h_jv)
    gv = _full_trees(net, fused, body_gv, {})
    gv = losses.add_l2_gradient(gv, v, l2, decay_mask(net, params))  # the penalty's Hessian: l2 on the weights
    return gv
