"""The layer protocol: what a layer and a container are (the traversal is `traversal.py`, parameter
roles `roles.py`, the generic per-example defaults `defaults.py`; their names stay importable here).

A layer is a frozen, hashable configuration with three pure methods:

    params, state, out_shape = layer.init(key, in_shape, dtype=None)
    y, state, cache          = layer.forward(params, state, x, train=False, key=None)
    dparams, dx              = layer.backward(params, cache, dy)

That is all a layer must write (subclassing `Layer` is optional). `in_shape`
is one example's shape (an int n means (n,)); inputs carry a leading batch
axis. `cache` holds what `backward` needs, as a pytree; static sizes travel
as static fields (`Static`, or a dataclass registered with static fields),
never as arrays. `backward` returns the vector-Jacobian product: given
dy = dL/dy it returns dL/dparams (params' structure) and dL/dx. It is
linear in dy.

Every other feature is derived. Per-example quantities, where example i of
dy (its leading slice) is the gradient of example i's own loss:

    grads_i, dx = per_example_backward(layer, params, cache, dy)   # leaves (batch, ...)
    sq, dx      = per_example_sq_norms(layer, params, cache, dy, l2)  # ||g_i + l2 W||^2, (batch,)
    sq, dx      = per_example_sq(layer, params, cache, dy)         # sum_i g_i**2, like params
    gram, dxa, dxb = per_example_gram(layer, params, ca, dya, cb, dyb)  # (na, nb) <g_i, g_j>
    sq, dx, wsum = sq_norms_and_weighted_sum(layer, params, cache, dy)  # wsum(w) = sum_i w_i g_i

(each lives in its feature's module; the names stay importable here). A
layer that declares its structure (`purenet.layers.structure`: the products
its parameters enter, a dense product over positions, a scale-and-shift, a
lookup, a convolution) gets each of them, and K-FAC's factors, from that
feature's rule for each product kind: Dense's ghost norm, Conv2D's taps,
attention's projections. A layer that declares nothing gets the generic
default: its own `backward`, `vmap`ped over the examples of its cache and
dy (a cache leaf whose leading axis follows the batch size, as the layer's
forward traced at two batch sizes shows, is sliced per example; a leaf
whose shape does not change is shared; a layer may declare its own with
`cache_batch_axes(cache, n)`). A layer may also define a feature's method
itself, which comes first. The test suite proves every rule and method
equal to the generic default. W in `l2 W` is every parameter whose role is
"weight" (see roles below), so the rules apply l2 to those.

The Hessian's diagonal (`pn.stats.hessian_diagonal`) needs each layer's
second-order term, which three methods cannot reveal, so a layer declares
it: `piecewise_linear = True` (the output is linear in each parameter and
piecewise linear in the input: Dense, convolutions, pooling, ReLU, ...), or
`second_derivative(cache) -> g''(a)` for an elementwise h = g(a) (Sigmoid,
Tanh, GELU, ...).

Containers (`Container`) are layers made of layers. They declare their
children once:

    children()                    the child layers, in forward order
    split(tree) / join(parts)     params-shaped trees (params, state, grads) per child and back
    walk_back(visit, params, caches, dys) -> (outs, dxs)

`walk_back` is the container's backward with a visitor at each leaf layer,
for any number of streams (a tuple of caches and of output gradients, one
per batch: the Gram matrix walks two batches at once). `backward`, the
per-example functions, the statistics, K-FAC, diagnostics, freezing,
remat and roles are all derived from these; no feature writes its own
walk into a container.

Roles: a layer declares what each parameter is with a class attribute
`roles = {"W": "weight", "b": "bias"}` (or a method `param_roles(params)`
returning a tree of role names like params). Roles are "weight" (a matrix
that multiplies inputs: l2, weight decay and K-FAC read this), "bias",
"gain", "embedding" (a lookup table: not decayed by default), and "other".
A parameter without a declared role is a "weight" when its rank is >= 2
and "other" below.

Tensor parallelism (`pn.distributed`, strategy "tensor"): a layer may say
how its parameters split over the mesh's "model" axis with the optional
method `tensor_split(params, split_in) -> (axes, split_out)` (see
`purenet.distributed.strategies`); `feature_split` is the rule of layers
whose W maps the input's last axis to the output's (Dense, convolutions).
"""
import dataclasses
import math
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

