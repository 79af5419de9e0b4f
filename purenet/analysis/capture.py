"""Every layer's activations and gradients from one forward and one handwritten backward, and hooks
that change the backward.

    rec = pn.capture(net, params, state, x, y, loss="cross_entropy", layers=None, hooks=None)
    rec.value, rec.grads, rec.state         # as pn.value_and_grad returns them (with hooks: the modified backward's)
    rec.layers[(2,)]                        # pn.Record(x, y, dy, dx) of the layer at path (2,)

A path is the tuple of child indices from the network down to a layer,
following each container's `children()` in forward order: in
`pn.Sequential([A, B, C])`, B is (1,); layer j of a Sequential inside a
Residual at position 2 is (2, 0, j). `pn.layer_paths(net)` lists them.

How. The backward already holds what a record needs: each layer's output
gradient dy arrives at it and its input gradient dx leaves it. The selected
layers are wrapped in a tap (`Tap`, a one-child container), whose forward
keeps the layer's input x and output y in its cache and whose part of the
walk applies the hook to dy, runs the layer's own backward and reports
Record(x, y, dy, dx) to the walk's visitor. The containers around the taps
are rebuilt with them (their `with_children`), so the taps take the same
params and state and the forward is the network's own: one forward, one
backward, no second pass. Under `jit`, only the selected layers' records are
outputs of the program: the unselected layers' activations are freed as in
`pn.value_and_grad`.

Hooks. `hooks={path: hook}`:

    hook(dy) -> dy'                         the output gradient that layer's backward receives instead
    pn.BackwardRule(rule)                   rule(layer, params, cache, dy) -> (grads, dx) in place of
                                            layer.backward (the layer's own cache; a learning rule)

so the walk computes the gradient of the modified backward: the same as
autodiff of the network whose layer output passes through a `jax.custom_vjp`
identity with that backward (the tests prove it). Gradient reversal is
`lambda dy: -lam * dy`, stopping `jnp.zeros_like`, per-layer clipping a
rescaling of dy. The l2 term is added outside every hook, as in `pn.loss`.
`pn.hooked(net, hooks)` returns the network with its hooks in place, for
training with `pn.fit`, an optimizer's loop or DP-SGD (a callable hook then
acts on each example's dy in the per-example features; a `BackwardRule`
gives batch gradients only).

The output activation a loss fuses with (the Softmax of a cross-entropy
network) is recorded too: x the logits, y the probabilities, dy = dL/dp,
dx = dL/dlogits. A hook on it computes the loss from the probabilities
instead (unfused).
"""
import dataclasses
import functools
from typing import Any, Callable, Iterable, NamedTuple

import jax

from purenet import losses
from purenet.layers.base import Array, PyTree, Visit, Wrapper
from purenet.layers.traversal import (PLAIN, _plain_leaf, is_container, layer_paths, map_layers, map_leaves, walk,
                                      zeros_like_tree)
from purenet.network import add_l2, loss_pass, output_head

__all__ = ["BackwardRule", "Capture", "Record", "Tap", "capture", "hooked", "layer_paths"]


class Record(NamedTuple):
    """One layer's activations and gradients, from one forward and one backward.

    Attributes:
        x: the layer's input (batch, ...).
        y: its output (batch, ...).
        dy: dL/dy, the output gradient its backward received (after its hook, if any).
        dx: dL/dx through this layer alone (PyTorch's grad_input: not summed with a skip path
            around it); None for a layer that reads integer ids.
    """

    x: Any
    y: Any
    dy: Any
    dx: Any


class Capture(NamedTuple):
    """What `pn.capture` returns.

    Attributes:
        value: the scalar loss (as `pn.value_and_grad` returns it).
        grads: its gradient with respect to params, by the (hooked) handwritten backward.
        state: the new state.
        layers: {path: Record} for the selected layers, in forward order.
    """

    value: Array
    grads: PyTree
    state: PyTree
    layers: dict


