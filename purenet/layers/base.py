"""The layer protocol, the one traversal, parameter roles, and the generic per-example defaults.

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

Each calls the layer's method of that name when it has one (a fast path:
Dense's ghost norm, Conv2D's taps, ...), and otherwise the generic
default: the layer's own `backward`, `vmap`ped over the examples of its
cache and dy (a cache leaf whose leading axis follows the batch size, as
the layer's forward traced at two batch sizes shows, is sliced per
example; a leaf whose shape does not change is shared; a layer may
declare its own with `cache_batch_axes(cache, n)`). The test suite proves every fast path equal
to the generic default. W in `l2 W` is every parameter whose role is
"weight" (see roles below), so a fast path applies l2 to those.

K-FAC reads `kfac_factors(params, cache, dy) -> (KFACFactors, dx)` and
`kfac_dims(params) -> (dim A, dim G)` where a layer has them (Dense, Conv2D);
a layer with several weight matrices returns `KFACBlocks` of them (and of
the dims: attention's four projections). Curvature
(`purenet.analysis.curvature`) runs the same functions once per cotangent column,
inside a `vmap` that sums over the columns (`per_example_sq_columns`).

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
from typing import Any, Callable, ClassVar, Iterator, Mapping, NamedTuple, Protocol, runtime_checkable

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

ROLES = ("weight", "bias", "gain", "embedding", "other")
# The roles the l2 penalty and the default weight-decay mask cover.
DECAYED = ("weight",)


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
    """A hashable value carried in a cache as static data (no array leaves): a size, a flag."""

    value: Any


class KFACFactors(NamedTuple):
    """K-FAC's Kronecker factors of one layer: F_W ~ A (x) G (see `pn.stats.kfac_factors`)."""

    A: Array  # (in + bias, in + bias): E over examples and positions of a a^T, a = [h, 1]
    G: Array  # (out, out): E over examples of sum over positions of dy dy^T


