"""Pytree plumbing shared by every optimizer: one place, not one copy per optimizer."""
import functools
from typing import Any, Callable, cast

import jax
import jax.numpy as jnp
import numpy as np

from purenet import _trees
from purenet.layers.base import Array, PyTree

__all__ = ["all_finite", "check_matching", "compute_dtype", "global_norm", "map", "upcast", "where", "zeros_like"]


def compute_dtype(x: Any) -> np.dtype:
    """The dtype slot arithmetic runs in: at least float32.

    float16/bfloat16 parameters keep their dtype, but their moments and
    accumulators live in float32, so eps = 1e-8 does not underflow to 0 and
    a zero gradient cannot produce 0/0 = NaN (optax#1754).
    """
    return jnp.promote_types(jnp.result_type(x), jnp.float32)


def zeros_like(params: PyTree, fill: Any = 0.0) -> PyTree:
    """A slot tree shaped like params, in the compute dtype, filled with `fill`.

    Called eagerly (an optimizer's `init` before training) it runs as one compiled program for the
    whole tree, not one per leaf shape (benchmarks/README.md, "Compile time and first-step latency").
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    spec = tuple((tuple(jnp.shape(p)), compute_dtype(p)) for p in leaves)
    return jax.tree_util.tree_unflatten(treedef, _filled(spec, fill))


@functools.partial(jax.jit, static_argnums=0)
def _filled(spec: tuple, fill: Any) -> list:
    """One array per (shape, dtype) of `spec`, each filled with `fill`."""
    return [jnp.full(shape, fill, dtype) for shape, dtype in spec]


def upcast(tree: PyTree) -> PyTree:
    """Every leaf in its compute dtype (at least float32)."""
    return jax.tree_util.tree_map(lambda g: jnp.asarray(g, compute_dtype(g)), tree)


def map(fn: Callable[..., Any], *trees: PyTree) -> PyTree:  # noqa: A001 - the one tree map the optimizers use
    return jax.tree_util.tree_map(fn, *trees)


def global_norm(tree: PyTree) -> Array:
    """sqrt of the sum of squares of every leaf."""
    return jnp.sqrt(sum((jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(tree)), start=0.0))


def all_finite(tree: PyTree) -> Array:
    """True (a bool scalar) when no leaf holds a NaN or an inf."""
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(tree)]))


def where(condition: Any, new: PyTree, old: PyTree) -> PyTree:
    """`new` where the scalar `condition` holds, else `old`, leaf by leaf (bit-identical either way)."""
    return jax.tree_util.tree_map(lambda n, o: jnp.where(condition, n, o), new, old)


def check_matching(params: PyTree, grads: PyTree, what: str = "grads") -> None:
    """Raise a ValueError naming the key path where `grads` and params differ."""
    m = _trees.first_mismatch(_trees.by_path(grads), _trees.by_path(params))
    if m is not None and m.kind == "paths":
        raise ValueError(
            f"{what} do not match the optimizer's params: missing key paths {m.missing}, "
            f"extra key paths {m.extra}"
        )
    if m is not None:
        raise ValueError(f"{what} leaf {m.path} has shape {m.actual}, but the param has shape {m.expected}")
    # (cast: mypy does not resolve jaxlib's PyTreeDef, and refuses to compare the unresolved type)
    if cast(Any, jax.tree_util.tree_structure(params)) != jax.tree_util.tree_structure(grads):
        raise ValueError(
            f"{what} have the same key paths as params but a different container structure: "
            f"{jax.tree_util.tree_structure(grads)} vs {jax.tree_util.tree_structure(params)}"
        )
