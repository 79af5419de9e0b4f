"""Convolution and pooling on NHWC images, each with its backward written out.

Shapes: x (N, H, W, C); a kernel of kh x kw taps with strides (sh, sw),
dilation (dh, dw) and padding (lo, hi) per spatial axis gives

    Ho = (H + lo + hi - ((kh - 1) dh + 1)) // sh + 1     (likewise Wo)

"SAME" pads so that Ho = ceil(H / sh), the odd pixel going to the high side;
"VALID" pads nothing; explicit padding is ((lo, hi), (lo, hi)) or an int.

Window view. Tap (i, j) of output pixel (p, q) reads the padded input at
(p sh + i dh, q sw + j dw). Stacking, for each tap, the strided slice of
the padded input it reads gives the patches P (N, Ho, Wo, kh kw C) (im2col):
a convolution is then one matrix product, y = P W2 with W2 = W reshaped to
(kh kw C, F), and every gradient is a Dense layer's gradient on P. Going
back, each tap's slice of dL/dP is put back where it was read (a pad with
interior zeros, the transpose of a strided slice) and the taps are summed
(col2im): the chain rule summed over every window a pixel belongs to.
"""
import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from purenet import chunks, initializers
from purenet.initializers import default_float
from purenet.layers.base import Array, Layer, ParameterFree, PyTree, Static, as_shape
from purenet.layers.defaults import feature_split
from purenet.layers.structure import Convolution

__all__ = [
    "AvgPool2D", "Conv1D", "Conv2D", "Geometry", "GlobalAvgPool2D", "IMPLEMENTATIONS", "MaxPool2D", "geometry", "patches",
    "tap_slices", "untap",
]

IMPLEMENTATIONS = ("auto", "im2col", "xla")
# What Conv2D(implementation="auto") runs, per backend, from benchmarks/cnn.py (see Conv2D's docstring).
_FASTEST = {"cpu": "xla", "gpu": "xla", "tpu": "xla"}
# Examples per chunk of the per-example convolution paths (per-example gradients and norms), per
# backend; absent: the whole batch at once. On the CPU a whole batch's per-tap slices and products no
# longer fit in the caches, and chunks of 16 were the fastest (measured in benchmarks/README.md,
# "DP-SGD step").
PER_EXAMPLE_CHUNK: dict[str, int] = {"cpu": 16}


# ---------------------------------------------------------------- geometry