class KFACBlocks(NamedTuple):
    """K-FAC's factors of a layer with several weight matrices (attention's Wq, Wk, Wv, Wo):
    factors[key] = KFACFactors(A, G), keyed "W" for a weight without a bias or "W|b" for weight W
    with its bias b: the layer declares the pairing (`kfac_key`), the preconditioner reads it."""

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
    """

    leaf: Callable[..., tuple[Any, tuple]]
    frozen: Callable[..., Any] | None
    shaped: bool = True


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

    def decode_init(self, params: PyTree, batch: int, length: int) -> PyTree:
        return decode_init(self.block, params, batch, length)

    def decode(self, params: PyTree, state: PyTree, x: Array, kv: PyTree, pos: Array) -> tuple[Array, PyTree]:
        return decode(self.block, params, state, x, kv, pos)


# ---------------------------------------------------------------- decoding one position at a time


def decode_init(layer: Any, params: PyTree, batch: int, length: int) -> PyTree:
    """A layer's empty decoding cache for `length` positions (its `decode_init`; () when position-wise).

    Decoding runs a causal sequence model one position at a time (`pn.generate(cache=True)`):

        kv = decode_init(layer, params, batch, length)
        y, kv = decode(layer, params, state, x, kv, pos)      # x: (batch, 1, ...), the position `pos`

    y equals the forward's output at `pos` on the whole sequence. Attention
    keeps its keys and values (a KV cache); positional layers read `pos`;
    containers decode their children; a `positionwise` layer runs its forward.
    """
    if hasattr(layer, "decode_init"):
        return layer.decode_init(params, batch, length)
    if getattr(layer, "positionwise", False):
        return ()
    raise ValueError(f"{layer} cannot decode one position at a time (pn.generate(cache=True)): it is not "
                     f"marked positionwise and has no decode_init / decode methods; use cache=False")


def decode(layer: Any, params: PyTree, state: PyTree, x: Array, kv: PyTree, pos: Array) -> tuple[Array, PyTree]:
    """One position through `layer` (see `decode_init`): (y, the updated cache)."""
    if hasattr(layer, "decode"):
        return layer.decode(params, state, x, kv, pos)
    y, _, _ = layer.forward(params, state, x, train=False)
    return y, kv


def is_container(layer: Any) -> bool:
    return hasattr(layer, "walk_back")


def walk(layer: Any, visit: Visit, params: PyTree, caches: tuple, dys: tuple) -> tuple[PyTree, tuple]:
    """The one traversal: `visit` at every leaf layer, containers wiring the gradients between them."""
    if is_container(layer):
        return layer.walk_back(visit, params, caches, dys)
    return visit.leaf(layer, params, caches, dys)


def _plain_leaf(layer: Any, params: PyTree, caches: tuple, dys: tuple) -> tuple[PyTree, tuple]:
    outs = [layer.backward(params, c, d) for c, d in zip(caches, dys)]
    if len(outs) == 1:
        return outs[0][0], (outs[0][1],)
    return None, tuple(dx for _, dx in outs)


def zeros_like_tree(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.zeros_like, tree)


PLAIN = Visit(_plain_leaf, lambda params, dys: zeros_like_tree(params))


def map_in_walk_order(net: Any, fn: Callable[[Any, PyTree], PyTree], params: PyTree,
                      frozen: Callable[[PyTree], PyTree] | None = None) -> PyTree:
    """A params-shaped tree of fn(layer, params) per leaf layer, called in the order a backward walk
    visits the leaves (so a list recorded during a walk can be consumed in step); `frozen(params)`
    stands for a Frozen subtree, which a walk does not enter (default: None)."""
    visit = Visit(lambda layer, p, caches, dys: (fn(layer, p), ()),
                  lambda p, dys: None if frozen is None else frozen(p))
    return walk(net, visit, params, (), ())[0]


def frozen_input_grads(block: Any, params: PyTree, caches: tuple, dys: tuple) -> tuple:
    """dL/dx through a frozen block, stream by stream (its parameter gradients are never formed)."""
    return tuple(block.backward(params, c, d)[1] for c, d in zip(caches, dys))


# ---------------------------------------------------------------- leaves, roles, ids


class Leaf(NamedTuple):
    """A leaf layer of a network, as the traversal finds it."""

    path: tuple        # child indices from the root
    layer: Any
    params: PyTree
    frozen: bool       # inside a Frozen container


def leaves(net: Any, params: PyTree, frozen: bool = False, path: tuple = ()) -> Iterator[Leaf]:
    """Every leaf layer in forward order, with its params (any params-shaped tree works: grads too)."""
    if not is_container(net):
        yield Leaf(path, net, params, frozen)
        return
    frozen = frozen or net.freezes
    for i, (child, sub) in enumerate(zip(net.children(), net.split(params))):
        yield from leaves(child, sub, frozen, path + (i,))


def map_leaves(net: Any, fn: Callable[[Any, PyTree, bool], PyTree], params: PyTree, frozen: bool = False) -> PyTree:
    """A params-shaped tree with fn(layer, params, frozen) in place of each leaf layer's params."""
    if not is_container(net):
        return fn(net, params, frozen)
    frozen = frozen or net.freezes
    return net.join([map_leaves(c, fn, p, frozen) for c, p in zip(net.children(), net.split(params))])


def walk_leaves(net: Any, outs: Any) -> list:
    """The leaf outs of an unshaped walk, in forward order (the containers' `parts`)."""
    if not is_container(net):
        return [outs]
    return [o for child, part in zip(net.children(), net.parts(outs)) for o in walk_leaves(child, part)]


def _default_role(value: Any) -> str:
    return "weight" if jnp.ndim(value) >= 2 else "other"


def layer_roles(layer: Any, params: PyTree) -> PyTree:
    """The role of each of one leaf layer's parameters, a tree of strings like params."""
    if hasattr(layer, "param_roles"):
        return layer.param_roles(params)
    declared = getattr(layer, "roles", {}) or {}
    if isinstance(params, dict):
        return {k: declared[k] if k in declared else jax.tree_util.tree_map(_default_role, v)
                for k, v in params.items()}
    return jax.tree_util.tree_map(_default_role, params)


def roles(net: Any, params: PyTree) -> PyTree:
    """Every parameter's role ("weight", "bias", "gain", "embedding", "other"), a tree like params."""
    return map_leaves(net, lambda layer, p, frozen: layer_roles(layer, p), params)


def decay_mask(net: Any, params: PyTree, decayed: tuple[str, ...] = DECAYED) -> PyTree:
    """True where a parameter is trainable and its role is in `decayed` (default: weight matrices).

    The mask `l2` uses, and the default for weight decay
    (`pn.optim.add_decayed_weights(..., mask=pn.decay_mask(net, params))`).
    Frozen parameters are never decayed.
    """
    def leaf(layer: Any, p: PyTree, frozen: bool) -> PyTree:
        return jax.tree_util.tree_map(lambda r: (not frozen) and r in decayed, layer_roles(layer, p))
    return map_leaves(net, leaf, params)


