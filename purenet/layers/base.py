"""The layer protocol, and a base for layers without parameters.

A layer is a frozen, hashable configuration with three pure methods:

    params, state, out_dim = layer.init(key, in_dim, dtype=None)
    y, state, cache        = layer.forward(params, state, x, train=False, key=None)
    dparams, dx            = layer.backward(params, cache, dy)

`cache` holds exactly what `backward` needs from the forward pass. `backward`
returns the vector-Jacobian product: given dy = dL/dy it returns dL/dparams
(same structure as params) and dL/dx. It is linear in dy.
"""
import dataclasses


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

    def apply(self, x):  # pragma: no cover - interface
        raise NotImplementedError

    def grad(self, cache, dy):  # pragma: no cover - interface
        raise NotImplementedError
