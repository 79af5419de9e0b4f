"""Embeddings: token ids -> vectors (Embedding), and learned positions (PositionalEmbedding).

    Embedding            ids (batch, T) int   -> E[ids]  (batch, T, features)
    PositionalEmbedding  x (batch, T, d)      -> x + P[:T]

The backward of a lookup is a scatter-add: row r of dL/dE is the sum of dy
over every position whose id is r (zero for ids not used). Ids are not
differentiable, so an Embedding's dL/dx is None: it is the first layer of
a network.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from purenet._checks import check_index_range
from purenet.initializers import default_float
from purenet.layers.base import Array, Layer, PyTree, Static, as_shape
from purenet.layers.structure import Lookup

__all__ = ["Embedding", "PositionalEmbedding", "check_ids", "per_example_scatter", "scatter_rows", "sq_norm_of_scatter"]


def check_ids(ids: Array, num_embeddings: int, what: str = "Embedding") -> None:
    """Require integer ids in [0, num_embeddings): the dtype at trace time, the values when concrete.

    Args:
        ids: token ids, any shape.
        num_embeddings: the number of rows of the table the ids index.
        what: the name of the layer, for the error messages.

    Raises:
        TypeError: if `ids` is not of an integer dtype.
        ValueError: if a concrete id lies outside [0, num_embeddings).
    """
    dtype = jnp.result_type(ids)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{what} takes integer token ids, got dtype {dtype}; "
                        f"convert them first, e.g. ids.astype(jnp.int32)")
    check_index_range(ids, num_embeddings, what)


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Embedding(Layer):
    """A lookup table: integer ids (batch, ...) -> rows of E, (batch, ..., features).

    params {"E": (num_embeddings, features)}, drawn from N(0, stddev^2)
    (stddev=1.0 as torch.nn.Embedding; GPT-2 uses 0.02).

    Backward, for dy = dL/dy:  dL/dE[r] = sum over positions p with ids[p] = r of dy[p]
    (a scatter-add of dy into the rows used). The ids get no gradient (dx is None).

    Ids must be integers in [0, num_embeddings); the range is checked
    eagerly when the ids are concrete. Inside `jit` it cannot be (check data
    before tracing, as `fit` does), and a bad id is not clamped: with
    n = num_embeddings, an id >= n or < -n gives a row of NaN (jnp.take's
    fill mode) and its gradient is dropped, while an id in [-n, 0) wraps
    around as in NumPy, reading (and getting the gradient of) row n + id.

    Args:
        num_embeddings: n, the table's rows (the vocabulary size), a positive int.
        features: the width of each row, a positive int.
        stddev: the standard deviation of the initial rows (default 1.0).

    Raises:
        ValueError: if `num_embeddings` or `features` is not a positive int
            (and, in `forward`, if a concrete id lies outside [0, n)).
        TypeError: in `forward`, if the ids are not integers.
    """
    piecewise_linear = True  # no second-order term: pn.stats.hessian_diagonal passes through

    num_embeddings: int
    features: int
    stddev: float = 1.0

    accepts_ids = True  # a network whose first layer this is takes integer inputs
    roles = {"E": "embedding"}
    positionwise = True

    def __post_init__(self) -> None:
        _check_positive("Embedding num_embeddings", self.num_embeddings)
        _check_positive("Embedding features", self.features)

    def init(self, key: Array, in_shape: Any, dtype: Any = None) -> tuple[PyTree, PyTree, tuple[int, ...]]:
        in_shape, dtype = as_shape(in_shape), dtype or default_float()
        E = self.stddev * jax.random.normal(key, (self.num_embeddings, self.features), dtype)
        return {"E": E}, {}, in_shape + (self.features,)

    def forward(self, params: PyTree, state: PyTree, x: Array, train: bool = False,
                key: Array | None = None) -> tuple[Array, PyTree, PyTree]:
        del train, key
        check_ids(x, params["E"].shape[0], str(self))
        return jnp.take(params["E"], x, axis=0), state, x

    def backward(self, params: PyTree, ids: Array, dy: Array) -> tuple[PyTree, None]:
        return {"E": scatter_rows(params["E"].shape[0], ids, dy)}, None

    def structure(self, params: PyTree) -> tuple[Lookup]:
        """A lookup of E's rows: its rules give every per-example feature (||dE_i||^2 without forming dE_i)."""
        return (Lookup("E"),)

    def products(self, params: PyTree, ids: Array, dy: Array) -> tuple[tuple, None]:
        return ((ids, dy),), None