def _is_int(v) -> bool:
    """A Python or numpy integer, not a bool (1.7 or True is never a pixel count)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _pair(value, name):
    if _is_int(value):
        value = (value, value)
    value = tuple(value) if isinstance(value, (tuple, list)) else value
    if not (isinstance(value, tuple) and len(value) == 2 and all(_is_int(v) and v >= 1 for v in value)):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return tuple(int(v) for v in value)


def _padding_config(padding, name="padding"):
    """'SAME', 'VALID', or explicit ((lo, hi), (lo, hi)) of non-negative ints, from an int or pairs."""
    if isinstance(padding, str) and padding in ("SAME", "VALID"):
        return padding
    if _is_int(padding):
        padding = ((padding, padding), (padding, padding))
    if isinstance(padding, np.ndarray):
        padding = padding.tolist()
    if not (isinstance(padding, (tuple, list)) and len(padding) == 2
            and all(isinstance(p, (tuple, list)) and len(p) == 2 and all(_is_int(v) and v >= 0 for v in p)
                    for p in padding)):
        raise ValueError(f"{name} must be 'SAME', 'VALID', a non-negative int or ((lo, hi), (lo, hi)) of "
                         f"non-negative ints, got {padding!r}")
    return tuple(tuple(int(v) for v in p) for p in padding)


class Geometry(NamedTuple):
    """Everything static about one windowed operation on an (H, W) input."""

    window: tuple
    strides: tuple
    dilation: tuple
    pads: tuple      # ((lo, hi), (lo, hi))
    in_hw: tuple
    out_hw: tuple

    @property
    def padded_hw(self) -> tuple[int, ...]:
        return tuple(n + lo + hi for n, (lo, hi) in zip(self.in_hw, self.pads))

    def taps(self) -> list[tuple[int, int]]:
        """(i, j) for every tap of the window, in row-major order."""
        return [(i, j) for i in range(self.window[0]) for j in range(self.window[1])]


def geometry(in_hw: Sequence[int], window: tuple[int, int], strides: tuple[int, int], dilation: tuple[int, int],
             padding: Any, owner: Any) -> Geometry:
    """The geometry of a window over an (H, W) input; padding is "SAME", "VALID" or ((lo, hi), (lo, hi)),
    and `owner` names the layer in the error when the window does not fit."""
    span = [(k - 1) * d + 1 for k, d in zip(window, dilation)]
    pads: Any  # ((lo, hi), (lo, hi)) in the end
    if padding == "VALID":
        pads = ((0, 0), (0, 0))
    elif padding == "SAME":
        pads = []
        for n, s, k in zip(in_hw, strides, span):
            total = max((-(-n // s) - 1) * s + k - n, 0)
            pads.append((total // 2, total - total // 2))
        pads = tuple(pads)
    else:
        pads = padding
    out_hw = tuple((n + lo + hi - k) // s + 1 for n, (lo, hi), k, s in zip(in_hw, pads, span, strides))
    if min(out_hw) < 1:
        raise ValueError(f"{owner}: a window spanning {tuple(span)} pixels does not fit the input of "
                         f"{tuple(in_hw)} pixels padded by {pads}")
    return Geometry(window, strides, dilation, pads, tuple(in_hw), out_hw)


def _pad(x, g, value=0.0):
    (hl, hh), (wl, wh) = g.pads
    return lax.pad(x, jnp.asarray(value, x.dtype), ((0, 0, 0), (hl, hh, 0), (wl, wh, 0), (0, 0, 0)))


def tap_slices(xp: Array, g: Geometry) -> list[Array]:
    """For each tap (i, j), the strided slice of the padded input xp it reads: (N, Ho, Wo, C) each."""
    (sh, sw), (dh, dw), (ho, wo) = g.strides, g.dilation, g.out_hw
    n, c = xp.shape[0], xp.shape[-1]
    return [lax.slice(xp, (0, i * dh, j * dw, 0), (n, i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, c),
                      (1, sh, sw, 1)) for i, j in g.taps()]


def untap(pieces: Sequence[Array], g: Geometry, in_place: bool = False) -> Array:
    """The transpose of `tap_slices` followed by cropping the padding: each tap's
    (N, Ho, Wo, C) piece goes back where it was read, and overlaps add up.

    By default every piece is padded to the image and the pads summed (XLA
    fuses it all: fastest for a pool's few taps). in_place=True adds each
    piece, spread out by the strides, into the window it was read from, in
    one image-sized buffer: for a convolution's many taps XLA may otherwise
    keep one padded image per tap alive (25 for a 5x5 kernel)."""
    (sh, sw), (dh, dw), (ho, wo) = g.strides, g.dilation, g.out_hw
    hp, wp = g.padded_hw
    n, c, zero = pieces[0].shape[0], pieces[0].shape[-1], jnp.zeros((), pieces[0].dtype)
    total: Any = jnp.zeros((n, hp, wp, c), pieces[0].dtype) if in_place else None  # else the first piece starts it
    for (i, j), piece in zip(g.taps(), pieces):
        if in_place:
            spread = lax.pad(piece, zero, ((0, 0, 0), (0, 0, sh - 1), (0, 0, sw - 1), (0, 0, 0)))
            start = (0, i * dh, j * dw, 0)
            total = lax.dynamic_update_slice(total, lax.dynamic_slice(total, start, spread.shape) + spread, start)
            continue
        placed = lax.pad(piece, zero, ((0, 0, 0), (i * dh, hp - i * dh - (ho - 1) * sh - 1, sh - 1),
                                       (j * dw, wp - j * dw - (wo - 1) * sw - 1, sw - 1), (0, 0, 0)))
        total = placed if total is None else total + placed
    (hl, _), (wl, _) = g.pads
    return lax.slice(total, (0, hl, wl, 0), (n, hl + g.in_hw[0], wl + g.in_hw[1], c))


def patches(x: Array, g: Geometry) -> Array:
    """im2col: (N, H, W, C) -> (N, Ho, Wo, kh kw C), taps major, channels minor (W's row order)."""
    slices = tap_slices(_pad(x, g), g)
    return slices[0] if len(slices) == 1 else jnp.concatenate(slices, axis=-1)


def _image_shape(owner, in_shape):
    in_shape = as_shape(in_shape)
    if len(in_shape) != 3:
        raise ValueError(f"{owner} expects images: an example shape (height, width, channels), got {in_shape}")
    return in_shape


def _check_images(owner, x):
    if jnp.ndim(x) != 4:
        raise ValueError(f"{owner} expects images of shape (batch, height, width, channels), "
                         f"got x of shape {jnp.shape(x)}")


def _tap_dot(s, w):
    """One tap's share of the output: S_tap (N, Ho, Wo, C) times W_tap (C, F)."""
    return lax.dot_general(s, w, (((3,), (0,)), ((), ())))


def _per_example_tap_grad(s, dy):
    """S_tap,i^T g_i for every example i: (N, C, F)."""
    return lax.dot_general(s, dy, (((1, 2), (1, 2)), ((0,), (0,))))


# ---------------------------------------------------------------- XLA's own transposes


def _dilated(n, d):
    return 0 if n == 0 else 1 + d * (n - 1)


def _dx_pads(g):
    """Padding of dy's convolution with the flipped kernel that gives dL/dx (XLA's rule)."""
    pads = []
    for n, k, s, d, o, (lo, _) in zip(g.in_hw, g.window, g.strides, g.dilation, g.out_hw, g.pads):
        before = _dilated(k, d) - lo - 1
        pads.append((before, n + _dilated(k, d) - 1 - _dilated(o, s) - before))
    return pads


def _dw_pads(g):
    """Padding of x's convolution with dy that gives dL/dW (XLA's rule)."""
    return [(lo, _dilated(o, s) - n + _dilated(k, d) - lo - 1)
            for n, k, s, d, o, (lo, _) in zip(g.in_hw, g.window, g.strides, g.dilation, g.out_hw, g.pads)]


_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def _conv(lhs, rhs, strides, pads, lhs_dilation=(1, 1), rhs_dilation=(1, 1)):
    """lax.conv_general_dilated on NHWC / HWIO operands. Every convolution here, the
    backward's included, is spelled in this one layout: XLA:CPU runs it on its fast
    path inside loops too, where the layouts autodiff emits for the transposes fall
    to a far slower one (jax-ml/jax#12868; measured in benchmarks/README.md, "CNN
    train step"), and fit's epochs are loops."""
    return lax.conv_general_dilated(lhs, rhs, strides, pads, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                                    dimension_numbers=_NHWC)


def _conv_dx(dy, W, g):
    """dL/dx: dy, dilated by the strides, convolved with the flipped kernel read as (kh, kw, F, C)."""
    return _conv(dy, jnp.transpose(lax.rev(W, (0, 1)), (0, 1, 3, 2)), (1, 1), _dx_pads(g), g.strides, g.dilation)


def _conv_dw(x, dy, g):
    """dL/dW: x with batch and channels swapped (C, H, W, N) convolved with dy read as a
    (Ho, Wo, N, F) kernel dilated by the strides; (C, kh, kw, F) back to (kh, kw, C, F)."""
    dw = _conv(jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(dy, (1, 2, 0, 3)), g.dilation, _dw_pads(g),
               rhs_dilation=g.strides)
    return jnp.transpose(dw, (1, 2, 0, 3))


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
                      = (P W2)[n, p, q, f]          (P: the patches, see the module docstring)

    Backward, for dL/dy = g:

        dL/dW = P^T g                 (summed over the batch and every output pixel)
        dL/db = sum g
        dL/dx = col2im(g W2^T)        (each pixel collects from every window it falls in)

    Two formulations compute these, both tested against autodiff and PyTorch:
    "xla" (lax.conv_general_dilated, and for the backward XLA's own
    transposes: dx is dy, dilated by the strides, convolved with the
    spatially flipped kernel; dW is x convolved with dy, batch and channels
    swapped; all three spelled in NHWC / HWIO, see `_conv`) and "im2col"
    (the products above on explicit patches). "auto" (the default) picks
    per backend what measured fastest (benchmarks/cnn.py): xla, except on
    the CPU for inputs of at most 3 channels, where im2col's patches are
    small and XLA's convolution of few channels slow (measured in
    benchmarks/README.md, "CNN train step"). Autodiff's layouts for the two
    transposes run far slower inside a `lax.scan` on XLA:CPU; spelled in
    the forward's layout they do not, so a scanned epoch keeps the step's speed.
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
        for name, value in (("features", features), ("kernel_size", _pair(kernel_size, "Conv2D kernel_size")),
                            ("strides", _pair(strides, "Conv2D strides")),
                            ("padding", _padding_config(padding, "Conv2D padding")),
                            ("dilation", _pair(dilation, "Conv2D dilation")), ("initializer", init),
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
        except im2col on the CPU for inputs of at most 3 channels (images), where the patches
        are small and XLA's convolution slow (benchmarks/cnn.py)."""
        if self.implementation != "auto":
            return self.implementation
        backend = jax.default_backend()
        if backend == "cpu" and W.shape[2] <= 3:
            return "im2col"
        return _FASTEST.get(backend, "xla")

    def init(self, key: Array, in_shape: Any, dtype: Any = None) -> tuple[PyTree, PyTree, tuple[int, ...]]:
        h, w, c = _image_shape(self, in_shape)
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
        _check_images(self, x)
        if x.shape[-1] != W.shape[2]:
            raise ValueError(f"{self} expects {W.shape[2]} input channels (W has shape {W.shape}), "
                             f"got x of shape {x.shape}")
        g = self._geometry(x.shape[1:3])
        if self._impl(W) == "xla":
            y = _conv(x, W, g.strides, g.pads, rhs_dilation=g.dilation)
            inputs = x
        else:
            inputs = patches(x, g)
            y = inputs @ W.reshape(-1, W.shape[-1])
        if self.use_bias:
            y = y + params["b"]
        return y, state, _ConvCache(inputs, Static(x.shape[1:3]))

    def backward(self, params: PyTree, cache: PyTree, dy: Array) -> tuple[PyTree, Array]:
        W = params["W"]
        g = self._geometry(cache.in_hw.value)
        if self._impl(W) == "xla":
            dW = _conv_dw(cache.inputs, dy, g)
        else:
            p2, dy2 = cache.inputs.reshape(-1, cache.inputs.shape[-1]), dy.reshape(-1, dy.shape[-1])
            dW = lax.dot_general(dy2, p2, (((0,), (0,)), ((), ()))).T.reshape(W.shape)  # P^T g, as Dense
        grads = {"W": dW}
        if self.use_bias:
            grads["b"] = jnp.sum(dy, axis=(0, 1, 2))
        return grads, self._dx(W, cache, dy, g)

    def _dx(self, W, cache, dy, g):
        if self._impl(W) == "xla":
            return _conv_dx(dy, W, g)
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
    """Each tap's (N, Ho, Wo, C) input slice: cut from the cached patches (im2col), else from x."""
    if conv._impl(W) == "im2col":
        p, n = cache.inputs, len(g.taps())
        c = p.shape[-1] // n
        return [p[..., t * c:(t + 1) * c] for t in range(n)]
    return tap_slices(_pad(cache.inputs, g), g)


def conv_patches(conv: "Conv2D", W: Array, cache: PyTree) -> Array:
    """The im2col patches P (N, Ho, Wo, kh kw C): the cache (im2col), or cut from x."""
    if conv._impl(W) == "im2col":
        return cache.inputs
    return patches(cache.inputs, conv._geometry(cache.in_hw.value))


def per_example_taps(conv: "Conv2D", W: Array, cache: PyTree, dy: Array) -> tuple[list[Array], Geometry]:
    """Example i's weight gradient by tap, dW_i[tap] = S_tap,i^T g_i, (N, C, F) each, S_tap the
    input slice the tap reads. From x (xla) one tap at a time, so no patches are formed; from
    cached patches (im2col) in one product P_i^T g_i, cut by tap."""
    g = conv._geometry(cache.in_hw.value)
    if conv._impl(W) == "im2col":
        n, c = dy.shape[0], W.shape[2]
        p, d = cache.inputs.reshape(n, -1, cache.inputs.shape[-1]), dy.reshape(n, -1, dy.shape[-1])
        dw = lax.dot_general(p, d, (((1,), (1,)), ((0,), (0,))))  # (N, kh kw C, F)
        return [dw[:, t * c:(t + 1) * c] for t in range(len(g.taps()))], g
    return [_per_example_tap_grad(s, dy) for s in taps(conv, W, cache, g)], g


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
            cross = sum(jnp.sum(_tap_dot(s, W[i, j]) * dy, axis=(1, 2, 3)) for (i, j), s in zip(g.taps(), slices))
            sq = sq + 2 * l2 * cross + l2 * l2 * jnp.sum(W * W)
        return sq
    formed, _ = per_example_taps(conv, W, cache, dy)
    return cast(Array, sum(jnp.sum((d + l2 * W[i, j]) ** 2, axis=(1, 2)) for (i, j), d in zip(g.taps(), formed)))


# ---------------------------------------------------------------- Conv1D


def _positive_int(value, name):
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if not (_is_int(value) and value >= 1):
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _padding_1d(padding):
    """'SAME', 'VALID', 'CAUSAL', a non-negative int, or (lo, hi) of non-negative ints."""
    if isinstance(padding, str) and padding in ("SAME", "VALID", "CAUSAL"):
        return padding
    if _is_int(padding) and padding >= 0:
        return (int(padding), int(padding))
    if (isinstance(padding, (tuple, list)) and len(padding) == 2
            and all(_is_int(v) and v >= 0 for v in padding)):
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


# ---------------------------------------------------------------- pooling


class _Pool(ParameterFree):
    """Shared by the window pools: window, strides (default: the window), padding."""
    piecewise_linear = True  # no second-order term: pn.stats.hessian_diagonal passes through

    if TYPE_CHECKING:  # the subclasses' fields
        window: tuple
        strides: tuple
        padding: Any

    def __init__(self, window: int | Sequence[int], strides: int | Sequence[int] | None = None,
                 padding: str | int | Sequence[Sequence[int]] = "VALID") -> None:
        name = type(self).__name__
        object.__setattr__(self, "window", _pair(window, f"{name} window"))
        object.__setattr__(self, "strides", self.window if strides is None else _pair(strides, f"{name} strides"))
        object.__setattr__(self, "padding", _padding_config(padding, f"{name} padding"))

    def _geometry(self, in_hw):
        return geometry(in_hw, self.window, self.strides, (1, 1), self.padding, self)

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        h, w, c = _image_shape(self, in_shape)
        return (*self._geometry((h, w)).out_hw, c)

    def _reduce(self, x, init, op):
        g = self._geometry(x.shape[1:3])
        # a numpy init value: concrete even under jit, so XLA (and autodiff) see a max / sum pool
        y = lax.reduce_window(x, np.asarray(init, x.dtype), op, (1, *g.window, 1), (1, *g.strides, 1),
                              ((0, 0), *g.pads, (0, 0)))
        return y, g


@dataclasses.dataclass(frozen=True, init=False)
class MaxPool2D(_Pool):
    """y = the largest input in each window (padding counts as -inf; padding that
    leaves a window without input is refused, so no output is -inf).

    Backward: each window's dy goes to the input it took the maximum from,
    and inputs that win several overlapping windows collect from each. When
    a window holds the maximum more than once, the first in row-major order
    takes it, as XLA's select-and-scatter (reduce_window's autodiff) does.
    """

    window: tuple
    strides: tuple
    padding: object

    def _geometry(self, in_hw):
        """The pool's geometry; refuses padding that leaves a window without input (its max: -inf)."""
        g = super()._geometry(in_hw)
        for n, (lo, _), k, s, o in zip(g.in_hw, g.pads, g.window, g.strides, g.out_hw):
            # the first window ends at k, the last starts at (o - 1) s; the input is [lo, lo + n)
            if lo >= k or (o - 1) * s >= lo + n:
                raise ValueError(f"{self}: padding {g.pads} leaves a window of {g.window} pixels holding only "
                                 f"padding on an input of {g.in_hw} pixels (its max would be -inf); "
                                 f"pad less than the window on each side (PyTorch allows at most half)")
        return g

    def apply(self, x: Array) -> tuple[Array, tuple[Array, Static]]:
        _check_images(self, x)
        y, g = self._reduce(x, -jnp.inf, lax.max)
        # which tap each output took: the first that equals the max (scanning the taps backwards)
        taps = tap_slices(_pad(x, g, -jnp.inf), g)
        chosen = jnp.full(y.shape, len(taps), jnp.int32)
        for t in reversed(range(len(taps))):
            chosen = jnp.where(taps[t] == y, t, chosen)
        return y, (chosen, Static(x.shape[1:3]))

    def grad(self, cache: tuple[Array, Static], dy: Array) -> Array:
        chosen, in_hw = cache
        g = self._geometry(in_hw.value)
        zero = jnp.zeros_like(dy)
        return untap([jnp.where(chosen == t, dy, zero) for t in range(len(g.taps()))], g)


@dataclasses.dataclass(frozen=True, init=False)
class AvgPool2D(_Pool):
    """y = the mean of each window: its sum over kh kw (padding counts as zeros, as
    PyTorch's count_include_pad=True). Backward: dy / (kh kw) to every input of the window."""

    window: tuple
    strides: tuple
    padding: object

    def apply(self, x: Array) -> tuple[Array, Static]:
        _check_images(self, x)
        y, g = self._reduce(x, 0.0, lax.add)
        return y / math.prod(g.window), Static(x.shape[1:3])

    def grad(self, in_hw: Static, dy: Array) -> Array:
        g = self._geometry(in_hw.value)
        share = dy / math.prod(g.window)
        return untap([share] * len(g.taps()), g)


@dataclasses.dataclass(frozen=True)
class GlobalAvgPool2D(ParameterFree):
    """(N, H, W, C) -> (N, C): y = the mean over every pixel;  dL/dx = dy / (H W) at every pixel."""
    piecewise_linear = True  # no second-order term: pn.stats.hessian_diagonal passes through

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (_image_shape(self, in_shape)[-1],)

    def apply(self, x: Array) -> tuple[Array, Static]:
        _check_images(self, x)
        return jnp.mean(x, axis=(1, 2)), Static(x.shape[1:3])

    def grad(self, in_hw: Static, dy: Array) -> Array:
        h, w = in_hw.value
        return jnp.broadcast_to(dy[:, None, None, :] / (h * w), (dy.shape[0], h, w, dy.shape[-1]))