class BackwardRule(NamedTuple):
    """A backward that replaces a layer's own: `rule(layer, params, cache, dy) -> (grads, dx)`.

    `layer`, `params` and `cache` are the layer's own (what its `backward`
    receives); grads must have params' structure. A learning rule beyond
    backprop keeps the layer's weight gradient and sends another dx back
    (feedback alignment: `pn.learning_rules`).

    Attributes:
        rule: the function.
    """

    rule: Callable[[Any, PyTree, PyTree, Array], tuple[PyTree, Array]]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["inner", "x", "y"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class _TapCache:
    inner: Any
    x: Any
    y: Any


@dataclasses.dataclass(frozen=True)
class Tap(Wrapper):
    """A layer (or container) with a hook on its backward and, when `record`, a record of its pass.

    Its params and state are the block's own; its forward is the block's,
    keeping x and y in the cache when recording. In the walk it applies
    `hook` to each stream's dy (a callable) or runs the `BackwardRule` in
    place of the block's backward, then reports `Record(x, y, dy, dx)` to
    the visitor's `tap` (`pn.capture`'s walk; other walks have none).

    Args:
        block: the layer or container.
        path: its path in the network (the record's key).
        hook: a callable dy -> dy', a `BackwardRule`, or None.
        record: True to keep x and y and report the record.
    """

    block: Any
    path: tuple = ()
    hook: Any = None
    record: bool = False

    def init(self, key: Array, in_shape: Any, dtype: Any = None) -> tuple[PyTree, PyTree, tuple[int, ...]]:
        return self.block.init(key, in_shape, dtype=dtype)

    def forward(self, params: PyTree, state: PyTree, x: Array, train: bool = False,
                key: Array | None = None) -> tuple[Array, PyTree, PyTree]:
        y, state, cache = self.block.forward(params, state, x, train=train, key=key)
        return y, state, _TapCache(cache, x, y) if self.record else _TapCache(cache, None, None)

    def _io(self, params: PyTree, cache: Any) -> tuple[Any, Any]:
        if isinstance(cache, _TapCache):
            return cache.x, cache.y
        return self.block.cached_io(params, cache)  # a leaf its container runs itself (GPT's ends)

    def walk_back(self, visit: Visit, params: PyTree, caches: tuple, dys: tuple) -> tuple[PyTree, tuple]:
        driven = [c for c in caches if not isinstance(c, _TapCache)]
        if driven and self.hook is not None:
            raise ValueError(f"pn.capture / pn.hooked: the layer at {self.path} ({type(self.block).__name__}) is "
                             f"run by its container, which computes the gradients around it itself: it can be "
                             f"recorded but not hooked; hook the layers next to it")
        inner = tuple(c.inner if isinstance(c, _TapCache) else c for c in caches)
        if isinstance(self.hook, BackwardRule):
            if visit.leaf is not _plain_leaf or len(dys) != 1:
                raise ValueError(f"the layer at {self.path} has a BackwardRule, which gives the batch gradient "
                                 f"only (pn.value_and_grad, pn.capture, training); this walk asks for another "
                                 f"quantity (per-example gradients, statistics, curvature)")
            grads, dx = self.hook.rule(self.block, params, inner[0], dys[0])
            outs, dxs = grads, (dx,)
        else:
            if self.hook is not None:
                dys = tuple(self.hook(dy) for dy in dys)
            outs, dxs = walk(self.block, visit, params, inner, dys)
        if self.record and visit.tap is not None:
            x, y = self._io(params, caches[0])
            visit.tap(self.path, Record(x, y, dys[0], dxs[0]))
        return outs, dxs


def _as_path(path: Any, what: str) -> tuple:
    if isinstance(path, int) and not isinstance(path, bool):
        return (path,)
    if isinstance(path, (tuple, list)) and all(isinstance(i, int) and not isinstance(i, bool) for i in path):
        return tuple(path)
    raise TypeError(f"{what}: a path is a tuple of child indices, e.g. (1,) or (2, 0, 1), got {path!r}")


def _checked(net: Any, path: tuple, where: dict, what: str) -> tuple:
    if path not in where:
        shown = ", ".join(str(p) for p, layer in where.items() if not is_container(layer))
        raise ValueError(f"{what}: the path {path} names no layer of the network; its leaf layers are at {shown}")
    if path == () and is_container(net):
        raise ValueError(f"{what}: the path () is the whole network; name one of its layers (its leaves are "
                         f"listed by pn.layer_paths(net))")
    return path


def _selected(net: Any, layers: Any, where: dict) -> list:
    """The recorded paths, in forward order: every leaf (None), the listed ones, or those a predicate picks."""
    if layers is None:
        return [p for p, layer in where.items() if not is_container(layer)]
    if callable(layers):
        return [p for p, layer in where.items() if p != () and layers(p, layer)]
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError(f"pn.capture: layers is None, a list of paths or a predicate (path, layer) -> bool, "
                        f"got {layers!r}")
    chosen = {_checked(net, _as_path(p, "pn.capture layers"), where, "pn.capture layers") for p in layers}
    return [p for p in where if p in chosen]


def _hooks(net: Any, hooks: Any, where: dict, what: str) -> dict:
    if hooks is None:
        return {}
    if not isinstance(hooks, dict):
        raise TypeError(f"{what}: hooks is a dict {{path: hook}}, got {type(hooks).__name__}")
    out = {}
    for path, hook in hooks.items():
        path = _checked(net, _as_path(path, what), where, what)
        if not (callable(hook) or isinstance(hook, BackwardRule)):
            raise TypeError(f"{what}: the hook at {path} is neither a function dy -> dy' nor a pn.BackwardRule, "
                            f"got {hook!r}")
        out[path] = hook
    return out


def _tapped(hooks: dict, recorded: Iterable) -> Callable[[tuple, Any], Any]:
    recorded = set(recorded)

    def tap(path: tuple, layer: Any) -> Any:
        if path in hooks or path in recorded:
            return Tap(layer, path, hooks.get(path), path in recorded)
        return layer
    return tap


def hooked(net: Any, hooks: dict) -> Any:
    """The network with hooks on its backward, for training (`pn.fit`, `pn.value_and_grad`, DP-SGD).

    Args:
        net: the network (a layer or a container).
        hooks: {path: hook}: a function dy -> dy' (the output gradient that
            layer's backward receives instead) or a `pn.BackwardRule` (a
            backward in place of the layer's), at any layer or container
            below the root; paths as `pn.layer_paths(net)` lists them.

    Returns:
        A network with the same params and state (the layers at the paths
            wrapped in a `Tap`): its forward is `net`'s and its backward the
            hooked one.

    Raises:
        ValueError: if a path names no layer, or the whole network.
        TypeError: if hooks is not a dict, a path is not a tuple of ints, or a
            hook is neither a function nor a `BackwardRule`.
        NotImplementedError: if a container on the way to a hooked layer does
            not define `with_children`.
    """
    where = dict(layer_paths(net))
    return map_layers(net, _tapped(_hooks(net, hooks, where, "pn.hooked"), ()))


def _head_path(net: Any) -> tuple:
    """The path of the output activation a fused loss leaves out: the chain's last child, or the net."""
    return () if output_head(net) is net else (len(net.children()) - 1,)


def capture(net: Any, params: PyTree, state: PyTree, x: Array, y: Any, loss: Any = "cross_entropy",
            l2: Any = 0.0, train: bool = False, key: Array | None = None, layers: Any = None,
            hooks: dict | None = None) -> Capture:
    """The loss, its gradient and every selected layer's input, output and gradients, in one pass.

    One forward and one handwritten backward (as `pn.value_and_grad`), which
    also return, for each selected layer, Record(x, y, dy, dx): its input,
    its output, dL/d(output) (after its hook) and dL/d(input) through it
    alone. With hooks, value is unchanged and grads (and every record
    below a hooked layer) are those of the modified backward.

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters, as `pn.init` returns them.
        state: its state (BatchNorm's running statistics; empty for most layers).
        x: inputs (batch, *in_shape): floats, or integer token ids (batch, T).
        y: targets, as `pn.value_and_grad` takes them.
        loss: a loss name or a `pn.Loss` (default "cross_entropy").
        l2: the coefficient of l2/2 sum W^2 over the weights (default 0),
            added outside every hook.
        train: True for training mode (Dropout drops, BatchNorm uses and
            updates the batch statistics).
        key: a PRNG key, needed in training by layers that draw (Dropout).
        layers: which layers to record: None (the default) for every leaf
            layer (the output activation a loss fuses with included), a list
            of paths (leaves or containers below the root), or a predicate
            `(path, layer) -> bool` over every layer and container.
        hooks: {path: hook}, as `pn.hooked` takes them (a hooked layer need
            not be recorded); None (the default) for none.

    Returns:
        A `Capture(value, grads, state, layers)`, layers = {path: Record} in
            forward order.

    Raises:
        ValueError: if a path names no layer or the whole network, a hook sits
            on a layer its container runs itself (GPT's ends), or an input is
            refused as `pn.value_and_grad` refuses it.
        TypeError: if `layers` or `hooks` is malformed.
        NotImplementedError: if a container on the way to a selected layer
            does not define `with_children`.
    """
    where = dict(layer_paths(net))
    recorded = _selected(net, layers, where)
    hooks = _hooks(net, hooks, where, "pn.capture")
    head = output_head(net)
    head_path = _head_path(net) if head is not None else None
    if head_path is not None and head_path in hooks and isinstance(loss, str):
        loss = losses.get(loss)  # a hooked output activation: the loss from its output, unfused
    records: dict = {}
    p = loss_pass(net, params, state, x, loss, train, key, rebuild=lambda body: map_layers(
        body, _tapped(hooks, recorded)))
    dout = p.loss_fn.backward(p.out, y)
    outs, _ = walk(p.body, Visit(PLAIN.leaf, None, True, records.__setitem__), p.body_params, (p.cache,), (dout,))
    grads = map_leaves(net, lambda layer, g, frozen: zeros_like_tree(g) if frozen else g, p.grads(net, outs))
    if head_path in recorded and head_path not in records:  # the output activation the loss fused with
        probs = head.forward({}, {}, p.out)[0]
        records[head_path] = Record(p.out, probs, losses.get(loss).backward(probs, y), dout)
    value, grads = add_l2(net, params, l2, p.loss_fn.value(p.out, y), grads)
    return Capture(value, grads, p.state, {path: records[path] for path in recorded})
