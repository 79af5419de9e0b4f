"""Losses, each beside its handwritten backward dL/d(output).

All losses average over the N examples of the batch (axis 0) and sum over
the outputs of an example (the last axis); an output with extra axes, such
as (N, T, k) for a sequence, averages over every position (N = N T):

    mse                    L = 1/N sum_n sum_k (y_nk - t_nk)^2          dL/dy = 2 (y - t) / N
    cross_entropy          L = -1/N sum_n sum_k t_nk log y_nk           dL/dy = -t / (N y)
    binary_cross_entropy   L = -1/N sum [t log y + (1-t) log(1-y)]      dL/dy = (y - t) / (N y (1-y))

After a Softmax (or Sigmoid) output the network functions use the fused
forms on the logits z instead, which are stable at any magnitude:

    softmax_cross_entropy  L = -1/N sum t * log_softmax(z)              dL/dz = (softmax(z) - t) / N
    sigmoid_binary_cross_entropy
                           L = 1/N sum [softplus(z) - t z]   dL/dz = (sigmoid(z) - t) / N

Infinite logits are clipped to a quarter of the largest float (see finite_logits).
A network that outputs logits itself (`pn.llama`, a `GPT` without Softmax:
its `outputs = "logits"`) gets the fused form for "cross_entropy" too. The
two fused forms are also loss names of their own, "softmax_cross_entropy"
and "sigmoid_binary_cross_entropy": they read any network's outputs as logits.

Cross-entropy targets are integer labels of the output's shape without its
last axis ((N,), or (N, T) for a sequence) or distributions of the output's
shape; other targets must match the output's shape exactly.

Your own loss is a `Loss(value, backward)`; it is accepted wherever a loss
name is. `LOSSES` is the one registry of names.
"""
import dataclasses
from typing import Any, Callable, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import xlog1py, xlogy

from purenet._checks import check_index_range, is_concrete
from purenet.layers.base import Array, PyTree, positions, wide

__all__ = [
    "LOSSES", "LOSSES_FROM_LOGITS", "Loss", "add_l2_gradient", "binary_cross_entropy", "binary_cross_entropy_backward",
    "checked", "class_targets", "cross_entropy", "cross_entropy_backward", "finite_logits", "get", "has_l2",
    "l2_backward", "l2_penalty", "mse", "mse_backward", "mse_hessian_sqrt", "mse_sample", "sigmoid_binary_cross_entropy",
    "sigmoid_binary_cross_entropy_backward", "sigmoid_hessian_sqrt", "sigmoid_sample", "softmax_cross_entropy",
    "softmax_cross_entropy_backward", "softmax_hessian_sqrt", "softmax_sample", "value_targets",
]


@dataclasses.dataclass(frozen=True)
class Loss:
    """A loss as a pair of pure functions of (output, target).

        value(out, y)    -> the scalar loss, a mean over the batch
        backward(out, y) -> dL/dout, of out's shape (the handwritten derivative)

    For example the Huber loss, written with its derivative:

        def huber(out, y):
            r = jnp.abs(out - y)
            return jnp.sum(jnp.where(r < 1, r**2 / 2, r - 1 / 2)) / out.shape[0]

        def huber_backward(out, y):
            return jnp.clip(out - y, -1, 1) / out.shape[0]

        pn.Loss(huber, huber_backward)

    `pn.check_grads(net, x, y, loss=pn.Loss(...))` checks the backward
    against autodiff of the value. Per-example functions take example i's
    loss as value(out[i:i+1], y[i:i+1]), so value must average over axis 0.

    What the rest of the library asks a loss, it declares (all optional):
    `targets`, `hessian_sqrt` and `sample` below.

    Args:
        value: `value(out, y)`, the scalar loss: a mean over axis 0 (the batch).
        backward: `backward(out, y)`, dL/dout of out's shape.
        name: the loss's name in messages; None for value's `__name__`.
        targets: "classes" (integer labels of the output's shape without its
            last axis, or distributions), "values" (the output's exact shape),
            or None (the default): the loss's own backward judges them (the
            input checks run it on shapes).
        hessian_sqrt: `out -> R` (*out.shape[:-1], k, k), the rows of R at each
            position a square root of that position's loss Hessian times the
            positions P (`sum_c r_c r_c^T = P d^2 L / d out^2` at batch 1):
            fisher="exact" (GGN, KFLR) reads it. None (the default): not declared.
        sample: `(out, key, samples) -> targets` (samples, *targets' shape)
            drawn from the model's predictive distribution, whose negative
            log-likelihood this loss is: fisher="mc" reads it. None (the
            default): not declared.

    Raises:
        TypeError: if `value` or `backward` is not callable.
    """

    value: Callable
    backward: Callable
    name: str | None = None
    targets: str | None = None
    hessian_sqrt: Callable | None = None
    sample: Callable | None = None

    def __post_init__(self) -> None:
        if not (callable(self.value) and callable(self.backward)):
            raise TypeError(f"Loss(value, backward) needs two functions, got {self.value!r} and {self.backward!r}")

    def __str__(self) -> str:
        return cast(str, self.name or getattr(self.value, "__name__", repr(self.value)))


