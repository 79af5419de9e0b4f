"""Going up in resolution on NHWC images: the transposed convolution and nearest-neighbour upsampling.

ConvTranspose2D is the adjoint of a strided convolution: where Conv2D's
backward sends dy back to x through every window, ConvTranspose2D's forward
sends x out the same way. So its forward is a convolution of x dilated by
the strides, and its backward holds the two products Conv2D's forward and
weight gradient are made of: dx is a strided convolution of dy, dW a
correlation of dy with x.
"""
import dataclasses
from typing import Any, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np
from jax import lax

from purenet import initializers
from purenet.initializers import default_float
from purenet.layers.base import Array, Layer, ParameterFree, PyTree, Static
from purenet.layers.windows import check_images, conv_nhwc, geometry, image_shape, is_int, pair, patches
from purenet.layers.structure import DenseProduct

__all__ = ["ConvTranspose2D", "Upsample2D", "transpose_pads"]


def transpose_pads(kernel: Sequence[int], strides: Sequence[int], padding: Any) -> tuple:
    """The padding ((lo, hi), (lo, hi)) of the stride-dilated input, as lax.conv_transpose reads
    "SAME" and "VALID" (explicit pairs are that padding already)."""
    if not isinstance(padding, str):
        return padding
    pads = []
    for k, s in zip(kernel, strides):
        if padding == "SAME":
            total = k + s - 2
            lo = k - 1 if s > k - 1 else -(-total // 2)
        else:  # VALID
            total, lo = k + s - 2 + max(k - s, 0), k - 1
        pads.append((lo, total - lo))
    return tuple(pads)


def padding_config(padding: Any):
    """ConvTranspose2D's padding: "SAME", "VALID", or explicit ((lo, hi), (lo, hi)) from an int or pairs.

    Args:
        padding: "SAME", "VALID", a non-negative int p for ((p, p), (p, p)),
            or ((lo, hi), (lo, hi)) of non-negative ints (a NumPy array too).

    Returns:
        The padding as "SAME", "VALID" or a tuple of two (lo, hi) int tuples.

    Raises:
        ValueError: for any other value.
    """
    if isinstance(padding, str) and padding in ("SAME", "VALID"):
        return padding
    if is_int(padding) and padding >= 0:
        return ((int(padding), int(padding)),) * 2
    if isinstance(padding, np.ndarray):
        padding = padding.tolist()
    if (isinstance(padding, (tuple, list)) and len(padding) == 2
            and all(isinstance(p, (tuple, list)) and len(p) == 2 and all(is_int(v) and v >= 0 for v in p)
                    for p in padding)):
        return tuple(tuple(int(v) for v in p) for p in padding)
    raise ValueError(f"ConvTranspose2D padding must be 'SAME', 'VALID', a non-negative int or ((lo, hi), (lo, hi)) "
                     f"of non-negative ints, got {padding!r}")


class _Geometry(NamedTuple):
    pads: tuple      # ((lo, hi), (lo, hi)) of the dilated input
    in_hw: tuple
    out_hw: tuple


class _Cache(NamedTuple):
    x: jnp.ndarray
    in_hw: Static


@dataclasses.dataclass(frozen=True, init=False)
class ConvTranspose2D(Layer):
    """Transposed 2-D convolution on NHWC, flax's convention (lax.conv_transpose, kernel not flipped).

    params {"W": (kh, kw, in_channels, features), "b": (features,)} ("b" absent
    when use_bias=False). x is dilated by the strides s (s - 1 zeros between
    pixels), padded by (lo, hi) per axis, and correlated with W at stride 1:

        y = lax.conv_transpose(x, W, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
        y[o] = b + sum_{n, i: n s + lo - i = o} x[n] W[i]          (per axis; channels contracted)
        Ho = (H - 1) s + 1 + lo + hi - k + 1

    "SAME" gives Ho = H s, "VALID" Ho = H s + max(k - s, 0) (lax's rule,
    `transpose_pads`); explicit ((lo, hi), (lo, hi)) pads the dilated input.

    Backward, g = dL/dy (per axis; n an input pixel, i a tap):

        dL/dx[n] = sum_i g[n s + lo - i] W[i]^T   a stride-s convolution of g, padded by k - 1 - lo,
                                                  with the flipped kernel read as (kh, kw, F, C)
        dL/dW[i] = sum_n x[n]^T g[n s + lo - i]   a correlation: g (F, Ho, Wo, N) against x read as a
                                                  (H, W, N, C) kernel dilated by s, flipped back
        dL/db    = sum g

    Each is spelled in NHWC / HWIO (Conv2D's `conv_nhwc`): on XLA:CPU autodiff's
    transposes of the forward fall off the fast path inside loops. This
    formulation is the one chosen for every backend, over autodiff of the
    same forward and over a col2im one (a matmul x W2 and each tap's piece
    added in place), because it was the fastest of the three on the CPU
    (benchmarks/README.md, section "Transposed convolution"). Its structure
    is one dense product on the patches of the dilated input (`structure`),
    so per-example gradients and norms, one-pass clipping, the statistics
    and K-FAC come from that product's rules.

    Args:
        features: F, the output channels (a positive int).
        kernel_size: (kh, kw), or an int k for (k, k).
        strides: (sh, sw), the dilation of the input (the upsampling factor),
            or an int for both (default 1).
        padding: "SAME" (the default: Ho = H s), "VALID" (Ho = H s +
            max(k - s, 0)), an int p for ((p, p), (p, p)), or explicit
            ((lo, hi), (lo, hi)) of the dilated input.
        init: the name of W's initializer (`purenet.initializers`), default
            "he_normal"; the bias starts at zero.
        use_bias: True (the default) to add a bias b (features,).
        initializer: the same as `init` under the field's name (keyword only;
            `dataclasses.replace` passes it); it wins when given.

    Raises:
        ValueError: if `features` is not a positive int, `kernel_size`,
            `strides` or `padding` is malformed, or `init` names no
            initializer (and, at `init` or in `forward`, if the padding leaves
            no output).
    """
    piecewise_linear = True  # no second-order term: pn.stats.hessian_diagonal passes through

    features: int
    kernel_size: tuple
    strides: tuple
    padding: object
    initializer: str
    use_bias: bool

    roles = {"W": "weight", "b": "bias"}

    def __init__(self, features: int, kernel_size: int | Sequence[int], strides: int | Sequence[int] = 1,
                 padding: str | int | Sequence[Sequence[int]] = "SAME", init: str = "he_normal",
                 use_bias: bool = True, *, initializer: str | None = None) -> None:
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"ConvTranspose2D features must be a positive integer, got {features!r}")
        init = initializer or init
        initializers.get(init)
        for name, value in (("features", features), ("kernel_size", pair(kernel_size, "ConvTranspose2D kernel_size")),
                            ("strides", pair(strides, "ConvTranspose2D strides")),
                            ("padding", padding_config(padding)), ("initializer", init),
                            ("use_bias", bool(use_bias))):
            object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return (f"ConvTranspose2D(features={self.features}, kernel_size={self.kernel_size}, strides={self.strides}, "
                f"padding={self.padding!r}, init={self.initializer!r}, use_bias={self.use_bias})")

    def _geometry(self, in_hw):
        pads = transpose_pads(self.kernel_size, self.strides, self.padding)
        out_hw = tuple((n - 1) * s + 1 + lo + hi - k + 1
                       for n, s, k, (lo, hi) in zip(in_hw, self.strides, self.kernel_size, pads))
        if min(out_hw) < 1:
            raise ValueError(f"{self}: a {self.kernel_size} kernel over the input of {tuple(in_hw)} pixels, dilated "
                             f"by the strides {self.strides} and padded by {pads}, leaves no output "
                             f"({out_hw}); pad more")
        return _Geometry(pads, tuple(in_hw), out_hw)

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
        y = conv_nhwc(x, W, (1, 1), g.pads, lhs_dilation=self.strides)
        if self.use_bias:
            y = y + params["b"]
        return y, state, _Cache(x, Static(x.shape[1:3]))

    def _dx(self, W, dy, g):
        pads = [(k - 1 - lo, (n - 1) * s + lo + 1 - o)  # hi: dy's padded length is (n - 1) s + k
                for k, s, n, o, (lo, _) in zip(self.kernel_size, self.strides, g.in_hw, g.out_hw, g.pads)]
        return conv_nhwc(dy, jnp.transpose(lax.rev(W, (0, 1)), (0, 1, 3, 2)), self.strides, pads)

    def _dw(self, x, dy, g):
        pads = [(k - 1 - lo, (n - 1) * s + lo + 1 - o)
                for k, s, n, o, (lo, _) in zip(self.kernel_size, self.strides, g.in_hw, g.out_hw, g.pads)]
        flipped = conv_nhwc(jnp.transpose(dy, (3, 1, 2, 0)), jnp.transpose(x, (1, 2, 0, 3)), (1, 1), pads,
                        rhs_dilation=self.strides)  # (F, kh, kw, C), taps reversed
        return lax.rev(jnp.transpose(flipped, (1, 2, 3, 0)), (0, 1))

    def backward(self, params: PyTree, cache: PyTree, dy: Array) -> tuple[PyTree, Array]:
        W = params["W"]
        g = self._geometry(cache.in_hw.value)
        grads = {"W": self._dw(cache.x, dy, g)}
        if self.use_bias:
            grads["b"] = jnp.sum(dy, axis=(0, 1, 2))
        return grads, self._dx(W, dy, g)

    def structure(self, params: PyTree) -> tuple[DenseProduct]:
        """A dense product on the im2col patches of the dilated, padded input (W read as (kh kw C, F)):
        every per-example feature and K-FAC (KFC's factors on those patches) come from its rules."""
        return (DenseProduct(("W",), ("b" if self.use_bias else None,)),)

    def products(self, params: PyTree, cache: PyTree, dy: Array) -> tuple[tuple, Array]:
        """(P, dy): y = P W2 + b, P the (N, Ho, Wo, kh kw C) patches of x dilated by the strides and
        padded (the zeros between pixels included), W2 = W reshaped to (kh kw C, F); and dx."""
        g = self._geometry(cache.in_hw.value)
        x = cache.x
        (hl, hh), (wl, wh) = g.pads
        (sh, sw) = self.strides
        xd = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (hl, hh, sh - 1), (wl, wh, sw - 1), (0, 0, 0)))
        window = geometry(xd.shape[1:3], self.kernel_size, (1, 1), (1, 1), "VALID", self)
        return ((patches(xd, window), dy),), self._dx(params["W"], dy, g)


