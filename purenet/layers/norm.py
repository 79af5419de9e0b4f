"""Normalisation within each example: LayerNorm and RMSNorm (over the features), GroupNorm (over groups).

Unlike BatchNorm, these normalise every position of every example on its
own (over the last axis), so examples never interact: per-example gradients
are well defined, and training and evaluation compute the same function.

Large inputs. Each row is first divided by c = 2^k, the largest power of two
<= max(|x|, 1) over the row (1 for rows within (-2, 2)), and eps by c^2:
the statistics of x / c never overflow, so rows up to float32's largest
value normalise correctly (without it mean(x^2) is inf from |x| ~ 1.8e19
and the output 0). Dividing by a power of two is exact, so nothing changes
for rows that did not overflow; c is a constant of the row for the
gradients (the output does not depend on it).
"""
import dataclasses
import math
from typing import TYPE_CHECKING, Any, NamedTuple

import jax.numpy as jnp
from jax import lax

from purenet._checks import check_hyperparameter
from purenet.initializers import default_float
from purenet.layers.base import Array, Layer, PyTree, as_shape, wide
from purenet.layers import structure
from purenet.layers.structure import ScaleShift

__all__ = ["GroupNorm", "LayerNorm", "RMSNorm"]


class _NormCache(NamedTuple):
    xhat: jnp.ndarray
    inv: jnp.ndarray  # 1 / sqrt(var + eps) or 1 / sqrt(mean(x^2) + eps), one per position


def _row_scale(x):
    """c = 2^max(e - 1, 0) per row, where max|x| = f 2^e (f in [0.5, 1)): a power of two
    in [1, max(|x|, 1)], so x / c is exact and |x / c| < 2."""
    _, e = jnp.frexp(jnp.max(jnp.abs(x), axis=-1, keepdims=True))
    return lax.stop_gradient(jnp.ldexp(jnp.ones((), x.dtype), jnp.maximum(e - 1, 0)))


class _FeatureNorm(Layer):
    """The parts LayerNorm and RMSNorm share: params, the protocol, per-example gradients."""

    roles = {"gamma": "gain", "beta": "bias"}
    positionwise = True

    if TYPE_CHECKING:  # what each subclass defines
        @property
        def _has_beta(self) -> bool: ...

        def _normalise(self, x: Array) -> tuple[Array, Array]: ...

        def _dx(self, params: PyTree, cache: _NormCache, dy: Array) -> Array: ...

    def init(self, key: Array, in_shape: Any, dtype: Any = None) -> tuple[PyTree, PyTree, tuple[int, ...]]:
        del key
        in_shape, dtype = as_shape(in_shape), dtype or default_float()
        d = in_shape[-1]
        params = {"gamma": jnp.ones((d,), dtype)}
        if self._has_beta:
            params["beta"] = jnp.zeros((d,), dtype)
        return params, {}, in_shape

    def forward(self, params: PyTree, state: PyTree, x: Array, train: bool = False,
                key: Array | None = None) -> tuple[Array, PyTree, _NormCache]:
        del train, key
        d = params["gamma"].shape[0]
        if jnp.shape(x)[-1] != d:
            raise ValueError(f"{self} expects inputs with {d} features on the last axis, got x of shape "
                             f"{jnp.shape(x)}")
        xhat, inv = self._normalise(x)  # statistics in at least float32 (mixed precision)
        y = params["gamma"] * xhat.astype(x.dtype)
        if "beta" in params:
            y = y + params["beta"]
        return y, state, _NormCache(xhat, inv)

    def backward(self, params: PyTree, cache: _NormCache, dy: Array) -> tuple[PyTree, Array]:
        (tag,) = self.structure(params)  # dL/dgamma = sum g xhat, dL/dbeta = sum g
        return structure.batch_grads(tag._replace(xhat=cache.xhat, g=dy), params), self._dx(params, cache, dy)

    def structure(self, params: PyTree) -> tuple[ScaleShift]:
        """y = xhat * gamma + beta: a scale and shift, whose rules give every per-example feature."""
        return (ScaleShift("gamma", "beta" if "beta" in params else None),)

    def products(self, params: PyTree, cache: _NormCache, dy: Array) -> tuple[tuple, Array]:
        return ((cache.xhat, dy),), self._dx(params, cache, dy)


