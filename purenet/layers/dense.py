"""The fully connected layer, and the dense product's identities its rules use (ghost norms, squares,
Gram matrices, K-FAC factors; `purenet.layers.structure.DenseProduct`)."""
import dataclasses
from typing import Any

import jax.numpy as jnp
from jax import lax

from purenet import initializers
from purenet.initializers import default_float
from purenet.layers.base import Array, KFACFactors, Layer, PyTree, as_shape, wide
from purenet.layers.defaults import feature_split
from purenet.layers.structure import DenseProduct, positions_of

__all__ = ["Dense", "kfac_factors", "per_example_gram", "per_example_sq", "per_example_sq_norms"]


@dataclasses.dataclass(frozen=True, init=False)
class Dense(Layer):
    """Fully connected layer: the pre-activation  a = h W + b  for a batch of rows h.

    The lecture's a = W h + b, transposed.

    Acts on the last axis: an input (batch, ..., in) gives (batch, ..., features),
    the same W at every position.
    params: {"W": (in, features), "b": (features,)} ("b" absent when use_bias=False).
    Biases start at zero; W is drawn by the initializer named by `init`
    (see `purenet.initializers`). The field holding that name is called
    `initializer` (`init` is the protocol method); the constructor takes
    either name, so the repr is a constructor call and dataclasses.replace works.

    Backward, for dL/da = dy:

        dL/dW = h^T dy        (summed over the batch and every position)
        dL/db = sum_batch dy
        dL/dh = dy W^T

    Args:
        features: the output width (a positive int).
        init: the name of W's initializer (`purenet.initializers`), default
            "he_normal".
        use_bias: True (the default) to add a bias b (features,).
        initializer: the same as `init` under the field's name (keyword only;
            `dataclasses.replace` passes it); it wins when given.

    Raises:
        ValueError: if `features` is not a positive int or `init` names no
            initializer (and, in `forward`, if x's last axis is not W's input
            width).
    """
    piecewise_linear = True  # no second-order term: pn.stats.hessian_diagonal passes through

    features: int
    initializer: str
    use_bias: bool

    roles = {"W": "weight", "b": "bias"}
    positionwise = True

    def tensor_split(self, params: PyTree, split_in: bool) -> tuple[PyTree, bool]:
        """Column parallel on a whole input, row parallel on a split one (`feature_split`)."""
        return feature_split(params, split_in)

    def __init__(self, features: int, init: str = "he_normal", use_bias: bool = True, *,
                 initializer: str | None = None) -> None:
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"Dense features must be a positive integer, got {features!r}")
        init = initializer or init
        initializers.get(init)  # fail early on an unknown name
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "initializer", init)
        object.__setattr__(self, "use_bias", bool(use_bias))

    def __repr__(self) -> str:
        return f"Dense(features={self.features}, init={self.initializer!r}, use_bias={self.use_bias})"

    def init(self, key: Array, in_shape: Any, dtype: Any = None) -> tuple[PyTree, PyTree, tuple[int, ...]]:
        in_shape, dtype = as_shape(in_shape), dtype or default_float()
        params = {"W": initializers.get(self.initializer)(key, (in_shape[-1], self.features), dtype)}
        if self.use_bias:
            params["b"] = jnp.zeros((self.features,), dtype)
        return params, {}, in_shape[:-1] + (self.features,)

    def forward(self, params: PyTree, state: PyTree, x: Array, train: bool = False,
                key: Array | None = None) -> tuple[Array, PyTree, Array]:
        del train, key
        W = params["W"]
        if jnp.shape(x)[-1] != W.shape[0]:
            raise ValueError(
                f"{self} expects inputs of width {W.shape[0]} (W has shape {W.shape}), "
                f"got x of shape {jnp.shape(x)}"
            )
        y = x @ W
        if self.use_bias:
            y = y + params["b"]
        return y, state, x

    def backward(self, params: PyTree, x: Array, dy: Array) -> tuple[PyTree, Array]:
        # The contractions are spelled as XLA's own transposes of x @ W, so the
        # result rounds exactly as autodiff's does (this matters after a
        # saturated softmax, where dL/dh is a small difference of large terms).
        x2 = jnp.reshape(x, (-1, x.shape[-1]))
        dy2 = jnp.reshape(dy, (-1, dy.shape[-1]))
        # h^T dy, accumulated in at least float32 (bfloat16 activations sum over many rows)
        dW = lax.dot_general(dy2, x2, (((0,), (0,)), ((), ())), preferred_element_type=wide(dy2).dtype).T
        dW = dW.astype(params["W"].dtype)
        dx = self._dx(params, dy)  # dy W^T
        grads = {"W": dW}
        if self.use_bias:
            grads["b"] = jnp.sum(dy2, axis=0)
        return grads, dx

    def cached_input(self, x: Array) -> Array:
        """The layer's input, read from its cache (diagnostics' input_rms)."""
        return x

    def _dx(self, params, dy):
        return lax.dot_general(dy, params["W"], (((dy.ndim - 1,), (1,)), ((), ())))

    def structure(self, params: PyTree) -> tuple[DenseProduct]:
        """One dense product: every per-example feature and K-FAC come from its rules."""
        return (DenseProduct(("W",), ("b" if self.use_bias else None,)),)

    def products(self, params: PyTree, x: Array, dy: Array) -> tuple[tuple, Array]:
        """Its input h and output gradient dy, and dx = dy W^T."""
        return ((x, dy),), self._dx(params, dy)


