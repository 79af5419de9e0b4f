"""Layers made of layers, beyond the chain: Residual, Parallel, and Flatten.

Backpropagation sums the gradient over every path from the loss to a
quantity (the lecture's point). A chain has one path per unit; here paths
fork and join:

    Residual   y = x + block(x)            dL/dx = dy + block's dL/dx
    Parallel   y = merge(b_1(x), ..., b_k(x))   dL/dx = sum_i b_i's dL/dx

Both check at `init` that the shapes fit and say which layer and which
shapes when they do not.
"""
import dataclasses
import functools
import itertools
import math
from typing import Any, Iterable

import jax
import jax.numpy as jnp

from purenet.layers.base import Array, Container, Wrapper, LayerLike, ParameterFree, PyTree, Static, Visit, as_shape
from purenet.layers.traversal import decode, frozen_input_grads, walk

__all__ = ["Flatten", "Frozen", "Parallel", "Remat", "Residual"]


def _sum(arrays):
    total = arrays[0]
    for a in arrays[1:]:
        total = total + a
    return total


@dataclasses.dataclass(frozen=True)
class Residual(Wrapper):
    """A skip connection around `block` (He et al., 2016):  y = x + block(x).

    params and state are the block's own. Backward: the identity path passes
    dy straight through and the block's path adds its own input gradient,

        dL/dparams = block's dL/dparams,   dL/dx = dy + block's dL/dx.

    The block must keep the shape of its input (`init` raises a ValueError
    naming both shapes otherwise).

    Args:
        block: the layer or container on the residual branch; its output
            shape must equal its input shape.
    """

    block: LayerLike

    def init(self, key: Array, in_shape: Any, dtype: Any = None) -> tuple[PyTree, PyTree, tuple[int, ...]]:
        in_shape = as_shape(in_shape)
        params, state, out_shape = self.block.init(key, in_shape, dtype=dtype)
        out_shape = as_shape(out_shape, "out_shape")
        if out_shape != in_shape:
            raise ValueError(f"Residual({type(self.block).__name__}): the block maps shape {in_shape} to "
                             f"{out_shape}, but y = x + block(x) needs both shapes equal")
        return params, state, in_shape

    def forward(self, params: PyTree, state: PyTree, x: Array, train: bool = False,
                key: Array | None = None) -> tuple[Array, PyTree, PyTree]:
        h, state, cache = self.block.forward(params, state, x, train=train, key=key)
        return x + h, state, cache

    def walk_back(self, visit: Visit, params: PyTree, caches: tuple, dys: tuple) -> tuple[PyTree, tuple]:
        outs, dxs = walk(self.block, visit, params, caches, dys)
        return outs, tuple(dy + dx for dy, dx in zip(dys, dxs))

    def decode(self, params: PyTree, state: PyTree, x: Array, kv: PyTree, pos: Array) -> tuple[Array, PyTree]:
        h, kv = decode(self.block, params, state, x, kv, pos)
        return x + h, kv


_MERGES = ("concat", "sum")


