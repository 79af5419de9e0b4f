"""Composition of layers, and the `mlp` builder."""
import dataclasses

import jax
import jax.numpy as jnp

from purenet._checks import is_concrete
from purenet.layers.activations import Identity, LeakyReLU, ReLU, Sigmoid, Tanh
from purenet.layers.batchnorm import BatchNorm
from purenet.layers.dense import Dense
from purenet.layers.dropout import Dropout
from purenet.layers.softmax import Softmax


@dataclasses.dataclass(frozen=True, init=False)
class Sequential:
    """A layer made of layers applied in order: h_i = layer_i(h_{i-1}).

    params and state are tuples with one entry per layer. Backward walks the
    layers in reverse, each turning dL/dh_i into dL/dparams_i and dL/dh_{i-1}:
    the chain rule, with the sum over paths done by each layer's matrix products.
    Layer i draws its randomness from fold_in(key, i).
    `in_dim`, when given, lets `pn.init` omit the input width.
    """

    layers: tuple
    in_dim: int | None

    def __init__(self, layers, in_dim=None):
        object.__setattr__(self, "layers", tuple(layers))
        object.__setattr__(self, "in_dim", in_dim)

    def init(self, key, in_dim=None, dtype=None):
        dim = self.in_dim if in_dim is None else in_dim
        if dim is None:
            raise ValueError("Sequential.init needs in_dim (the width of the input rows)")
        params, states = [], []
        for layer, k in zip(self.layers, jax.random.split(key, max(len(self.layers), 1))):
            p, s, dim = layer.init(k, dim, dtype=dtype)
            params.append(p)
            states.append(s)
        return tuple(params), tuple(states), dim

    def _check(self, tree, what):
        if not isinstance(tree, (tuple, list)) or len(tree) != len(self.layers):
            got = len(tree) if isinstance(tree, (tuple, list)) else type(tree).__name__
            raise ValueError(
                f"Sequential with {len(self.layers)} layers needs {what} as a tuple of "
                f"{len(self.layers)} entries, got {got}"
            )

    def forward(self, params, state, x, train=False, key=None):
        self._check(params, "params")
        self._check(state, "state")
        new_state, caches = [], []
        for i, layer in enumerate(self.layers):
            k = None if key is None else jax.random.fold_in(key, i)
            try:
                x, s, c = layer.forward(params[i], state[i], x, train=train, key=k)
            except (ValueError, TypeError) as e:
                raise type(e)(f"layer {i} ({type(layer).__name__}): {e}") from e
            new_state.append(s)
            caches.append(c)
        return x, tuple(new_state), tuple(caches)

    def backward(self, params, cache, dy):
        grads = [None] * len(self.layers)
        for i in reversed(range(len(self.layers))):
            grads[i], dy = self.layers[i].backward(params[i], cache[i], dy)
        return tuple(grads), dy

    def per_example_backward(self, params, cache, dy):
        grads = [None] * len(self.layers)
        for i in reversed(range(len(self.layers))):
            grads[i], dy = self.layers[i].per_example_backward(params[i], cache[i], dy)
        return tuple(grads), dy

    def per_example_sq_norms(self, params, cache, dy, l2=0.0):
        total = jnp.zeros(dy.shape[:1], dy.dtype)
        for i in reversed(range(len(self.layers))):
            sq, dy = self.layers[i].per_example_sq_norms(params[i], cache[i], dy, l2)
            total = total + sq
        return total, dy


_HIDDEN = {
    "relu": ReLU, "leaky_relu": LeakyReLU, "tanh": Tanh,
    "sigmoid": Sigmoid, "identity": Identity, "linear": Identity,
}
_OUTPUT = {"softmax": Softmax, "sigmoid": Sigmoid, "identity": Identity, "linear": Identity}
_DEFAULT_INIT = {"relu": "he_normal", "leaky_relu": "he_normal"}  # others: Xavier


def mlp(sizes, hidden="relu", output="softmax", init=None, dropout=0.0, batchnorm=False):
    """A multilayer perceptron: sizes = [in_dim, hidden..., out_dim].

    Each hidden layer is Dense -> BatchNorm (if batchnorm) -> activation ->
    Dropout (if dropout > 0); the output layer is Dense -> output activation.
    A Dense followed by BatchNorm has no bias: BatchNorm subtracts the mean,
    so a bias there would do nothing (its gradient is exactly zero) and beta
    takes its place.
    `init=None` picks He (he_normal) for relu-type hidden units and Xavier
    (xavier_normal) for the others, as the lecture advises.
    """
    sizes = list(sizes)
    if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"mlp sizes must be >= 2 positive integers [in, hidden..., out], got {sizes}")
    if hidden not in _HIDDEN:
        raise ValueError(f"unknown hidden activation {hidden!r}; choose one of {sorted(_HIDDEN)}")
    if output not in _OUTPUT:
        raise ValueError(f"unknown output activation {output!r}; choose one of {sorted(_OUTPUT)}")
    init = init or _DEFAULT_INIT.get(hidden, "xavier_normal")
    layers = []
    for width in sizes[1:-1]:
        layers.append(Dense(width, init=init, use_bias=not batchnorm))
        if batchnorm:
            layers.append(BatchNorm())
        layers.append(_HIDDEN[hidden]())
        if not (is_concrete(dropout) and dropout == 0):  # a traced rate (a sweep) keeps the layer
            layers.append(Dropout(dropout))
    layers += [Dense(sizes[-1], init=init), _OUTPUT[output]()]
    return Sequential(layers, in_dim=sizes[0])
