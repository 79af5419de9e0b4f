"""The fully connected layer."""
import dataclasses

import jax.numpy as jnp
from jax import lax

from purenet import initializers
from purenet.initializers import default_float
from purenet.layers.base import as_shape, wide


@dataclasses.dataclass(frozen=True, init=False)
class Dense:
    """Pre-activation  a = h W + b  for a batch of rows h (the lecture's a = W h + b, transposed).

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
    """

    features: int
    initializer: str
    use_bias: bool

    def __init__(self, features, init="he_normal", use_bias=True, *, initializer=None):
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"Dense features must be a positive integer, got {features!r}")
        init = initializer or init
        initializers.get(init)  # fail early on an unknown name
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "initializer", init)
        object.__setattr__(self, "use_bias", bool(use_bias))

    def __repr__(self):
        return f"Dense(features={self.features}, init={self.initializer!r}, use_bias={self.use_bias})"

    def init(self, key, in_shape, dtype=None):
        in_shape, dtype = as_shape(in_shape), dtype or default_float()
        params = {"W": initializers.get(self.initializer)(key, (in_shape[-1], self.features), dtype)}
        if self.use_bias:
            params["b"] = jnp.zeros((self.features,), dtype)
        return params, {}, in_shape[:-1] + (self.features,)

    def forward(self, params, state, x, train=False, key=None):
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

    def backward(self, params, x, dy):
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

    def _dx(self, params, dy):
        return lax.dot_general(dy, params["W"], (((dy.ndim - 1,), (1,)), ((), ())))

    def per_example_backward(self, params, x, dy):
        """Example i's gradients: dW_i = sum_t h_it dy_it^T (an outer product per position t),
        db_i = sum_t dy_it; for rows (no positions) dW_i = h_i dy_i^T, db_i = dy_i."""
        return per_example_grads(x, dy, self.use_bias), self._dx(params, dy)

    def per_example_sq_norms(self, params, x, dy, l2=0.0):
        """||dW_i + l2 W||^2 + ||db_i||^2, without forming dW_i where an identity is cheaper
        (see `per_example_sq_norms`)."""
        return per_example_sq_norms(x, dy, params["W"], self.use_bias, l2), self._dx(params, dy)


def per_example_grads(x, dy, use_bias):
    """{"W": (batch, in, out), "b": (batch, out)}: each example's sum over its positions."""
    x3, dy3 = _positions(x), _positions(dy)
    grads = {"W": jnp.einsum("bti,btj->bij", x3, dy3)}
    if use_bias:
        grads["b"] = jnp.sum(dy3, axis=1)
    return grads


def per_example_sq_norms(x, dy, W, use_bias, l2=0.0):
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
        x3, dy3 = _positions(x), _positions(dy)
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


def _positions(t):
    """(batch, ..., d) -> (batch, positions, d)."""
    return jnp.reshape(t, (t.shape[0], -1, t.shape[-1]))
