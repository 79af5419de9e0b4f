"""Convolutions on NHWC images (Conv2D, and Conv1D as Conv2D on a height of one), each with its backward
written out; the windows' geometry and im2col taps are `purenet.layers.windows`, the pools
`purenet.layers.pooling` (their names stay importable from here).
"""
import dataclasses
import functools
import math
from typing import Any, NamedTuple, Sequence, cast

import jax
import jax.numpy as jnp
from jax import lax

from purenet import chunks, initializers
from purenet.initializers import default_float
from purenet.layers.base import Array, Layer, PyTree, Static, as_shape
from purenet.layers.defaults import feature_split
from purenet.layers.structure import Convolution
from purenet.layers.windows import (Geometry, check_images, conv_dw, conv_dx, conv_nhwc, geometry, image_shape, is_int,
                                    pad, padding_config, pair, patches, per_example_tap_grad, tap_dot, tap_slices, tap_sum,
                                    untap)
from purenet.layers.pooling import AvgPool2D, GlobalAvgPool2D, MaxPool2D

__all__ = [
    "AvgPool2D", "Conv1D", "Conv2D", "Geometry", "GlobalAvgPool2D", "IMPLEMENTATIONS", "MaxPool2D", "conv_patches",
    "geometry", "in_chunks", "patches", "per_example_taps", "tap_slices", "tap_sq_norms", "taps", "untap",
]

IMPLEMENTATIONS = ("auto", "im2col", "taps", "xla")
# What Conv2D(implementation="auto") runs, per backend, from benchmarks/cnn.py (see Conv2D's docstring).
_FASTEST = {"cpu": "xla", "gpu": "xla", "tpu": "xla"}
# "auto" on the CPU runs the "taps" forward up to this many multiply-adds per output (kh kw C); measured
# in benchmarks/README.md ("CNN train step": 25 and 27 faster than im2col and xla, 72 and 75 slower).
TAPS_MAX_TERMS = 32
# Examples per chunk of the per-example convolution paths (per-example gradients and norms), per
# backend; absent: the whole batch at once. On the CPU a whole batch's per-tap slices and products no
# longer fit in the caches, and chunks of 16 were the fastest (measured in benchmarks/README.md,
# "DP-SGD step").
PER_EXAMPLE_CHUNK: dict[str, int] = {"cpu": 16}


# ---------------------------------------------------------------- Conv2D


class _ConvCache(NamedTuple):
    inputs: jnp.ndarray   # the patches P (im2col), or x itself (xla)
    in_hw: Static         # the input's (H, W)