__all__ = [
    "Array", "Container", "DECAYED", "Elementwise", "KFACBlocks", "KFACFactors", "Layer", "LayerLike", "Leaf", "PLAIN",
    "ParameterFree", "PyTree", "ROLES", "Static", "Visit", "as_shape", "cache_batch_axes", "decay_mask", "decode", "decode_init",
    "frozen_input_grads", "generic_per_example_backward", "generic_per_example_sq_norms", "has_params", "id_layer",
    "is_container", "kfac_eligible", "kfac_key", "kfac_pair", "layer_roles", "leaves", "map_leaves", "output_kind", "per_example_backward",
    "per_example_gram", "per_example_sq", "per_example_sq_columns", "per_example_sq_norms", "per_example_sum",
    "positions", "roles", "scale_rows", "sq_norms_and_weighted_sum", "sum_leaves", "Wrapper", "feature_split",
    "map_in_walk_order", "walk", "walk_leaves", "wide", "zeros_like_tree",
]

Array = jax.Array
PyTree = Any



def as_shape(shape: Any, what: str = "in_shape") -> tuple[int, ...]:
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


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Static:
    """A hashable value carried in a cache as static data (no array leaves): a size, a flag.

    Registered as a pytree with no leaves, so `jit`, `vmap` and `tree_map`
    pass it through as part of the tree's structure.

    Args:
        value: the value (hashable: an int, a tuple of ints, a string, a bool).
    """

    value: Any


class KFACFactors(NamedTuple):
    """K-FAC's Kronecker factors of one layer: F_W ~ A (x) G (see `pn.stats.kfac_factors`).

    Attributes:
        A: the input factor, (in + 1, in + 1) with a bias, else (in, in): the
            mean over examples and positions of `a a^T`, a = [h, 1].
        G: the output-gradient factor, (out, out): the mean over examples of
            the sum over positions of `dy dy^T`.
    """

    A: Array
    G: Array


class KFACBlocks(NamedTuple):
    """K-FAC's factors of a layer with several weight matrices (attention's Wq, Wk, Wv, Wo).

    factors[key] = KFACFactors(A, G), keyed "W" for a weight without a bias or "W|b" for weight W
    with its bias b: the layer declares the pairing (`kfac_key`), the preconditioner reads it.

    Attributes:
        factors: {key: KFACFactors} with one entry per weight matrix, keyed as
            `kfac_key(weight, bias)` gives ("Wo", or "Wq|bq" with a bias).
    """

    factors: dict


def kfac_key(weight: str, bias: str | None = None) -> str:
    """The KFACBlocks key of a weight and its bias ("Wq|bq"), and back with `kfac_pair`."""
    return weight if bias is None else f"{weight}|{bias}"


def kfac_pair(key: str) -> tuple[str, list[str]]:
    """(weight, [bias] or []) from a KFACBlocks key."""
    weight, *bias = key.split("|")
    return weight, bias



def per_example_sum(t: Array) -> Array:
    """Sum over the axes between the batch axis and the last one: (batch, ..., d) -> (batch, d)."""
    return jnp.sum(t, axis=tuple(range(1, t.ndim - 1))) if t.ndim > 2 else t


def wide(t: Array) -> Array:
    """`t` in at least float32: bfloat16 / float16 activations get float32 statistics and sums
    (mixed precision); float32 and float64 pass through unchanged."""
    return t.astype(jnp.promote_types(jnp.result_type(t), jnp.float32))


def positions(shape: tuple[int, ...]) -> int:
    """How many positions an output of this batched shape has (every axis but the last)."""
    return math.prod(shape[:-1]) if len(shape) > 1 else shape[0]


# ---------------------------------------------------------------- the protocol


