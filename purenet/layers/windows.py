"""Windows over NHWC images: their geometry, the im2col taps, and the one convolution layout.

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

Shared by the convolutions (`conv.py`, `transposed.py`) and the pools (`pooling.py`).
"""
from typing import Any, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np
from jax import lax

from purenet.layers.base import Array, as_shape

__all__ = ["Geometry", "check_images", "conv_dw", "conv_dx", "conv_nhwc", "geometry", "image_shape", "is_int",
           "pad", "padding_config", "pair", "patches", "per_example_tap_grad", "tap_dot", "tap_slices", "tap_sum",
           "untap"]


def is_int(v) -> bool:
    """A Python or numpy integer, not a bool (1.7 or True is never a pixel count)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def pair(value, name):
    if is_int(value):
        value = (value, value)
    value = tuple(value) if isinstance(value, (tuple, list)) else value
    if not (isinstance(value, tuple) and len(value) == 2 and all(is_int(v) and v >= 1 for v in value)):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return tuple(int(v) for v in value)


def padding_config(padding, name="padding"):
    """'SAME', 'VALID', or explicit ((lo, hi), (lo, hi)) of non-negative ints, from an int or pairs."""
    if isinstance(padding, str) and padding in ("SAME", "VALID"):
        return padding
    if is_int(padding):
        padding = ((padding, padding), (padding, padding))
    if isinstance(padding, np.ndarray):
        padding = padding.tolist()
    if not (isinstance(padding, (tuple, list)) and len(padding) == 2
            and all(isinstance(p, (tuple, list)) and len(p) == 2 and all(is_int(v) and v >= 0 for v in p)
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


def pad(x, g, value=0.0):
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
    slices = tap_slices(pad(x, g), g)
    return slices[0] if len(slices) == 1 else jnp.concatenate(slices, axis=-1)


def image_shape(owner, in_shape):
    in_shape = as_shape(in_shape)
    if len(in_shape) != 3:
        raise ValueError(f"{owner} expects images: an example shape (height, width, channels), got {in_shape}")
    return in_shape


def check_images(owner, x):
    if jnp.ndim(x) != 4:
        raise ValueError(f"{owner} expects images of shape (batch, height, width, channels), "
                         f"got x of shape {jnp.shape(x)}")


def tap_dot(s, w):
    """One tap's share of the output: S_tap (N, Ho, Wo, C) times W_tap (C, F)."""
    return lax.dot_general(s, w, (((3,), (0,)), ((), ())))


def tap_sum(x, W, g):
    """The convolution's forward as a sum over its taps, y = sum_{tap, c} S_tap[..., c] W[tap, c, :]:
    kh kw C broadcast multiply-adds that XLA fuses into one loop over the output, with no patches
    formed (the fastest forward on the CPU for few input channels; see Conv2D's docstring)."""
    slices, c = tap_slices(pad(x, g), g), W.shape[2]
    w = W.reshape(len(slices), c, W.shape[3])
    terms = (s[..., i:i + 1] * w[t, i] for t, s in enumerate(slices) for i in range(c))
    y = next(terms)
    for term in terms:
        y = y + term
    return y


def per_example_tap_grad(s, dy):
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


def conv_nhwc(lhs, rhs, strides, pads, lhs_dilation=(1, 1), rhs_dilation=(1, 1)):
    """lax.conv_general_dilated on NHWC / HWIO operands. Every convolution here, the
    backward's included, is spelled in this one layout: XLA:CPU runs it on its fast
    path inside loops too, where the layouts autodiff emits for the transposes fall
    to a far slower one (jax-ml/jax#12868; measured in benchmarks/README.md, "CNN
    train step"), and fit's epochs are loops."""
    return lax.conv_general_dilated(lhs, rhs, strides, pads, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                                    dimension_numbers=_NHWC)


def conv_dx(dy, W, g):
    """dL/dx: dy, dilated by the strides, convolved with the flipped kernel read as (kh, kw, F, C)."""
    return conv_nhwc(dy, jnp.transpose(lax.rev(W, (0, 1)), (0, 1, 3, 2)), (1, 1), _dx_pads(g), g.strides, g.dilation)


def conv_dw(x, dy, g):
    """dL/dW: x with batch and channels swapped (C, H, W, N) convolved with dy read as a
    (Ho, Wo, N, F) kernel dilated by the strides; (C, kh, kw, F) back to (kh, kw, C, F)."""
    dw = conv_nhwc(jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(dy, (1, 2, 0, 3)), g.dilation, _dw_pads(g),
               rhs_dilation=g.strides)
    return jnp.transpose(dw, (1, 2, 0, 3))
