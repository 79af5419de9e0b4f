"""Network-level pure functions: a network's forward, its loss, and the recipe every backward follows.

    value_and_grad:  x -> layer forwards (caches) -> loss and dL/d(output)
                       -> the one traversal back (`walk`), a visitor at each leaf -> grads (+ l2 W)

`backward_pass` is that recipe, once: `value_and_grad`, mixed precision,
K-FAC, DP-SGD's clipping, the per-example functions and the statistics all
run it, each with its own visitor (what a leaf layer computes) and seed
(what enters the backward at the output). `loss` is the same computation in
plain JAX, with no backward: autodiff of it is the reference that
`value_and_grad` is tested against.

When a network ends in Softmax and the loss is cross-entropy (or Sigmoid and
binary cross-entropy), both functions stop before that activation and use
the fused loss on the logits, which is exact and finite at any magnitude.

l2 adds l2/2 sum W^2 over the network's trainable weight matrices: every
parameter whose role is "weight" (`pn.layers.base.decay_mask`), attention's
Wq, Wk, Wv, Wo included; not biases, gains, embedding tables, or anything
inside `Frozen`.
"""
import functools
from typing import Any, Callable, NamedTuple

import jax

from purenet import losses
from purenet._checks import check_float_input
from purenet.layers import Sequential
from purenet.layers.base import Visit
from purenet.layers.roles import decay_mask, id_layer, output_kind
from purenet.layers.traversal import PLAIN, map_leaves, walk
from purenet.layers.protocol import check_names
from purenet.layers.structure import check as check_structure

PyTree = Any

def fused_loss(layer: Any) -> str | None:
    """The loss an output layer fuses with (its `fuses_with`: Softmax's "cross_entropy"), or None."""
    return getattr(layer, "fuses_with", None)


def output_head(net: Any) -> Any:
    """The last layer of `net` when it is an output activation that fuses with a loss (a Softmax or
    Sigmoid ending a Sequential, or the network itself), else None."""
    last = net.output_child() if _is_chain(net) else net
    return last if last is not None and fused_loss(last) is not None else None


def _is_chain(net: Any) -> bool:
    """A container whose output is its last child's and that can leave it out (`without_output`)."""
    return bool(getattr(net, "chain", False)) and hasattr(net, "without_output")


def _split_head(net: Any, loss: Any) -> tuple[Any, bool]:
    """(body, fused): body is `net` without its final activation when that fuses with `loss`,
    or `net` itself when it outputs logits (pn.llama, a GPT without Softmax) and the loss is
    cross-entropy: either way the loss is computed from the logits."""
    if loss == "cross_entropy" and output_kind(net) == "logits":
        return net, True
    head = output_head(net)
    if head is None or fused_loss(head) != loss:
        return net, False
    if head is net:
        return Sequential(()), True
    return net.without_output(), True


def _strips_head(net: Any, fused: bool) -> bool:
    """Whether the fused body left out the network's last layer (not so for a logits network)."""
    return fused and output_kind(net) != "logits"


def _body_trees(net: Any, fused: bool, params: PyTree, state: PyTree) -> tuple[PyTree, PyTree]:
    if not _strips_head(net, fused):
        return params, state
    if _is_chain(net):
        body = net.without_output()
        return body.join(net.split(params)[:-1]), body.join(net.split(state)[:-1])
    return (), ()


def _full_trees(net: Any, fused: bool, body_tree: PyTree, head_tree: PyTree) -> PyTree:
    if not _strips_head(net, fused):
        return body_tree
    if _is_chain(net):
        return net.join([*net.without_output().split(body_tree), head_tree])
    return head_tree