@dataclasses.dataclass(frozen=True, init=False)
class Parallel(Container):
    """Branches that all read the same x, merged:  y = merge(b_1(x), ..., b_k(x)).

    merge="concat" joins the outputs along the last axis (their other axes
    must agree); merge="sum" adds them (their shapes must be equal). params
    and state are tuples with one entry per branch; branch i draws its
    randomness from fold_in(key, i).

    Backward: each branch receives its part of dy (its slice of the last
    axis for concat, all of dy for sum), and x fans out to every branch, so
    its gradient is the sum over the branches (the chain rule summed over
    every path):  dL/dx = sum_i b_i's dL/dx.

    Args:
        branches: the branch layers (any iterable, stored as a tuple), at
            least one; each reads the same x.
        merge: "concat" (the default) or "sum".

    Raises:
        ValueError: if there are no branches or `merge` is neither "concat"
            nor "sum" (and, at `init`, if the branch outputs' shapes do not
            fit the merge).
    """

    branches: tuple
    merge: str

    def __init__(self, branches: Iterable[LayerLike], merge: str = "concat") -> None:
        branches = tuple(branches)
        if not branches:
            raise ValueError("Parallel needs at least one branch")
        if merge not in _MERGES:
            raise ValueError(f"Parallel merge must be one of {_MERGES}, got {merge!r}")
        object.__setattr__(self, "branches", branches)
        object.__setattr__(self, "merge", merge)

    def init(self, key: Array, in_shape: Any, dtype: Any = None) -> tuple[PyTree, PyTree, tuple[int, ...]]:
        in_shape = as_shape(in_shape)
        params, states, shapes = [], [], []
        for branch, k in zip(self.branches, jax.random.split(key, len(self.branches))):
            p, s, out = branch.init(k, in_shape, dtype=dtype)
            params.append(p)
            states.append(s)
            shapes.append(as_shape(out, "out_shape"))
        if self.merge == "sum" and len(set(shapes)) > 1:
            raise ValueError(f"Parallel(merge='sum'): branch outputs have shapes {shapes}; a sum needs them "
                             f"all equal")
        if self.merge == "concat" and len({s[:-1] for s in shapes}) > 1:
            raise ValueError(f"Parallel(merge='concat'): branch outputs have shapes {shapes}; concatenating "
                             f"on the last axis needs every other axis equal")
        out = shapes[0] if self.merge == "sum" else shapes[0][:-1] + (sum(s[-1] for s in shapes),)
        return tuple(params), tuple(states), out

    def with_children(self, children: tuple | list) -> "Parallel":
        return Parallel(children, merge=self.merge)

    def _check(self, tree, what):
        if not isinstance(tree, (tuple, list)) or len(tree) != len(self.branches):
            raise ValueError(f"Parallel with {len(self.branches)} branches needs {what} as a tuple of "
                             f"{len(self.branches)} entries, got {type(tree).__name__}")

    def forward(self, params: PyTree, state: PyTree, x: Array, train: bool = False,
                key: Array | None = None) -> tuple[Array, PyTree, PyTree]:
        self._check(params, "params")
        self._check(state, "state")
        outs, states, caches = [], [], []
        for i, branch in enumerate(self.branches):
            k = None if key is None else jax.random.fold_in(key, i)
            y, s, c = branch.forward(params[i], state[i], x, train=train, key=k)
            outs.append(y)
            states.append(s)
            caches.append(c)
        if self.merge == "sum":
            return _sum(outs), tuple(states), (tuple(caches), None)
        widths = Static(tuple(y.shape[-1] for y in outs))  # where to split dy on the way back
        return jnp.concatenate(outs, axis=-1), tuple(states), (tuple(caches), widths)

    def _branch_dys(self, cache, dy):
        _, widths = cache
        if widths is None:
            return [dy] * len(self.branches)
        splits = list(itertools.accumulate(widths.value))[:-1]
        return jnp.split(dy, splits, axis=-1)

    def children(self) -> tuple:
        return self.branches

    def input_children(self) -> tuple:
        return self.branches

    def output_child(self) -> Any:
        return self.branches[0] if len(self.branches) == 1 else None

    def split(self, tree: PyTree) -> tuple:
        return tuple(tree)

    def join(self, parts: tuple | list) -> PyTree:
        return tuple(parts)

    def walk_back(self, visit: Visit, params: PyTree, caches: tuple, dys: tuple) -> tuple[PyTree, tuple]:
        """Each branch gets its part of dy; x fans out to every branch, so dL/dx sums over them."""
        split = [self._branch_dys(c, dy) for c, dy in zip(caches, dys)]  # per stream, per branch
        outs, dxs = [], []
        for i, branch in enumerate(self.branches):
            out, dx = walk(branch, visit, params[i], tuple(c[0][i] for c in caches), tuple(s[i] for s in split))
            outs.append(out)
            dxs.append(dx)
        return tuple(outs), tuple(_sum([dx[k] for dx in dxs]) for k in range(len(dys)))


@dataclasses.dataclass(frozen=True)
class Flatten(ParameterFree):
    """(batch, *shape) -> (batch, prod(shape)); backward reshapes dy back."""
    piecewise_linear = True  # no second-order term: pn.stats.hessian_diagonal passes through

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (math.prod(in_shape),)

    def apply(self, x: Array) -> tuple[Array, Static]:
        return jnp.reshape(x, (x.shape[0], -1)), Static(x.shape[1:])

    def grad(self, shape: Static, dy: Array) -> Array:
        return jnp.reshape(dy, (dy.shape[0], *shape.value))