@dataclasses.dataclass(frozen=True, init=False)
class Conv2D(Layer):
    """2-D convolution (cross-correlation, as lax.conv_general_dilated and PyTorch compute it) on NHWC.

    params {"W": (kh, kw, in_channels, features), "b": (features,)} ("b" absent
    when use_bias=False); fans for the initializer count the receptive field.

        y[n, p, q, f] = b[f] + sum_{i, j, c} x_pad[n, p sh + i dh, q sw + j dw, c] W[i, j, c, f]
                      = (P W2)[n, p, q, f]          (P: the patches, see `purenet.layers.windows`)

    Backward, for dL/dy = g:

        dL/dW = P^T g                 (summed over the batch and every output pixel)
        dL/db = sum g
        dL/dx = col2im(g W2^T)        (each pixel collects from every window it falls in)

    Three formulations compute these, all tested against autodiff and PyTorch:
    "xla" (lax.conv_general_dilated, and for the backward XLA's own
    transposes: dx is dy, dilated by the strides, convolved with the
    spatially flipped kernel; dW is x convolved with dy, batch and channels
    swapped; all three spelled in NHWC / HWIO, see `conv_nhwc`), "im2col"
    (the products above on explicit patches) and "taps" (the forward as
    kh kw C broadcast multiply-adds, y = sum_{tap, c} S_tap[..., c] W[tap, c],
    which XLA fuses into one loop; the backward xla's). "auto" (the
    default) picks per backend what measured fastest (benchmarks/cnn.py):
    xla, except on the CPU for few input channels: taps where kh kw C <=
    `TAPS_MAX_TERMS` (a LeNet's first 5x5 convolution of one channel runs
    its forward in well under half of im2col's and xla's time), else im2col
    for inputs of at most 3 channels, where the patches are small and XLA's
    convolution of few channels slow (benchmarks/README.md, section "CNN
    train step", "The image layer as taps"). Autodiff's layouts for the two
    transposes run far slower inside a `lax.scan` on XLA:CPU; spelled in
    the forward's layout they do not, so a scanned epoch keeps the step's speed.

    Args:
        features: F, the output channels (a positive int).
        kernel_size: (kh, kw), or an int k for (k, k).
        strides: (sh, sw), or an int for both (default 1).
        padding: "SAME" (the default: Ho = ceil(H / sh)), "VALID", an int p
            for ((p, p), (p, p)), or explicit ((lo, hi), (lo, hi)).
        dilation: (dh, dw), the kernel's dilation, or an int for both (default 1).
        init: the name of W's initializer (`purenet.initializers`), default
            "he_normal"; the bias starts at zero.
        use_bias: True (the default) to add a bias b (features,).
        implementation: "auto" (the default), "xla", "im2col" or "taps" (see above).
        initializer: the same as `init` under the field's name (keyword only;
            `dataclasses.replace` passes it); it wins when given.

    Raises:
        ValueError: if `features` is not a positive int, `kernel_size`,
            `strides`, `dilation` or `padding` is malformed, `init` names no
            initializer, or `implementation` is unknown (and, at `init` or
            `forward`, if the kernel does not fit the padded input).
    """
    piecewise_linear = True  # no second-order term: pn.stats.hessian_diagonal passes through

    features: int
    kernel_size: tuple
    strides: tuple
    padding: object
    dilation: tuple
    initializer: str
    use_bias: bool
    implementation: str

    roles = {"W": "weight", "b": "bias"}

    def tensor_split(self, params: PyTree, split_in: bool) -> tuple[PyTree, bool]:
        """Output channels split on a whole input, input channels on a split one (`feature_split`)."""
        return feature_split(params, split_in)

    def __init__(self, features: int, kernel_size: int | Sequence[int], strides: int | Sequence[int] = 1,
                 padding: str | int | Sequence[Sequence[int]] = "SAME", dilation: int | Sequence[int] = 1,
                 init: str = "he_normal", use_bias: bool = True, implementation: str = "auto", *,
                 initializer: str | None = None) -> None:
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"Conv2D features must be a positive integer, got {features!r}")
        init = initializer or init  # the field's name, as dataclasses.replace passes it
        initializers.get(init)
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"Conv2D implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        for name, value in (("features", features), ("kernel_size", pair(kernel_size, "Conv2D kernel_size")),
                            ("strides", pair(strides, "Conv2D strides")),
                            ("padding", padding_config(padding, "Conv2D padding")),
                            ("dilation", pair(dilation, "Conv2D dilation")), ("initializer", init),
                            ("use_bias", bool(use_bias)), ("implementation", implementation)):
            object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return (f"Conv2D(features={self.features}, kernel_size={self.kernel_size}, strides={self.strides}, "
                f"padding={self.padding!r}, dilation={self.dilation}, init={self.initializer!r}, "
                f"use_bias={self.use_bias}, implementation={self.implementation!r})")

    def _geometry(self, in_hw):
        return geometry(in_hw, self.kernel_size, self.strides, self.dilation, self.padding, self)

    def _impl(self, W):
        """The formulation this layer runs: its own, or for "auto" `_FASTEST` on this backend,
        except on the CPU for few input channels: taps up to `TAPS_MAX_TERMS` multiply-adds per
        output, else im2col for at most 3 channels (images), where the patches are small and
        XLA's convolution slow (benchmarks/cnn.py)."""
        if self.implementation != "auto":
            return self.implementation
        backend = jax.default_backend()
        if backend == "cpu" and W.shape[0] * W.shape[1] * W.shape[2] <= TAPS_MAX_TERMS:
            return "taps"
        if backend == "cpu" and W.shape[2] <= 3:
            return "im2col"
        return _FASTEST.get(backend, "xla")

    def init(self, key: Array, in_shape: Any, dtype: Any = None) -> tuple[PyTree, PyTree, tuple[int, ...]]:
        h, w, c = image_shape(self, in_shape)
        g = self._geometry((h, w))
        dtype = dtype or default_float()
        params = {"W": initializers.get(self.initializer)(key, (*self.kernel_size, c, self.features), dtype)}
        if self.use_bias:
            params["b"] = jnp.zeros((self.features,), dtype)
        return params, {}, (*g.out_hw, self.features)

    def forward(self, params: PyTree, state: PyTree, x: Array, train: bool = False,
                key: Array | None = None) -> tuple[Array, PyTree, PyTree]:
        del train, key
        W = params["W"]
        check_images(self, x)
        if x.shape[-1] != W.shape[2]:
            raise ValueError(f"{self} expects {W.shape[2]} input channels (W has shape {W.shape}), "
                             f"got x of shape {x.shape}")
        g = self._geometry(x.shape[1:3])
        impl, inputs = self._impl(W), x
        if impl == "xla":
            y = conv_nhwc(x, W, g.strides, g.pads, rhs_dilation=g.dilation)
        elif impl == "taps":
            y = tap_sum(x, W, g)
        else:
            inputs = patches(x, g)
            y = inputs @ W.reshape(-1, W.shape[-1])
        if self.use_bias:
            y = y + params["b"]
        return y, state, _ConvCache(inputs, Static(x.shape[1:3]))

    def backward(self, params: PyTree, cache: PyTree, dy: Array) -> tuple[PyTree, Array]:
        W = params["W"]
        g = self._geometry(cache.in_hw.value)
        if self._impl(W) != "im2col":
            dW = conv_dw(cache.inputs, dy, g)
        else:
            p2, dy2 = cache.inputs.reshape(-1, cache.inputs.shape[-1]), dy.reshape(-1, dy.shape[-1])
            dW = lax.dot_general(dy2, p2, (((0,), (0,)), ((), ()))).T.reshape(W.shape)  # P^T g, as Dense
        grads = {"W": dW}
        if self.use_bias:
            grads["b"] = jnp.sum(dy, axis=(0, 1, 2))
        return grads, self._dx(W, cache, dy, g)

    def _dx(self, W, cache, dy, g):
        if self._impl(W) != "im2col":
            return conv_dx(dy, W, g)
        dp = lax.dot_general(dy, W.reshape(-1, W.shape[-1]), (((3,), (1,)), ((), ())))  # g W2^T
        c = W.shape[2]
        return untap([dp[..., t * c:(t + 1) * c] for t in range(len(g.taps()))], g, in_place=True)

    def structure(self, params: PyTree) -> tuple[Convolution]:
        """One convolution product: every per-example feature (by tap, or the ghost norm over output
        pixels) and K-FAC (on the patches) come from its rules, which read this layer's geometry."""
        return (Convolution("W", "b" if self.use_bias else None),)

    def products(self, params: PyTree, cache: PyTree, dy: Array) -> tuple[tuple, Array]:
        """(its cache, dy, itself), and dx."""
        return ((cache, dy, self),), self._dx_of(params, cache, dy)

    def _dx_of(self, params, cache, dy):
        return self._dx(params["W"], cache, dy, self._geometry(cache.in_hw.value))


