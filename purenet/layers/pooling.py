"""Pooling on NHWC images: max, average and global average, each with its backward written out."""
import dataclasses
import math
from typing import TYPE_CHECKING, Any, Sequence

import jax.numpy as jnp
import numpy as np
from jax import lax

from purenet.layers.base import Array, ParameterFree, Static
from purenet.layers.windows import check_images, geometry, image_shape, pad, padding_config, pair, tap_slices, untap

__all__ = ["AvgPool2D", "GlobalAvgPool2D", "MaxPool2D"]


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
        object.__setattr__(self, "window", pair(window, f"{name} window"))
        object.__setattr__(self, "strides", self.window if strides is None else pair(strides, f"{name} strides"))
        object.__setattr__(self, "padding", padding_config(padding, f"{name} padding"))

    def _geometry(self, in_hw):
        return geometry(in_hw, self.window, self.strides, (1, 1), self.padding, self)

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        h, w, c = image_shape(self, in_shape)
        return (*self._geometry((h, w)).out_hw, c)

    def _reduce(self, x, init, op):
        g = self._geometry(x.shape[1:3])
        # a numpy init value: concrete even under jit, so XLA (and autodiff) see a max / sum pool
        y = lax.reduce_window(x, np.asarray(init, x.dtype), op, (1, *g.window, 1), (1, *g.strides, 1),
                              ((0, 0), *g.pads, (0, 0)))
        return y, g


@dataclasses.dataclass(frozen=True, init=False)
class MaxPool2D(_Pool):
    """Max pooling on NHWC images: y = the largest input in each window.

    Padding counts as -inf; padding that leaves a window without input is
    refused, so no output is -inf.

    Backward: each window's dy goes to the input it took the maximum from,
    and inputs that win several overlapping windows collect from each. When
    a window holds the maximum more than once, the first in row-major order
    takes it, as XLA's select-and-scatter (reduce_window's autodiff) does.

    Attributes:
        window: (kh, kw); the constructor also takes an int k for (k, k).
        strides: (sh, sw); the constructor also takes an int for both, or
            None (the default) for the window.
        padding: "VALID" (the default), "SAME", or explicit ((lo, hi), (lo, hi));
            the constructor also takes an int p for ((p, p), (p, p)).

    Raises:
        ValueError: if `window`, `strides` or `padding` is malformed (and, at
            `init` or in `forward`, if a window holds only padding or does not
            fit the input).
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
        check_images(self, x)
        y, g = self._reduce(x, -jnp.inf, lax.max)
        # which tap each output took: the first that equals the max (scanning the taps backwards)
        taps = tap_slices(pad(x, g, -jnp.inf), g)
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
    """Average pooling on NHWC images: y = the mean of each window.

    The mean is the window's sum over kh kw (padding counts as zeros, as
    PyTorch's count_include_pad=True). Backward: dy / (kh kw) to every input
    of the window.

    Attributes:
        window: (kh, kw); the constructor also takes an int k for (k, k).
        strides: (sh, sw); the constructor also takes an int for both, or
            None (the default) for the window.
        padding: "VALID" (the default), "SAME", or explicit ((lo, hi), (lo, hi));
            the constructor also takes an int p for ((p, p), (p, p)).

    Raises:
        ValueError: if `window`, `strides` or `padding` is malformed (and, at
            `init` or in `forward`, if the window does not fit the input).
    """

    window: tuple
    strides: tuple
    padding: object

    def apply(self, x: Array) -> tuple[Array, Static]:
        check_images(self, x)
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
        return (image_shape(self, in_shape)[-1],)

    def apply(self, x: Array) -> tuple[Array, Static]:
        check_images(self, x)
        return jnp.mean(x, axis=(1, 2)), Static(x.shape[1:3])

    def grad(self, in_hw: Static, dy: Array) -> Array:
        h, w = in_hw.value
        return jnp.broadcast_to(dy[:, None, None, :] / (h * w), (dy.shape[0], h, w, dy.shape[-1]))
