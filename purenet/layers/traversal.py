"""The one traversal: `walk` runs a visitor at every leaf layer of a network's backward, in the order
containers declare (`Container.walk_back`), for any number of streams; and the walks built on it:
leaves in walk order, decoding one position at a time.

    outs, dxs = walk(net, visit, params, caches, dys)    # visit: a `Visit` (leaf rule, frozen rule)
    for leaf in leaves(net, params): ...                 # Leaf(path, layer, params, frozen)

Every feature that reads the backward's caches and output gradients (per-example gradients, DP-SGD's
clipping, statistics, K-FAC, diagnostics) is a `Visit`; none writes its own walk.
"""
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp

from purenet.layers.base import Array, PyTree, Visit

__all__ = [
    "Leaf", "PLAIN", "decode", "decode_init", "frozen_input_grads", "is_container", "layer_paths", "leaves",
    "map_in_walk_order", "map_layers", "map_leaves", "walk", "walk_leaves", "zeros_like_tree",
]


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


# ---------------------------------------------------------------- leaves


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


def layer_paths(net: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """Every layer of `net` with its path, containers included (each before its children), in forward order.

    A path is the tuple of child indices from `net` down to a layer, following
    each container's `children()`: in `pn.Sequential([A, B, C])` B is (1,);
    layer j of a Sequential inside a Residual at position 2 is (2, 0, j).
    These are the addresses of `pn.capture` and `pn.hooked`.

        for path, layer in pn.layer_paths(net): print(path, type(layer).__name__)

    Args:
        net: the network (a layer or a container).
        path: the path of `net` itself (default (): the root).

    Returns:
        An iterator of (path, layer) pairs, the root first.
    """
    yield path, net
    if is_container(net):
        for i, child in enumerate(net.children()):
            yield from layer_paths(child, path + (i,))


def map_layers(net: Any, fn: Callable[[tuple, Any], Any], path: tuple = ()) -> Any:
    """`net` with fn(path, layer) in place of every layer, children first: a container whose children
    changed is rebuilt around them (`with_children`) before fn sees it; fn returns a layer unchanged to
    keep it."""
    if is_container(net):
        kids = tuple(net.children())
        new = tuple(map_layers(child, fn, path + (i,)) for i, child in enumerate(kids))
        if any(a is not b for a, b in zip(new, kids)):
            net = net.with_children(new)
    return fn(path, net)


def walk_leaves(net: Any, outs: Any) -> list:
    """The leaf outs of an unshaped walk, in forward order (the containers' `parts`)."""
    if not is_container(net):
        return [outs]
    return [o for child, part in zip(net.children(), net.parts(outs)) for o in walk_leaves(child, part)]


