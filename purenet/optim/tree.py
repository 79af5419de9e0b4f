"""Pytree plumbing shared by every optimizer: one place, not one copy per optimizer."""
import jax
import jax.numpy as jnp

from purenet import _trees


def compute_dtype(x):
    """The dtype slot arithmetic runs in: at least float32.

    float16/bfloat16 parameters keep their dtype, but their moments and
    accumulators live in float32, so eps = 1e-8 does not underflow to 0 and
    a zero gradient cannot produce 0/0 = NaN (optax#1754).
    """
    return jnp.promote_types(jnp.result_type(x), jnp.float32)


def zeros_like(params, fill=0.0):
    """A slot tree shaped like params, in the compute dtype, filled with `fill`."""
    return jax.tree_util.tree_map(lambda p: jnp.full(jnp.shape(p), fill, compute_dtype(p)), params)


def upcast(tree):
    return jax.tree_util.tree_map(lambda g: jnp.asarray(g, compute_dtype(g)), tree)


def map(fn, *trees):  # noqa: A001 - the one tree map the optimizers use
    return jax.tree_util.tree_map(fn, *trees)


def global_norm(tree):
    """sqrt of the sum of squares of every leaf."""
    return jnp.sqrt(sum((jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(tree)), start=0.0))


def all_finite(tree):
    """True (a bool scalar) when no leaf holds a NaN or an inf."""
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(tree)]))


def where(condition, new, old):
    """`new` where the scalar `condition` holds, else `old`, leaf by leaf (bit-identical either way)."""
    return jax.tree_util.tree_map(lambda n, o: jnp.where(condition, n, o), new, old)


def check_matching(params, grads, what="grads"):
    """Raise a ValueError naming the key path where `grads` and params differ."""
    m = _trees.first_mismatch(_trees.by_path(grads), _trees.by_path(params))
    if m is not None and m.kind == "paths":
        raise ValueError(
            f"{what} do not match the optimizer's params: missing key paths {m.missing}, "
            f"extra key paths {m.extra}"
        )
    if m is not None:
        raise ValueError(f"{what} leaf {m.path} has shape {m.actual}, but the param has shape {m.expected}")
    if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(grads):
        raise ValueError(
            f"{what} have the same key paths as params but a different container structure: "
            f"{jax.tree_util.tree_structure(grads)} vs {jax.tree_util.tree_structure(params)}"
        )