# ---------------------------------------------------------------- the convolution product's pieces
# (what the rules of `purenet.layers.structure.Convolution` compute with, in the feature modules)


def taps(conv: "Conv2D", W: Array, cache: PyTree, g: Geometry) -> list[Array]:
    """Each tap's (N, Ho, Wo, C) input slice: cut from the cached patches (im2col), else from x (xla, taps)."""
    if conv._impl(W) == "im2col":
        p, n = cache.inputs, len(g.taps())
        c = p.shape[-1] // n
        return [p[..., t * c:(t + 1) * c] for t in range(n)]
    return tap_slices(pad(cache.inputs, g), g)


def conv_patches(conv: "Conv2D", W: Array, cache: PyTree) -> Array:
    """The im2col patches P (N, Ho, Wo, kh kw C): the cache (im2col), or cut from x."""
    if conv._impl(W) == "im2col":
        return cache.inputs
    return patches(cache.inputs, conv._geometry(cache.in_hw.value))


def per_example_taps(conv: "Conv2D", W: Array, cache: PyTree, dy: Array) -> tuple[list[Array], Geometry]:
    """Example i's weight gradient by tap, dW_i[tap] = S_tap,i^T g_i, (N, C, F) each, S_tap the
    input slice the tap reads. From x (xla) one tap at a time, so no patches are formed; from x
    (taps: few channels) the slices stacked in one product; from cached patches (im2col) in one
    product P_i^T g_i, cut by tap."""
    g = conv._geometry(cache.in_hw.value)
    if conv._impl(W) == "taps":  # the slices stacked taps first (contiguous writes), in one product
        stacked = jnp.stack(taps(conv, W, cache, g))  # (T, N, Ho, Wo, C)
        dw = lax.dot_general(stacked, dy, (((2, 3), (1, 2)), ((1,), (0,))))  # (N, T, C, F)
        return [dw[:, t] for t in range(len(g.taps()))], g
    if conv._impl(W) == "im2col":
        n, c = dy.shape[0], W.shape[2]
        p, d = cache.inputs.reshape(n, -1, cache.inputs.shape[-1]), dy.reshape(n, -1, dy.shape[-1])
        dw = lax.dot_general(p, d, (((1,), (1,)), ((0,), (0,))))  # (N, kh kw C, F)
        return [dw[:, t * c:(t + 1) * c] for t in range(len(g.taps()))], g
    return [per_example_tap_grad(s, dy) for s in taps(conv, W, cache, g)], g


