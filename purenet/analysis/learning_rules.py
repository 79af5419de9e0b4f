"""Learning rules beyond backprop: feedback alignment, sign symmetry and direct feedback alignment.

    net_fa = pn.learning_rules.feedback_alignment(net)      # net: a flat pn.Sequential (pn.mlp, a LeNet)
    params, state = pn.init(net_fa, key)                    # params as pn.init(net, key) gives them; state holds B
    result = pn.fit(net_fa, pn.optim.adam(1e-3), (x, y), key=key, epochs=5)

Backprop sends dx = dy W^T down from a layer y = x W + b ("weight transport":
the feedback uses the forward's own weights). A learning rule keeps every
layer's weight gradient local, dW = x^T dy and db = sum dy from the dy the
layer receives, and replaces the feedback:

    feedback alignment (Lillicrap et al. 2016)   dx = dy B^T, B a fixed random matrix shaped like W
    sign symmetry, uSF (Liao, Leibo & Poggio     dx = dy (s sign(W))^T, the current W's signs;
      2016; biotorch's "usf")                        s = the standard deviation of W's initializer
    sign symmetry, frSF (biotorch's "frsf")      dx = dy (|M| o sign(W))^T, M fixed random like W
    direct feedback alignment (Nokland 2016)     dx_l = e B_l for every Dense / Conv2D l, e = the dy the
                                                     network's last Dense / Conv2D receives (the output
                                                     error dL/dlogits), B_l a fixed random (|e|, |x_l|) matrix

For a Conv2D, "dy B^T" is the transposed convolution with B in place of the
kernel (the layer's own backward run with B for W: `Feedback`). In direct
feedback alignment the error reaches each layer's *input*, the previous
hidden layer's output h_l, and then passes back through the layers between
(the activation's f'(a), a pooling's routing) to the next Dense / Conv2D
below, as Nokland's delta a_l = (B_l e) * f'(a_l) and biotorch's DFA layers
(which replace each layer's grad_input) do. B_l is a dense matrix for a
Conv2D too (Nokland's); biotorch instead convolves a spatially constant error
image with a random kernel.

uSF's scale s follows biotorch: B = s sign(W) with s the standard deviation
its layer's initializer draws W with (its "scaling factor", after Xiao et
al. 2018): he_normal sqrt(2 / fan_in), xavier sqrt(2 / (fan_in + fan_out)),
lecun_normal sqrt(1 / fan_in) (a convolution's fans count its receptive
field). biotorch's third variant, brSF, draws new magnitudes every batch and
is not offered.

The fixed matrices live in the network's state (drawn at `pn.init` from its
key, never trained; the params are the plain network's, drawn from the same
key), so `pn.save` / `pn.load` of (params, state) keeps them. uSF stores none.

What works. A rule network's backward gives the rule's updates, not the
loss's gradient. They serve `pn.value_and_grad`, `pn.fit` and the training
loops, every optimizer but K-FAC, `pn.capture` and `pn.hooked` (a weight
layer's Record.dx is the rule's dx, the feedback it sends), `pn.input_grad`
(the rule's dx at the input), `pn.diagnostics`, and `pn.per_example_grads`
(example i's own update: each rule's feedback acts on each example's row
alone, so the per-example walk is exact). Everything defined by the loss's
true derivatives, or not proven for a rule, is an error that says so: DP-SGD
(its per-example clipping), `pn.per_example_grad_norms`, `pn.stats` (Fisher,
GGN and Hessian diagonals, K-FAC factors, gradient statistics), the K-FAC
optimizer, `pn.influence`, `pn.hvp` and `pn.ggn_vp`. Run those on the plain
network (`backprop(net, state)` gives it back, with the same params).

Networks: a flat `pn.Sequential` (no containers among its layers) whose
layers with weight matrices are Dense and Conv2D; parameter-free layers
(activations, pooling, Flatten, Dropout, the output Softmax) and norms
(BatchNorm, LayerNorm: per-feature gains, no weight transport) keep their
own backward. Any other layer with a weight is an error at `pn.init`.
"""
import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from purenet import initializers
from purenet.analysis.capture import Tap
from purenet.layers.base import Array, Layer, PyTree, Static, Visit, as_shape
from purenet.layers.conv import Conv2D
from purenet.layers.dense import Dense
from purenet.layers.roles import layer_roles
from purenet.layers.sequential import Sequential
from purenet.layers.traversal import PLAIN, is_container, walk