def _factor(value):
    try:
        return pair(value, "Upsample2D factor")
    except ValueError:
        raise ValueError(f"Upsample2D factor must be a positive int or a pair of positive ints, got {value!r}") \
            from None


@dataclasses.dataclass(frozen=True, init=False)
class Upsample2D(ParameterFree):
    """Nearest-neighbour upsampling of NHWC images by (fh, fw): each pixel becomes an fh x fw block.

        y[n, p, q, c] = x[n, p // fh, q // fw, c]     (N, H fh, W fw, C), as jnp.repeat on both axes

    Backward: each input pixel collects the gradients of its block, a sum pool of dy:

        dL/dx[n, h, w, c] = sum_{a < fh, b < fw} g[n, h fh + a, w fw + b, c]

    Args:
        factor: (fh, fw), or an int f for (f, f) (default 2).

    Raises:
        ValueError: if `factor` is not a positive int or a pair of positive ints.
    """
    piecewise_linear = True  # no second-order term: pn.stats.hessian_diagonal passes through

    factor: tuple

    def __init__(self, factor: int | Sequence[int] = 2) -> None:
        object.__setattr__(self, "factor", _factor(factor))

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        h, w, c = image_shape(self, in_shape)
        return (h * self.factor[0], w * self.factor[1], c)

    def apply(self, x: Array) -> tuple[Array, Static]:
        check_images(self, x)
        n, h, w, c = x.shape
        (fh, fw) = self.factor
        y = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, fh, w, fw, c)).reshape(n, h * fh, w * fw, c)
        return y, Static((h, w))

    def grad(self, in_hw: Static, dy: Array) -> Array:
        (h, w), (fh, fw) = in_hw.value, self.factor
        return jnp.sum(dy.reshape(dy.shape[0], h, fh, w, fw, dy.shape[-1]), axis=(2, 4))

