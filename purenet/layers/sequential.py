"""Composition of layers, and the `mlp` builder."""
import dataclasses
from typing import Any, ClassVar, Iterable

import jax

from purenet._checks import is_concrete
from purenet.layers.activations import ACTIVATIONS, Identity, Sigmoid
from purenet.layers.base import Array, Container, PyTree, Visit, as_shape
from purenet.layers.traversal import decode, decode_init, walk
from purenet.layers.batchnorm import BatchNorm
from purenet.layers.dense import Dense
from purenet.layers.dropout import Dropout
from purenet.layers.softmax import Softmax

__all__ = ["Sequential", "mlp"]


@dataclasses.dataclass(frozen=True, init=False)
class Sequential(Container):
    """A layer made of layers applied in order: h_i = layer_i(h_{i-1}).

    params and state are tuples with one entry per layer. Backward walks the
    layers in reverse, each turning dL/dh_i into dL/dparams_i and dL/dh_{i-1}:
    the chain rule, with the sum over paths done by each layer's matrix products.
    Layer i draws its randomness from fold_in(key, i).
    `in_shape` (one example's shape; `in_dim=n` means (n,)), when given, lets
    `pn.init` omit it.

    Args:
        layers: the layers in forward order (any iterable, stored as a tuple).
        in_shape: one example's shape (an int n means (n,)), or None to pass
            it to `pn.init` instead.
        in_dim: an alias of `in_shape` for a width (keyword only);
            `in_shape` wins when both are given.

    Raises:
        ValueError: if the shape given is not a positive int or a non-empty
            tuple of positive ints (and, in `init` and `forward`, a layer's
            ValueError or TypeError, prefixed with the layer's index and type).
        TypeError: if the shape given is neither an int nor a sequence of ints.
    """

    layers: tuple
    in_shape: tuple | None
    chain: ClassVar[bool] = True  # streams pass from layer to layer untouched

    def __init__(self, layers: Iterable[Any], in_shape: Any = None, *, in_dim: int | None = None) -> None:
        shape = in_shape if in_shape is not None else in_dim
        object.__setattr__(self, "layers", tuple(layers))
        object.__setattr__(self, "in_shape", None if shape is None else as_shape(shape))

    @property
    def in_dim(self) -> int | None:
        """The width of the input's last axis, when the input shape is known."""
        return None if self.in_shape is None else self.in_shape[-1]

    def init(self, key: Array, in_shape: Any = None, dtype: Any = None) -> tuple[PyTree, PyTree, tuple[int, ...]]:
        shape = self.in_shape if in_shape is None else as_shape(in_shape)
        if shape is None:
            raise ValueError(f"{type(self).__name__}.init needs in_shape (the shape of one example, e.g. its width)")
        params, states, shapes = self._init_each(key, shape, dtype)
        return tuple(params), tuple(states), shapes[-1]

    def _init_each(self, key: Array, shape: tuple, dtype: Any) -> tuple[list, list, list]:
        """Each layer's params and state, in order, and the shapes between them (the input's first)."""
        params, states, shapes = [], [], [shape]
        for i, (layer, k) in enumerate(zip(self.layers, jax.random.split(key, max(len(self.layers), 1)))):
            try:
                p, s, shape = layer.init(k, shape, dtype=dtype)
            except (ValueError, TypeError) as e:
                _reraise_in_layer(e, i, layer)
            shapes.append(as_shape(shape, "out_shape"))
            shape = shapes[-1]
            params.append(p)
            states.append(s)
        return params, states, shapes

    def _check(self, tree, what):
        if not isinstance(tree, (tuple, list)) or len(tree) != len(self.layers):
            got = len(tree) if isinstance(tree, (tuple, list)) else type(tree).__name__
            raise ValueError(
                f"Sequential with {len(self.layers)} layers needs {what} as a tuple of "
                f"{len(self.layers)} entries, got {got}"
            )

    def forward(self, params: PyTree, state: PyTree, x: Array, train: bool = False,
                key: Array | None = None) -> tuple[Array, PyTree, PyTree]:
        self._check(params, "params")
        self._check(state, "state")
        new_state, caches = [], []
        for i, layer in enumerate(self.layers):
            k = None if key is None else jax.random.fold_in(key, i)
            try:
                x, s, c = layer.forward(params[i], state[i], x, train=train, key=k)
            except (ValueError, TypeError) as e:
                _reraise_in_layer(e, i, layer)
            new_state.append(s)
            caches.append(c)
        return x, tuple(new_state), tuple(caches)

    # ------------------------------------------------------------ the traversal

    def children(self) -> tuple:
        return self.layers

    def split(self, tree: PyTree) -> tuple:
        return tuple(tree)

    def join(self, parts: tuple | list) -> PyTree:
        return tuple(parts)

    def with_children(self, children: tuple | list) -> "Sequential":
        return Sequential(children, in_shape=self.in_shape)

    def without_output(self) -> "Sequential":
        """The chain without its last layer (a loss fused with that layer reads the logits before it)."""
        return Sequential(self.layers[:-1], in_shape=self.in_shape)

    def walk_back(self, visit: Visit, params: PyTree, caches: tuple, dys: tuple) -> tuple[PyTree, tuple]:
        """The chain rule in reverse: layer i turns dL/dh_i into its own part and dL/dh_{i-1}."""
        outs = [None] * len(self.layers)
        for i in reversed(range(len(self.layers))):
            outs[i], dys = walk(self.layers[i], visit, params[i], tuple(c[i] for c in caches), dys)
        return tuple(outs), dys

    def decode_init(self, params: PyTree, batch: int, length: int) -> PyTree:
        return tuple(decode_init(layer, p, batch, length) for layer, p in zip(self.layers, params))

    def decode(self, params: PyTree, state: PyTree, x: Array, kv: PyTree, pos: Array) -> tuple[Array, PyTree]:
        """One position through every layer in turn, each with its own part of the cache."""
        out = []
        for layer, p, s, c in zip(self.layers, params, state, kv):
            x, c = decode(layer, p, s, x, c, pos)
            out.append(c)
        return x, tuple(out)


