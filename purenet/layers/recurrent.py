"""Recurrent layers: LSTM and GRU with PyTorch's equations, and backpropagation through time by hand.

Both run on sequences (batch, T, d) -> (batch, T, features), the state starting
at zero (h_0 = c_0 = 0; there is no initial-state argument). The input
projection x_t Wx of every step is one matrix product before the recurrence;
the recurrence is one `lax.scan` forward, and its backward one reverse
`lax.scan` that carries dL/dh (and dL/dc) from step t to step t - 1. The
weight gradients are then one matrix product each, over all (example, step)
pairs: dWx = sum_t x_t^T dz_t, dWh = sum_t h_{t-1}^T dz_t, from the
pre-activation gradients dz_t the reverse scan stacks.

Per-example quantities come from the same dz_t (each example's recursion
only involves itself): each layer declares its structure as two dense
products over the time steps, (x, dz) and (h_{t-1}, dz), so example i's
dWx_i = sum_t x_it dz_it^T, the ghost norm over time steps

    ||sum_t a_t b_t^T||^2 = sum_{t,s} (a_t . a_s)(b_t . b_s),

one-pass clipping, the statistics and K-FAC (over the time steps) are the
dense product's rules (`purenet.layers.structure`).
"""
import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from purenet import initializers
from purenet.initializers import default_float
from purenet.layers.structure import DenseProduct
from purenet.layers.base import Array, Layer, PyTree, as_shape

__all__ = ["GRU", "LSTM"]

PYTORCH = "pytorch"  # the default initializer name: PyTorch's U(-1/sqrt(h), 1/sqrt(h))


class LSTMCache(NamedTuple):
    x: Array      # (B, T, d) the input
    gates: Array  # (B, T, 4h) the activated gates [i, f, g, o]
    c: Array      # (B, T, h) the cell states c_1 .. c_T
    y: Array      # (B, T, h) the outputs h_1 .. h_T


class GRUCache(NamedTuple):
    x: Array      # (B, T, d) the input
    gates: Array  # (B, T, 3h) the activated gates [r, z, n]
    hn: Array     # (B, T, h) h_{t-1} Whn + bhn, the part of n's pre-activation that r gates
    y: Array      # (B, T, h) the outputs h_1 .. h_T


def _check_features(name: str, features: Any) -> None:
    if isinstance(features, bool) or not isinstance(features, int) or features < 1:
        raise ValueError(f"{name} features must be a positive integer, got {features!r}")


def _check_init(init: str) -> None:
    if init != PYTORCH:
        initializers.get(init)  # fail early on an unknown name


def _time_major(t: Array) -> Array:
    return jnp.swapaxes(t, 0, 1)


def _shift(t: Array) -> Array:
    """(B, T, h) outputs h_1 .. h_T -> h_0 .. h_{T-1} with h_0 = 0."""
    return jnp.pad(t, ((0, 0), (1, 0), (0, 0)))[:, :-1]


def _matmul_t(a: Array, W: Array) -> Array:
    """a W^T, contracting the last axes (XLA's own transpose of a @ W)."""
    return lax.dot_general(a, W, (((a.ndim - 1,), (1,)), ((), ())))


def _project(x: Array, W: Array) -> Array:
    """x W for x (B, T, d), laid out time-major: (T, B, k), one matrix product (on x's time-major copy,
    the narrower side when d < k, so the product writes its time-major rows in place)."""
    return _time_major(x) @ W