def init(net: Any, key: jax.Array, in_shape: Any = None, dtype: Any = None, *,
         in_dim: int | None = None) -> tuple[PyTree, PyTree]:
    """Initialise a network: returns (params, state).

    `in_shape` is one example's shape (an int n means (n,); `in_dim=n` is an
    alias). It may be omitted for a Sequential that knows it (e.g. from `mlp`).
    `dtype` defaults to JAX's default float (float64 under jax_enable_x64).
    A layer that defines a name close to an optional protocol name but not
    one (`mixes_example`) is an AttributeError that suggests the name
    (`purenet.layers.protocol.check_names`); a layer whose declared
    structure leaves out a parameter or places one twice is a ValueError
    (`purenet.layers.structure.check`).

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        key: the PRNG key every initial weight is drawn from.
        in_shape: one example's shape, without the batch axis (an int n means
            (n,)); None when `in_dim` is given or the network knows its shape.
        dtype: the parameters' floating dtype; None for JAX's default float.
        in_dim: an alias of `in_shape` for a width (keyword only).

    Returns:
        (params, state): the parameters, a pytree (tuples for containers,
            dicts of arrays for layers), and the state (BatchNorm's running
            statistics; empty for most layers), each shaped like the network.

    Raises:
        ValueError: if no input shape is given or known, a layer refuses the
            shape (its message names the layer), or a layer's declared
            structure misplaces a parameter.
        AttributeError: if a layer defines a misspelt optional protocol name.
        TypeError: if the shape is not an int or a tuple of ints, or a layer
            declares a structure without `products`.
    """
    check_names(net)
    if in_shape is None:
        in_shape = in_dim
    if in_shape is None:
        in_shape = getattr(net, "in_shape", None)  # a Sequential that knows it, pn.llama
    if in_shape is None:
        raise ValueError(f"pn.init needs in_dim or in_shape for {type(net).__name__} "
                         f"(the shape of one example, e.g. the width of the input rows)")
    params, state = _initialised(net, key, in_shape, dtype)
    map_leaves(net, lambda layer, p, frozen: check_structure(layer, p), params)
    return params, state


def _initialised(net: Any, key: jax.Array, in_shape: Any, dtype: Any) -> tuple[PyTree, PyTree]:
    """net.init's (params, state), as one compiled program when the network can be hashed: every draw,
    slice and zero of the network compiles together instead of one small program per operation (the
    first-step latency: benchmarks/README.md, "Compile time"). The same values either way."""
    try:
        program = _init_program(net, in_shape, dtype)
    except TypeError:  # a layer holding arrays (or a traced rate) cannot be a static argument
        return net.init(key, in_shape, dtype=dtype)[:2]
    return program(key)


@functools.lru_cache(maxsize=32)
def _init_program(net: Any, in_shape: Any, dtype: Any) -> Callable[[jax.Array], tuple[PyTree, PyTree]]:
    return jax.jit(lambda key: net.init(key, in_shape, dtype=dtype)[:2])


def forward(net: Any, params: PyTree, state: PyTree, x: jax.Array, train: bool = False,
            key: jax.Array | None = None) -> tuple[jax.Array, PyTree]:
    """The network's output: returns (y, state); state changes only in training.

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters, as `pn.init` returns them.
        state: its state (BatchNorm's running statistics; empty tuples and
            dicts for most layers).
        x: inputs (batch, *in_shape): floats, or integer token ids (batch, T)
            for a network that starts with an embedding.
        train: True for training mode (Dropout drops, BatchNorm uses and
            updates the batch statistics); False (the default) to evaluate.
        key: a PRNG key, needed in training by layers that draw (Dropout).

    Returns:
        (y, state): the output (batch, *out_shape) (probabilities after a
            final Softmax, logits for a `pn.GPT` or `pn.llama`) and the new state
            (the given one in evaluation).

    Raises:
        TypeError: if `x` is not floating point (integer for a network that
            reads ids).
        ValueError: if `x` has no batch axis or an empty one, an id lies
            outside the vocabulary (checked when concrete), or a layer
            refuses the input (its message names the layer).
    """
    check_float_input(x, ids=id_layer(net))
    y, state, _ = net.forward(params, state, x, train=train, key=key)
    return y, state


def _prepare(net: Any, loss: Any) -> tuple[Any, bool, losses.Loss]:
    chosen = losses.get(loss)  # unknown names raise here
    if isinstance(loss, losses.Loss):
        return net, False, losses.checked(chosen)
    body, fused = _split_head(net, loss)
    return body, fused, losses.LOSSES_FROM_LOGITS[loss] if fused else chosen


def evaluation_body(net: Any, params: PyTree, state: PyTree, loss: Any) -> tuple[Any, PyTree, PyTree, losses.Loss, Any]:
    """(body, its params, its state, the loss of the body's output, the final Softmax / Sigmoid the fused
    loss left out, or None): what an evaluation pass runs forward. With a head, the output is its logits."""
    body, fused, chosen = _prepare(net, loss)
    body_params, body_state = _body_trees(net, fused, params, state)
    head = net.output_child() if _strips_head(net, fused) and _is_chain(net) else None
    return body, body_params, body_state, chosen, head