def per_example_sq_norms(x: Array, dy: Array, W: Array, use_bias: bool, l2: Any = 0.0) -> Array:
    """||dW_i + l2 W||^2 + ||db_i||^2 for y = x W + b, each example's sum over its positions.

    Rows (batch, in) (Goodfellow, 2015):  ||h_i dy_i^T||^2 = ||h_i||^2 ||dy_i||^2.
    T positions (batch, ..., in), the ghost norm over positions:

        ||sum_t h_t dy_t^T||^2 = sum_{t,t'} (h_t . h_t') (dy_t . dy_t'),

    memory O(batch T^2), used when T^2 <= in * out; otherwise dW_i is
    formed (memory O(batch in out)), whichever is smaller. The l2 cross
    term is  <dW_i, W> = sum_t h_t^T W dy_t  either way.
    """
    dy_sq = jnp.sum(dy * dy, axis=-1)
    if x.ndim == 2:
        sq = jnp.sum(x * x, axis=-1) * dy_sq
        if use_bias:
            sq = sq + dy_sq
    else:
        x3, dy3 = positions_of(x), positions_of(dy)
        t = x3.shape[1]
        if t * t <= W.size:
            sq = jnp.sum(jnp.einsum("bti,bsi->bts", x3, x3) * jnp.einsum("btj,bsj->bts", dy3, dy3), axis=(1, 2))
        else:
            sq = jnp.sum(jnp.einsum("bti,btj->bij", x3, dy3) ** 2, axis=(1, 2))
        if use_bias:
            sq = sq + jnp.sum(jnp.sum(dy3, axis=1) ** 2, axis=-1)
    if isinstance(l2, (int, float)) and l2 == 0:
        return sq
    cross = jnp.sum(jnp.reshape((x @ W) * dy, (x.shape[0], -1)), axis=-1)
    return sq + 2 * l2 * cross + l2 * l2 * jnp.sum(W * W)