def _batch_size(y):
    """The number of positions a loss averages over: the batch, times any extra axes."""
    return positions(jnp.shape(y))


# ---------------------------------------------------------------- targets


def _check_same_shape(name, out, target):
    if jnp.shape(target) != jnp.shape(out):
        raise ValueError(
            f"{name}: target shape {jnp.shape(target)} does not match the network output "
            f"shape {jnp.shape(out)}"
        )


def _as_float(target, out):
    return jnp.asarray(target).astype(jnp.result_type(out))


def class_targets(name: str, out: Array, target: Any) -> Array:
    """Cross-entropy targets as distributions: integer labels become one-hot rows.

    Labels (N,) (or (N, T)) become one-hot rows; distributions (N, k) pass
    through checked. Concrete labels must lie in [0, k), checked on the
    caller's array before any cast (a numpy int64 `2**32 + 1` is refused,
    not wrapped to label 1 as int32 would with x64 off). Traced labels
    (inside `jit`) cannot be checked.

    Args:
        name: the loss's name, for the error messages.
        out: the output the targets are for, (N, ..., k).
        target: integer labels of out's shape without its last axis, or
            distributions of out's shape.

    Returns:
        The targets as floats of out's shape and dtype.

    Raises:
        TypeError: if labels (one axis fewer than out) are not integers.
        ValueError: if the target's shape fits neither form, or a concrete
            label lies outside [0, k).
    """
    given, target = target, jnp.asarray(target)
    k = jnp.shape(out)[-1]
    if target.ndim == jnp.ndim(out) - 1:
        if not jnp.issubdtype(target.dtype, jnp.integer):
            raise TypeError(
                f"{name}: labels of shape {target.shape} must be integer class indices, "
                f"got dtype {target.dtype} (pass distributions of shape {jnp.shape(out)} "
                f"for soft targets)"
            )
        if target.shape != jnp.shape(out)[:-1]:
            raise ValueError(
                f"{name}: labels of shape {target.shape} do not match the batch of the "
                f"output shape {jnp.shape(out)}"
            )
        check_index_range(given, k, name, "label", "classes")
        return jax.nn.one_hot(target, k, dtype=jnp.result_type(out))
    _check_same_shape(name, out, target)
    return _as_float(target, out)


def value_targets(name: str, out: Array, target: Any) -> Array:
    """Targets for mse / binary cross-entropy: the output's exact shape.

    Args:
        name: the loss's name, for the error message.
        out: the output the targets are for.
        target: the targets, of out's exact shape.

    Returns:
        The targets as an array of out's dtype.

    Raises:
        ValueError: if the target's shape is not out's.
    """
    _check_same_shape(name, out, target)
    return _as_float(target, out)


# ---------------------------------------------------------------- losses on outputs


def mse(y: Array, t: Any) -> Array:
    """Mean squared error, summed over the outputs and averaged over the positions.

        L = 1/N sum_n sum_k (y_nk - t_nk)^2

    N counts the batch times any axes between it and the last.

    Args:
        y: the network's outputs (N, ..., k).
        t: the targets, of y's exact shape.

    Returns:
        The scalar loss L.

    Raises:
        ValueError: if the targets' shape is not y's.
    """
    t = value_targets("mse", y, t)
    return jnp.sum((y - t) ** 2) / _batch_size(y)


def mse_backward(y: Array, t: Any) -> Array:
    """The gradient of `mse` with respect to the outputs: dL/dy = 2 (y - t) / N.

    Args:
        y: the network's outputs (N, ..., k).
        t: the targets, of y's exact shape.

    Returns:
        dL/dy, y's shape.

    Raises:
        ValueError: if the targets' shape is not y's.
    """
    t = value_targets("mse", y, t)
    return 2 * (y - t) / _batch_size(y)


