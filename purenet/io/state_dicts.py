"""Any PyTorch state_dict into purenet's params: a name map and the layout rules (`pn.weights` re-exports these).

    params = pn.weights.from_state_dict(like, state_dict, names, transforms)

`LAYOUTS` holds PyTorch's weight layouts by name (Linear (out, in) -> Dense W
(in, out); Conv2d (out, in, kh, kw) -> Conv2D W (kh, kw, in, out)); the
docs guide "Weights in and out" (docs/guides/weights.md) is the recipe.
"""
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from purenet.io.safetensors import WeightsError, _shape_dtype, _to_numpy, flatten

__all__ = ["LAYOUTS", "from_state_dict"]

PyTree = Any


def _layout(rank: int, axes: tuple[int, ...], what: str) -> Callable[[np.ndarray], np.ndarray]:
    def move(w: np.ndarray) -> np.ndarray:
        if w.ndim != rank:
            raise ValueError(f"a {what} weight has {rank} axes, got shape {w.shape}")
        return np.transpose(w, axes)
    return move


LAYOUTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda w: w,
    "linear": _layout(2, (1, 0), "Linear"),           # nn.Linear (out, in) -> Dense W (in, out)
    "conv1d": _layout(3, (2, 1, 0), "Conv1d"),        # nn.Conv1d (out, in, k) -> Conv1D W (k, in, out)
    "conv2d": _layout(4, (2, 3, 1, 0), "Conv2d"),     # nn.Conv2d (out, in, kh, kw) -> Conv2D W (kh, kw, in, out)
}
"""PyTorch's weight layouts -> purenet's, by name, for `from_state_dict`'s transforms."""


def _castable(src: np.dtype, dst: np.dtype) -> bool:
    kinds = (jnp.floating, jnp.complexfloating, jnp.signedinteger, jnp.unsignedinteger, jnp.bool_)
    return any(jnp.issubdtype(src, k) and jnp.issubdtype(dst, k) for k in kinds)


def _cast(value: np.ndarray, dtype: np.dtype, where: str) -> np.ndarray:
    """`value` as `dtype` (a kind `_castable` allows), refusing a cast that changes values rather than
    rounding them: an integer outside dtype's range, or a finite float (complex) that overflows to
    inf or NaN. A narrower float rounds to nearest (tiny values may become 0): that stays allowed."""
    if value.dtype == dtype:
        return value
    if jnp.issubdtype(dtype, jnp.integer) and value.size:
        info, low, high = jnp.iinfo(dtype), int(value.min()), int(value.max())
        for v in (low, high):
            if not info.min <= v <= info.max:
                raise WeightsError(f"{where}: {v} is outside {dtype}'s range [{info.min}, {info.max}]")
    with np.errstate(over="ignore", invalid="ignore"):
        out = value.astype(dtype)
    if jnp.issubdtype(dtype, jnp.inexact):
        lost = np.isfinite(value) & ~np.isfinite(out)
        if lost.any():
            raise WeightsError(f"{where}: the finite {value.dtype} value {value[lost][0]} overflows {dtype} "
                               f"(to {out[lost][0]})")
    return out


def from_state_dict(like: PyTree, state_dict: Mapping[str, Any], names: Mapping[str, str],
                    transforms: Mapping[str, str | Callable[[np.ndarray], np.ndarray]] | None = None, *,
                    strict: bool = True) -> PyTree:
    """Fill a params tree shaped like `like` from a PyTorch-style state_dict.

    Transforms apply to the state_dict's value (numpy; torch tensors converted) before the shape
    check. Each value must then have like's shape; it is cast to like's dtype within its kind (float
    to float, int to int), as JAX holds that dtype (int64 -> int32, float64 -> float32 without
    jax_enable_x64). A cast that changes values is a WeightsError naming the tensor: an integer
    outside the dtype's range, a finite float that overflows (to inf, or NaN in a float8 without
    inf). Floats narrower than the value's round to nearest (float64 -> float32 keeps about 7
    digits; values below float32's range become subnormal or 0), as torch's .float() does. With
    strict (the default) every state_dict key must be used. Any mismatch is a WeightsError naming
    the tensors. Returns like's structure with jax arrays.

    Args:
        like: the params tree to fill (arrays or `jax.ShapeDtypeStruct`s, e.g. jax.eval_shape
            of `pn.init`): its names, shapes and dtypes.
        state_dict: {key: tensor} (torch tensors or numpy arrays).
        names: {purenet tensor name (`flatten(like)`'s keys): state_dict key}, one for every
            leaf of like (several leaves may read one key, e.g. slices of a fused matrix).
        transforms: {purenet name: a name in LAYOUTS ("linear", "conv1d", "conv2d") or a
            function array -> array}, applied to the state_dict's value before the shape check;
            None (or a name left out) for none.
        strict: True to require that every state_dict key is used.

    Returns:
        A tree like `like` of jax arrays, in the dtypes JAX holds for like's.

    Raises:
        WeightsError: if the name map does not match like's leaves, a key is absent from the
            state_dict, (strict) a state_dict key is unused, a transform fails, or a value has
            the wrong shape, an incompatible dtype kind, or a value the cast would change.
        ValueError: if a transform names a layout not in LAYOUTS.
    """
    wanted = flatten(like)
    names, transforms = dict(names), dict(transforms or {})
    missing = [n for n in wanted if n not in names]
    unknown = [n for n in names if n not in wanted] + [n for n in transforms if n not in names]
    if missing or unknown:
        raise WeightsError(f"the name map does not match the parameters: no state_dict key for {missing}; "
                           f"not parameters: {sorted(set(unknown))}")
    absent = sorted({key for key in names.values() if key not in state_dict})
    if absent:
        raise WeightsError(f"the state_dict has no {absent}")
    unused = sorted(set(state_dict) - set(names.values()))
    if strict and unused:
        raise WeightsError(f"the state_dict has keys the name map does not use: {unused} (strict=False ignores them)")
    leaves = []
    for name, leaf in wanted.items():
        key = names[name]
        value = _to_numpy(state_dict[key])
        transform = transforms.get(name, "identity")
        if isinstance(transform, str):
            if transform not in LAYOUTS:
                raise ValueError(f"unknown layout {transform!r} for {name} (known: {', '.join(LAYOUTS)})")
            transform = LAYOUTS[transform]
        try:
            value = np.asarray(transform(value))
        except ValueError as e:
            raise WeightsError(f"state_dict[{key!r}] -> {name}: {e}") from None
        shape, dtype = _shape_dtype(leaf)
        if value.shape != shape:
            raise WeightsError(f"state_dict[{key!r}] gives {name} shape {value.shape}, expected {shape}")
        if not _castable(value.dtype, dtype):
            raise WeightsError(f"state_dict[{key!r}] has dtype {value.dtype}, {name} needs {dtype}")
        held = np.dtype(jax.dtypes.canonicalize_dtype(dtype))  # what jnp.asarray makes of dtype
        leaves.append(jnp.asarray(_cast(value, held, f"state_dict[{key!r}] -> {name}")))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)