def id_layer(layer: Any) -> Any:
    """The layer that reads a network's input as integer ids (an Embedding first), or None.

    A layer says so with the class attribute `accepts_ids = True`; a container
    takes ids when a child that reads its input does (any wrapper, any depth).
    """
    if getattr(layer, "accepts_ids", False):
        return layer
    if is_container(layer):
        for child in layer.input_children():
            found = id_layer(child)
            if found is not None:
                return found
    return None


def output_kind(net: Any) -> str:
    """What a network outputs: "probabilities" (it ends in Softmax), "logits" (GPT), or "values".

    A layer says so with the class attribute `outputs`; a container outputs
    what its output child does (through any wrapper, any depth).
    """
    while getattr(net, "outputs", None) is None and is_container(net) and net.output_child() is not None:
        net = net.output_child()
    return getattr(net, "outputs", None) or "values"


# ---------------------------------------------------------------- generic per-example defaults


def _batch_size(dy: PyTree) -> int:
    return jax.tree_util.tree_leaves(dy)[0].shape[0]


def has_params(params: PyTree) -> bool:
    return bool(jax.tree_util.tree_leaves(params))


def cache_batch_axes(layer: Any, cache: PyTree, n: int, params: PyTree = None, dy: PyTree = None) -> list:
    """Per cache leaf: 0 when it carries the batch axis first, None when it is shared by all examples.

    The layer's own `cache_batch_axes(cache, n)` when it has one. Otherwise the forward says: given
    `params` and `dy`, the input's shape is that of the backward's dx, and the layer's cache is traced
    (`jax.eval_shape`, nothing computed) at batch sizes n and n + 1. A leaf whose leading axis follows
    the batch is batched; one whose shape does not change is shared (a cached parameter, even one
    with n rows); any other (a cache of n * T rows) cannot be sliced per example and is an error
    that asks the layer to declare its axes. Where the forward cannot be traced (no dx, an init
    that needs values), a leaf with n leading rows is batched, unless a parameter has its very
    shape: that is ambiguous, and an error too.
    """
    if hasattr(layer, "cache_batch_axes"):
        return list(layer.cache_batch_axes(cache, n))
    shapes = [jnp.shape(leaf) for leaf in jax.tree_util.tree_leaves(cache)]
    grown = None if params is None or dy is None else _cache_shapes_at(layer, params, cache, dy, n + 1)
    if grown is None:
        owned = {jnp.shape(p) for p in jax.tree_util.tree_leaves(params)}
        for shape in shapes:
            if len(shape) >= 1 and shape[0] == n and shape in owned:
                raise ValueError(_undeclared(layer, shape, n, "a parameter has the same shape"))
        return [0 if len(shape) >= 1 and shape[0] == n else None for shape in shapes]
    axes: list[int | None] = []
    for shape, other in zip(shapes, grown):
        if len(shape) >= 1 and shape[0] == n and other == (n + 1,) + shape[1:]:
            axes.append(0)
        elif shape == other:
            axes.append(None)
        else:
            raise ValueError(_undeclared(layer, shape, n, f"it has shape {other} for a batch of {n + 1}"))
    return axes


def _undeclared(layer: Any, shape: tuple, n: int, why: str) -> str:
    return (f"{type(layer).__name__}'s cache has a leaf of shape {shape} at a batch of {n} examples, and "
            f"{why}: the per-example path cannot tell whether it holds one row per example. Define "
            f"cache_batch_axes(self, cache, n) on the layer, returning per cache leaf 0 (batch axis first) "
            f"or None (shared by all examples), or give it a per_example_backward")