@dataclasses.dataclass(frozen=True)
class LayerNorm(_FeatureNorm):
    """Layer normalisation (Ba et al., 2016) over the last axis of each position.

    params {"gamma": ones(d), "beta": zeros(d)} ("beta" absent when use_bias=False).
    With the mean and the (biased) variance over the d features:

        mu = mean(x),  var = mean((x - mu)^2),  s = 1 / sqrt(var + eps)
        xhat = (x - mu) s,   y = gamma xhat + beta

    Backward, g = dL/dy (the same algebra as BatchNorm's, over features
    instead of the batch):

        dL/dgamma = sum_positions g xhat,   dL/dbeta = sum_positions g
        dL/dxhat  = g gamma
        dL/dx     = s (dL/dxhat - mean(dL/dxhat) - xhat mean(dL/dxhat xhat))

    The mean term is the path through mu: d mu/dx_k = 1/d. The xhat term is
    the path through var: d s/dx_k = -s^3 (x_k - mu) / d = -s^2 xhat_k / d.
    Rows of any float32 magnitude (1e20 too) normalise exactly: see the module docstring.

    Args:
        eps: added to the variance before the square root, > 0 (default 1e-5).
        use_bias: True (the default) for the shift beta; False leaves y = gamma xhat.

    Raises:
        ValueError: if `eps` is not a positive finite number (and, in
            `forward`, if x's last axis is not gamma's width).
    """

    eps: float = 1e-5
    use_bias: bool = True

    def __post_init__(self) -> None:
        check_hyperparameter("LayerNorm eps", self.eps, 0.0, None, low_open=True)

    @property
    def _has_beta(self):
        return self.use_bias

    def _normalise(self, x):
        x = wide(x)
        c = _row_scale(x)  # statistics of x / c: no overflow (see the module docstring)
        x = x / c
        mean = jnp.mean(x, axis=-1, keepdims=True)
        centered = x - mean
        var = jnp.mean(centered * centered, axis=-1, keepdims=True)
        inv = 1.0 / jnp.sqrt(var + self.eps / c / c)  # s c
        return centered * inv, inv / c

    def _dx(self, params, cache, dy):
        dxhat = wide(dy * params["gamma"])
        dx = cache.inv * (dxhat - jnp.mean(dxhat, axis=-1, keepdims=True)
                          - cache.xhat * jnp.mean(dxhat * cache.xhat, axis=-1, keepdims=True))
        return dx.astype(dy.dtype)


@dataclasses.dataclass(frozen=True)
class RMSNorm(_FeatureNorm):
    """Root-mean-square normalisation (Zhang & Sennrich, 2019) over the last axis.

    params {"gamma": ones(d)}. No centering and no shift:

        r = 1 / sqrt(mean(x^2) + eps),   xhat = x r,   y = gamma xhat

    Backward, g = dL/dy: dL/dgamma = sum_positions g xhat, and since
    d r/dx_k = -r^3 x_k / d = -r^2 xhat_k / d,

        dL/dx = r (dL/dxhat - xhat mean(dL/dxhat xhat)),   dL/dxhat = g gamma.

    Rows of any float32 magnitude (1e20 too) normalise exactly: see the module docstring.

    Args:
        eps: added to mean(x^2) before the square root, > 0 (default 1e-6).

    Raises:
        ValueError: if `eps` is not a positive finite number (and, in
            `forward`, if x's last axis is not gamma's width).
    """

    eps: float = 1e-6

    def __post_init__(self) -> None:
        check_hyperparameter("RMSNorm eps", self.eps, 0.0, None, low_open=True)

    _has_beta = False

    def _normalise(self, x):
        x = wide(x)
        c = _row_scale(x)  # statistics of x / c: no overflow (see the module docstring)
        x = x / c
        inv = 1.0 / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps / c / c)  # r c
        return x * inv, inv / c

    def _dx(self, params, cache, dy):
        dxhat = wide(dy * params["gamma"])
        dx = cache.inv * (dxhat - cache.xhat * jnp.mean(dxhat * cache.xhat, axis=-1, keepdims=True))
        return dx.astype(dy.dtype)


