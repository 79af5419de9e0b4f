"""SwiGLU, the gated MLP of LLaMA-style blocks (Shazeer 2020), with its handwritten backward."""
import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from purenet import initializers
from purenet.initializers import default_float
from purenet.layers import dense
from purenet.layers.base import Array, Layer, PyTree, as_shape
from purenet.layers.structure import DenseProduct

__all__ = ["SwiGLU"]


class _SwiGLUCache(NamedTuple):
    x: Array   # (batch, ..., d) the input
    a: Array   # x W1, the gate's pre-activation
    b: Array   # x W3, the linear branch
    u: Array   # silu(a) * b, the input of W2


def _t(y, W):
    """y W^T on the last axis."""
    return lax.dot_general(y, W, (((y.ndim - 1,), (1,)), ((), ())))


@dataclasses.dataclass(frozen=True, init=False)
class SwiGLU(Layer):
    """The gated MLP `y = (silu(x W1) * (x W3)) W2` on the last axis.

    params {"W1", "W3": (d, hidden), "W2": (hidden, d)}, no bias; the output
    keeps x's width d. silu(a) = a s(a), s the sigmoid; weights from the
    initializer `init` (default xavier_uniform). With a = x W1, b = x W3,
    `u = silu(a) * b` and g = dL/dy:

        dW2 = u^T g,               du = g W2^T
        da  = du * b * silu'(a),   silu'(a) = s(a) (1 + a (1 - s(a)))
        db  = du * silu(a)
        dW1 = x^T da,  dW3 = x^T db,  dx = da W1^T + db W3^T

    (each x^T . summed over every position, as Dense's). Its structure is
    two dense products, (x, [da db]) and (u, g): per-example gradients and
    norms, one-pass clipping, the statistics and K-FAC come from their rules.

    Args:
        hidden: the gated inner width (a positive int); LLaMA uses about 8d/3.
        init: the name of the weights' initializer (`purenet.initializers`),
            default "xavier_uniform".
        initializer: the same as `init` under the field's name (keyword only;
            `dataclasses.replace` passes it); it wins when given.

    Raises:
        ValueError: if `hidden` is not a positive int or `init` names no
            initializer (and, in `forward`, for x of rank < 2 or of a width
            other than W1's).
    """

    hidden: int
    initializer: str

    roles = {"W1": "weight", "W2": "weight", "W3": "weight"}
    positionwise = True

    def __init__(self, hidden: int, init: str = "xavier_uniform", *, initializer: str | None = None) -> None:
        init = init if initializer is None else initializer  # the field's name: dataclasses.replace passes it
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"SwiGLU hidden must be a positive integer, got {hidden!r}")
        initializers.get(init)
        object.__setattr__(self, "hidden", hidden)
        object.__setattr__(self, "initializer", init)

    def init(self, key: Array, in_shape: Any, dtype: Any = None) -> tuple[PyTree, PyTree, tuple[int, ...]]:
        in_shape, dtype = as_shape(in_shape), dtype or default_float()
        d, draw = in_shape[-1], initializers.get(self.initializer)
        k1, k2, k3 = jax.random.split(key, 3)
        params = {"W1": draw(k1, (d, self.hidden), dtype), "W3": draw(k3, (d, self.hidden), dtype),
                  "W2": draw(k2, (self.hidden, d), dtype)}
        return params, {}, in_shape

    def forward(self, params: PyTree, state: PyTree, x: Array, train: bool = False,
                key: Array | None = None) -> tuple[Array, PyTree, PyTree]:
        del train, key
        d = params["W1"].shape[0]
        if jnp.ndim(x) < 2 or x.shape[-1] != d:
            raise ValueError(f"{self} expects x of shape (batch, ..., {d}), got {jnp.shape(x)}")
        a, b = x @ params["W1"], x @ params["W3"]
        u = jax.nn.silu(a) * b
        return u @ params["W2"], state, _SwiGLUCache(x, a, b, u)

    def _d_gates(self, params, c, dy):
        """[da db] (batch, ..., 2 hidden): dL/d(x [W1 W3])."""
        du = _t(dy, params["W2"])
        s = jax.nn.sigmoid(c.a)
        da = du * c.b * (s * (1 + c.a * (1 - s)))
        db = du * (c.a * s)
        return jnp.concatenate([da, db], axis=-1)

    def _w_in(self, params):
        return jnp.concatenate([params["W1"], params["W3"]], axis=1)

    def _collect(self, g_in, g_out):
        h = self.hidden
        return {"W1": g_in["W"][..., :h], "W3": g_in["W"][..., h:], "W2": g_out["W"]}

    def _grads(self, params, cache, dgates, dy):
        g_out, _ = dense.Dense(params["W2"].shape[1], use_bias=False).backward({"W": params["W2"]}, cache.u, dy)
        w_in = self._w_in(params)
        g_in, dx = dense.Dense(w_in.shape[1], use_bias=False).backward({"W": w_in}, cache.x, dgates)
        return self._collect(g_in, g_out), dx

    def backward(self, params: PyTree, cache: PyTree, dy: Array) -> tuple[PyTree, Array]:
        return self._grads(params, cache, self._d_gates(params, cache, dy), dy)

    def structure(self, params: PyTree) -> tuple[DenseProduct, DenseProduct]:
        """Two dense products: x [W1 W3] and u W2. Every per-example feature and K-FAC (W1, W3 sharing
        A, each its own G) come from their rules."""
        return DenseProduct(("W1", "W3"), (None, None)), DenseProduct(("W2",), (None,))

    def products(self, params: PyTree, cache: PyTree, dy: Array) -> tuple[tuple, Array]:
        """(x, `[da db]`) and (u, dy), and `dx = [da db] [W1 W3]^T`."""
        dgates = self._d_gates(params, cache, dy)
        return ((cache.x, dgates), (cache.u, dy)), _t(dgates, self._w_in(params))