@runtime_checkable
class LayerLike(Protocol):
    """What every layer is (a structural type: subclassing `Layer` is not needed)."""

    def init(self, key: Array, in_shape: Any, dtype: Any = None) -> tuple[PyTree, PyTree, tuple[int, ...]]: ...

    def forward(self, params: PyTree, state: PyTree, x: Array, train: bool = False,
                key: Array | None = None) -> tuple[Array, PyTree, PyTree]: ...

    def backward(self, params: PyTree, cache: PyTree, dy: Array) -> tuple[PyTree, Array | None]: ...


class Layer:
    """An optional base for layers: the three methods to write, and the class attributes read.

    `roles` maps parameter names to roles (see the module docstring);
    `accepts_ids = True` marks a layer that reads integer ids (an Embedding);
    `positionwise = True` one that acts on each position of a sequence on its
    own (Dense, activations, norms), so it decodes one token at a time as it is.
    """

    roles: ClassVar[Mapping[str, str]] = {}
    accepts_ids: ClassVar[bool] = False
    positionwise: ClassVar[bool] = False

    def init(self, key: Array, in_shape: Any, dtype: Any = None) -> tuple[PyTree, PyTree, tuple[int, ...]]:
        raise NotImplementedError(f"{type(self).__name__} must define init(key, in_shape, dtype=None)")

    def forward(self, params: PyTree, state: PyTree, x: Array, train: bool = False,
                key: Array | None = None) -> tuple[Array, PyTree, PyTree]:
        raise NotImplementedError(f"{type(self).__name__} must define forward(params, state, x, train, key)")

    def backward(self, params: PyTree, cache: PyTree, dy: Array) -> tuple[PyTree, Array | None]:
        raise NotImplementedError(f"{type(self).__name__} must define backward(params, cache, dy)")


class Visit(NamedTuple):
    """What a walk does at each leaf layer, for `n` streams.

    leaf(layer, params, caches, dys) -> (out, dxs): the leaf's contribution and its input gradients.
    frozen(params, dys) -> out: the contribution of a frozen subtree (no gradient: zeros or None);
        None for a visitor that only reads caches, which then sees frozen layers like any other.
    shaped: True when outs are shaped like params (gradients), so containers `join` them;
        otherwise each container returns a tuple of its children's outs (`parts` takes it apart).
    tap(path, record) -> None: called by the taps `pn.capture` places (`purenet.analysis.capture.Tap`)
        with each recorded layer's `pn.Record`; None (the default) for every other walk.
    """

    leaf: Callable[..., tuple[Any, tuple]]
    frozen: Callable[..., Any] | None
    shaped: bool = True
    tap: Callable[..., None] | None = None


class Container(Layer):
    """A layer made of layers: declares its children once; every feature walks them.

    Subclasses define `children()`, `split(tree)`, `join(parts)`, `init`,
    `forward` and `walk_back(visit, params, caches, dys)`; `backward` is derived.
    `freezes = True` (Frozen) marks a container whose parameters never train.
    """

    freezes: ClassVar[bool] = False
    # walk_back hands each stream from child to child untouched (a chain): walks whose streams are
    # not arrays (pn.stats.hessian_diagonal's growing columns) run only through such containers
    chain: ClassVar[bool] = False

    def children(self) -> tuple:
        raise NotImplementedError

    def split(self, tree: PyTree) -> tuple:
        raise NotImplementedError

    def join(self, parts: tuple | list) -> PyTree:
        raise NotImplementedError

    def parts(self, outs: Any) -> tuple:
        """The children's outs from an unshaped walk's outs (as `split` does for shaped ones)."""
        return self.split(outs)

    def input_children(self) -> tuple:
        """The children that read the container's input (the first, for a chain)."""
        return self.children()[:1]

    def output_child(self) -> Any:
        """The child whose output is the container's output (the last, for a chain; None when
        the output mixes several, as Parallel's merge does)."""
        kids = self.children()
        return kids[-1] if kids else None

    def walk_back(self, visit: Visit, params: PyTree, caches: tuple, dys: tuple) -> tuple[PyTree, tuple]:
        raise NotImplementedError

    def with_children(self, children: tuple | list) -> "Container":
        """The same container with `children` in place of its own, wired the same way (the children
        take the same params and state): how `pn.capture` and `pn.hooked` place their taps."""
        raise NotImplementedError(f"{type(self).__name__} does not define with_children(children), so the "
                                  f"layers inside it cannot be captured or hooked; define it (return the same "
                                  f"container built around `children`)")

    def backward(self, params: PyTree, cache: PyTree, dy: Array) -> tuple[PyTree, Array | None]:
        grads, (dx,) = self.walk_back(PLAIN, params, (cache,), (dy,))
        return grads, dx