def _sum_outer(a: Array, dz: Array) -> Array:
    """sum over examples and steps of a_t^T dz_t: a (B, T, i), dz (T, B, k) -> (i, k), one matrix product
    of a's time-major copy (rows in dz's order) with dz."""
    a2 = jnp.reshape(_time_major(a), (-1, a.shape[-1]))
    return lax.dot_general(a2, jnp.reshape(dz, (-1, dz.shape[-1])), (((0,), (0,)), ((), ())))


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class _Recurrent(Layer):
    """What LSTM and GRU share: construction, init, input checks, the backward and the per-example paths."""

    features: int
    initializer: str
    unroll: int

    def __init__(self, features: int, init: str = PYTORCH, unroll: int = 1, *,
                 initializer: str | None = None) -> None:
        name = type(self).__name__
        _check_features(name, features)
        init = initializer or init
        _check_init(init)
        if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1:
            raise ValueError(f"{name} unroll must be a positive integer, got {unroll!r}")
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "initializer", init)
        object.__setattr__(self, "unroll", unroll)

    def __repr__(self) -> str:
        extra = f", unroll={self.unroll}" if self.unroll != 1 else ""
        return f"{type(self).__name__}(features={self.features}, init={self.initializer!r}{extra})"

    def _shape(self, in_shape: Any) -> tuple[int, int]:
        shape = as_shape(in_shape)
        if len(shape) != 2:
            raise ValueError(f"{self} takes sequences: one example of shape (T, d), got in_shape {shape}")
        return shape[0], shape[1]

    def _draw(self, key: Array, shape: tuple[int, ...], dtype: Any) -> Array:
        if self.initializer == PYTORCH:
            bound = 1.0 / jnp.sqrt(jnp.asarray(self.features, dtype))
            return jax.random.uniform(key, shape, dtype, -bound, bound)
        if len(shape) == 1:
            return jnp.zeros(shape, dtype)
        return initializers.get(self.initializer)(key, shape, dtype)

    def _check_input(self, params: PyTree, x: Array) -> None:
        d = params["Wx"].shape[0]
        if jnp.ndim(x) != 3 or jnp.shape(x)[-1] != d:
            raise ValueError(f"{self} expects sequences of shape (batch, T, {d}), got x of shape {jnp.shape(x)}")

    def _dz(self, params: PyTree, cache: PyTree, dy: Array) -> tuple[Array, Array]:
        """(dL/d(x_t Wx), dL/d(h_{t-1} Wh)) for every step, time-major (T, B, k) each."""
        raise NotImplementedError

    def _grads(self, params: PyTree, cache: PyTree, dx_in: Array, dh_in: Array) -> PyTree:
        raise NotImplementedError

    def backward(self, params: PyTree, cache: PyTree, dy: Array) -> tuple[PyTree, Array]:
        dx_in, dh_in = self._dz(params, cache, dy)
        return self._grads(params, cache, dx_in, dh_in), _dx(params, dx_in)

    def products(self, params: PyTree, cache: PyTree, dy: Array) -> tuple[tuple, Array]:
        """(x, dz_x) and (h_{t-1}, dz_h), batch first, from the batch's one reverse scan (each dz_t row
        belongs to one example); dx."""
        dx_in, dh_in = self._dz(params, cache, dy)
        dzx = _time_major(dx_in)
        dzh = dzx if dh_in is dx_in else _time_major(dh_in)
        return ((cache.x, dzx), (_shift(cache.y), dzh)), _dx(params, dx_in)

    def cached_input(self, cache: PyTree) -> Array:
        """The layer's input, read from its cache (diagnostics' input_rms)."""
        return cache.x


