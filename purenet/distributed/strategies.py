"""Where each parameter lives on a mesh: the "fsdp", "tensor" and "fsdp+tensor" strategies.

A strategy is a placement, never a change of the computation: params get a
`NamedSharding`, jit runs the same program, and XLA's SPMD partitioner
inserts the collectives. Every strategy therefore computes what one device
computes (up to the order of float sums).

"fsdp" (fully sharded data parallel, ZeRO-3): every parameter with an axis
divisible by the size n of the mesh's data axis ("data", or the only axis of
a 1-D mesh: `purenet.distributed.data_axis`) is split along its largest such
axis, and so are the optimizer's slots (any subtree of the optimizer state
shaped like params). The batch is split over that axis too. In the forward
each layer's W is all-gathered just before use; in the backward the weight
gradient

    dW = sum over the global batch of h^T dy

is a per-device partial sum that a reduce-scatter both sums and splits, so
each device updates only its 1/n of W and of the slots.

"tensor" (Megatron-LM): layers are split over the mesh's "model" axis. A layer
says how with the optional protocol method

    layer.tensor_split(params, split_in) -> (axes, split_out)

where `split_in` says whether the layer's input arrives split over its last
(feature) axis, `axes` is a params-shaped tree of the axis of each
parameter to split (None: whole), and `split_out` whether its output leaves
split. Dense and the convolutions split their output features (column
parallel: W[..., :, j], b[j]) when the input is whole, and their input
features (row parallel: W[..., i, :], the bias whole; the products are
partial sums that one all-reduce adds) when it arrives split; so a Dense
pair Dense(4d) -> GELU -> Dense(d) is Megatron's MLP, with Megatron's f/g
pair of collectives: nothing in the forward before the first Dense and an
all-reduce after the second, and the dual (an all-reduce of dL/dx) in the
backward. Attention splits Wq, Wk, Wv by heads and Wo by rows; GPT's tied
embedding by vocabulary rows. A parameter-free position-wise layer (GELU,
Dropout) passes the split through; any other layer is whole (its params
replicated, its output whole). The layers are visited in forward order by
the one traversal (`purenet.layers.base.map_leaves`). A split whose axis
does not divide by the "model" size is dropped for that layer.

"fsdp+tensor": the tensor split on "model", then FSDP's split on the data
axis (which must be another axis than "model") along the largest remaining
divisible axis.
"""
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from purenet.distributed.data import AXIS, data_axis, put
from purenet.distributed.mesh import MODEL
from purenet.layers.base import PyTree
from purenet.layers.defaults import has_params
from purenet.layers.traversal import map_leaves

__all__ = [
    "STRATEGIES", "check_strategy", "constrain", "like_params", "param_shardings", "param_specs", "shard_params",
    "shard_tree", "tensor_axes", "tree_shardings",
]

STRATEGIES = ("fsdp", "tensor", "fsdp+tensor")