__all__ = ["Feedback", "FeedbackCache", "RULES", "RuleSequential", "backprop", "direct_feedback_alignment",
           "feedback_alignment", "init_std", "sign_symmetry"]

# rule -> its name in messages
RULES = {"fa": "feedback alignment", "usf": "sign symmetry (uSF)", "frsf": "sign symmetry (frSF)",
         "dfa": "direct feedback alignment"}
_STORED = ("fa", "frsf", "dfa")  # the rules whose random matrices live in the state
_SALT = 0x46422  # B's keys: fold_in(key, _SALT), apart from the layers' own draws from key
# variance scaling per initializer name: (scale, fan); "normal" is N(0, 1)
_VARIANCE = {"xavier_uniform": (1.0, "avg"), "xavier_normal": (1.0, "avg"), "he_normal": (2.0, "in"),
             "he_uniform": (2.0, "in"), "lecun_normal": (1.0, "in")}


def init_std(name: str, shape: tuple[int, ...]) -> float:
    """The standard deviation the initializer `name` draws a weight of `shape` with.

    sqrt(s / fan) for the variance-scaling ones (fan_in, or the mean of
    fan_in and fan_out, a convolution's receptive field counted), 1 for
    "normal": uSF's scale, as biotorch takes it from its layers' initializer.

    Args:
        name: an initializer name (`purenet.initializers`).
        shape: the weight's shape, (fan_in, fan_out) last.

    Returns:
        The standard deviation, a float.

    Raises:
        ValueError: for "zeros" (no spread to take) or an unknown name.
    """
    initializers.get(name)
    if name == "normal":
        return 1.0
    if name not in _VARIANCE:
        raise ValueError(f"sign symmetry takes its scale from the standard deviation of W's initializer, and "
                         f"{name!r} has none; pass scale= to pn.learning_rules.sign_symmetry")
    receptive = math.prod(shape[:-2])
    fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
    scale, mode = _VARIANCE[name]
    return math.sqrt(scale / max(1.0, fan_in if mode == "in" else (fan_in + fan_out) / 2))


class FeedbackCache(NamedTuple):
    """A `Feedback` layer's cache.

    Attributes:
        inner: the Dense's or Conv2D's own cache.
        B: the stored random matrix (FA: B; frSF: M; DFA: B_l), None for uSF.
        error: DFA's output error e (batch, ...), put in by the `RuleSequential` walk; None otherwise.
        in_shape: one example's input shape (DFA reshapes e B_l to it).
    """

    inner: Any
    B: Any
    error: Any
    in_shape: Static


