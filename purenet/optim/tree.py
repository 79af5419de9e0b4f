"""Pytree plumbing shared by every optimizer: one place, not one copy per optimizer."""
import jax
import jax.numpy as jnp


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


def check_matching(params, grads, what="grads"):
    """Raise a ValueError naming the key path where `grads` and params differ."""
    p_leaves = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
    g_leaves = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(grads)}
    missing = sorted(set(p_leaves) - set(g_leaves))
    extra = sorted(set(g_leaves) - set(p_leaves))
    if missing or extra:
        raise ValueError(
            f"{what} do not match the optimizer's params: missing key paths {missing}, "
            f"extra key paths {extra}"
        )
    for path, p in p_leaves.items():
        if jnp.shape(g_leaves[path]) != jnp.shape(p):
            raise ValueError(
                f"{what} leaf {path} has shape {jnp.shape(g_leaves[path])}, "
                f"but the param has shape {jnp.shape(p)}"
            )
    if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(grads):
        raise ValueError(
            f"{what} have the same key paths as params but a different container structure: "
            f"{jax.tree_util.tree_structure(grads)} vs {jax.tree_util.tree_structure(params)}"
        )
