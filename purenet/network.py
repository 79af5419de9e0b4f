"""Network-level pure functions: the only place that walks layers forward, then backward.

    value_and_grad:  x -> layer forwards (caches) -> loss and dL/d(output)
                       -> layer backwards in reverse -> grads (+ l2 W)

`loss` is the same computation in plain JAX, with no backward: `jax.grad` of
it is the reference that `value_and_grad` is tested against.

When a network ends in Softmax and the loss is cross-entropy (or Sigmoid and
binary cross-entropy), both functions stop before that activation and use
the fused loss on the logits, which is exact and finite at any magnitude.
"""
import jax
import jax.numpy as jnp

from purenet import losses
from purenet._checks import check_float_input
from purenet.layers import Sequential, Sigmoid, Softmax

# Output activation -> the loss it fuses with.
_FUSED = {Softmax: "cross_entropy", Sigmoid: "binary_cross_entropy"}


def _identity_layer():
    return Sequential(())


def _split_head(net, loss):
    """(body, fused): body is `net` without its final activation when that fuses with `loss`."""
    if isinstance(net, Sequential) and net.layers and _FUSED.get(type(net.layers[-1])) == loss:
        return Sequential(net.layers[:-1], in_dim=net.in_dim), True
    if _FUSED.get(type(net)) == loss:
        return _identity_layer(), True
    return net, False


def _body_trees(net, fused, params, state):
    if not fused:
        return params, state
    if isinstance(net, Sequential):
        return params[:-1], state[:-1]
    return (), ()


def _full_trees(net, fused, body_tree, head_tree):
    if not fused:
        return body_tree
    if isinstance(net, Sequential):
        return tuple(body_tree) + (head_tree,)
    return head_tree


def init(net, key, in_dim=None, dtype=None):
    """Initialise a network: returns (params, state).

    `in_dim` may be omitted for a Sequential that knows it (e.g. from `mlp`).
    `dtype` defaults to JAX's default float (float64 under jax_enable_x64).
    """
    if in_dim is None and isinstance(net, Sequential):
        in_dim = net.in_dim
    if in_dim is None:
        raise ValueError(f"pn.init needs in_dim for {type(net).__name__} (the width of the input rows)")
    params, state, _ = net.init(key, in_dim, dtype=dtype)
    return params, state


def forward(net, params, state, x, train=False, key=None):
    """The network's output: returns (y, state); state changes only in training."""
    check_float_input(x)
    y, state, _ = net.forward(params, state, x, train=train, key=key)
    return y, state


def _prepare(net, loss):
    losses.get(loss)  # unknown names raise here
    body, fused = _split_head(net, loss)
    chosen = losses.LOSSES_FROM_LOGITS if fused else losses.LOSSES
    return body, fused, chosen[loss]


def loss(net, params, state, x, y, loss="cross_entropy", l2=0.0, train=False, key=None):
    """The loss of the network on (x, y) plus l2/2 sum W^2: returns (value, state).

    Plain JAX and differentiable: jax.grad of it is the reference gradient.
    """
    check_float_input(x)
    body, fused, chosen = _prepare(net, loss)
    bparams, bstate = _body_trees(net, fused, params, state)
    out, new_bstate, _ = body.forward(bparams, bstate, x, train=train, key=key)
    value = chosen.value(out, y) + losses.l2_penalty(params, l2)
    head_state = state[-1] if fused and isinstance(net, Sequential) else state
    return value, _full_trees(net, fused, new_bstate, head_state)


def value_and_grad(net, params, state, x, y, loss="cross_entropy", l2=0.0, train=False, key=None):
    """The loss and its gradient by the handwritten backward: returns (value, grads, state).

    grads has the structure of params; no autodiff is involved.
    """
    check_float_input(x)
    body, fused, chosen = _prepare(net, loss)
    bparams, bstate = _body_trees(net, fused, params, state)
    out, new_bstate, cache = body.forward(bparams, bstate, x, train=train, key=key)
    value = chosen.value(out, y) + losses.l2_penalty(params, l2)
    bgrads, _ = body.backward(bparams, cache, chosen.backward(out, y))
    grads = _full_trees(net, fused, bgrads, {})
    if not isinstance(l2, (int, float)) or l2 != 0:
        l2_grads = losses.l2_backward(params, l2)
        grads = jax.tree_util.tree_map(jnp.add, grads, l2_grads)
    head_state = state[-1] if fused and isinstance(net, Sequential) else state
    return value, grads, _full_trees(net, fused, new_bstate, head_state)
