"""Network-level pure functions: the only place that walks layers forward, then backward.

    value_and_grad:  x -> layer forwards (caches) -> loss and dL/d(output)
                       -> layer backwards in reverse -> grads (+ l2 W)

`loss` is the same computation in plain JAX, with no backward: autodiff of
it is the reference that `value_and_grad` is tested against.

When a network ends in Softmax and the loss is cross-entropy (or Sigmoid and
binary cross-entropy), both functions stop before that activation and use
the fused loss on the logits, which is exact and finite at any magnitude.
"""
from typing import Any, NamedTuple

from purenet import losses
from purenet._checks import check_float_input
from purenet.layers import Sequential, Sigmoid, Softmax
from purenet.layers.base import id_layer

# Output activation -> the loss it fuses with.
_FUSED = {Softmax: "cross_entropy", Sigmoid: "binary_cross_entropy"}


def _identity_layer():
    return Sequential(())


def _split_head(net, loss):
    """(body, fused): body is `net` without its final activation when that fuses with `loss`."""
    if isinstance(net, Sequential) and net.layers and _FUSED.get(type(net.layers[-1])) == loss:
        return Sequential(net.layers[:-1], in_shape=net.in_shape), True
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


def init(net, key, in_shape=None, dtype=None, *, in_dim=None):
    """Initialise a network: returns (params, state).

    `in_shape` is one example's shape (an int n means (n,); `in_dim=n` is an
    alias). It may be omitted for a Sequential that knows it (e.g. from `mlp`).
    `dtype` defaults to JAX's default float (float64 under jax_enable_x64).
    """
    if in_shape is None:
        in_shape = in_dim
    if in_shape is None and isinstance(net, Sequential):
        in_shape = net.in_shape
    if in_shape is None:
        raise ValueError(f"pn.init needs in_dim or in_shape for {type(net).__name__} "
                         f"(the shape of one example, e.g. the width of the input rows)")
    params, state, _ = net.init(key, in_shape, dtype=dtype)
    return params, state


def forward(net, params, state, x, train=False, key=None):
    """The network's output: returns (y, state); state changes only in training."""
    check_float_input(x, ids=id_layer(net))
    y, state, _ = net.forward(params, state, x, train=train, key=key)
    return y, state


def _prepare(net, loss):
    chosen = losses.get(loss)  # unknown names raise here
    if isinstance(loss, losses.Loss):
        return net, False, losses.checked(chosen)
    body, fused = _split_head(net, loss)
    return body, fused, losses.LOSSES_FROM_LOGITS[loss] if fused else chosen


class LossPass(NamedTuple):
    """What the forward part of a loss leaves for a backward pass."""

    body: Any          # the network without a fused output activation
    fused: bool        # True when the loss is computed from logits
    body_params: Any
    out: Any           # the body's output (logits when fused)
    cache: Any
    state: Any         # the whole network's new state
    loss_fn: losses.Loss

    def grads(self, net, body_grads):
        """Body gradients placed into the structure of the whole network's params."""
        return _full_trees(net, self.fused, body_grads, {})


def loss_pass(net, params, state, x, loss, train=False, key=None):
    """Run the network forward for `loss`, keeping the caches (shared by every backward)."""
    check_float_input(x, ids=id_layer(net))
    body, fused, chosen = _prepare(net, loss)
    bparams, bstate = _body_trees(net, fused, params, state)
    out, new_bstate, cache = body.forward(bparams, bstate, x, train=train, key=key)
    head_state = state[-1] if fused and isinstance(net, Sequential) else state
    return LossPass(body, fused, bparams, out, cache, _full_trees(net, fused, new_bstate, head_state), chosen)


def loss(net, params, state, x, y, loss="cross_entropy", l2=0.0, train=False, key=None):
    """The loss of the network on (x, y) plus l2/2 sum W^2: returns (value, state).

    Plain JAX and differentiable: its autodiff gradient is the reference.
    """
    p = loss_pass(net, params, state, x, loss, train, key)
    return p.loss_fn.value(p.out, y) + losses.l2_penalty(params, l2), p.state


def value_and_grad(net, params, state, x, y, loss="cross_entropy", l2=0.0, train=False, key=None):
    """The loss and its gradient by the handwritten backward: returns (value, grads, state).

    grads has the structure of params; no autodiff is involved.
    """
    p = loss_pass(net, params, state, x, loss, train, key)
    value = p.loss_fn.value(p.out, y) + losses.l2_penalty(params, l2)
    body_grads, _ = p.body.backward(p.body_params, p.cache, p.loss_fn.backward(p.out, y))
    return value, losses.add_l2_gradient(p.grads(net, body_grads), params, l2), p.state


def input_grad(net, params, state, x, y, loss="cross_entropy", train=False, key=None):
    """dL/dx, the gradient of the loss with respect to the input, by the handwritten backward.

    The same forward and backward as `value_and_grad`, whose last step
    returns dL/dx beside the weights' gradients (the l2 term does not depend
    on x). Has x's shape; the basis of input attacks (FGSM, PGD) and saliency.
    """
    p = loss_pass(net, params, state, x, loss, train, key)
    _, dx = p.body.backward(p.body_params, p.cache, p.loss_fn.backward(p.out, y))
    return dx