def _gates_4(z: Array, h: int) -> Array:
    """[i, f, g, o] activated from the pre-activation z (..., 4h): sigmoid, sigmoid, tanh, sigmoid,
    as one elementwise pass over all 4h columns, tanh(z) = 2 sigmoid(2z) - 1 for g (no slices or
    concatenation: faster on the CPU, measured in benchmarks/README.md, "LSTM train step and
    per-example norms"; the same values up to rounding)."""
    g = ((jnp.arange(4 * h) // h) == 2).astype(z.dtype)  # 1 in g's columns, else 0
    return (1 + g) * jax.nn.sigmoid((1 + g) * z) - g


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class LSTM(_Recurrent):
    """PyTorch's LSTM (one layer, batch_first), gates in PyTorch's order i, f, g, o.

    params {"Wx": (d, 4h), "Wh": (h, 4h), "b": (4h,)}, h = features; PyTorch's
    weight_ih_l0 is Wx^T, weight_hh_l0 is Wh^T and b = bias_ih_l0 + bias_hh_l0.
    For t = 1 .. T, from h_0 = c_0 = 0:

        z_t = x_t Wx + h_{t-1} Wh + b                       (4h,)  = [z_i, z_f, z_g, z_o]
        i = sigma(z_i),  f = sigma(z_f),  g = tanh(z_g),  o = sigma(z_o)
        c_t = f * c_{t-1} + i * g
        h_t = o * tanh(c_t)                                  the output y_t

    Init (default init="pytorch", as nn.LSTM): every weight U(-k, k), k = 1/sqrt(h),
    and b the sum of two such draws (PyTorch's two biases). With another `init`
    name (see `purenet.initializers`) Wx and Wh are drawn by it and b starts at zero.
    `unroll` is lax.scan's (steps per loop iteration, forward and backward; results
    are the same).

    Backward through time, for dy_t = dL/dy_t. The reverse scan carries
    dh = dL/dh_t from the steps after t (zero after T) and dc = dL/dc_t likewise:

        dh_t  = dy_t + dh                                   (all of dL/dh_t)
        do    = dh_t * tanh(c_t)
        dc_t  = dc + dh_t * o * (1 - tanh(c_t)^2)           (all of dL/dc_t)
        di    = dc_t * g,   dg = dc_t * i,   df = dc_t * c_{t-1}
        dz_t  = [di i(1-i), df f(1-f), dg (1-g^2), do o(1-o)]
        carry to t-1:  dh = dz_t Wh^T,   dc = dc_t * f

    then, after the scan, as one matrix product each over all (example, step) pairs:

        dWx = sum_t x_t^T dz_t,   dWh = sum_t h_{t-1}^T dz_t,   db = sum_t dz_t,
        dx_t = dz_t Wx^T.

    The constructor's arguments are its fields (`init` is stored as `initializer`):

    Attributes:
        features: h, the hidden state's width (a positive int).
        init: (constructor only) "pytorch" (the default: PyTorch's
            U(-1/sqrt(h), 1/sqrt(h)) draws, see above) or the name of an
            initializer in `purenet.initializers` for Wx and Wh (the biases
            then start at zero). Stored as `initializer`; the attribute `init`
            is the protocol method.
        unroll: steps per loop iteration of the forward and backward
            `lax.scan` (a positive int, default 1); results do not change.
        initializer: the same as `init` under the field's name (keyword only;
            `dataclasses.replace` passes it); it wins when given.

    Raises:
        ValueError: if `features` or `unroll` is not a positive int or `init`
            names no initializer (and, in `forward`, for x not of shape
            (batch, T, d) with W's input width d).
    """

    roles = {"Wx": "weight", "Wh": "weight", "b": "bias"}

    def init(self, key: Array, in_shape: Any, dtype: Any = None) -> tuple[PyTree, PyTree, tuple[int, ...]]:
        t, d = self._shape(in_shape)
        dtype, h = dtype or default_float(), self.features
        kx, kh, kb, kb2 = jax.random.split(key, 4)
        b = self._draw(kb, (4 * h,), dtype)
        if self.initializer == PYTORCH:
            b = b + self._draw(kb2, (4 * h,), dtype)
        params = {"Wx": self._draw(kx, (d, 4 * h), dtype), "Wh": self._draw(kh, (h, 4 * h), dtype), "b": b}
        return params, {}, (t, h)

    def forward(self, params: PyTree, state: PyTree, x: Array, train: bool = False,
                key: Array | None = None) -> tuple[Array, PyTree, LSTMCache]:
        del train, key
        self._check_input(params, x)
        Wh, h = params["Wh"], self.features
        # b is added inside the step: added to the (T, B, 4h) product up front it took a second buffer
        # of that size (the add does not fuse into the matmul; measured in benchmarks/README.md, "LSTM
        # train step and per-example norms")
        xz, b = _project(x, params["Wx"]), params["b"]
        zero = jnp.zeros((x.shape[0], h), xz.dtype)

        def step(carry, xz_t):
            h_prev, c_prev = carry
            a = _gates_4(xz_t + h_prev @ Wh + b, h)
            c = a[:, h:2 * h] * c_prev + a[:, :h] * a[:, 2 * h:3 * h]
            h_t = a[:, 3 * h:] * jnp.tanh(c)
            return (h_t, c), (a, c, h_t)

        _, (a, c, y) = lax.scan(step, (zero, zero), xz, unroll=self.unroll)
        y = _time_major(y)
        return y, state, LSTMCache(x, _time_major(a), _time_major(c), y)

    def _dz(self, params: PyTree, cache: LSTMCache, dy: Array) -> tuple[Array, Array]:
        WhT, h = params["Wh"].T, self.features  # transposed once, not per step
        c = _time_major(cache.c)
        xs = (_time_major(dy), _time_major(cache.gates), c, jnp.pad(c, ((1, 0), (0, 0), (0, 0)))[:-1])

        def step(carry, inputs):
            dh, dc = carry
            dy_t, a, c_t, c_prev = inputs
            i, f, g, o = a[:, :h], a[:, h:2 * h], a[:, 2 * h:3 * h], a[:, 3 * h:]
            dh = dh + dy_t
            tc = jnp.tanh(c_t)
            dc = dc + dh * o * (1 - tc * tc)
            dz = jnp.concatenate([dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g * g),
                                  dh * tc * o * (1 - o)], axis=-1)
            return (dz @ WhT, dc * f), dz

        zero = jnp.zeros(dy.shape[:1] + (h,), dy.dtype)
        _, dz = lax.scan(step, (zero, zero), xs, reverse=True, unroll=self.unroll)
        return dz, dz

    def structure(self, params: PyTree) -> tuple[DenseProduct, DenseProduct]:
        """z_t = x_t Wx + h_{t-1} Wh + b: two dense products over the time steps, (x, dz) with the
        bias and (h_{t-1}, dz) without. Per-example features and K-FAC (over the steps, KFAC-expand)
        come from their rules."""
        return DenseProduct(("Wx",), ("b",)), DenseProduct(("Wh",), (None,))

    def _grads(self, params: PyTree, cache: LSTMCache, dx_in: Array, dh_in: Array) -> PyTree:
        h_prev = _shift(cache.y)
        return {"Wx": _sum_outer(cache.x, dx_in), "Wh": _sum_outer(h_prev, dh_in), "b": jnp.sum(dx_in, axis=(0, 1))}


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class GRU(_Recurrent):
    """PyTorch's GRU (one layer, batch_first), gates in PyTorch's order r, z, n.

    params {"Wx": (d, 3h), "Wh": (h, 3h), "bx": (3h,), "bh": (3h,)}, h = features;
    PyTorch's weight_ih_l0 = Wx^T, weight_hh_l0 = Wh^T, bias_ih_l0 = bx, bias_hh_l0 = bh.
    For t = 1 .. T, from h_0 = 0, with gx = x_t Wx + bx and gh = h_{t-1} Wh + bh
    split into their r, z, n thirds:

        r = sigma(gx_r + gh_r),   z = sigma(gx_z + gh_z)
        n = tanh(gx_n + r * gh_n)
        h_t = (1 - z) * n + z * h_{t-1}                      the output y_t

    Init (default init="pytorch", as nn.GRU): every weight and bias U(-k, k),
    k = 1/sqrt(h). With another `init` name Wx and Wh are drawn by it and the
    biases start at zero. `unroll` as in LSTM.

    Backward through time, for dy_t = dL/dy_t, the reverse scan carrying
    dh = dL/dh_t from the steps after t (zero after T):

        dh_t  = dy_t + dh
        dn    = dh_t * (1 - z),   dz = dh_t * (h_{t-1} - n)
        da_n  = dn * (1 - n^2)                                (n's pre-activation)
        da_r  = da_n * gh_n * r (1 - r),   da_z = dz * z (1 - z)
        dgx_t = [da_r, da_z, da_n],   dgh_t = [da_r, da_z, da_n * r]
        carry to t-1:  dh = dh_t * z + dgh_t Wh^T

    then, after the scan, one matrix product each:

        dWx = sum_t x_t^T dgx_t,   dbx = sum_t dgx_t,   dx_t = dgx_t Wx^T
        dWh = sum_t h_{t-1}^T dgh_t,   dbh = sum_t dgh_t.

    The constructor's arguments are its fields (`init` is stored as `initializer`):

    Attributes:
        features: h, the hidden state's width (a positive int).
        init: (constructor only) "pytorch" (the default: PyTorch's
            U(-1/sqrt(h), 1/sqrt(h)) draws, see above) or the name of an
            initializer in `purenet.initializers` for Wx and Wh (the biases
            then start at zero). Stored as `initializer`; the attribute `init`
            is the protocol method.
        unroll: steps per loop iteration of the forward and backward
            `lax.scan` (a positive int, default 1); results do not change.
        initializer: the same as `init` under the field's name (keyword only;
            `dataclasses.replace` passes it); it wins when given.

    Raises:
        ValueError: if `features` or `unroll` is not a positive int or `init`
            names no initializer (and, in `forward`, for x not of shape
            (batch, T, d) with W's input width d).
    """

    roles = {"Wx": "weight", "Wh": "weight", "bx": "bias", "bh": "bias"}

    def init(self, key: Array, in_shape: Any, dtype: Any = None) -> tuple[PyTree, PyTree, tuple[int, ...]]:
        t, d = self._shape(in_shape)
        dtype, h = dtype or default_float(), self.features
        kx, kh, kbx, kbh = jax.random.split(key, 4)
        params = {"Wx": self._draw(kx, (d, 3 * h), dtype), "Wh": self._draw(kh, (h, 3 * h), dtype),
                  "bx": self._draw(kbx, (3 * h,), dtype), "bh": self._draw(kbh, (3 * h,), dtype)}
        return params, {}, (t, h)

    def forward(self, params: PyTree, state: PyTree, x: Array, train: bool = False,
                key: Array | None = None) -> tuple[Array, PyTree, GRUCache]:
        del train, key
        self._check_input(params, x)
        Wh, bh, h = params["Wh"], params["bh"], self.features
        gx, bx = _project(x, params["Wx"]), params["bx"]  # (T, B, 3h); bx added per step, as LSTM's b

        def step(h_prev, gx_t):
            gx_t = gx_t + bx
            gh = h_prev @ Wh + bh
            rz = jax.nn.sigmoid(gx_t[:, :2 * h] + gh[:, :2 * h])
            hn = gh[:, 2 * h:]
            n = jnp.tanh(gx_t[:, 2 * h:] + rz[:, :h] * hn)
            z = rz[:, h:]
            h_t = n + z * (h_prev - n)
            return h_t, (jnp.concatenate([rz, n], axis=-1), hn, h_t)

        _, (a, hn, y) = lax.scan(step, jnp.zeros((x.shape[0], h), gx.dtype), gx, unroll=self.unroll)
        y = _time_major(y)
        return y, state, GRUCache(x, _time_major(a), _time_major(hn), y)

    def _dz(self, params: PyTree, cache: GRUCache, dy: Array) -> tuple[Array, Array]:
        WhT, h = params["Wh"].T, self.features  # transposed once, not per step
        xs = (_time_major(dy), _time_major(cache.gates), _time_major(cache.hn), _time_major(_shift(cache.y)))

        def step(dh, inputs):
            dy_t, a, hn, h_prev = inputs
            r, z, n = a[:, :h], a[:, h:2 * h], a[:, 2 * h:]
            dh = dh + dy_t
            da_n = dh * (1 - z) * (1 - n * n)
            da_r = da_n * hn * r * (1 - r)
            da_z = dh * (h_prev - n) * z * (1 - z)
            dgh = jnp.concatenate([da_r, da_z, da_n * r], axis=-1)
            return dh * z + dgh @ WhT, (jnp.concatenate([da_r, da_z, da_n], axis=-1), dgh)

        _, (dgx, dgh) = lax.scan(step, jnp.zeros(dy.shape[:1] + (h,), dy.dtype), xs, reverse=True,
                                 unroll=self.unroll)
        return dgx, dgh

    def structure(self, params: PyTree) -> tuple[DenseProduct, DenseProduct]:
        """gx = x_t Wx + bx and gh = h_{t-1} Wh + bh: two dense products over the time steps, each with
        its bias. Per-example features and K-FAC (over the steps, KFAC-expand) come from their rules."""
        return DenseProduct(("Wx",), ("bx",)), DenseProduct(("Wh",), ("bh",))

    def _grads(self, params: PyTree, cache: GRUCache, dx_in: Array, dh_in: Array) -> PyTree:
        h_prev = _shift(cache.y)
        return {"Wx": _sum_outer(cache.x, dx_in), "Wh": _sum_outer(h_prev, dh_in),
                "bx": jnp.sum(dx_in, axis=(0, 1)), "bh": jnp.sum(dh_in, axis=(0, 1))}


def _dx(params: PyTree, dx_in: Array) -> Array:
    """dL/dx (B, T, d) from the time-major input-projection gradients (T, B, k): dz Wx^T."""
    return _time_major(_matmul_t(dx_in, params["Wx"]))