def _reraise_in_layer(error, i, layer):
    """Raise `error` saying where it happened: a plain ValueError / TypeError gets the layer in front
    of its message; any other type (JAX's own errors have other constructors) gets it as a note."""
    where = f"layer {i} ({type(layer).__name__})"
    if type(error) in (ValueError, TypeError):
        raise type(error)(f"{where}: {error}") from error
    error.add_note(f"in {where}")
    raise error


_OUTPUT = {"softmax": Softmax, "sigmoid": Sigmoid, "identity": Identity, "linear": Identity}
# He for the relu family (zero or small below 0, linear above), Xavier for the others.
_RELU_LIKE = ("relu", "leaky_relu", "elu", "gelu", "silu", "softplus")


def mlp(sizes: Iterable[int], hidden: str = "relu", output: str = "softmax", init: str | None = None,
        dropout: float = 0.0, batchnorm: bool = False) -> Sequential:
    """A multilayer perceptron: sizes = [in_dim, hidden..., out_dim].

    Each hidden layer is Dense -> BatchNorm (if batchnorm) -> activation ->
    Dropout (if dropout > 0); the output layer is Dense -> output activation.
    A Dense followed by BatchNorm has no bias: BatchNorm subtracts the mean,
    so a bias there would do nothing (its gradient is exactly zero) and beta
    takes its place.
    `hidden` names any activation in `pn.layers.ACTIVATIONS`.
    `init=None` picks He (he_normal) for relu-type hidden units (relu, leaky
    relu, elu, gelu, silu, softplus) and Xavier (xavier_normal) for the
    others, as the lecture advises.

    Args:
        sizes: the widths [in_dim, hidden..., out_dim]: at least two positive ints.
        hidden: the hidden activation's name, a key of `pn.layers.ACTIVATIONS`
            (default "relu").
        output: the output activation: "softmax" (the default), "sigmoid",
            "identity" or "linear" (the last two are the same).
        init: the Dense layers' initializer name (`purenet.initializers`), or
            None for He or Xavier by `hidden` (see above).
        dropout: the Dropout rate after each hidden activation, in [0, 1);
            0 (the default) adds no Dropout layer.
        batchnorm: True to put a BatchNorm between each hidden Dense (then
            without a bias) and its activation.

    Returns:
        A `Sequential` that knows its input shape (sizes[0],), so
            `pn.init(net, key)` needs no shape.

    Raises:
        ValueError: if `sizes` has fewer than two entries or one that is not a
            positive int, `hidden` or `output` is unknown, `init` names no
            initializer, or `dropout` is outside [0, 1).
    """
    sizes = list(sizes)
    if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"mlp sizes must be >= 2 positive integers [in, hidden..., out], got {sizes}")
    if hidden not in ACTIVATIONS:
        raise ValueError(f"unknown hidden activation {hidden!r}; choose one of {sorted(ACTIVATIONS)}")
    if output not in _OUTPUT:
        raise ValueError(f"unknown output activation {output!r}; choose one of {sorted(_OUTPUT)}")
    init = init or ("he_normal" if hidden in _RELU_LIKE else "xavier_normal")
    layers: list[Any] = []
    for width in sizes[1:-1]:
        layers.append(Dense(width, init=init, use_bias=not batchnorm))
        if batchnorm:
            layers.append(BatchNorm())
        layers.append(ACTIVATIONS[hidden]())
        if not (is_concrete(dropout) and dropout == 0):  # a traced rate (a sweep) keeps the layer
            layers.append(Dropout(dropout))
    layers += [Dense(sizes[-1], init=init), _OUTPUT[output]()]
    return Sequential(layers, in_shape=sizes[0])