def _cache_shapes_at(layer: Any, params: PyTree, cache: PyTree, dy: PyTree, m: int) -> list | None:
    """The shapes of the layer's cache leaves for a batch of m examples (traced, nothing computed), or
    None where the forward cannot be traced from what the backward has, or does not reproduce `cache`."""
    def shaped(t: Any) -> Any:
        return jax.ShapeDtypeStruct(jnp.shape(t), jnp.result_type(t))

    try:
        dx = jax.eval_shape(lambda: layer.backward(params, cache, dy)[1])
        if not isinstance(dx, jax.ShapeDtypeStruct) or len(dx.shape) < 1:
            return None
        in_shape, n = dx.shape[1:], dx.shape[0]
        state = jax.eval_shape(lambda: layer.init(jax.random.key(0), in_shape, dx.dtype)[1])
        p = jax.tree_util.tree_map(shaped, params)
        actual = jax.tree_util.tree_structure(cache), [jnp.shape(t) for t in jax.tree_util.tree_leaves(cache)]
        for train in (True, False):
            def cache_of(batch: int) -> Any:
                x = jax.ShapeDtypeStruct((batch, *in_shape), dx.dtype)
                return jax.eval_shape(lambda p, s, x: layer.forward(p, s, x, train=train, key=jax.random.key(0))[2],
                                      p, state, x)
            at_n = cache_of(n)
            if (jax.tree_util.tree_structure(at_n), [t.shape for t in jax.tree_util.tree_leaves(at_n)]) == actual:
                return [t.shape for t in jax.tree_util.tree_leaves(cache_of(m))]
    except Exception:  # noqa: BLE001 - a forward that needs values or other inputs: the fallback decides
        return None
    return None


def generic_per_example_backward(layer: Any, params: PyTree, cache: PyTree, dy: PyTree) -> tuple[PyTree, Any]:
    """Each example's gradients by the layer's own backward, vmapped over the examples.

    Example i's backward sees its slice of every batched cache leaf and of dy,
    with a batch axis of one, and the shared leaves whole. The batch's dx is
    the examples' dx rows (a layer that mixes examples, like BatchNorm in
    training, must not use this path).
    """
    n = _batch_size(dy)
    leaves_, treedef = jax.tree_util.tree_flatten(cache)
    axes = cache_batch_axes(layer, cache, n, params, dy)

    def one(batched: list, dy_i: PyTree) -> tuple[PyTree, Any]:
        it = iter(batched)
        full = [next(it)[None] if ax == 0 else leaf for leaf, ax in zip(leaves_, axes)]
        g, dx = layer.backward(params, jax.tree_util.tree_unflatten(treedef, full),
                               jax.tree_util.tree_map(lambda t: t[None], dy_i))
        return g, jax.tree_util.tree_map(lambda t: t[0], dx)

    batched = [leaf for leaf, ax in zip(leaves_, axes) if ax == 0]
    return jax.vmap(one)(batched, dy)


def per_example_backward(layer: Any, params: PyTree, cache: PyTree, dy: PyTree) -> tuple[PyTree, Any]:
    """(grads with a leading batch axis, dx): the layer's fast path, or the generic default."""
    if hasattr(layer, "per_example_backward"):
        return layer.per_example_backward(params, cache, dy)
    if not has_params(params):
        return params, layer.backward(params, cache, dy)[1]
    return generic_per_example_backward(layer, params, cache, dy)


def sum_leaves(tree: PyTree, zero: Array) -> Array:
    total = zero
    for leaf in jax.tree_util.tree_leaves(tree):
        total = total + leaf
    return total


def _rows_sq(g: Array) -> Array:
    return jnp.sum(jnp.reshape(g * g, (g.shape[0], -1)), axis=-1)


def generic_per_example_sq_norms(layer: Any, params: PyTree, cache: PyTree, dy: PyTree,
                                 l2: Any = 0.0) -> tuple[Array, Any]:
    """||g_i + l2 W||^2 from the per-example gradients (W: the layer's weight-role parameters)."""
    grads, dx = per_example_backward(layer, params, cache, dy)
    n = _batch_size(dy)
    zero = jnp.zeros((n,), jax.tree_util.tree_leaves(dy)[0].dtype)
    if not has_params(params):
        return zero, dx
    if not (isinstance(l2, (int, float)) and l2 == 0):
        mask = jax.tree_util.tree_map(lambda r: r in DECAYED, layer_roles(layer, params))
        grads = jax.tree_util.tree_map(lambda g, p, m: g + l2 * p if m else g, grads, params, mask)
    return sum_leaves(jax.tree_util.tree_map(_rows_sq, grads), zero), dx


def per_example_sq_norms(layer: Any, params: PyTree, cache: PyTree, dy: PyTree,
                         l2: Any = 0.0) -> tuple[Array, Any]:
    """(||g_i + l2 W||^2 per example, dx): the layer's fast path, or from per-example gradients."""
    if hasattr(layer, "per_example_sq_norms"):
        return layer.per_example_sq_norms(params, cache, dy, l2)
    return generic_per_example_sq_norms(layer, params, cache, dy, l2)


