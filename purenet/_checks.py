"""Input validation shared by layers, losses and optimizers.

Checks on shapes and dtypes run at trace time. Checks on values (label
ranges, NaNs, hyperparameters) run only when the value is concrete: inside
`jit` a traced value cannot be inspected, so those checks are skipped there
and the callers that own concrete data (for example `fit`) run them up front.

Integer ids and labels are checked on the caller's own array, before any
cast: with x64 off JAX holds integers as int32, and jnp.asarray wraps a numpy
int64 2**32 + 1 to 1 (a valid, wrong label) without a word.
"""
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["as_array", "check_finite_rows", "check_float_input", "check_hyperparameter", "check_index_range",
           "is_concrete"]


def is_concrete(x: Any) -> bool:
    """True when `x` holds a value we can look at (not a tracer).

    Args:
        x: any value: an array, a Python or NumPy scalar, or a JAX tracer.

    Returns:
        False for a JAX tracer (inside `jit`, `vmap`, `grad`), True otherwise.
    """
    return not isinstance(x, jax.core.Tracer)


def check_index_range(x: Any, n: int, name: str, what: str = "token id", of: str = "embeddings") -> None:
    """Raise naming the offending value unless the integers of `x` lie in [0, n).

    `n` counts ids (embedding rows) or classes. Pass the caller's array as
    given, before any cast: the values are read on their own dtype, so a
    numpy int64 `2**32 + 1` is refused as itself rather than passed as the 1
    that int32 (x64 off) would make of it. Traced values cannot be
    inspected: inside `jit` they pass unchecked.

    Args:
        x: integer ids or labels, any shape; an empty array passes.
        n: the number of valid values (ids or classes): the range is [0, n).
        name: what `x` is called in the error message (e.g. "labels").
        what: what one value of `x` is, for the message ("token id", "label").
        of: what `n` counts, for the message ("embeddings", "classes").

    Raises:
        ValueError: if a concrete value of `x` is negative or at least `n`.
    """
    if not is_concrete(x) or not np.size(x):
        return
    values = np.asarray(x)
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"{name}: {what} {lo if lo < 0 else hi} is out of range for {n} {of} [0, {n})")


def as_array(x: Any, name: str = "x") -> jax.Array:
    """`jnp.asarray(x)`, refusing concrete integers that the cast would wrap.

    With x64 off JAX holds integers in 32 bits: a numpy int64 value outside
    int32's range would wrap silently (`2**32 + 1` becomes 1), so it is a
    ValueError naming `name` and the value. Traced values pass unchecked.

    Args:
        x: an array-like (numpy array, list, scalar, JAX array or tracer).
        name: what `x` is called in the error message.

    Returns:
        `x` as a JAX array (JAX arrays and tracers are returned as they are).

    Raises:
        ValueError: if `x` holds concrete integers outside the range of JAX's
            integer dtype (int32 while x64 is off).
    """
    if is_concrete(x) and not isinstance(x, jax.Array) and np.size(x):
        values = np.asarray(x)
        if values.dtype.kind in "iu":
            target = jax.dtypes.canonicalize_dtype(values.dtype)
            info = np.iinfo(target)
            lo, hi = int(values.min()), int(values.max())
            if lo < info.min or hi > info.max:
                raise ValueError(f"{name}: integer {lo if lo < info.min else hi} does not fit {target}, JAX's "
                                 f"integers while x64 is off (it would wrap); use values in "
                                 f"[{info.min}, {info.max}] or enable x64")
    return jnp.asarray(x)


def check_float_input(x: Any, name: str = "x", ids: Any = None) -> None:
    """Require a floating-point array with a non-empty leading batch axis.

    `ids`, when given, is the layer that reads the input as integer token
    ids (an Embedding first, see `purenet.layers.base.id_layer`): then x
    must be integers in [0, ids.num_embeddings) instead (the range is
    checked when x is concrete).

    Args:
        x: a network input, shape (batch, *in_shape).
        name: what `x` is called in the error messages.
        ids: the layer that reads integer ids (it has `num_embeddings`), or
            None for a network that reads floats.

    Raises:
        TypeError: if `x` is not floating point (or, with `ids`, not integer).
        ValueError: if `x` is a scalar or an empty batch, or (with `ids`) a
            concrete id lies outside [0, ids.num_embeddings).
    """
    dtype = jnp.result_type(x)
    if ids is not None:
        if not jnp.issubdtype(dtype, jnp.integer):
            raise TypeError(
                f"{name} must be integer token ids (the network starts with {ids}), got dtype {dtype}; "
                f"convert it first, e.g. {name}.astype(jnp.int32)"
            )
        check_index_range(x, ids.num_embeddings, name)
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
    """Raise naming the first row of `x` that holds a NaN or infinity.

    Use it on data before training: a non-finite input makes every gradient
    NaN. Traced values (inside `jit`) cannot be inspected and pass unchecked.

    Args:
        x: a numeric array with a leading batch axis, shape (batch, ...).
        name: what `x` is called in the error message.

    Raises:
        ValueError: if a concrete `x` holds a NaN or an infinity; the message
            names the first such row and how many rows are bad.
    """
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
    infinite end: values must be finite. Traced values pass unchecked, and
    so do None, callables (schedules) and arrays of rank >= 1.

    Args:
        name: the hyperparameter's name, for the error message.
        value: its value.
        low: the lower bound, or None for none (-inf, open).
        high: the upper bound, or None for none (+inf, open).
        low_open: True to exclude `low` itself.
        high_open: True (the default) to exclude `high` itself.

    Raises:
        ValueError: if a concrete scalar `value` is NaN or outside the interval.
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