def per_example_sq(x: Array, dy: Array, use_bias: bool) -> dict[str, Array]:
    """`{"W": sum_i dW_i**2, "b": sum_i db_i**2}` (elementwise squares) for y = x W + b.

    Rows: `dW_i = h_i dy_i^T`, so `dW_i**2 = (h_i**2)(dy_i**2)^T` and the sum over
    examples is one matmul, `(h**2)^T (dy**2)`: no dW_i is formed.
    T positions: dW_i[a, b] = sum_t h_ta dy_tb, so

        dW_i[a, b]**2 = sum_{t,t'} (h_ta h_t'a) (dy_tb dy_t'b),

    again one matmul over the (example, t, t') pairs, memory O(batch T^2 (in +
    out)); used when T^2 (in + out) <= in out, else dW_i is formed and squared
    (memory O(batch in out)), whichever is smaller.
    """
    if x.ndim == 2:
        sq = {"W": lax.dot_general(x * x, dy * dy, (((0,), (0,)), ((), ())))}
        if use_bias:
            sq["b"] = jnp.sum(dy * dy, axis=0)
        return sq
    x3, dy3 = positions_of(x), positions_of(dy)
    n, t, i, o = x3.shape[0], x3.shape[1], x3.shape[2], dy3.shape[2]
    if t * t * (i + o) <= i * o:
        hh = (x3[:, :, None, :] * x3[:, None, :, :]).reshape(n * t * t, i)
        dd = (dy3[:, :, None, :] * dy3[:, None, :, :]).reshape(n * t * t, o)
        w = lax.dot_general(hh, dd, (((0,), (0,)), ((), ())))
    else:
        w = jnp.sum(jnp.einsum("bti,btj->bij", x3, dy3) ** 2, axis=0)
    sq = {"W": w}
    if use_bias:
        sq["b"] = jnp.sum(jnp.sum(dy3, axis=1) ** 2, axis=0)
    return sq


def per_example_gram(xa: Array, dya: Array, xb: Array, dyb: Array, use_bias: bool) -> Array:
    """(na, nb) matrix of <grad_i, grad_j> for y = x W + b, i from batch a and j from batch b.

    Rows: <h_i dy_i^T, h_j dy_j^T> = (h_i . h_j)(dy_i . dy_j), so the matrix
    is (Ha Hb^T) * (Da Db^T), plus Da Db^T for the bias: no grad_i is formed.
    T positions: <sum_t h_t dy_t^T, sum_s h_s dy_s^T> = sum_{t,s} (h_t . h_s)(dy_t . dy_s),
    memory O(na nb T^2); when that exceeds (na + nb) in out, each dW_i is
    formed instead and the products taken.
    """
    if xa.ndim == 2:
        dd = dya @ dyb.T
        gram = (xa @ xb.T) * dd
        return gram + dd if use_bias else gram
    xa3, dya3, xb3, dyb3 = positions_of(xa), positions_of(dya), positions_of(xb), positions_of(dyb)
    na, nb, ta, tb = xa3.shape[0], xb3.shape[0], xa3.shape[1], xb3.shape[1]
    if na * nb * ta * tb <= (na + nb) * xa3.shape[2] * dya3.shape[2]:
        gram = jnp.sum(jnp.einsum("ati,bsi->abts", xa3, xb3) * jnp.einsum("atj,bsj->abts", dya3, dyb3), axis=(2, 3))
    else:
        wa, wb = jnp.einsum("bti,btj->bij", xa3, dya3), jnp.einsum("bti,btj->bij", xb3, dyb3)
        gram = wa.reshape(na, -1) @ wb.reshape(nb, -1).T
    if use_bias:
        gram = gram + jnp.sum(dya3, axis=1) @ jnp.sum(dyb3, axis=1).T
    return gram


def kfac_factors(x: Array, dy: Array, use_bias: bool) -> KFACFactors:
    """KFACFactors(A, G) for y = x W + b with per-example output gradients dy.

        A = 1/(N T) sum_{i,t} a_it a_it^T,   a = [h, 1] (the 1 only with a bias)
        G = 1/N     sum_{i,t} dy_it dy_it^T

    N examples of T positions each (T = 1 for rows). The empirical Fisher of
    the weights [W; b] is then approximated as A (x) G (Martens & Grosse,
    2015; for positions, the KFC approximation of Grosse & Martens, 2016,
    which takes positions as uncorrelated: F ~ T E[a a^T] (x) E[dy dy^T]).
    """
    x2, dy2 = jnp.reshape(x, (-1, x.shape[-1])), jnp.reshape(dy, (-1, dy.shape[-1]))
    if use_bias:
        x2 = jnp.concatenate([x2, jnp.ones((x2.shape[0], 1), x2.dtype)], axis=1)
    a = lax.dot_general(x2, x2, (((0,), (0,)), ((), ()))) / x2.shape[0]
    g = lax.dot_general(dy2, dy2, (((0,), (0,)), ((), ()))) / dy.shape[0]
    return KFACFactors(a, g)