def cross_entropy(y: Array, t: Any) -> Array:
    """Cross-entropy of predicted probabilities against labels or distributions.

        L = -1/N sum_n sum_k t_nk log y_nk

    Terms with t_nk = 0 are 0 even where y_nk = 0 (`xlogy`). After a
    Softmax the network functions use `softmax_cross_entropy` on the logits
    instead (stable at any magnitude).

    Args:
        y: probabilities (N, ..., k), e.g. a Softmax's outputs.
        t: the targets: integer labels of y's shape without its last axis
            ((N,), or (N, T) for a sequence), or distributions of y's shape.

    Returns:
        The scalar loss L.

    Raises:
        TypeError: if labels (targets of one axis fewer than y) are not integers.
        ValueError: if the targets' shape fits neither form, or a concrete
            label lies outside [0, k).
    """
    t = class_targets("cross_entropy", y, t)
    return -jnp.sum(xlogy(t, y)) / _batch_size(y)


def cross_entropy_backward(y: Array, t: Any) -> Array:
    """The gradient of `cross_entropy` with respect to the probabilities: dL/dy = -t / (N y).

    Entries with t = 0 are exactly 0 (no 0 / 0 where y = 0).

    Args:
        y: probabilities (N, ..., k).
        t: the targets: integer labels of y's shape without its last axis
            ((N,), or (N, T) for a sequence), or distributions of y's shape.

    Returns:
        dL/dy, y's shape.

    Raises:
        TypeError: if labels (targets of one axis fewer than y) are not integers.
        ValueError: if the targets' shape fits neither form, or a concrete
            label lies outside [0, k).
    """
    t = class_targets("cross_entropy", y, t)
    return -jnp.where(t == 0, 0.0, t / y) / _batch_size(y)


def binary_cross_entropy(y: Array, t: Any) -> Array:
    """Binary cross-entropy of predicted probabilities against targets in [0, 1].

        L = -1/N sum [t log y + (1 - t) log(1 - y)]

    Terms whose weight (t or 1 - t) is 0 are 0 (`xlogy`, `xlog1py`). After a
    Sigmoid the network functions use `sigmoid_binary_cross_entropy` on the
    logits instead.

    Args:
        y: probabilities (N, ..., k), e.g. a Sigmoid's outputs.
        t: the targets, of y's exact shape.

    Returns:
        The scalar loss L.

    Raises:
        ValueError: if the targets' shape is not y's.
    """
    t = value_targets("binary_cross_entropy", y, t)
    return -jnp.sum(xlogy(t, y) + xlog1py(1 - t, -y)) / _batch_size(y)


def binary_cross_entropy_backward(y: Array, t: Any) -> Array:
    """The gradient of `binary_cross_entropy`: dL/dy = (y - t) / (N y (1 - y)).

    Computed as ((1 - t) / (1 - y) - t / y) / N, each term exactly 0 where
    its weight is 0.

    Args:
        y: probabilities (N, ..., k).
        t: the targets, of y's exact shape.

    Returns:
        dL/dy, y's shape.

    Raises:
        ValueError: if the targets' shape is not y's.
    """
    t = value_targets("binary_cross_entropy", y, t)
    pos = jnp.where(t == 0, 0.0, t / y)
    neg = jnp.where(t == 1, 0.0, (1 - t) / (1 - y))
    return (neg - pos) / _batch_size(y)


# ---------------------------------------------------------------- fused forms on logits


def finite_logits(z: Array) -> Array:
    """Clip logits to +-(largest float / 4), so +-inf become finite (NaN stays NaN).

    An infinite logit is then the certainty it stands for: the loss is 0 when
    it is the target and huge but finite otherwise, and the gradient is the
    finite p - t, instead of inf - inf = NaN. A quarter of the largest float
    keeps differences of two clipped logits finite too.

    Args:
        z: logits, any shape, of a floating dtype.

    Returns:
        z clipped to [-big, big], big = finfo(z.dtype).max / 4 (z's shape and dtype).
    """
    big = jnp.finfo(jnp.result_type(z)).max / 4
    return jnp.clip(z, -big, big)


def _wide_logits(z):
    """Logits for the log-sum-exp: clipped in their own dtype, then at least float32 (so
    bfloat16 / float16 logits get float32 statistics; float32 and float64 are untouched)."""
    return wide(finite_logits(z))