class LossPass(NamedTuple):
    """What the forward part of a loss leaves for a backward pass."""

    body: Any          # the network without a fused output activation
    fused: bool        # True when the loss is computed from logits
    body_params: Any
    out: Any           # the body's output (logits when fused)
    cache: Any
    state: Any         # the whole network's new state
    loss_fn: losses.Loss

    def grads(self, net: Any, body_grads: PyTree) -> PyTree:
        """Body gradients placed into the structure of the whole network's params."""
        return _full_trees(net, self.fused, body_grads, {})

    def per_example_seed(self, y: Any) -> jax.Array:
        """Row i: the gradient of example i's own loss L_i with respect to the output (N dL/dout)."""
        return self.loss_fn.backward(self.out, y) * self.out.shape[0]


def loss_pass(net: Any, params: PyTree, state: PyTree, x: jax.Array, loss: Any, train: bool = False,
              key: jax.Array | None = None, rebuild: Callable[[Any], Any] | None = None) -> LossPass:
    """Run the network forward for `loss`, keeping the caches (shared by every backward); `rebuild(body)`,
    when given, is the body to run instead (the same params and state: `pn.capture`'s taps)."""
    check_float_input(x, ids=id_layer(net))
    body, fused, chosen = _prepare(net, loss)
    bparams, bstate = _body_trees(net, fused, params, state)
    body = body if rebuild is None else rebuild(body)
    out, new_bstate, cache = body.forward(bparams, bstate, x, train=train, key=key)
    head_state = net.split(state)[-1] if _strips_head(net, fused) and _is_chain(net) else state
    return LossPass(body, fused, bparams, out, cache, _full_trees(net, fused, new_bstate, head_state), chosen)


def l2_terms(net: Any, params: PyTree, l2: Any) -> tuple[Any, PyTree | None]:
    """(l2/2 sum W^2, l2 W) over the network's decay mask (None for the gradient when l2 is 0)."""
    if not losses.has_l2(l2):
        return 0.0, None
    mask = decay_mask(net, params)
    return losses.l2_penalty(params, l2, mask), losses.l2_backward(params, l2, mask)


def add_l2(net: Any, params: PyTree, l2: Any, value: Any, grads: PyTree) -> tuple[Any, PyTree]:
    """value + l2/2 sum W^2 and grads + l2 W (grads may carry a leading batch axis)."""
    penalty, gradient = l2_terms(net, params, l2)
    if gradient is None:
        return value, grads
    return value + penalty, jax.tree_util.tree_map(lambda g, d: g + d, grads, gradient)


def backward_pass(p: LossPass, net: Any, y: Any, visit: Visit = PLAIN,
                  seed: Callable[[jax.Array], jax.Array] | None = None) -> PyTree:
    """The backward half of the recipe: seed = dL/dout (or `seed(dL/dout)`), walked back through
    the body with `visit`; returns the visitor's outputs, placed like the network's params."""
    dout = p.loss_fn.backward(p.out, y)
    outs, _ = walk(p.body, visit, p.body_params, (p.cache,), (dout if seed is None else seed(dout),))
    return p.grads(net, outs) if visit.shaped else outs


def loss(net: Any, params: PyTree, state: PyTree, x: jax.Array, y: Any, loss: Any = "cross_entropy",
         l2: Any = 0.0, train: bool = False, key: jax.Array | None = None) -> tuple[jax.Array, PyTree]:
    """The loss of the network on (x, y) plus l2/2 sum W^2: returns (value, state).

    Plain JAX and differentiable: its autodiff gradient is the reference.

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters, as `pn.init` returns them.
        state: its state (BatchNorm's running statistics; empty tuples and
            dicts for most layers).
        x: inputs (batch, *in_shape): floats, or integer token ids (batch, T)
            for a network that starts with an embedding.
        y: targets: for cross-entropy, integer labels of the output's shape
            without its last axis ((batch,), or (batch, T) for a sequence) or
            distributions of the output's shape; for mse and binary
            cross-entropy, the output's exact shape (a `pn.Loss` declares its own).
        loss: a loss name ("cross_entropy", the default, "mse",
            "binary_cross_entropy", "softmax_cross_entropy",
            "sigmoid_binary_cross_entropy") or a `pn.Loss`.
        l2: the coefficient of the penalty l2/2 sum W^2 over the parameters
            whose role is "weight" (default 0: no penalty).
        train: True for training mode (Dropout drops, BatchNorm uses and
            updates the batch statistics); False (the default) to evaluate.
        key: a PRNG key, needed in training by layers that draw (Dropout).

    Returns:
        (value, state): the scalar loss (the mean over the batch, plus the l2
            penalty) and the new state.

    Raises:
        TypeError: if `x` is not floating point (integer for a network that
            reads ids), or cross-entropy labels are not integers.
        ValueError: if `x` has no batch axis or an empty one, an id or label
            lies outside its range (checked when concrete), `loss` is an
            unknown name, the targets' shape does not fit the output, or a
            layer refuses the input (its message names the layer).
    """
    p = loss_pass(net, params, state, x, loss, train, key)
    return p.loss_fn.value(p.out, y) + l2_terms(net, params, l2)[0], p.state


