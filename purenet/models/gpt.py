"""A GPT (decoder-only transformer language model), and its builder `gpt`.

    ids (batch, T) -> E[ids] + P[:T] -> [dropout] -> blocks -> LayerNorm -> h (batch, T, d)
                   -> logits = h E^T (tied) or h W (untied) -> Softmax (in `gpt`'s Sequential)

    block:  x = x + Dropout(Attention(LayerNorm(x)))         causal, `heads` heads
            x = x + Dropout(Dense(d)(GELU(Dense(4d)(LayerNorm(x)))))

as GPT-2 and nanoGPT build it (pre-LayerNorm, exact GELU, no bias on the
output projection).
"""
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from purenet.layers import dense, structure
from purenet.layers.activations import GELU
from purenet.layers.attention import MultiHeadAttention
from purenet.layers.base import Array, Container, Layer, PyTree, Visit, as_shape
from purenet.layers.traversal import decode, decode_init, walk
from purenet.layers.compose import Residual
from purenet.layers.dropout import Dropout
from purenet.layers.embedding import Embedding, PositionalEmbedding, check_ids
from purenet.layers.norm import LayerNorm
from purenet.layers.sequential import Sequential
from purenet.layers.softmax import Softmax
from purenet.layers.structure import DenseProduct, Lookup, TiedTable

__all__ = ["GPT", "TiedEnds", "check_model_sizes", "gpt"]

_STD = 0.02  # GPT-2's initial standard deviation for every matrix