def scale_rows(w: Array, t: PyTree) -> PyTree:
    """Each array of t with row i (its leading slice) multiplied by w_i."""
    return jax.tree_util.tree_map(lambda a: a * w.reshape((-1,) + (1,) * (a.ndim - 1)).astype(a.dtype), t)


def sq_norms_and_weighted_sum(layer: Any, params: PyTree, cache: PyTree,
                              dy: PyTree) -> tuple[Array, Any, Callable[[Array], PyTree]]:
    """(||g_i||^2 per example, dx, w -> sum_i w_i g_i): the pieces of one-pass clipping.

    g_i is linear in example i's rows of dy, so sum_i w_i g_i is the
    parameter gradient of the rescaled rows w_i dy_i: by default the layer's
    backward of them. A layer whose backward first maps dy to an inner
    gradient (attention's dL/d[q k v], a recurrent layer's gate gradients)
    says so with its own `sq_norms_and_weighted_sum`, which rescales that
    inner gradient instead of running its backward twice.
    """
    if hasattr(layer, "sq_norms_and_weighted_sum"):
        return layer.sq_norms_and_weighted_sum(params, cache, dy)
    sq, dx = per_example_sq_norms(layer, params, cache, dy, 0.0)
    return sq, dx, lambda w: layer.backward(params, cache, scale_rows(w, dy))[0]


def per_example_sq(layer: Any, params: PyTree, cache: PyTree, dy: PyTree) -> tuple[PyTree, Any]:
    """(sum_i g_i**2 elementwise, like params; dx)."""
    if hasattr(layer, "per_example_sq"):
        return layer.per_example_sq(params, cache, dy)
    grads, dx = per_example_backward(layer, params, cache, dy)
    return jax.tree_util.tree_map(lambda g: jnp.sum(g * g, axis=0), grads), dx


def per_example_sq_columns(layer: Any, params: PyTree, cache: PyTree, dy: PyTree, axis_name: str) -> tuple[PyTree, Any]:
    """(sum over the examples and over the cotangent columns of g**2, like params; dx), inside a
    `vmap` over the columns named `axis_name` (`purenet.analysis.curvature.column_walk`): the layer's
    fast path, or its `per_example_sq` summed over the columns with `lax.psum`."""
    if hasattr(layer, "per_example_sq_columns"):
        return layer.per_example_sq_columns(params, cache, dy, axis_name)
    sq, dx = per_example_sq(layer, params, cache, dy)
    return jax.lax.psum(sq, axis_name), dx


def per_example_gram(layer: Any, params: PyTree, cache_a: PyTree, dy_a: PyTree, cache_b: PyTree,
                     dy_b: PyTree) -> tuple[Array, Any, Any]:
    """((na, nb) matrix of <g_i, g_j>, dxa, dxb)."""
    if hasattr(layer, "per_example_gram"):
        return layer.per_example_gram(params, cache_a, dy_a, cache_b, dy_b)
    ga, dxa = per_example_backward(layer, params, cache_a, dy_a)
    gb, dxb = per_example_backward(layer, params, cache_b, dy_b)
    na, nb = _batch_size(dy_a), _batch_size(dy_b)
    products = jax.tree_util.tree_map(
        lambda u, v: jnp.reshape(u, (na, -1)) @ jnp.reshape(v, (nb, -1)).T, ga, gb)
    zero = jnp.zeros((na, nb), jax.tree_util.tree_leaves(dy_a)[0].dtype)
    return sum_leaves(products, zero), dxa, dxb


def feature_split(params: PyTree, split_in: bool) -> tuple[PyTree, bool]:
    """Megatron's split of  y = x W + b  (W: (..., in, out)) over a "model" axis of size m.

    Input whole: column parallel, W[..., :, j-block] and b[j-block] per device,
    y comes out split over its features (no collective). Input split: row
    parallel, W[..., i-block, :] per device, b whole; each device's x_i W_i
    is a partial sum of y, which one all-reduce adds (and b is added once).
    The backward is the dual: dL/dx = dy W^T is split (row) or a partial sum
    to all-reduce (column).
    """
    if split_in:
        return {k: (-2 if k == "W" else None) for k in params}, False
    return {k: (-1 if k == "W" else 0) for k in params}, True


def kfac_eligible(layer: Any) -> bool:
    return hasattr(layer, "kfac_factors") and hasattr(layer, "kfac_dims")


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
