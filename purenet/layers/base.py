"""The layer protocol, and a base for layers without parameters.

A layer is a frozen, hashable configuration with three pure methods:

    params, state, out_dim = layer.init(key, in_dim, dtype=None)
    y, state, cache        = layer.forward(params, state, x, train=False, key=None)
    dparams, dx            = layer.backward(params, cache, dy)

`cache` holds exactly what `backward` needs from the forward pass. `backward`
returns the vector-Jacobian product: given dy = dL/dy it returns dL/dparams
(same structure as params) and dL/dx. It is linear in dy.

Two optional methods give per-example gradient information for a batch of
rows, where row i of dy is the gradient of example i's own loss:

    grads_i, dx = layer.per_example_backward(params, cache, dy)   # leading batch axis
    sq, dx      = layer.per_example_sq_norms(params, cache, dy, l2) # ||grad_i + l2 W||^2, (batch,)
"""
import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Elementwise:
    """A parameter-free layer h = g(a) applied element by element.

    Subclasses define `apply(x) -> (y, cache)` and `grad(cache, dy) -> dx`;
    the three protocol methods come from here.
    """

    def init(self, key, in_dim, dtype=None):
        del key, dtype
        return {}, {}, in_dim

    def forward(self, params, state, x, train=False, key=None):
        del params, train, key
        y, cache = self.apply(x)
        return y, state, cache

    def backward(self, params, cache, dy):
        del params
        return {}, self.grad(cache, dy)

    def per_example_backward(self, params, cache, dy):
        """No parameters: the per-example gradients are empty; dx is as usual."""
        return {}, self.grad(cache, dy)

    def per_example_sq_norms(self, params, cache, dy, l2=0.0):
        """Squared norm of each example's parameter gradient (zero: none), and dx."""
        return jnp.zeros(dy.shape[:1], dy.dtype), self.grad(cache, dy)

    def apply(self, x):  # pragma: no cover - interface
        raise NotImplementedError

    def grad(self, cache, dy):  # pragma: no cover - interface
        raise NotImplementedError