@dataclasses.dataclass(frozen=True)
class Feedback(Layer):
    """A Dense or Conv2D whose backward sends the rule's feedback down instead of dy W^T.

    Params and forward are the block's own; its weight gradients are the
    block's own backward's (local: dW = x^T dy, db = sum dy). dx:

        "fa"    the block's backward with B (state, fixed) in place of W: dy B^T, a Conv2D's transposed conv
        "usf"   the same with scale * sign(W)
        "frsf"  the same with |M| o sign(W), M (state) fixed
        "dfa"   e B_l reshaped to x, e the output error its `RuleSequential` delivers

    Args:
        block: a `pn.Dense` or `pn.Conv2D`.
        rule: "fa", "usf", "frsf" or "dfa".
        init_name: the initializer of the stored matrix (a `purenet.initializers`
            name); None for the block's own (FA, frSF) or "xavier_uniform" (DFA).
        scale: uSF's s; None for the standard deviation of the block's initializer.

    Raises:
        TypeError: if `block` is neither a Dense nor a Conv2D.
        ValueError: if `rule` or `init_name` is unknown, `scale` is not positive,
            or uSF takes its scale from an initializer without a spread ("zeros").
    """

    block: Any
    rule: str
    init_name: str | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.block, (Dense, Conv2D)):
            raise TypeError(f"a learning rule replaces the feedback of a Dense or a Conv2D, got "
                            f"{type(self.block).__name__}")
        if self.rule not in RULES:
            raise ValueError(f"unknown learning rule {self.rule!r}; choose one of {sorted(RULES)}")
        if self.init_name is not None:
            initializers.get(self.init_name)
        if self.scale is not None and not (isinstance(self.scale, (int, float)) and self.scale > 0):
            raise ValueError(f"sign symmetry's scale must be a positive number, got {self.scale!r}")
        if self.rule == "usf" and self.scale is None:
            init_std(self.block.initializer, (1, 1))  # an initializer without a spread is refused here

    def param_roles(self, params: PyTree) -> PyTree:
        """The block's roles (W a weight, b a bias)."""
        return layer_roles(self.block, params)

    def init(self, key: Array, in_shape: Any, dtype: Any = None) -> tuple[PyTree, PyTree, tuple[int, ...]]:
        params, state, out = self.block.init(key, in_shape, dtype=dtype)
        if self.rule in ("fa", "frsf"):
            W = params["W"]
            state = {"B": initializers.get(self.init_name or self.block.initializer)(
                jax.random.fold_in(key, _SALT), W.shape, W.dtype)}
        return params, state, out  # DFA: its RuleSequential draws B_l, which needs the error's size

    def forward(self, params: PyTree, state: PyTree, x: Array, train: bool = False,
                key: Array | None = None) -> tuple[Array, PyTree, PyTree]:
        stored = None
        if self.rule in _STORED:
            if not isinstance(state, dict) or "B" not in state:
                raise ValueError(f"{RULES[self.rule]}: this {type(self.block).__name__}'s state holds no feedback "
                                 f"matrix B; initialise the rule network itself (pn.init(rule_net, key)), not the "
                                 f"plain network")
            stored = state["B"]
        y, _, cache = self.block.forward(params, {}, x, train=train, key=key)
        return y, state, FeedbackCache(cache, stored, None, Static(tuple(x.shape[1:])))

    def feedback_matrix(self, params: PyTree, cache: FeedbackCache) -> Array:
        """The matrix in place of W in dx (FA, uSF, frSF): B, s sign(W) or |M| o sign(W)."""
        W = params["W"]
        if self.rule == "fa":
            return cache.B
        if self.rule == "frsf":
            return jnp.abs(cache.B) * jnp.sign(W)
        s = self.scale if self.scale is not None else init_std(self.block.initializer, W.shape)
        return jnp.asarray(s, W.dtype) * jnp.sign(W)

    def feedback(self, params: PyTree, cache: FeedbackCache, dy: Array) -> Array:
        """dx: the rule's feedback for the output gradient dy (row by row: each example's own)."""
        if self.rule == "dfa":
            if cache.error is None:
                raise ValueError("direct feedback alignment: this layer's feedback is the output error, which its "
                                 "RuleSequential delivers; it cannot run outside one")
            e = cache.error
            return (e.reshape(e.shape[0], -1) @ cache.B).reshape(e.shape[0], *cache.in_shape.value)
        return self.block.backward({**params, "W": self.feedback_matrix(params, cache)}, cache.inner, dy)[1]

    def backward(self, params: PyTree, cache: PyTree, dy: Array) -> tuple[PyTree, Array]:
        grads, _ = self.block.backward(params, cache.inner, dy)
        return grads, self.feedback(params, cache, dy)

    def per_example_backward(self, params: PyTree, cache: PyTree, dy: Array) -> tuple[PyTree, Array]:
        """Per-example weight gradients by the block's own rule, and the rule's feedback."""
        from purenet.analysis.per_example import per_example_backward
        grads, _ = per_example_backward(self.block, params, cache.inner, dy)
        return grads, self.feedback(params, cache, dy)


