"""The fully connected layer."""
import dataclasses

import jax.numpy as jnp
from jax import lax

from purenet import initializers
from purenet.initializers import default_float


@dataclasses.dataclass(frozen=True, init=False)
class Dense:
    """Pre-activation  a = h W + b  for a batch of rows h (the lecture's a = W h + b, transposed).

    params: {"W": (in_dim, features), "b": (features,)} ("b" absent when use_bias=False).
    Biases start at zero; W is drawn by the initializer named by `init`
    (see `purenet.initializers`), stored as the field `initializer` because
    `init` is the protocol method.

    Backward, for dL/da = dy:
        dL/dW = h^T dy        (summed over the batch)
        dL/db = sum_batch dy
        dL/dh = dy W^T
    """

    features: int
    initializer: str
    use_bias: bool

    def __init__(self, features, init="he_normal", use_bias=True):
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"Dense features must be a positive integer, got {features!r}")
        initializers.get(init)  # fail early on an unknown name
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "initializer", init)
        object.__setattr__(self, "use_bias", bool(use_bias))

    def init(self, key, in_dim, dtype=None):
        dtype = dtype or default_float()
        params = {"W": initializers.get(self.initializer)(key, (in_dim, self.features), dtype)}
        if self.use_bias:
            params["b"] = jnp.zeros((self.features,), dtype)
        return params, {}, self.features

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
        dW = lax.dot_general(dy2, x2, (((0,), (0,)), ((), ()))).T  # (h^T dy)
        dx = self._dx(params, dy)  # dy W^T
        grads = {"W": dW}
        if self.use_bias:
            grads["b"] = jnp.sum(dy2, axis=0)
        return grads, dx

    def _dx(self, params, dy):
        return lax.dot_general(dy, params["W"], (((dy.ndim - 1,), (1,)), ((), ())))

    def per_example_backward(self, params, x, dy):
        """Example i's gradients: dW_i = h_i dy_i^T (an outer product), db_i = dy_i."""
        _check_rows(x)
        grads = {"W": jnp.einsum("bi,bj->bij", x, dy)}
        if self.use_bias:
            grads["b"] = dy
        return grads, self._dx(params, dy)

    def per_example_sq_norms(self, params, x, dy, l2=0.0):
        """||dW_i + l2 W||^2 + ||db_i||^2 without forming dW_i (Goodfellow, 2015):

            ||h_i dy_i^T||^2 = ||h_i||^2 ||dy_i||^2,   <h_i dy_i^T, W> = h_i^T W dy_i.

        Memory O(batch (in + out)) instead of O(batch in out).
        """
        _check_rows(x)
        dy_sq = jnp.sum(dy * dy, axis=-1)
        sq = jnp.sum(x * x, axis=-1) * dy_sq
        if self.use_bias:
            sq = sq + dy_sq
        W = params["W"]
        sq = sq + 2 * l2 * jnp.sum((x @ W) * dy, axis=-1) + l2 * l2 * jnp.sum(W * W)
        return sq, self._dx(params, dy)


def _check_rows(x):
    if x.ndim != 2:
        raise ValueError(f"per-example gradients need inputs of shape (batch, features), got {x.shape}")