class Wrapper(Container):
    """A container of one child, `self.block`, whose params and state are the block's own."""

    block: Any

    def children(self) -> tuple:
        return (self.block,)

    def split(self, tree: PyTree) -> tuple:
        return (tree,)

    def join(self, parts: tuple | list) -> PyTree:
        return parts[0]

    def with_children(self, children: tuple | list) -> "Wrapper":
        (block,) = children
        return dataclasses.replace(self, block=block)  # type: ignore[type-var]  # subclasses are dataclasses

    def decode_init(self, params: PyTree, batch: int, length: int) -> PyTree:
        return decode_init(self.block, params, batch, length)

    def decode(self, params: PyTree, state: PyTree, x: Array, kv: PyTree, pos: Array) -> tuple[Array, PyTree]:
        return decode(self.block, params, state, x, kv, pos)


# ---------------------------------------------------------------- layers without parameters


@dataclasses.dataclass(frozen=True)
class ParameterFree(Layer):
    """A layer without parameters or state.

    Subclasses define `apply(x) -> (y, cache)` and `grad(cache, dy) -> dx`,
    and `out_shape(in_shape)` when the shape changes (checking it); the
    protocol methods come from here.
    """

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return in_shape

    def init(self, key: Array, in_shape: Any, dtype: Any = None) -> tuple[PyTree, PyTree, tuple[int, ...]]:
        del key, dtype
        return {}, {}, self.out_shape(as_shape(in_shape))

    def forward(self, params: PyTree, state: PyTree, x: Array, train: bool = False,
                key: Array | None = None) -> tuple[Array, PyTree, PyTree]:
        del params, train, key
        y, cache = self.apply(x)
        return y, state, cache

    def backward(self, params: PyTree, cache: PyTree, dy: Array) -> tuple[PyTree, Array | None]:
        del params
        return {}, self.grad(cache, dy)

    def apply(self, x: Array) -> tuple[Array, PyTree]:  # pragma: no cover - interface
        raise NotImplementedError

    def grad(self, cache: PyTree, dy: Array) -> Array:  # pragma: no cover - interface
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Elementwise(ParameterFree):
    """A parameter-free layer h = g(a) applied element by element.

    Subclasses define `apply(x) -> (y, cache)` and `grad(cache, dy) -> dx`.
    """

    positionwise: ClassVar[bool] = True


# The traversal, roles and generic defaults live in their own modules; their names stay importable from here
# (and Container's methods call them through these names).
from purenet.layers.traversal import (PLAIN, Leaf, decode, decode_init, frozen_input_grads, is_container,  # noqa: E402
                                      leaves, map_in_walk_order, map_leaves, walk, walk_leaves, zeros_like_tree)
from purenet.layers.roles import DECAYED, ROLES, decay_mask, id_layer, layer_roles, output_kind, roles  # noqa: E402
from purenet.layers.defaults import (cache_batch_axes, feature_split, generic_per_example_backward,  # noqa: E402
                                     generic_per_example_sq_norms, has_params, scale_rows, sum_leaves)

# Each per-example feature lives with its rules per product kind, in that feature's module (above the
# kernel, so imported when first asked for); the names stay importable from here.
_FEATURES = {
    "per_example_backward": "purenet.analysis.per_example", "per_example_sq_norms": "purenet.analysis.per_example",
    "sq_norms_and_weighted_sum": "purenet.privacy.clipping", "per_example_sq": "purenet.analysis.stats",
    "per_example_sq_columns": "purenet.analysis.stats", "per_example_gram": "purenet.analysis.stats",
    "kfac_eligible": "purenet.analysis.kfac",
}


def __getattr__(name: str) -> Any:
    if name in _FEATURES:
        import importlib
        return getattr(importlib.import_module(_FEATURES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
