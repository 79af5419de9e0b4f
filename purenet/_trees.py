"""Comparing two trees leaf by leaf, keyed by path: the one walk that gradient checks,
optimizers and checkpoints share (each words its own error from the mismatch).

A tree is flattened to {key path string: leaf} (`by_path`), so trees of
different container types (a file's leaves against a freshly built state)
compare by the names of their leaves, not by position.
"""
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["Mismatch", "by_path", "first_mismatch"]


class Mismatch(NamedTuple):
    """The first difference: kind "paths" (missing: paths only `expected` has, extra: only
    `actual` has, both sorted), or "shape" / "dtype" at `path` (actual's vs expected's value)."""

    kind: str
    path: str | None = None
    actual: Any = None
    expected: Any = None
    missing: list = []
    extra: list = []


def by_path(tree: Any) -> dict[str, Any]:
    """{jax.tree_util.keystr(path): leaf} in flattening order."""
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def first_mismatch(actual: Mapping[str, Any], expected: Mapping[str, Any], shape: bool = True,
                   dtype: Callable[[Any], Any] | None = None) -> Mismatch | None:
    """The first way `actual` differs from `expected` (both {path: leaf}), or None.

    Key paths first (every missing and extra path at once); then, leaf by leaf
    in expected's order, the shape (when `shape`) and the dtype (when `dtype`,
    a function leaf -> dtype, is given).
    """
    missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
    if missing or extra:
        return Mismatch("paths", missing=missing, extra=extra)
    for path, want in expected.items():
        got = actual[path]
        if shape and jnp.shape(got) != jnp.shape(want):
            return Mismatch("shape", path, jnp.shape(got), jnp.shape(want))
        if dtype is not None and dtype(got) != dtype(want):
            return Mismatch("dtype", path, dtype(got), dtype(want))
    return None