def softmax_cross_entropy(z: Array, t: Any) -> Array:
    """Cross-entropy of softmax(z) computed from the logits z, stable at any magnitude.

        L = -1/N sum t * log_softmax(z)

    Logits are clipped by `finite_logits` and computed in at least float32.

    Args:
        z: logits (N, ..., k).
        t: the targets: integer labels of y's shape without its last axis
            ((N,), or (N, T) for a sequence), or distributions of y's shape.

    Returns:
        The scalar loss L.

    Raises:
        TypeError: if labels (targets of one axis fewer than y) are not integers.
        ValueError: if the targets' shape fits neither form, or a concrete
            label lies outside [0, k).
    """
    z = _wide_logits(z)
    t = class_targets("cross_entropy", z, t)
    return -jnp.sum(t * jax.nn.log_softmax(z, axis=-1)) / _batch_size(z)


def softmax_cross_entropy_backward(z: Array, t: Any) -> Array:
    """The gradient of `softmax_cross_entropy` in the logits: dL/dz = (softmax(z) - t) / N.

    Args:
        z: logits (N, ..., k).
        t: the targets: integer labels of y's shape without its last axis
            ((N,), or (N, T) for a sequence), or distributions of y's shape.

    Returns:
        dL/dz, z's shape and dtype.

    Raises:
        TypeError: if labels (targets of one axis fewer than y) are not integers.
        ValueError: if the targets' shape fits neither form, or a concrete
            label lies outside [0, k).
    """
    zw = _wide_logits(z)
    t = class_targets("cross_entropy", zw, t)
    return ((jax.nn.softmax(zw, axis=-1) - t) / _batch_size(z)).astype(jnp.result_type(z))


def sigmoid_binary_cross_entropy(z: Array, t: Any) -> Array:
    """Binary cross-entropy of sigmoid(z) computed from the logits z, stable at any magnitude.

        L = 1/N sum [softplus(z) - t z]

    Logits are clipped by `finite_logits` and computed in at least float32.

    Args:
        z: logits (N, ..., k).
        t: the targets, of y's exact shape.

    Returns:
        The scalar loss L.

    Raises:
        ValueError: if the targets' shape is not y's.
    """
    # softplus(z) = log(1 + e^z) = max(z, 0) + log1p(e^-|z|), via logaddexp,
    # whose derivative is exact at z = 0 (max and abs are kinked there).
    z = _wide_logits(z)
    t = value_targets("binary_cross_entropy", z, t)
    return jnp.sum(jnp.logaddexp(0.0, z) - t * z) / _batch_size(z)


def sigmoid_binary_cross_entropy_backward(z: Array, t: Any) -> Array:
    """The gradient of `sigmoid_binary_cross_entropy` in the logits: dL/dz = (sigmoid(z) - t) / N.

    Args:
        z: logits (N, ..., k).
        t: the targets, of y's exact shape.

    Returns:
        dL/dz, z's shape and dtype.

    Raises:
        ValueError: if the targets' shape is not y's.
    """
    zw = _wide_logits(z)
    t = value_targets("binary_cross_entropy", zw, t)
    return ((jax.nn.sigmoid(zw) - t) / _batch_size(z)).astype(jnp.result_type(z))


# ---------------------------------------------------------------- the Hessians' square roots and sampling


def mse_hessian_sqrt(y: Array) -> Array:
    """sqrt(2) I at every position: the Hessian of (y - t)^2 summed over the k outputs is 2 I.

    Args:
        y: the outputs (..., k).

    Returns:
        (..., k, k): sqrt(2) times the identity at every position.
    """
    k = y.shape[-1]
    return jnp.broadcast_to(np.sqrt(2.0) * jnp.eye(k, dtype=y.dtype), (*y.shape[:-1], k, k))


def softmax_hessian_sqrt(z: Array) -> Array:
    """A square root of cross-entropy's Hessian in the logits, diag(p) - p p^T (p = softmax(z)).

    Its rows are `r_c = sqrt(p_c) (e_c - p)`, and `sum_c r_c r_c^T = diag(p) - p p^T`.

    Args:
        z: logits (..., k).

    Returns:
        R (..., k, k), row c the vector r_c at every position.
    """
    p = jax.nn.softmax(finite_logits(z), axis=-1)
    return jnp.sqrt(p)[..., :, None] * (jnp.eye(z.shape[-1], dtype=z.dtype) - p[..., None, :])