def _core(layer: Any) -> Any:
    """The layer under the taps `pn.capture` / `pn.hooked` place."""
    while isinstance(layer, Tap):
        layer = layer.block
    return layer


def _deliver(layer: Any, cache: Any, error: Array) -> Any:
    """`cache` with DFA's error put into the Feedback layer's cache (under any taps)."""
    if isinstance(layer, Tap):
        return dataclasses.replace(cache, inner=_deliver(layer.block, cache.inner, error))
    return cache._replace(error=error)


def _refused(rule: str) -> ValueError:
    return ValueError(
        f"pn.learning_rules: a {RULES[rule]} network's backward gives the rule's updates, not the loss's gradient. "
        f"It serves pn.value_and_grad, pn.fit and the optimizers (not K-FAC), pn.capture / pn.hooked, "
        f"pn.input_grad, pn.diagnostics and pn.per_example_grads; this walk asks for something defined by the "
        f"loss's true derivatives or not proven for a rule (DP-SGD's per-example clipping, "
        f"pn.per_example_grad_norms, pn.stats' curvature and gradient statistics, K-FAC, pn.influence). Run it on "
        f"the plain network: net, state = pn.learning_rules.backprop(rule_net, state)")


def _allowed(visit: Visit) -> bool:
    """The walks a rule serves: the batch backward (value_and_grad, fit, capture), per-example gradients, and
    walks that only read the caches (diagnostics)."""
    from purenet.analysis.per_example import PER_EXAMPLE
    return visit.leaf is PLAIN.leaf or visit.leaf is PER_EXAMPLE.leaf or visit.frozen is None


@dataclasses.dataclass(frozen=True, init=False)
class RuleSequential(Sequential):
    """A `pn.Sequential` trained by a learning rule: its Dense and Conv2D layers are `Feedback` layers.

    The same layers, params and paths as the plain chain (layer i is at (i,));
    the state adds each Feedback layer's fixed matrix {"B": ...} (none for
    uSF). Built by `feedback_alignment`, `sign_symmetry` and
    `direct_feedback_alignment`. Its walk refuses the walks a rule does not
    serve (see the module docstring) and, for DFA, hands the output error e
    (the dy its last Feedback layer receives) to every Feedback layer.

    Args:
        layers: the layers in forward order: Feedback layers, parameter-free
            layers and norms (no containers).
        in_shape: one example's shape, or None.
        rule: "fa", "usf", "frsf" or "dfa".
        in_dim: an alias of `in_shape` for a width (keyword only).

    Raises:
        ValueError: if `rule` is unknown or a layer is a container (and, at
            `init`, if a layer other than a Feedback has a weight matrix).
        TypeError: as `pn.Sequential` for a malformed shape.
    """

    rule: str

    @property
    def learning_rule(self) -> str:
        """The rule's name (what `pn.hvp` and `pn.ggn_vp` look for, to refuse the network)."""
        return RULES[self.rule]

    def __init__(self, layers: Any, in_shape: Any = None, *, rule: str, in_dim: int | None = None) -> None:
        super().__init__(layers, in_shape, in_dim=in_dim)
        if rule not in RULES:
            raise ValueError(f"unknown learning rule {rule!r}; choose one of {sorted(RULES)}")
        object.__setattr__(self, "rule", rule)
        _check_flat(self.layers, RULES[rule])

    def with_children(self, children: tuple | list) -> "RuleSequential":
        return RuleSequential(children, in_shape=self.in_shape, rule=self.rule)

    def without_output(self) -> "RuleSequential":
        return RuleSequential(self.layers[:-1], in_shape=self.in_shape, rule=self.rule)

    def init(self, key: Array, in_shape: Any = None, dtype: Any = None) -> tuple[PyTree, PyTree, tuple[int, ...]]:
        shape = self.in_shape if in_shape is None else as_shape(in_shape)
        if shape is None:
            raise ValueError("RuleSequential.init needs in_shape (the shape of one example, e.g. its width)")
        params, states, shapes = self._init_each(key, shape, dtype)
        for i, (layer, p) in enumerate(zip(self.layers, params)):
            _check_covered(i, _core(layer), p, RULES[self.rule])
        if self.rule == "dfa":
            states = self._draw_direct(key, params, states, shapes)
        return tuple(params), tuple(states), shapes[-1]

    def _draw_direct(self, key: Array, params: list, states: list, shapes: list) -> list:
        """Each Feedback layer's B_l, (|e|, |x_l|): e the last Feedback layer's output, per example."""
        at = [i for i, layer in enumerate(self.layers) if isinstance(_core(layer), Feedback)]
        e_size = math.prod(shapes[at[-1] + 1])
        base = jax.random.fold_in(key, _SALT)
        for i in at:
            layer = _core(self.layers[i])
            states[i] = {"B": initializers.get(layer.init_name or "xavier_uniform")(
                jax.random.fold_in(base, i), (e_size, math.prod(shapes[i])), params[i]["W"].dtype)}
        return states

    def walk_back(self, visit: Visit, params: PyTree, caches: tuple, dys: tuple) -> tuple[PyTree, tuple]:
        """The chain's walk (for DFA with the output error handed to every Feedback layer), for the walks
        a rule serves."""
        if not _allowed(visit):
            raise _refused(self.rule)
        if self.rule != "dfa":
            return super().walk_back(visit, params, caches, dys)
        outs: list = [None] * len(self.layers)
        error = None
        for i in reversed(range(len(self.layers))):
            layer, layer_caches = self.layers[i], tuple(c[i] for c in caches)
            if isinstance(_core(layer), Feedback):
                error = dys if error is None else error  # e: what the last Feedback layer receives
                layer_caches = tuple(_deliver(layer, c, e) for c, e in zip(layer_caches, error))
            outs[i], dys = walk(layer, visit, params[i], layer_caches, dys)
        return tuple(outs), dys


