"""Input validation shared by layers, losses and optimizers.

Checks on shapes and dtypes run at trace time. Checks on values (label
ranges, NaNs, hyperparameters) run only when the value is concrete: inside
`jit` a traced value cannot be inspected, so those checks are skipped there
and the callers that own concrete data (for example `fit`) run them up front.
"""
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_finite_rows", "check_float_input", "check_hyperparameter", "is_concrete"]


def is_concrete(x: Any) -> bool:
    """True when `x` holds a value we can look at (not a tracer)."""
    return not isinstance(x, jax.core.Tracer)


def check_float_input(x: Any, name: str = "x", ids: Any = None) -> None:
    """Require a floating-point array with a non-empty leading batch axis.

    `ids`, when given, is the layer that reads the input as integer token
    ids (an Embedding first, see `purenet.layers.base.id_layer`): then x
    must be integers in [0, ids.num_embeddings) instead (the range is
    checked when x is concrete).
    """
    dtype = jnp.result_type(x)
    if ids is not None:
        if not jnp.issubdtype(dtype, jnp.integer):
            raise TypeError(
                f"{name} must be integer token ids (the network starts with {ids}), got dtype {dtype}; "
                f"convert it first, e.g. {name}.astype(jnp.int32)"
            )
        if is_concrete(x) and jnp.size(x):
            values = np.asarray(x)
            lo, hi, n = int(values.min()), int(values.max()), ids.num_embeddings
            if lo < 0 or hi >= n:
                raise ValueError(f"{name}: token id {lo if lo < 0 else hi} is out of range for {n} "
                                 f"embeddings [0, {n})")
    elif not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a floating-point array, got dtype {dtype}; "
            f"convert it first, e.g. {name}.astype(jnp.float32)"
        )
    shape = jnp.shape(x)
    if len(shape) == 0:
        raise ValueError(f"{name} must have a batch axis, got a scalar")
    if shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {shape})")


def check_finite_rows(x: Any, name: str = "x") -> None:
    """Raise naming the first row of `x` that holds a NaN or infinity."""
    if not is_concrete(x):
        return
    bad = ~np.isfinite(np.asarray(x)).reshape(np.shape(x)[0], -1).all(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(
            f"{name} has a non-finite value (NaN or inf) in row {row} "
            f"({int(bad.sum())} bad rows of {len(bad)})"
        )


def check_hyperparameter(name: str, value: Any, low: float | None = None, high: float | None = None,
                         low_open: bool = False, high_open: bool = True) -> None:
    """Raise a ValueError naming `name` when a concrete scalar is NaN or out of range.

    The accepted interval is [low, high) by default; `low_open` and
    `high_open` choose open or closed ends. A missing bound is an open
    infinite end: values must be finite. Traced values pass unchecked.
    """
    if value is None or callable(value) or not is_concrete(value):
        return
    if np.ndim(value) != 0:
        return  # per-leaf arrays are the caller's business
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"{name} must be a number, got NaN")
    low_open, high_open = low_open or low is None, high_open or high is None
    low, high = -math.inf if low is None else low, math.inf if high is None else high
    too_low = v <= low if low_open else v < low
    too_high = v >= high if high_open else v > high
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {left}{low}, {high}{right}, got {v}")