def sigmoid_hessian_sqrt(z: Array) -> Array:
    """diag(sqrt(p (1 - p))), p = sigmoid(z): a square root of binary cross-entropy's Hessian in the logits.

    Args:
        z: logits (..., k).

    Returns:
        (..., k, k): the diagonal matrix of sqrt(p (1 - p)) at every position.
    """
    p = jax.nn.sigmoid(finite_logits(z))
    return jnp.sqrt(p * (1 - p))[..., :, None] * jnp.eye(z.shape[-1], dtype=z.dtype)


def mse_sample(y: Array, key: Array, samples: int) -> Array:
    """f + N(0, I/2): the Gaussian whose negative log-likelihood is the squared error (up to a constant).

    Args:
        y: the outputs f (N, ..., k), the Gaussian's mean.
        key: the PRNG key.
        samples: how many draws per output.

    Returns:
        (samples, *y.shape): the sampled targets.
    """
    return y + np.sqrt(0.5) * jax.random.normal(key, (samples, *y.shape), y.dtype)


def softmax_sample(z: Array, key: Array, samples: int) -> Array:
    """Class labels drawn from softmax(z), (samples, *z.shape[:-1]).

    Args:
        z: logits (N, ..., k).
        key: the PRNG key.
        samples: how many draws per position.

    Returns:
        Integer labels (samples, *z.shape[:-1]).
    """
    return jax.random.categorical(key, finite_logits(z), axis=-1, shape=(samples, *z.shape[:-1]))


def sigmoid_sample(z: Array, key: Array, samples: int) -> Array:
    """0/1 targets drawn from sigmoid(z).

    Args:
        z: logits (N, ..., k).
        key: the PRNG key.
        samples: how many draws per output.

    Returns:
        (samples, *z.shape): 0 or 1 in z's dtype, 1 with probability sigmoid(z).
    """
    return jax.random.bernoulli(key, jax.nn.sigmoid(finite_logits(z)), (samples, *z.shape)).astype(z.dtype)


_MSE = Loss(mse, mse_backward, targets="values", hessian_sqrt=mse_hessian_sqrt, sample=mse_sample)
_SOFTMAX_CE = Loss(softmax_cross_entropy, softmax_cross_entropy_backward, targets="classes",
                   hessian_sqrt=softmax_hessian_sqrt, sample=softmax_sample)
_SIGMOID_BCE = Loss(sigmoid_binary_cross_entropy, sigmoid_binary_cross_entropy_backward, targets="values",
                    hessian_sqrt=sigmoid_hessian_sqrt, sample=sigmoid_sample)

LOSSES = {
    "mse": _MSE,
    "cross_entropy": Loss(cross_entropy, cross_entropy_backward, targets="classes"),
    "binary_cross_entropy": Loss(binary_cross_entropy, binary_cross_entropy_backward, targets="values"),
    "softmax_cross_entropy": _SOFTMAX_CE,
    "sigmoid_binary_cross_entropy": _SIGMOID_BCE,
}
# The same losses computed from the logits of the output activation they follow.
LOSSES_FROM_LOGITS = {"cross_entropy": _SOFTMAX_CE, "binary_cross_entropy": _SIGMOID_BCE}


def get(loss: str | Loss) -> Loss:
    """The Loss for a registered name, or `loss` itself when it is a Loss.

    Args:
        loss: a key of `LOSSES` ("mse", "cross_entropy",
            "binary_cross_entropy", "softmax_cross_entropy",
            "sigmoid_binary_cross_entropy") or a `Loss`.

    Returns:
        The `Loss`.

    Raises:
        ValueError: if `loss` is neither a registered name nor a `Loss`.
    """
    if isinstance(loss, Loss):
        return loss
    try:
        return LOSSES[loss]
    except (KeyError, TypeError):
        raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)} "
                         f"or pass your own pn.Loss(value, backward)") from None


def _numeric_array(v) -> bool:
    """A jax / numpy array or Python number of a numeric dtype (not None, a tuple, a bool or a string)."""
    if not isinstance(v, (jax.Array, np.ndarray, np.generic, int, float)) or isinstance(v, bool):
        return False
    return jnp.issubdtype(jnp.result_type(v), jnp.number)


def _what(v) -> str:
    """What a loss function returned, for an error message."""
    if isinstance(v, (jax.Array, np.ndarray)):
        return f"an array of shape {jnp.shape(v)} and dtype {jnp.result_type(v)}"
    return "None" if v is None else f"a {type(v).__name__} ({str(v)[:80]})"