def _check_flat(layers: tuple, name: str) -> None:
    for i, layer in enumerate(layers):
        if is_container(layer) and not isinstance(layer, Tap):
            raise ValueError(f"{name}: layer {i} is a {type(layer).__name__}, a container; the learning rules take "
                             f"a flat pn.Sequential of Dense / Conv2D layers, parameter-free layers and norms")
    if layers and not any(isinstance(_core(layer), Feedback) for layer in layers):
        raise ValueError(f"{name}: the network has no Dense or Conv2D layer whose feedback the rule could replace")


def _check_covered(i: int, layer: Any, params: PyTree, name: str) -> None:
    if isinstance(layer, Feedback):
        return
    weights = [k for k, r in (layer_roles(layer, params).items() if isinstance(params, dict) else ())
               if r == "weight"]
    if weights:
        raise ValueError(f"{name}: layer {i} ({type(layer).__name__}) has weight matrices {weights} whose feedback "
                         f"the rule does not replace; the rules cover Dense and Conv2D only")


def _build(net: Any, rule: str, **options: Any) -> RuleSequential:
    if isinstance(net, RuleSequential):
        raise ValueError(f"{RULES[rule]}: the network already learns by {RULES[net.rule]}; pass the plain network "
                         f"(pn.learning_rules.backprop(net) gives it back)")
    if not isinstance(net, Sequential):
        raise TypeError(f"{RULES[rule]}: the learning rules take a pn.Sequential (pn.mlp, a LeNet-style CNN), got "
                        f"{type(net).__name__}")
    layers = [Feedback(layer, rule, **options) if isinstance(layer, (Dense, Conv2D)) else layer
              for layer in net.layers]
    return RuleSequential(layers, in_shape=net.in_shape, rule=rule)