def in_chunks(fn: Any, cache: PyTree, dy: Array) -> Any:
    """fn(cache, dy) -> per-example rows, evaluated PER_EXAMPLE_CHUNK examples at a time on the CPU
    (`purenet.chunks.in_chunks`): the per-tap products of a whole large batch fall out of the
    caches there, and in chunks they do not (see PER_EXAMPLE_CHUNK). Other backends: one call."""
    chunk = PER_EXAMPLE_CHUNK.get(jax.default_backend())
    if chunk is None or dy.shape[0] <= chunk:
        return fn(cache, dy)
    return chunks.in_chunks(lambda inputs, d, _: fn(_ConvCache(inputs, cache.in_hw), d), chunk, cache.inputs, dy)


def tap_sq_norms(conv: "Conv2D", W: Array, cache: PyTree, dy: Array, l2: Any) -> Array:
    """||dW_i + l2 W||^2 without forming patches, whichever of two ways costs fewer flops.

    Formed by tap (`per_example_taps`):  sum_tap ||S_tap,i^T g_i + l2 W_tap||^2, O(N T K F) flops.
    Ghost norm over the T = Ho Wo output pixels (K = kh kw C, the patch length):

        ||sum_t p_t g_t^T||^2 = sum_{t,t'} (p_t . p_t') (g_t . g_t'),
        p_t . p_t' = sum_tap S_tap,t . S_tap,t'   (accumulated tap by tap),

    O(N T^2 (K + F)) flops and O(N T^2) memory, used when T (K + F) < K F:
    small late feature maps with wide kernels. The l2 cross term is
    <dW_i, W> = sum_t (p_t W2) . g_t, read off the forward's product.
    """
    g = conv._geometry(cache.in_hw.value)
    n, t, k, f = dy.shape[0], math.prod(g.out_hw), W.size // W.shape[-1], W.shape[-1]
    if t * (k + f) < k * f:
        slices = taps(conv, W, cache, g)
        s3 = [s.reshape(n, t, -1) for s in slices]
        pp = sum(jnp.einsum("btc,bsc->bts", s, s) for s in s3)
        dy3 = dy.reshape(n, t, f)
        sq = jnp.sum(pp * jnp.einsum("btj,bsj->bts", dy3, dy3), axis=(1, 2))
        if not (isinstance(l2, (int, float)) and l2 == 0):
            cross = sum(jnp.sum(tap_dot(s, W[i, j]) * dy, axis=(1, 2, 3)) for (i, j), s in zip(g.taps(), slices))
            sq = sq + 2 * l2 * cross + l2 * l2 * jnp.sum(W * W)
        return sq
    formed, _ = per_example_taps(conv, W, cache, dy)
    return cast(Array, sum(jnp.sum((d + l2 * W[i, j]) ** 2, axis=(1, 2)) for (i, j), d in zip(g.taps(), formed)))