def check_model_sizes(model: Any, builder: str) -> None:
    """Check a language model's sizes (GPT's, LLaMA's): positive integers, and features divisible by heads.

    Args:
        model: the model, with the attributes vocab_size, context, layers,
            heads and features.
        builder: the builder's name ("gpt", "llama"), for the error messages.

    Raises:
        ValueError: if a size is not a positive int or features is not a
            multiple of heads.
    """
    for name in ("vocab_size", "context", "layers", "heads", "features"):
        value = getattr(model, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{builder} {name} must be a positive integer, got {value!r}")
    if model.features % model.heads:
        raise ValueError(f"{builder} features={model.features} must divide into heads={model.heads}")


@dataclasses.dataclass(frozen=True)
class GPT(Container):
    """A GPT-2 style transformer language model from token ids to logits.

    The token embedding is optionally tied to the output projection.
    params: {"token": {"E": (vocab, d)}, "body": (the Sequential's params),
    and "head": {"W": (d, vocab)} when not tied}; body = [PositionalEmbedding,
    (Dropout), blocks..., LayerNorm]. Initialised as GPT-2: E, P and every
    matrix from N(0, 0.02^2), the residual projections (attention's Wo and
    the MLP's second Dense) from N(0, (0.02 / sqrt(2 layers))^2), biases 0.

    Weight tying. With tie_embeddings=True the one matrix E is used twice:
    to look up the input vectors, h0 = E[ids], and as the output
    projection, logits = h E^T. Backpropagation sums the gradient over every
    path to a quantity, so E's gradient is the sum of both uses:

        dL/dE = scatter_add(ids, dL/dh0)        (the lookup: row r gets dL/dh0 at every id r)
              + (dL/dlogits)^T h                (the output projection, as Dense's x^T dy)

    Both ends are one leaf of the traversal (`TiedEnds`), after the body's
    walk: it adds the two terms, per example too, and its squared norm
    expands ||A + B||^2 = ||A||^2 + ||B||^2 + 2 <A, B> so that no
    (batch, vocab, d) tensor is formed. GPT outputs logits; `pn.gpt` puts
    a Softmax after it.

    Args:
        vocab_size: the number of token ids (E's rows).
        context: the longest sequence T (the positional embedding's rows).
        layers: the number of transformer blocks.
        heads: the attention heads per block; `features` must be a multiple of it.
        features: d, the model width.
        dropout: the Dropout rate after the embeddings and on each residual
            branch, in [0, 1) (default 0: no Dropout layers).
        tie_embeddings: True (the default) to use E^T as the output
            projection; False for a separate head W (d, vocab).
        replaced: (ends, body) in place of the ones the configuration
            builds, or None (the default): set by `with_children` (the taps
            of `pn.capture` and `pn.hooked`), not by hand.

    Raises:
        ValueError: if `vocab_size`, `context`, `layers`, `heads` or
            `features` is not a positive int, or `features` is not a multiple
            of `heads` (and, at `init`, for a `dropout` outside [0, 1)).
    """

    vocab_size: int
    context: int
    layers: int
    heads: int
    features: int
    dropout: float = 0.0
    tie_embeddings: bool = True
    replaced: tuple | None = dataclasses.field(default=None, repr=False)

    accepts_ids = True
    outputs = "logits"

    def __post_init__(self) -> None:
        check_model_sizes(self, "gpt")

    @property
    def num_embeddings(self) -> int:
        return self.vocab_size

    @property
    def token(self) -> Embedding:
        return Embedding(self.vocab_size, self.features, stddev=_STD)

    @property
    def body(self) -> Sequential:
        if self.replaced is not None:
            return self.replaced[1]
        d, drop = self.features, self.dropout
        extra = [Dropout(drop)] if not (isinstance(drop, (int, float)) and drop == 0) else []
        blocks = [
            Sequential([
                Residual(Sequential([LayerNorm(), MultiHeadAttention(self.heads, causal=True), *extra])),
                Residual(Sequential([LayerNorm(), dense.Dense(4 * d), GELU(), dense.Dense(d), *extra])),
            ])
            for _ in range(self.layers)
        ]
        return Sequential([PositionalEmbedding(self.context, stddev=_STD), *extra, *blocks, LayerNorm()])

    def init(self, key: Array, in_shape: Any, dtype: Any = None) -> tuple[PyTree, PyTree, tuple[int, ...]]:
        in_shape = as_shape(in_shape)
        if len(in_shape) != 1 or in_shape[0] > self.context:
            raise ValueError(f"gpt takes examples of shape (T,) of token ids with T <= context={self.context}, "
                             f"got {in_shape}")
        k_tok, k_body, k_head, k_w = jax.random.split(key, 4)
        token, _, shape = self.token.init(k_tok, in_shape, dtype)
        body, state, shape = self.body.init(k_body, shape, dtype)
        token, body = self._gpt2_init(k_w, token, body)
        params = {"token": token, "body": body}
        if not self.tie_embeddings:
            params["head"] = {"W": _STD * jax.random.normal(k_head, (self.features, self.vocab_size),
                                                           token["E"].dtype)}
        return params, state, shape[:-1] + (self.vocab_size,)

    def _gpt2_init(self, key, token, body):
        """Redraw E, P and the blocks' matrices: N(0, 0.02^2); residual projections N(0, (0.02/sqrt(2 L))^2).

        All of them are cut, in order, from one standard-normal draw: one
        random-number program for XLA to compile instead of one per matrix
        shape, so a jitted init compiles faster (measured in benchmarks/README.md,
        "The whole run against PyTorch eager").
        """
        token, body = dict(token), list(body)
        body[0] = dict(body[0])  # the positional embedding
        slots = [(token, "E", _STD), (body[0], "P", _STD)]
        first = len(body) - 1 - self.layers
        res_std = _STD / math.sqrt(2 * self.layers)
        for j in range(first, first + self.layers):
            (attn_ln, attn, *rest_a), (mlp_ln, fc, gelu, proj, *rest_m) = body[j]
            attn, fc, proj = dict(attn), dict(fc), dict(proj)
            slots += [(attn, name, res_std if name == "Wo" else _STD) for name in ("Wq", "Wk", "Wv", "Wo")]
            slots += [(fc, "W", _STD), (proj, "W", res_std)]
            body[j] = ((attn_ln, attn, *rest_a), (mlp_ln, fc, gelu, proj, *rest_m))
        z = jax.random.normal(key, (sum(params[name].size for params, name, _ in slots),), token["E"].dtype)
        start = 0
        for params, name, std in slots:
            shape = params[name].shape
            params[name] = std * z[start:start + math.prod(shape)].reshape(shape)
            start += math.prod(shape)
        return token, tuple(body)

    def _out_matrix(self, params):
        return _readout(params, self.tie_embeddings)

    def forward(self, params: PyTree, state: PyTree, x: Array, train: bool = False,
                key: Array | None = None) -> tuple[Array, PyTree, PyTree]:
        check_ids(x, params["token"]["E"].shape[0], "gpt")
        if jnp.ndim(x) != 2 or x.shape[1] > self.context:
            raise ValueError(f"gpt takes ids of shape (batch, T <= {self.context}), got {jnp.shape(x)}")
        h0 = jnp.take(params["token"]["E"], x, axis=0)
        h, state, body_cache = self.body.forward(params["body"], state, h0, train=train, key=key)
        logits = h @ self._out_matrix(params)
        return logits, state, (x, body_cache, h)

    def decode_init(self, params: PyTree, batch: int, length: int) -> PyTree:
        return decode_init(self.body, params["body"], batch, length)

    def decode(self, params: PyTree, state: PyTree, x: Array, kv: PyTree, pos: Array) -> tuple[Array, PyTree]:
        """Next-token logits (batch, 1, vocab) for the ids x (batch, 1) at position `pos`."""
        h, kv = decode(self.body, params["body"], state, jnp.take(params["token"]["E"], x, axis=0), kv, pos)
        return h @ self._out_matrix(params), kv

    @property
    def ends(self) -> "TiedEnds":
        return TiedEnds(self.tie_embeddings) if self.replaced is None else self.replaced[0]

    def children(self) -> tuple:
        return (self.ends, self.body)

    def with_children(self, children: tuple | list) -> "GPT":
        ends, body = children
        return dataclasses.replace(self, replaced=(ends, body))

    def split(self, tree: PyTree) -> tuple:
        if "ends" in tree:  # a visitor's one value for the ends (the untied head's K-FAC factors)
            return tree["ends"], tree["body"]
        return {k: tree[k] for k in ("token", "head") if k in tree}, tree["body"]

    def parts(self, outs: Any) -> tuple:
        return tuple(outs)

    def join(self, parts: tuple | list) -> PyTree:
        ends, body = parts
        if ends is None:  # a visitor that has nothing for the ends (the tied table's K-FAC factors)
            ends = {"token": None} if self.tie_embeddings else {"token": None, "head": None}
        # one value for the whole leaf: the untied head's K-FAC factors, or its influence blocks {"head/W": ...}
        if not isinstance(ends, dict) or "token" not in ends:
            return {"ends": ends, "body": body}
        return {"token": ends["token"], "body": body, **({"head": ends["head"]} if "head" in ends else {})}

    def walk_back(self, visit: Visit, params: PyTree, caches: tuple, dys: tuple) -> tuple[PyTree, tuple]:
        """The head's dL/dh, the body's walk, then the ends (lookup and output projection) as one leaf."""
        M = self._out_matrix(params)
        dhs = tuple(lax.dot_general(dy, M, (((2,), (1,)), ((), ()))) for dy in dys)  # dy M^T
        body_out, dh0s = walk(self.body, visit, params["body"], tuple(c[1] for c in caches), dhs)
        ends_params, _ = self.split(params)
        ends_out, _ = walk(self.ends, visit, ends_params, tuple((c[0], c[2]) for c in caches),
                           tuple(zip(dh0s, dys)))
        outs = self.join((ends_out, body_out)) if visit.shaped else (ends_out, body_out)
        return outs, tuple(None for _ in dys)


def _readout(params: PyTree, tied: bool) -> Array:
    """The output projection M of logits = h M: E^T when tied, else the head's W."""
    return params["token"]["E"].T if tied else params["head"]["W"]


@dataclasses.dataclass(frozen=True)
class TiedEnds(Layer):
    """GPT's two ends as one leaf of the traversal: the token lookup and the output projection.

    The lookup h0 = E[ids] and the output projection logits = h M (M = E^T
    when tied, else the head's W), which may share E.

    params {"token": {"E"}} (+ {"head": {"W"}} untied); cache (ids, h); dy = (dL/dh0, dL/dlogits).
    backward: dE = scatter_add(ids, dL/dh0) + (dL/dlogits)^T h (tied), dW = h^T dL/dlogits (untied):
    the batch gradients of the products it declares (`structure`). The ids get no gradient.

    Args:
        tied: True when E is also the output projection (GPT's tie_embeddings).
    """

    tied: bool

    def param_roles(self, params: PyTree) -> PyTree:
        return {"token": {"E": "embedding"}, **({"head": {"W": "weight"}} if "head" in params else {})}

    def tensor_split(self, params: PyTree, split_in: bool) -> tuple[PyTree, bool]:
        """Megatron's vocabulary-parallel ends: E split by vocabulary rows (the lookup is a masked
        local gather plus an all-reduce; the logits h E^T come out split over the vocabulary),
        an untied head's W by its vocabulary columns."""
        del split_in
        return {"token": {"E": 0}, **({"head": {"W": -1}} if "head" in params else {})}, False

    def init(self, key: Array, in_shape: Any,  # pragma: no cover - built by GPT
             dtype: Any = None) -> tuple[PyTree, PyTree, tuple[int, ...]]:
        raise TypeError("TiedEnds is a part of GPT's traversal, not a layer to build on its own")

    def forward(self, params: PyTree, state: PyTree, x: Array,  # pragma: no cover - built by GPT
                train: bool = False, key: Array | None = None) -> tuple[Array, PyTree, PyTree]:
        raise TypeError("TiedEnds is a part of GPT's traversal, not a layer to run on its own")

    def structure(self, params: PyTree) -> tuple:
        """Tied: one TiedTable (E looked up and read out). Untied: a Lookup of E and a dense product
        h W, so every per-example feature and K-FAC (on the head) come from their rules."""
        if self.tied:
            return (TiedTable("token/E"),)
        return Lookup("token/E"), DenseProduct(("head/W",), (None,))

    # dy is the pair (dL/dh0, dL/dlogits): typed Any, as the protocol's dy is an array.
    def products(self, params: PyTree, cache: tuple[Array, Array], dy: Any) -> tuple[tuple, None]:
        (ids, h), (dh0, dlogits) = cache, dy
        if self.tied:
            return ((ids, dh0, h, dlogits),), None
        return ((ids, dh0), (h, dlogits)), None

    def cached_io(self, params: PyTree, cache: tuple[Array, Array]) -> tuple[tuple, tuple]:
        """((ids, h), (h0, logits)): the ends' inputs (the ids and the body's output) and outputs (the
        looked-up vectors and the logits), for `pn.capture`."""
        ids, h = cache
        return (ids, h), (jnp.take(params["token"]["E"], ids, axis=0), h @ _readout(params, self.tied))

    def backward(self, params: PyTree, cache: tuple[Array, Array], dy: Any) -> tuple[PyTree, None]:
        products, _ = structure.bound(self, params, cache, dy)
        named = structure.flat(params)
        return structure.tree_of(params, [structure.batch_grads(p, named) for p in products]), None


def gpt(vocab_size: int, context: int, layers: int, heads: int, features: int, dropout: float = 0.0,
        tie_embeddings: bool = True) -> Sequential:
    """Build a GPT language model: integer ids -> next-token probabilities.

    Maps ids (batch, T <= context) to probabilities (batch, T, vocab):
    Sequential([GPT(...), Softmax()]); train it with loss="cross_entropy" and
    labels (batch, T) (the ids shifted by one): the loss averages over every
    position, computed stably from the logits. See `GPT` for the blocks, the
    initialisation and how the tied embedding's two gradients add.

        net = pn.gpt(vocab_size=65, context=64, layers=4, heads=4, features=128)
        params, state = pn.init(net, key)

    Args:
        vocab_size: the number of token ids.
        context: the longest sequence T.
        layers: the number of transformer blocks.
        heads: the attention heads per block; `features` must be a multiple of it.
        features: d, the model width.
        dropout: the Dropout rate after the embeddings and on each residual
            branch, in [0, 1) (default 0).
        tie_embeddings: True (the default) to share the token embedding with
            the output projection.

    Returns:
        A `Sequential` of the `GPT` and a `Softmax`, knowing its input shape
            (context,), so `pn.init(net, key)` needs no shape.

    Raises:
        ValueError: if a size is not a positive int or `features` is not a
            multiple of `heads`.
    """
    model = GPT(vocab_size, context, layers, heads, features, dropout, bool(tie_embeddings))
    return Sequential([model, Softmax()], in_shape=(context,))