def feedback_alignment(net: Sequential, init: str | None = None) -> RuleSequential:
    """The network trained by feedback alignment (Lillicrap et al. 2016): dx = dy B^T, B fixed and random.

    Every Dense and Conv2D sends dy B^T down (for a Conv2D the transposed
    convolution with kernel B) with B of W's shape, drawn once at `pn.init`
    and kept in the state; its weight gradients stay x^T dy and sum dy.

    Args:
        net: a flat `pn.Sequential` (e.g. `pn.mlp`, a LeNet-style CNN).
        init: B's initializer name; None (the default) for each layer's own,
            so B is distributed as W was at initialisation (biotorch draws
            both with the same initializer too).

    Returns:
        A `RuleSequential` with the same layers, params and paths.

    Raises:
        TypeError: if `net` is not a `pn.Sequential`.
        ValueError: if `net` already has a rule, holds a container, has no
            Dense or Conv2D, or `init` is unknown (at `pn.init`: another layer
            with a weight matrix).
    """
    return _build(net, "fa", init_name=init)


def sign_symmetry(net: Sequential, scale: float | None = None, magnitude: str = "uniform") -> RuleSequential:
    """The network trained by sign symmetry (Liao, Leibo & Poggio 2016), as biotorch defines its two variants.

        magnitude="uniform"       uSF:  dx = dy (s sign(W))^T, the current W's signs, no stored matrix
        magnitude="fixed_random"  frSF: dx = dy (|M| o sign(W))^T, M fixed (drawn like W, in the state)

    s, biotorch's "scaling factor", is the standard deviation of the layer's
    initializer (`init_std`); the weight gradients stay x^T dy and sum dy.

    Args:
        net: a flat `pn.Sequential`.
        scale: uSF's s for every layer; None (the default) for each layer's
            initializer's standard deviation, as biotorch.
        magnitude: "uniform" (uSF, the default) or "fixed_random" (frSF).

    Returns:
        A `RuleSequential` with the same layers, params and paths.

    Raises:
        TypeError: if `net` is not a `pn.Sequential`.
        ValueError: if `magnitude` is unknown, `scale` is not positive, or as
            `feedback_alignment`.
    """
    if magnitude not in ("uniform", "fixed_random"):
        raise ValueError(f"sign_symmetry magnitude must be 'uniform' (uSF) or 'fixed_random' (frSF), "
                         f"got {magnitude!r}")
    if magnitude == "fixed_random":
        if scale is not None:
            raise ValueError("sign_symmetry: scale is uSF's; frSF's magnitudes are |M|, M drawn like W")
        return _build(net, "frsf")
    return _build(net, "usf", scale=scale)


def direct_feedback_alignment(net: Sequential, init: str = "xavier_uniform") -> RuleSequential:
    """The network trained by direct feedback alignment (Nokland 2016): the output error sent to every layer.

    e = dL/d(output of the last Dense / Conv2D) (the logits' error for a
    Softmax network with cross-entropy), each example's flattened. Every
    Dense and Conv2D l receives e B_l at its input (the previous hidden
    layer's output), B_l fixed and random, (|e|, |x_l|), in the state; the
    layers between (activations, pooling) pass it back to the next Dense /
    Conv2D below with their own backward, and the weight gradients stay
    x^T dy and sum dy.

    Args:
        net: a flat `pn.Sequential`.
        init: B_l's initializer name (default "xavier_uniform", biotorch's).

    Returns:
        A `RuleSequential` with the same layers, params and paths.

    Raises:
        TypeError: if `net` is not a `pn.Sequential`.
        ValueError: as `feedback_alignment`.
    """
    return _build(net, "dfa", init_name=init)


def backprop(net: RuleSequential, state: PyTree = None) -> Any:
    """The plain network back (backprop), and its state without the rule's matrices.

    Args:
        net: a `RuleSequential`.
        state: its state, or None.

    Returns:
        The `pn.Sequential` the rule was built on when `state` is None; else
            (that network, its state): the same params work for both.

    Raises:
        TypeError: if `net` is not a `RuleSequential`.
    """
    if not isinstance(net, RuleSequential):
        raise TypeError(f"pn.learning_rules.backprop takes a rule network, got {type(net).__name__}")
    plain = Sequential([_core(layer).block if isinstance(_core(layer), Feedback) else layer for layer in net.layers],
                       in_shape=net.in_shape)
    if state is None:
        return plain
    return plain, tuple({} if isinstance(_core(layer), Feedback) else s for layer, s in zip(net.layers, state))

