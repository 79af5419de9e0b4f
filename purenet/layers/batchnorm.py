"""Batch normalisation (Ioffe & Szegedy, 2015)."""
import dataclasses
import math
from typing import Any, NamedTuple

import jax.numpy as jnp

from purenet._checks import check_hyperparameter
from purenet.initializers import default_float
from purenet.layers.base import Array, Layer, PyTree, as_shape, per_example_sum, wide

__all__ = ["BatchNorm"]


class _BatchStatsCache(NamedTuple):
    xhat: jnp.ndarray
    inv_std: jnp.ndarray


class _RunningStatsCache(NamedTuple):
    xhat: jnp.ndarray
    inv_std: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class BatchNorm(Layer):
    """Normalise each feature over the batch, then scale and shift.

    Features are the last axis; the statistics run over every other axis
    (the batch, and for images (N, H, W, C) every pixel: per channel).

    params {"gamma": ones(d), "beta": zeros(d)}; state {"mean": zeros(d), "var": ones(d)}.

    Training, over the N rows of the batch (two-pass, biased variance):

        mu = mean(x),  var = mean((x - mu)^2),  s = 1 / sqrt(var + eps)
        xhat = (x - mu) s,   y = gamma xhat + beta
        running = momentum * running + (1 - momentum) * batch statistic

    Evaluation uses the running mean and variance instead and leaves state alone.

    Backward in training goes through mu and var too (g = dL/dy):

        dL/dgamma = sum(g xhat),  dL/dbeta = sum(g)
        dL/dxhat  = g gamma
        dL/dx     = s (dL/dxhat - mean(dL/dxhat) - xhat mean(dL/dxhat xhat))

    (the mean term is the path through mu; the xhat term, through var).
    In evaluation the statistics are constants: dL/dx = s dL/dxhat.
    A training batch of one example has no variance and is an error.

    Args:
        momentum: the running statistics' decay, in [0, 1] (default 0.9): the
            weight of the old value. PyTorch's `momentum` is 1 minus this.
        eps: added to the variance before the square root, > 0 (default 1e-5).

    Raises:
        ValueError: if `momentum` is outside [0, 1] or `eps` is not a positive
            finite number (and, in `forward` with train=True, for a batch of
            fewer than 2 values per feature).
    """

    momentum: float = 0.9
    eps: float = 1e-5

    roles = {"gamma": "gain", "beta": "bias"}
    mixes_examples = True  # in training: per-example gradients (and so DP-SGD) are undefined

    def __post_init__(self) -> None:
        check_hyperparameter("BatchNorm momentum", self.momentum, 0.0, 1.0, high_open=False)
        check_hyperparameter("BatchNorm eps", self.eps, 0.0, low_open=True, high=None)

    def init(self, key: Array, in_shape: Any, dtype: Any = None) -> tuple[PyTree, PyTree, tuple[int, ...]]:
        del key
        in_shape, dtype = as_shape(in_shape), dtype or default_float()
        d = in_shape[-1]
        params = {"gamma": jnp.ones((d,), dtype), "beta": jnp.zeros((d,), dtype)}
        state = {"mean": jnp.zeros((d,), dtype), "var": jnp.ones((d,), dtype)}
        return params, state, in_shape

    def forward(self, params: PyTree, state: PyTree, x: Array, train: bool = False,
                key: Array | None = None) -> tuple[Array, PyTree, PyTree]:
        del key
        dtype, x = jnp.result_type(x), wide(x)  # statistics in at least float32 (mixed precision)
        axes = tuple(range(jnp.ndim(x) - 1))
        cache: _BatchStatsCache | _RunningStatsCache
        if train:
            n = math.prod(jnp.shape(x)[:-1])
            if n < 2:
                raise ValueError(
                    f"BatchNorm in training needs at least 2 examples to estimate a variance, "
                    f"got a batch of shape {jnp.shape(x)}"
                )
            mean = jnp.mean(x, axis=axes)
            centered = x - mean
            var = jnp.mean(centered * centered, axis=axes)
            inv_std = 1.0 / jnp.sqrt(var + self.eps)
            xhat = centered * inv_std
            m = self.momentum
            state = {
                "mean": (m * state["mean"] + (1 - m) * mean).astype(state["mean"].dtype),
                "var": (m * state["var"] + (1 - m) * var).astype(state["var"].dtype),
            }
            cache = _BatchStatsCache(xhat, inv_std)
        else:
            inv_std = 1.0 / jnp.sqrt(state["var"] + self.eps)
            xhat = (x - state["mean"]) * inv_std
            cache = _RunningStatsCache(xhat, inv_std)
        return (params["gamma"] * xhat + params["beta"]).astype(dtype), state, cache

    def backward(self, params: PyTree, cache: PyTree, dy: Array) -> tuple[PyTree, Array]:
        dtype, dy = jnp.result_type(dy), wide(dy)
        axes = tuple(range(jnp.ndim(dy) - 1))
        pdtype = params["gamma"].dtype
        grads = {"gamma": jnp.sum(dy * cache.xhat, axis=axes).astype(pdtype),
                 "beta": jnp.sum(dy, axis=axes).astype(pdtype)}
        dxhat = dy * params["gamma"]
        if isinstance(cache, _RunningStatsCache):
            return grads, (dxhat * cache.inv_std).astype(dtype)
        dx = cache.inv_std * (
            dxhat
            - jnp.mean(dxhat, axis=axes)
            - cache.xhat * jnp.mean(dxhat * cache.xhat, axis=axes)
        )
        return grads, dx.astype(dtype)

    def _per_example(self, params, cache, dy):
        if isinstance(cache, _BatchStatsCache):
            raise ValueError(
                "per-example gradients are undefined through BatchNorm in training mode: the batch "
                "mean and variance couple the examples (evaluate with train=False, or drop BatchNorm)"
            )
        grads = {"gamma": per_example_sum(dy * cache.xhat), "beta": per_example_sum(dy)}
        return grads, dy * params["gamma"] * cache.inv_std

    def per_example_backward(self, params: PyTree, cache: PyTree, dy: Array) -> tuple[PyTree, Array]:
        """In evaluation mode: dgamma_i = dy_i xhat_i, dbeta_i = dy_i."""
        return self._per_example(params, cache, dy)

    def per_example_sq_norms(self, params: PyTree, cache: PyTree, dy: Array, l2: Any = 0.0) -> tuple[Array, Array]:
        grads, dx = self._per_example(params, cache, dy)
        return jnp.sum(grads["gamma"] ** 2 + grads["beta"] ** 2, axis=-1), dx