@dataclasses.dataclass(frozen=True)
class Frozen(Wrapper):
    """`block` with its parameters held fixed.

    The same forward, and a backward that passes dL/dx through but returns
    zero parameter gradients. No parameter gradient is computed at all:
    under jit, XLA drops the block's dL/dW products, whose results nothing
    uses (a frozen Dense costs one matrix product in the backward instead of
    two). params and state are
    the block's own, so a checkpoint of the unfrozen network loads as is.
    Pair with `pn.optim.masked` when weight decay must not move them either.

    Args:
        block: the layer or container whose parameters stay fixed.
    """

    block: LayerLike

    def init(self, key: Array, in_shape: Any, dtype: Any = None) -> tuple[PyTree, PyTree, tuple[int, ...]]:
        return self.block.init(key, in_shape, dtype=dtype)

    def forward(self, params: PyTree, state: PyTree, x: Array, train: bool = False,
                key: Array | None = None) -> tuple[Array, PyTree, PyTree]:
        return self.block.forward(params, state, x, train=train, key=key)

    freezes = True

    def walk_back(self, visit: Visit, params: PyTree, caches: tuple, dys: tuple) -> tuple[PyTree, tuple]:
        """dL/dx passes through; every feature sees no parameter gradient here (visit.frozen)."""
        if visit.frozen is None:  # a visitor that only reads the caches
            return walk(self.block, visit, params, caches, dys)
        return visit.frozen(params, dys), frozen_input_grads(self.block, params, caches, dys)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["x", "state", "key"], meta_fields=["train"])
@dataclasses.dataclass(frozen=True)
class _RematCache:
    x: jax.Array
    state: Any
    key: Any
    train: bool  # static


@dataclasses.dataclass(frozen=True)
class Remat(Wrapper):
    """`block` rematerialised: its activations are recomputed in the backward instead of kept.

    The forward keeps only the block's input, and the backward runs the
    block's forward again (same params, state and key, so dropout masks
    agree) to rebuild the cache it needs, then the block's backward.

    Memory for time: the activations inside the block are not held between
    the forward and the backward pass. The recomputation reads its inputs
    through `lax.optimization_barrier` and through a data dependence on the
    incoming dy, so XLA cannot merge it with the original forward (which
    would keep the activations alive again) on any backend: XLA:CPU removes
    barriers, and there `jax.checkpoint` saves nothing. Gradients are
    exactly the plain block's. The compiled step's temporary memory drops,
    where `jax.checkpoint` of the same blocks raises it (benchmarks/README.md,
    section "Measurements behind choices in the source").

    Args:
        block: the layer or container to rematerialise (typically one
            transformer or residual block).
    """

    block: LayerLike

    def init(self, key: Array, in_shape: Any, dtype: Any = None) -> tuple[PyTree, PyTree, tuple[int, ...]]:
        return self.block.init(key, in_shape, dtype=dtype)

    def forward(self, params: PyTree, state: PyTree, x: Array, train: bool = False,
                key: Array | None = None) -> tuple[Array, PyTree, PyTree]:
        y, new_state, _ = self.block.forward(params, state, x, train=train, key=key)
        return y, new_state, _RematCache(x, state, key, bool(train))

    def _rerun(self, params, cache, dy=None):
        """The block's cache again, computed from inputs that depend on dy: XLA can neither
        merge it with the first forward nor run it before the backward reaches the block."""
        x, params, dy = jax.lax.optimization_barrier((cache.x, params, dy))
        if dy is not None:  # XLA:CPU drops barriers: a data dependence (x + 0 dy_0 = x) holds there too
            x = x + jnp.zeros((), x.dtype) * dy.reshape(-1)[0].astype(x.dtype)
        _, _, inner = self.block.forward(params, cache.state, x, train=cache.train,
                                         key=cache.key)
        return inner, dy

    def walk_back(self, visit: Visit, params: PyTree, caches: tuple, dys: tuple) -> tuple[PyTree, tuple]:
        inner, dys = zip(*(self._rerun(params, c, dy) for c, dy in zip(caches, dys))) if caches else ((), ())
        return walk(self.block, visit, params, tuple(inner), tuple(dys))