def check_strategy(strategy: str, mesh: Mesh | None) -> None:
    """Raise unless `strategy` is known and `mesh` has the axes it splits over.

    Args:
        strategy: "fsdp", "tensor" or "fsdp+tensor" (`STRATEGIES`).
        mesh: the device mesh, or None.

    Raises:
        ValueError: if `strategy` is unknown, `mesh` is None, a tensor strategy's
            mesh has no "model" axis, or an FSDP strategy's mesh has no data
            axis (or, with "fsdp+tensor", its data axis is "model").
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown sharding strategy {strategy!r}; use one of {STRATEGIES}")
    if mesh is None:
        raise ValueError(f"strategy={strategy!r} needs a mesh: pass mesh=pn.distributed.mesh({{...}})")
    fix = f"build it with pn.distributed.mesh({{{AXIS!r}: ..., {MODEL!r}: ...}})"
    if "tensor" in strategy and MODEL not in mesh.axis_names:
        raise ValueError(f"strategy={strategy!r} splits parameters over the mesh axis {MODEL!r}, but the mesh "
                         f"has axes {tuple(mesh.axis_names)}; {fix}")
    data = data_axis(mesh)
    if "fsdp" in strategy and (data is None or "tensor" in strategy and data == MODEL):
        raise ValueError(f"strategy={strategy!r} splits parameters over the mesh's data axis ({AXIS!r}, or the "
                         f"only axis of a 1-D mesh{', not the tensor axis' if data == MODEL else ''}), but the "
                         f"mesh has axes {tuple(mesh.axis_names)}; {fix}")


def _axis(shape: tuple[int, ...], a: int | None) -> int | None:
    return None if a is None else a % len(shape)


def tensor_axes(net: Any, params: PyTree, parts: int) -> PyTree:
    """Per parameter, the axis tensor parallelism splits into `parts` (None: whole), a tree like params.

    The layers are visited in forward order; each says how it splits with
    `layer.tensor_split(params, split_in)` (see the module docstring). A
    layer whose split axes do not divide by `parts` stays whole.

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters (arrays or `jax.ShapeDtypeStruct`s: only shapes are read).
        parts: the size of the mesh's "model" axis.

    Returns:
        A tree like params: each leaf the (non-negative) axis to split, or None.
    """
    split = [False]  # whether the activation flowing into the next layer is split over its features

    def leaf(layer: Any, p: PyTree, frozen: bool) -> PyTree:
        del frozen
        whole = jax.tree_util.tree_map(lambda _: None, p)
        if not has_params(p):
            split[0] = split[0] and bool(getattr(layer, "positionwise", False))
            return whole
        if not hasattr(layer, "tensor_split"):
            split[0] = False
            return whole
        axes, out = layer.tensor_split(p, split[0])
        ok = all(a is None or v.shape[_axis(v.shape, a)] % parts == 0
                 for a, v in zip(jax.tree_util.tree_leaves(axes, is_leaf=lambda t: t is None),
                                 jax.tree_util.tree_leaves(p)))
        split[0] = bool(out) and ok
        if not ok:
            return whole
        return jax.tree_util.tree_map(lambda a, v: _axis(v.shape, a), axes, p, is_leaf=lambda t: t is None)

    return map_leaves(net, leaf, params)


def param_specs(net: Any, params: PyTree, mesh: Mesh, strategy: str) -> PyTree:
    """The PartitionSpec of every parameter under `strategy` (see the module docstring), a tree like params.

    Args:
        net: the network whose layers say how they split.
        params: its parameters (only shapes are read).
        mesh: the device mesh, with the axes `strategy` needs.
        strategy: "fsdp", "tensor" or "fsdp+tensor".

    Returns:
        A tree like params of `PartitionSpec`s, one entry per array axis:
            "model" (tensor split), the data axis (FSDP split) or None.

    Raises:
        ValueError: if `strategy` is unknown or `mesh` lacks its axes (`check_strategy`).
    """
    check_strategy(strategy, mesh)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if "tensor" in strategy:
        model = jax.tree_util.tree_leaves(tensor_axes(net, params, int(mesh.shape[MODEL])),
                                          is_leaf=lambda t: t is None)
    else:
        model = [None] * len(leaves)
    data = data_axis(mesh)
    n = int(mesh.shape[data]) if "fsdp" in strategy and data is not None else 1
    specs = []
    for v, m in zip(leaves, model):
        spec: list = [None] * len(v.shape)
        if m is not None:
            spec[m] = MODEL
        if n > 1:
            free = [a for a in range(len(v.shape)) if a != m and v.shape[a] % n == 0]
            if free:
                spec[max(free, key=lambda a: (v.shape[a], -a))] = data
        specs.append(PartitionSpec(*spec))
    return jax.tree_util.tree_unflatten(treedef, specs)


def param_shardings(net: Any, params: PyTree, mesh: Mesh, strategy: str) -> PyTree:
    """`param_specs` as NamedShardings on `mesh`.

    Args:
        net: the network whose layers say how they split.
        params: its parameters (only shapes are read).
        mesh: the device mesh, with the axes `strategy` needs.
        strategy: "fsdp", "tensor" or "fsdp+tensor".

    Returns:
        A tree like params of `NamedSharding`s.

    Raises:
        ValueError: if `strategy` is unknown or `mesh` lacks its axes (`check_strategy`).
    """
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), param_specs(net, params, mesh, strategy),
                                  is_leaf=lambda s: isinstance(s, PartitionSpec))


def shard_params(net: Any, params: PyTree, mesh: Mesh, strategy: str = "fsdp") -> PyTree:
    """params placed on `mesh` as `strategy` splits them ("fsdp", "tensor" or "fsdp+tensor").

    Args:
        net: the network whose layers say how they split.
        params: its parameters.
        mesh: the device mesh, with the axes `strategy` needs.
        strategy: "fsdp", "tensor" or "fsdp+tensor".

    Returns:
        params as global `jax.Array`s with `param_shardings(net, params, mesh, strategy)`.

    Raises:
        ValueError: if `strategy` is unknown or `mesh` lacks its axes (`check_strategy`).
    """
    return jax.tree_util.tree_map(put, params, param_shardings(net, params, mesh, strategy))


def like_params(tree: PyTree, params: PyTree, per_param: PyTree, other: Any) -> PyTree:
    """`tree` with every subtree shaped like params replaced by `per_param`, and every other leaf by `other`.

    A subtree is shaped like params when it has their structure and leaf
    shapes: the params themselves, Adam's moments, an EMA, early stopping's
    best params.

    Args:
        tree: any pytree (an optimizer state, a TrainState).
        params: the parameters whose structure and shapes are matched.
        per_param: what replaces each params-shaped subtree (e.g. a tree of
            shardings like params).
        other: what replaces every other leaf.

    Returns:
        tree with its params-shaped subtrees replaced by `per_param` and its other
            leaves by `other`.
    """
    treedef: Any = jax.tree_util.tree_structure(params)
    shapes = [jax.numpy.shape(v) for v in jax.tree_util.tree_leaves(params)]

    def shaped(node: Any) -> bool:
        if jax.tree_util.tree_structure(node) != treedef:
            return False
        return [jax.numpy.shape(v) for v in jax.tree_util.tree_leaves(node)] == shapes

    return jax.tree_util.tree_map(lambda node: per_param if shaped(node) else other, tree, is_leaf=shaped)


def tree_shardings(net: Any, tree: PyTree, params: PyTree, mesh: Mesh, strategy: str) -> PyTree:
    """A sharding for every leaf of `tree`: params-shaped subtrees as the params, the rest replicated.

    Args:
        net: the network whose layers say how they split.
        tree: any pytree (an optimizer state, a TrainState).
        params: the parameters (only shapes are read).
        mesh: the device mesh, with the axes `strategy` needs.
        strategy: "fsdp", "tensor" or "fsdp+tensor".

    Returns:
        A tree like `tree` (see `like_params`) of `NamedSharding`s.

    Raises:
        ValueError: if `strategy` is unknown or `mesh` lacks its axes (`check_strategy`).
    """
    return like_params(tree, params, param_shardings(net, params, mesh, strategy), NamedSharding(mesh, PartitionSpec()))


def shard_tree(net: Any, tree: PyTree, params: PyTree, mesh: Mesh, strategy: str) -> PyTree:
    """`tree` (an optimizer state, a TrainState) placed on `mesh`.

    Params-shaped parts are split as `strategy` splits the params (so
    optimizer slots are sharded like them), everything else is replicated.

    Args:
        net: the network whose layers say how they split.
        tree: the pytree to place.
        params: the parameters (only shapes are read).
        mesh: the device mesh, with the axes `strategy` needs.
        strategy: "fsdp", "tensor" or "fsdp+tensor".

    Returns:
        tree with every leaf a global `jax.Array` placed by `tree_shardings`.

    Raises:
        ValueError: if `strategy` is unknown or `mesh` lacks its axes (`check_strategy`).
    """
    shardings = tree_shardings(net, tree, params, mesh, strategy)
    return jax.tree_util.tree_map(put, tree, shardings)


def constrain(tree: PyTree, shardings: PyTree) -> PyTree:
    """`jax.lax.with_sharding_constraint` leaf by leaf (inside jit: pin where XLA keeps each part).

    Args:
        tree: a pytree of arrays.
        shardings: a tree of shardings of tree's structure.

    Returns:
        tree, each leaf constrained to its sharding.
    """
    return jax.tree_util.tree_map(jax.lax.with_sharding_constraint, tree, shardings)