# ---------------------------------------------------------------- Conv1D


def _positive_int(value, name):
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if not (is_int(value) and value >= 1):
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _padding_1d(padding):
    """'SAME', 'VALID', 'CAUSAL', a non-negative int, or (lo, hi) of non-negative ints."""
    if isinstance(padding, str) and padding in ("SAME", "VALID", "CAUSAL"):
        return padding
    if is_int(padding) and padding >= 0:
        return (int(padding), int(padding))
    if (isinstance(padding, (tuple, list)) and len(padding) == 2
            and all(is_int(v) and v >= 0 for v in padding)):
        return (int(padding[0]), int(padding[1]))
    raise ValueError(f"Conv1D padding must be 'SAME', 'VALID', 'CAUSAL', a non-negative int or (lo, hi) of "
                     f"non-negative ints, got {padding!r}")


@dataclasses.dataclass(frozen=True, init=False)
class Conv1D(Layer):
    """1-D convolution (cross-correlation, as PyTorch's conv1d) on NWC sequences (batch, length, channels).

    params {"W": (k, in_channels, features), "b": (features,)} ("b" absent when
    use_bias=False). With strides s, dilation d and padding (lo, hi):

        y[n, t, f] = b[f] + sum_{i, c} x_pad[n, t s + i d, c] W[i, c, f]
        Lo = (L + lo + hi - ((k - 1) d + 1)) // s + 1

    padding "SAME" (Lo = ceil(L / s), the odd pad on the high side), "VALID",
    "CAUSAL" (lo = (k - 1) d, hi = 0: output t reads inputs <= t s only), an
    int or (lo, hi).

    It is a Conv2D of height 1: x as (N, 1, L, C), W as (1, k, C, F), so the
    forward, the backward (dW = P^T g, db = sum g, dx = col2im(g W2^T), or
    XLA's NHWC transposes), both formulations and their per-backend choice
    ("auto"), the per-example taps and ghost norms and K-FAC's factors are
    Conv2D's (see its docstring), with W reshaped on the way in and out.

    Args:
        features: F, the output channels (a positive int).
        kernel_size: k, the kernel's length (a positive int).
        strides: s, the stride (a positive int, default 1).
        padding: "SAME" (the default), "VALID", "CAUSAL", a non-negative int p
            for (p, p), or (lo, hi).
        dilation: d, the kernel's dilation (a positive int, default 1).
        init: the name of W's initializer (`purenet.initializers`), default
            "he_normal"; the bias starts at zero.
        use_bias: True (the default) to add a bias b (features,).
        implementation: "auto" (the default), "xla", "im2col" or "taps", as Conv2D's.
        initializer: the same as `init` under the field's name (keyword only;
            `dataclasses.replace` passes it); it wins when given.

    Raises:
        ValueError: if `features`, `kernel_size`, `strides` or `dilation` is
            not a positive int, `padding` is malformed, `init` names no
            initializer, or `implementation` is unknown (and, at `init` or
            `forward`, if the kernel does not fit the padded input).
    """
    piecewise_linear = True  # no second-order term: pn.stats.hessian_diagonal passes through

    features: int
    kernel_size: int
    strides: int
    padding: object
    dilation: int
    initializer: str
    use_bias: bool
    implementation: str

    roles = {"W": "weight", "b": "bias"}

    def tensor_split(self, params: PyTree, split_in: bool) -> tuple[PyTree, bool]:
        """Output channels split on a whole input, input channels on a split one (`feature_split`)."""
        return feature_split(params, split_in)

    def __init__(self, features: int, kernel_size: int, strides: int = 1, padding: str | int | Sequence[int] = "SAME",
                 dilation: int = 1, init: str = "he_normal", use_bias: bool = True, implementation: str = "auto", *,
                 initializer: str | None = None) -> None:
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"Conv1D features must be a positive integer, got {features!r}")
        init = initializer or init
        initializers.get(init)
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"Conv1D implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        for name, value in (("features", features), ("kernel_size", _positive_int(kernel_size, "Conv1D kernel_size")),
                            ("strides", _positive_int(strides, "Conv1D strides")), ("padding", _padding_1d(padding)),
                            ("dilation", _positive_int(dilation, "Conv1D dilation")), ("initializer", init),
                            ("use_bias", bool(use_bias)), ("implementation", implementation)):
            object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return (f"Conv1D(features={self.features}, kernel_size={self.kernel_size}, strides={self.strides}, "
                f"padding={self.padding!r}, dilation={self.dilation}, init={self.initializer!r}, "
                f"use_bias={self.use_bias}, implementation={self.implementation!r})")

    @functools.cached_property
    def conv2d(self) -> Conv2D:
        """The height-1 Conv2D this layer runs."""
        if self.padding == "CAUSAL":
            padding: Any = ((0, 0), ((self.kernel_size - 1) * self.dilation, 0))
        elif isinstance(self.padding, tuple):
            padding = ((0, 0), self.padding)
        else:
            padding = self.padding
        return Conv2D(self.features, (1, self.kernel_size), (1, self.strides), padding, (1, self.dilation),
                      self.initializer, self.use_bias, self.implementation)

    def _check_fits(self, length):
        try:
            return self.conv2d._geometry((1, length))
        except ValueError:
            span = (self.kernel_size - 1) * self.dilation + 1  # only VALID and explicit pads can fail
            pads = self.conv2d.padding[1] if isinstance(self.conv2d.padding, tuple) else (0, 0)
            raise ValueError(f"{self}: a kernel spanning {span} positions does not fit the input of length "
                             f"{length} padded by {pads}") from None

    @staticmethod
    def _w2(params):
        return {**params, "W": params["W"][None]}

    @staticmethod
    def _w1(grads, axis=0):
        w = grads["W"]
        return {**grads, "W": jnp.squeeze(w, axis)}

    def init(self, key: Array, in_shape: Any, dtype: Any = None) -> tuple[PyTree, PyTree, tuple[int, ...]]:
        in_shape = as_shape(in_shape)
        if len(in_shape) != 2:
            raise ValueError(f"{self} expects sequences: an example shape (length, channels), got {in_shape}")
        self._check_fits(in_shape[0])
        params, state, out = self.conv2d.init(key, (1, *in_shape), dtype)
        return self._w1(params), state, out[1:]

    def forward(self, params: PyTree, state: PyTree, x: Array, train: bool = False,
                key: Array | None = None) -> tuple[Array, PyTree, PyTree]:
        if jnp.ndim(x) != 3:
            raise ValueError(f"{self} expects sequences of shape (batch, length, channels), got x of shape "
                             f"{jnp.shape(x)}")
        W = params["W"]
        if jnp.ndim(W) != 3 or x.shape[-1] != W.shape[1]:
            raise ValueError(f"{self} expects {W.shape[1] if jnp.ndim(W) == 3 else '?'} input channels "
                             f"(W has shape {jnp.shape(W)}), got x of shape {x.shape}")
        self._check_fits(x.shape[1])
        y, state, cache = self.conv2d.forward(self._w2(params), state, x[:, None], train, key)
        return y[:, 0], state, cache

    def backward(self, params: PyTree, cache: PyTree, dy: Array) -> tuple[PyTree, Array]:
        grads, dx = self.conv2d.backward(self._w2(params), cache, dy[:, None])
        return self._w1(grads), dx[:, 0]

    def structure(self, params: PyTree) -> tuple[Convolution]:
        """Conv2D's convolution product on a height of one: W (k, in, out) read as (1, k, in, out)."""
        return (Convolution("W", "b" if self.use_bias else None),)

    def products(self, params: PyTree, cache: PyTree, dy: Array) -> tuple[tuple, Array]:
        return ((cache, dy[:, None], self.conv2d),), self.conv2d._dx_of(self._w2(params), cache, dy[:, None])[:, 0]