def checked(loss: Loss) -> Loss:
    """`loss` with its results checked (at trace time) on every call, naming the loss.

    value must return a numeric scalar array, backward a numeric array of
    out's shape.

    Args:
        loss: a user's `Loss`.

    Returns:
        A `Loss` with the same declarations and name whose value and backward
            raise, naming the loss, when the wrapped functions return something
            else: TypeError for a non-numeric result, ValueError for a wrong shape.
    """

    def value(out, y):
        v = loss.value(out, y)
        if not _numeric_array(v):
            raise TypeError(f"loss {loss}: value returned {_what(v)}, but a loss must be a numeric scalar array")
        if jnp.ndim(v) != 0:
            raise ValueError(f"loss {loss}: value returned shape {jnp.shape(v)}, but a loss must be a scalar")
        return v

    def backward(out, y):
        d = loss.backward(out, y)
        if not _numeric_array(d):
            raise TypeError(f"loss {loss}: backward returned {_what(d)}, but dL/dout must be a numeric array of "
                            f"the output's shape {jnp.shape(out)}")
        if jnp.shape(d) != jnp.shape(out):
            raise ValueError(f"loss {loss}: backward returned shape {jnp.shape(d)}, but dL/dout must have "
                             f"the output's shape {jnp.shape(out)}")
        return d

    return dataclasses.replace(loss, value=value, backward=backward, name=str(loss))  # its declarations kept


# ---------------------------------------------------------------- L2


def _half_sum_of_squares(w, l2):
    """l2/2 * sum(w**2) without overflow: in at least float32, with w scaled by s = max|w|.

    sum((w/s)**2) <= size, and (l2/2 * sum((w/s)**2)) * s * s overflows only
    when the penalty itself does; a (traced) zero l2 gives 0, never 0 * inf = NaN.
    The result has w's dtype.
    """
    u = w.astype(jnp.promote_types(w.dtype, jnp.float32))
    peak = jax.lax.stop_gradient(jnp.max(jnp.abs(u), initial=0))
    s = jnp.where(peak > 0, peak, 1)
    u = u / s
    return ((0.5 * l2 * jnp.sum(u * u)) * s * s).astype(w.dtype)


def has_l2(l2: Any) -> bool:
    """False only for a concrete zero: then the l2 terms are skipped, not added as zeros.

    Args:
        l2: the l2 coefficient: a number, a scalar array, or a traced value.

    Returns:
        False when `l2` is a concrete scalar equal to 0, True otherwise.
    """
    return not (is_concrete(l2) and np.ndim(l2) == 0 and float(l2) == 0)


def l2_penalty(params: PyTree, l2: Any, mask: PyTree) -> Array | float:
    """The penalty `l2/2 * sum W^2` over every leaf where `mask` is True.

    The mask is the network's decay mask: its trainable weight matrices (see
    `pn.layers.base.decay_mask`).

    A concrete l2 of zero adds nothing (not even 0 * sum W^2, which is NaN
    once the sum overflows).

    Args:
        params: the parameters.
        l2: the coefficient (a number or a scalar array, possibly traced).
        mask: a tree like params of bools: True where the penalty applies.

    Returns:
        The scalar penalty (0.0 when l2 is a concrete zero).
    """
    if not has_l2(l2):
        return 0.0
    pairs = zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(mask))
    return sum((_half_sum_of_squares(w, l2) for w, m in pairs if m), start=0.0)


def l2_backward(params: PyTree, l2: Any, mask: PyTree) -> PyTree:
    """d(l2 penalty)/dparams: l2 * W where `mask` is True, zero elsewhere.

    Args:
        params: the parameters.
        l2: the coefficient.
        mask: a tree like params of bools: True where the penalty applies.

    Returns:
        A tree like params: `l2 * W` on masked leaves, zeros on the others.
    """
    return jax.tree_util.tree_map(lambda w, m: l2 * w if m else jnp.zeros_like(w), params, mask)


def add_l2_gradient(grads: PyTree, params: PyTree, l2: Any, mask: PyTree) -> PyTree:
    """grads + l2 W on every masked weight: the one place the penalty's gradient is added.

    grads may carry a leading batch axis (per-example gradients): l2 W
    broadcasts over it, as each example's loss carries the whole penalty.

    Args:
        grads: gradients like params, optionally with a leading batch axis.
        params: the parameters.
        l2: the coefficient (nothing is added for a concrete zero).
        mask: a tree like params of bools: True where the penalty applies.

    Returns:
        grads plus `l2 W` on the masked leaves (grads itself when l2 is a
            concrete zero).
    """
    if not has_l2(l2):
        return grads
    return jax.tree_util.tree_map(jnp.add, grads, l2_backward(params, l2, mask))