@dataclasses.dataclass(frozen=True)
class GroupNorm(_FeatureNorm):
    """Group normalisation (Wu & He, 2018), channels last: PyTorch's nn.GroupNorm on the NCHW transpose.

    x (B, ..., C) of any rank >= 2; the C channels split into `num_groups`
    groups of C / G consecutive channels. For each example and group the
    statistics run over the group's m = (positions) x (C / G) entries:

        mu = mean(x),  var = mean((x - mu)^2),  s = 1 / sqrt(var + eps)     (per example and group)
        xhat = (x - mu) s,   y = gamma xhat + beta                           (gamma, beta: (C,))

    Backward, g = dL/dy, means over the same m entries (LayerNorm's algebra over a group):

        dL/dgamma = sum_{batch, positions} g xhat,   dL/dbeta = sum_{batch, positions} g
        dL/dxhat  = g gamma
        dL/dx     = s (dL/dxhat - mean(dL/dxhat) - xhat mean(dL/dxhat xhat))

    Examples never interact, so per-example gradients exist (and DP-SGD
    clips them, where BatchNorm is refused): example i's are its own sums
    over positions, sum g_i xhat_i and sum g_i, a (B, C) array each (its
    structure: a scale and shift). num_groups = 1 is LayerNorm over every entry of an example
    (with per-channel gamma); num_groups = C is instance normalisation.
    Groups of any float32 magnitude normalise exactly (see the module docstring).

    Args:
        num_groups: G, the number of groups (a positive int); the channels C
            must be a multiple of it.
        eps: added to each group's variance before the square root, > 0
            (default 1e-5).

    Raises:
        ValueError: if `num_groups` is not a positive int or `eps` is not a
            positive finite number (and, at `init` or in `forward`, if the
            channels do not split into `num_groups` groups).
    """

    num_groups: int
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if isinstance(self.num_groups, bool) or not isinstance(self.num_groups, int) or self.num_groups < 1:
            raise ValueError(f"GroupNorm num_groups must be a positive int, got {self.num_groups!r}")
        check_hyperparameter("GroupNorm eps", self.eps, 0.0, None, low_open=True)

    _has_beta = True

    def _check(self, shape, what, rank=2):
        if len(shape) < rank:
            raise ValueError(f"{self} expects inputs of shape (batch, ..., channels), got {what} of shape {shape}")
        if shape[-1] % self.num_groups:
            raise ValueError(f"{self}: {shape[-1]} channels (the last axis of {what}, shape {shape}) do not split "
                             f"into {self.num_groups} groups")

    def init(self, key: Array, in_shape: Any, dtype: Any = None) -> tuple[PyTree, PyTree, tuple[int, ...]]:
        shape = as_shape(in_shape)
        self._check(shape, "an example", rank=1)
        return super().init(key, shape, dtype)

    def forward(self, params: PyTree, state: PyTree, x: Array, train: bool = False,
                key: Array | None = None) -> tuple[Array, PyTree, _NormCache]:
        self._check(jnp.shape(x), "x")
        return super().forward(params, state, x, train, key)

    def _grouped(self, t):
        """(B, ..., C) -> (B, positions, G, C / G)."""
        return t.reshape(t.shape[0], math.prod(t.shape[1:-1]), self.num_groups, t.shape[-1] // self.num_groups)

    def _normalise(self, x):
        xg = self._grouped(wide(x))
        _, e = jnp.frexp(jnp.max(jnp.abs(xg), axis=(1, 3), keepdims=True))  # as _row_scale, per group
        c = lax.stop_gradient(jnp.ldexp(jnp.ones((), xg.dtype), jnp.maximum(e - 1, 0)))
        xg = xg / c
        mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
        centered = xg - mean
        var = jnp.mean(centered * centered, axis=(1, 3), keepdims=True)
        inv = 1.0 / jnp.sqrt(var + self.eps / c / c)  # s c
        return (centered * inv).reshape(x.shape), inv / c

    def _dx(self, params, cache, dy):
        dxhat = self._grouped(wide(dy * params["gamma"]))
        xhat = self._grouped(cache.xhat)
        dx = cache.inv * (dxhat - jnp.mean(dxhat, axis=(1, 3), keepdims=True)
                          - xhat * jnp.mean(dxhat * xhat, axis=(1, 3), keepdims=True))
        return dx.reshape(dy.shape).astype(dy.dtype)
