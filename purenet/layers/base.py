"""The layer protocol, shapes, and a base for layers without parameters.

A layer is a frozen, hashable configuration with three pure methods:

    params, state, out_shape = layer.init(key, in_shape, dtype=None)
    y, state, cache          = layer.forward(params, state, x, train=False, key=None)
    dparams, dx              = layer.backward(params, cache, dy)

`in_shape` is the shape of one example (a tuple; an int n means (n,)); inputs
carry a leading batch axis. `cache` holds exactly what `backward` needs from
the forward pass, as a pytree of arrays (no Python numbers: a cache may cross
`lax.scan` or custom-VJP boundaries (see `purenet.interop`); static sizes travel as the shape
of an empty array, see `shape_token`). `backward` returns the vector-Jacobian
product: given dy = dL/dy it returns dL/dparams (same structure as params)
and dL/dx. It is linear in dy.

Two optional methods give per-example gradient information for a batch,
where example i of dy (its leading-axis slice) is the gradient of example
i's own loss:

    grads_i, dx = layer.per_example_backward(params, cache, dy)   # leading batch axis
    sq, dx      = layer.per_example_sq_norms(params, cache, dy, l2) # ||grad_i + l2 W||^2, (batch,)

Layers made of layers (Sequential, Residual, Parallel) also define
`children(params, cache=None)`: a tuple of (layer, params, cache) triples,
in forward order, that tools such as `pn.diagnostics` walk.

Gradient statistics (`pn.stats`) come from three more optional methods,
each faster or leaner than its fallback on `per_example_backward`
(layers without them still work; Dense and Conv2D have them):

    sq, dx         = layer.per_example_sq(params, cache, dy)   # sum_i grad_i**2, like params
    gram, dxa, dxb = layer.per_example_gram(params, cache_a, dy_a, cache_b, dy_b)  # (na, nb) <grad_i, grad_j>
    factors, dx    = layer.kfac_factors(params, cache, dy)     # KFACFactors(A, G); with layer.kfac_dims(params)

Containers define `map_backward(fn, params, caches, dys)` instead: the walk
of `per_example_backward` with a function `fn(layer, params, caches, dys) ->
(out, dxs)` applied at every leaf layer, for any number of streams (a tuple
of caches and a tuple of output gradients, one per batch: the Gram matrix
walks two batches at once, a walk of zero streams visits the parameters
only). It returns (outs, dxs), outs shaped like params.
"""
import dataclasses
import math
from typing import NamedTuple, Protocol, runtime_checkable

import jax.numpy as jnp


def as_shape(shape, what="in_shape"):
    """One example's shape as a tuple of positive ints; an int n means (n,)."""
    if isinstance(shape, (int,)) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        shape = tuple(shape)
    except TypeError:
        raise TypeError(f"{what} must be an int or a tuple of ints, got {shape!r}") from None
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"{what} must be a non-empty tuple of positive ints, got {shape!r}")
    return shape


def shape_token(shape):
    """An empty array whose shape after the first axis is `shape`: a static size a cache can carry."""
    return jnp.zeros((0, *shape), jnp.int8)


def token_shape(token):
    return token.shape[1:]


def id_layer(layer):
    """The layer that reads a network's input as integer ids (an Embedding first), or None.

    A layer says so with the class attribute `accepts_ids = True`; a
    Sequential takes ids when its first layer does.
    """
    if getattr(layer, "accepts_ids", False):
        return layer
    inner = getattr(layer, "layers", None)
    if isinstance(inner, tuple) and inner:
        return id_layer(inner[0])
    return None


class KFACFactors(NamedTuple):
    """K-FAC's Kronecker factors of one layer: F_W ~ A (x) G (see `pn.stats.kfac_factors`)."""

    A: jnp.ndarray  # (in + bias, in + bias): E over examples and positions of a a^T, a = [h, 1]
    G: jnp.ndarray  # (out, out): E over examples of sum over positions of dy dy^T


def map_backward(layer, fn, params, caches, dys):
    """`layer.map_backward` for containers; fn(layer, ...) at a leaf layer. Returns (outs, dxs)."""
    if hasattr(layer, "map_backward"):
        return layer.map_backward(fn, params, caches, dys)
    return fn(layer, params, caches, dys)


def per_example_sum(t):
    """Sum over the axes between the batch axis and the last one: (batch, ..., d) -> (batch, d)."""
    return jnp.sum(t, axis=tuple(range(1, t.ndim - 1))) if t.ndim > 2 else t


def wide(t):
    """`t` in at least float32: bfloat16 / float16 activations get float32 statistics and sums
    (mixed precision); float32 and float64 pass through unchanged."""
    return t.astype(jnp.promote_types(jnp.result_type(t), jnp.float32))


def positions(shape):
    """How many positions an output of this batched shape has (every axis but the last)."""
    return math.prod(shape[:-1]) if len(shape) > 1 else shape[0]


@dataclasses.dataclass(frozen=True)
class ParameterFree:
    """A layer without parameters or state.

    Subclasses define `apply(x) -> (y, cache)` and `grad(cache, dy) -> dx`,
    and `out_shape(in_shape)` when the shape changes (checking it); the
    protocol methods come from here.
    """

    def out_shape(self, in_shape):
        return in_shape

    def init(self, key, in_shape, dtype=None):
        del key, dtype
        return {}, {}, self.out_shape(as_shape(in_shape))

    def forward(self, params, state, x, train=False, key=None):
        del params, train, key
        y, cache = self.apply(x)
        return y, state, cache

    def backward(self, params, cache, dy):
        del params
        return {}, self.grad(cache, dy)

    def per_example_backward(self, params, cache, dy):
        """No parameters: the per-example gradients are empty; dx is as usual."""
        return {}, self.grad(cache, dy)

    def per_example_sq_norms(self, params, cache, dy, l2=0.0):
        """Squared norm of each example's parameter gradient (zero: none), and dx."""
        return jnp.zeros(dy.shape[:1], dy.dtype), self.grad(cache, dy)

    def apply(self, x):  # pragma: no cover - interface
        raise NotImplementedError

    def grad(self, cache, dy):  # pragma: no cover - interface
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Elementwise(ParameterFree):
    """A parameter-free layer h = g(a) applied element by element.

    Subclasses define `apply(x) -> (y, cache)` and `grad(cache, dy) -> dx`.
    """


@runtime_checkable
class Layer(Protocol):
    """What every layer is (a structural type: subclassing is not needed)."""

    def init(self, key, in_shape, dtype=None): ...

    def forward(self, params, state, x, train=False, key=None): ...

    def backward(self, params, cache, dy): ...
