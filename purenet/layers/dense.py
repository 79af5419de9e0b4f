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
        dx = lax.dot_general(dy, params["W"], (((dy.ndim - 1,), (1,)), ((), ())))  # dy W^T
        grads = {"W": dW}
        if self.use_bias:
            grads["b"] = jnp.sum(dy2, axis=0)
        return grads, dx