def value_and_grad(net: Any, params: PyTree, state: PyTree, x: jax.Array, y: Any, loss: Any = "cross_entropy",
                   l2: Any = 0.0, train: bool = False,
                   key: jax.Array | None = None) -> tuple[jax.Array, PyTree, PyTree]:
    """The loss and its gradient by the handwritten backward: returns (value, grads, state).

    grads has the structure of params; no autodiff is involved.

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters, as `pn.init` returns them.
        state: its state (BatchNorm's running statistics; empty tuples and
            dicts for most layers).
        x: inputs (batch, *in_shape): floats, or integer token ids (batch, T)
            for a network that starts with an embedding.
        y: targets: for cross-entropy, integer labels of the output's shape
            without its last axis ((batch,), or (batch, T) for a sequence) or
            distributions of the output's shape; for mse and binary
            cross-entropy, the output's exact shape (a `pn.Loss` declares its own).
        loss: a loss name ("cross_entropy", the default, "mse",
            "binary_cross_entropy", "softmax_cross_entropy",
            "sigmoid_binary_cross_entropy") or a `pn.Loss`.
        l2: the coefficient of the penalty l2/2 sum W^2 over the parameters
            whose role is "weight" (default 0: no penalty).
        train: True for training mode (Dropout drops, BatchNorm uses and
            updates the batch statistics); False (the default) to evaluate.
        key: a PRNG key, needed in training by layers that draw (Dropout).

    Returns:
        (value, grads, state): the scalar loss (as `pn.loss` gives it), its
            gradient with respect to params (params' structure, l2 W included)
            and the new state.

    Raises:
        TypeError: if `x` is not floating point (integer for a network that
            reads ids), or cross-entropy labels are not integers.
        ValueError: if `x` has no batch axis or an empty one, an id or label
            lies outside its range (checked when concrete), `loss` is an
            unknown name, the targets' shape does not fit the output, or a
            layer refuses the input (its message names the layer).
    """
    p = loss_pass(net, params, state, x, loss, train, key)
    value, grads = add_l2(net, params, l2, p.loss_fn.value(p.out, y), backward_pass(p, net, y))
    return value, grads, p.state


def input_grad(net: Any, params: PyTree, state: PyTree, x: jax.Array, y: Any, loss: Any = "cross_entropy",
               train: bool = False, key: jax.Array | None = None) -> jax.Array:
    """dL/dx, the gradient of the loss with respect to the input, by the handwritten backward.

    The same forward and backward as `value_and_grad`, whose last step
    returns dL/dx beside the weights' gradients (the l2 term does not depend
    on x). Has x's shape; the basis of input attacks (FGSM, PGD) and saliency.
    A network that reads integer ids (an Embedding first) has no input
    gradient: that is an error.

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters, as `pn.init` returns them.
        state: its state (BatchNorm's running statistics; empty tuples and
            dicts for most layers).
        x: float inputs (batch, *in_shape).
        y: targets: for cross-entropy, integer labels of the output's shape
            without its last axis ((batch,), or (batch, T) for a sequence) or
            distributions of the output's shape; for mse and binary
            cross-entropy, the output's exact shape (a `pn.Loss` declares its own).
        loss: a loss name ("cross_entropy", the default, "mse",
            "binary_cross_entropy", "softmax_cross_entropy",
            "sigmoid_binary_cross_entropy") or a `pn.Loss`.
        train: True for training mode (Dropout drops, BatchNorm uses and
            updates the batch statistics); False (the default) to evaluate.
        key: a PRNG key, needed in training by layers that draw (Dropout).

    Returns:
        dL/dx, x's shape (batch, *in_shape): the gradient of the batch's mean
            loss with respect to each input.

    Raises:
        ValueError: if the network reads integer ids, `x` has no batch axis or
            an empty one, `loss` is an unknown name, the targets' shape does
            not fit the output, or a layer refuses the input.
        TypeError: if `x` is not floating point, or cross-entropy labels are
            not integers.
    """
    if id_layer(net) is not None:
        raise ValueError(f"input_grad: {type(id_layer(net)).__name__} reads integer ids, which have no gradient; "
                         f"take the gradient with respect to the embeddings instead")
    p = loss_pass(net, params, state, x, loss, train, key)
    _, dx = p.body.backward(p.body_params, p.cache, p.loss_fn.backward(p.out, y))
    return dx