def scatter_rows(num_rows: int, ids: Array, dy: Array) -> Array:
    """The scatter-add `sum_p onehot(ids[p]) dy[p]^T`, the transpose of a row gather.

    Args:
        num_rows: the table's rows.
        ids: integer ids, shape (batch, ...).
        dy: the gradient of the gathered rows, shape (batch, ..., d).

    Returns:
        (num_rows, d): row r holds the sum of dy over the positions whose id is r.
    """
    d = dy.shape[-1]
    return jnp.zeros((num_rows, d), dy.dtype).at[jnp.reshape(ids, (-1,))].add(jnp.reshape(dy, (-1, d)))


def per_example_scatter(num_rows: int, ids: Array, dy: Array) -> Array:
    """Each example's own scatter: (batch, num_rows, d)."""
    b, d = dy.shape[0], dy.shape[-1]
    ids2, dy3 = jnp.reshape(ids, (b, -1)), jnp.reshape(dy, (b, -1, d))
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], ids2.shape)
    return jnp.zeros((b, num_rows, d), dy.dtype).at[rows, ids2].add(dy3)


def sq_norm_of_scatter(ids: Array, dy: Array) -> Array:
    """||dE_i||^2 = sum_{t,t'} [ids_t = ids_t'] dy_t . dy_t'  (a T x T Gram masked by equal ids)."""
    b, d = dy.shape[0], dy.shape[-1]
    ids2, dy3 = jnp.reshape(ids, (b, -1)), jnp.reshape(dy, (b, -1, d))
    same = ids2[:, :, None] == ids2[:, None, :]
    gram = jnp.einsum("btd,bsd->bts", dy3, dy3)
    return jnp.sum(jnp.where(same, gram, 0.0), axis=(1, 2))


@dataclasses.dataclass(frozen=True)
class PositionalEmbedding(Layer):
    """Learned positions: x (batch, T, d) -> x + P[:T], for T <= context.

    params {"P": (context, d)}, drawn from N(0, stddev^2). Backward:
    dL/dP[t] = sum_batch dy[:, t] for t < T (zero for the unused positions),
    dL/dx = dy.

    Args:
        context: the longest sequence, a positive int (P's rows).
        stddev: the standard deviation of the initial P (default 1.0).

    Raises:
        ValueError: if `context` is not a positive int (and, at `init` or in
            `forward`, for inputs that are not (batch, T, d) with T <= context).
    """

    context: int
    stddev: float = 1.0

    roles = {"P": "embedding"}

    def tensor_split(self, params: PyTree, split_in: bool) -> tuple[PyTree, bool]:
        """P split by positions (each device adds its rows; the partitioner gathers them); the
        input's own split passes through."""
        return {"P": 0}, split_in

    def __post_init__(self) -> None:
        _check_positive("PositionalEmbedding context", self.context)

    def init(self, key: Array, in_shape: Any, dtype: Any = None) -> tuple[PyTree, PyTree, tuple[int, ...]]:
        in_shape, dtype = as_shape(in_shape), dtype or default_float()
        if len(in_shape) != 2 or in_shape[0] > self.context:
            raise ValueError(f"{self} takes examples of shape (T, features) with T <= {self.context}, "
                             f"got {in_shape}")
        return {"P": self.stddev * jax.random.normal(key, (self.context, in_shape[1]), dtype)}, {}, in_shape

    def forward(self, params: PyTree, state: PyTree, x: Array, train: bool = False,
                key: Array | None = None) -> tuple[Array, PyTree, PyTree]:
        del train, key
        P = params["P"]
        if jnp.ndim(x) != 3 or x.shape[1] > P.shape[0] or x.shape[2] != P.shape[1]:
            raise ValueError(f"{self} expects x of shape (batch, T <= {P.shape[0]}, {P.shape[1]}), "
                             f"got {jnp.shape(x)}")
        return x + P[: x.shape[1]], state, Static(P.shape[0] - x.shape[1])  # positions not used

    @staticmethod
    def _pad(g, unused):
        pad = [(0, 0)] * g.ndim
        pad[-2] = (0, unused.value)
        return jnp.pad(g, pad)

    def backward(self, params: PyTree, unused: Static, dy: Array) -> tuple[PyTree, Array]:
        return {"P": self._pad(jnp.sum(dy, axis=0), unused)}, dy

    def per_example_backward(self, params: PyTree, unused: Static, dy: Array) -> tuple[PyTree, Array]:
        return {"P": self._pad(dy, unused)}, dy

    def per_example_sq_norms(self, params: PyTree, unused: Static, dy: Array, l2: Any = 0.0) -> tuple[Array, Array]:
        return jnp.sum(jnp.reshape(dy * dy, (dy.shape[0], -1)), axis=-1), dy

    def decode_init(self, params: PyTree, batch: int, length: int) -> PyTree:
        return ()

    def decode(self, params: PyTree, state: PyTree, x: Array, kv: PyTree, pos: Array) -> tuple[Array, PyTree]:
        """One position: x (batch, 1, d) + P[pos]."""
        return x + lax.dynamic_slice_in_dim(params["P"], pos, 1, axis=0), kv
