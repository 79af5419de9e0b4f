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

import jax
import jax.numpy as jnp
from jax import lax

from purenet.layers import dense
from purenet.layers.activations import GELU
from purenet.layers.attention import MultiHeadAttention
from purenet.layers.base import as_shape
from purenet.layers.compose import Residual
from purenet.layers.dropout import Dropout
from purenet.layers.embedding import (Embedding, PositionalEmbedding, check_ids, per_example_scatter,
                                      scatter_rows, sq_norm_of_scatter)
from purenet.layers.norm import LayerNorm
from purenet.layers.sequential import Sequential
from purenet.layers.softmax import Softmax

_STD = 0.02  # GPT-2's initial standard deviation for every matrix


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"gpt {name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class GPT:
    """A transformer language model from token ids to logits, with the token
    embedding optionally tied to the output projection.

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

    `backward` computes both terms and adds them; `per_example_backward`
    adds them per example, and `per_example_sq_norms` expands
    ||A + B||^2 = ||A||^2 + ||B||^2 + 2 <A, B> so that no (batch, vocab, d)
    tensor is formed.
    """

    vocab_size: int
    context: int
    layers: int
    heads: int
    features: int
    dropout: float = 0.0
    tie_embeddings: bool = True

    accepts_ids = True

    def __post_init__(self):
        for name in ("vocab_size", "context", "layers", "heads", "features"):
            _positive(name, getattr(self, name))
        if self.features % self.heads:
            raise ValueError(f"gpt features={self.features} must divide into heads={self.heads}")

    @property
    def num_embeddings(self):
        return self.vocab_size

    @property
    def token(self):
        return Embedding(self.vocab_size, self.features, stddev=_STD)

    @property
    def body(self):
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

    def init(self, key, in_shape, dtype=None):
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
        shape (a jitted init of nanoGPT's model compiles in 0.5 s, not 1.25 s).
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
        return params["token"]["E"].T if self.tie_embeddings else params["head"]["W"]

    def forward(self, params, state, x, train=False, key=None):
        check_ids(x, params["token"]["E"].shape[0], "gpt")
        if jnp.ndim(x) != 2 or x.shape[1] > self.context:
            raise ValueError(f"gpt takes ids of shape (batch, T <= {self.context}), got {jnp.shape(x)}")
        h0 = jnp.take(params["token"]["E"], x, axis=0)
        h, state, body_cache = self.body.forward(params["body"], state, h0, train=train, key=key)
        logits = h @ self._out_matrix(params)
        return logits, state, (x, body_cache, h)

    def _head_grads(self, params, h, dy):
        """dL/d(output matrix) as stored (E: (vocab, d) when tied; W: (d, vocab)), and dL/dh."""
        h2, dy2 = jnp.reshape(h, (-1, h.shape[-1])), jnp.reshape(dy, (-1, dy.shape[-1]))
        d_out = lax.dot_general(dy2, h2, (((0,), (0,)), ((), ())))  # dy^T h: (vocab, d)
        dh = lax.dot_general(dy, self._out_matrix(params), (((2,), (1,)), ((), ())))  # dy M^T
        return (d_out if self.tie_embeddings else d_out.T), dh

    def backward(self, params, cache, dy):
        ids, body_cache, h = cache
        d_out, dh = self._head_grads(params, h, dy)
        body_grads, dh0 = self.body.backward(params["body"], body_cache, dh)
        d_lookup = scatter_rows(params["token"]["E"].shape[0], ids, dh0)
        grads = {"token": {"E": d_lookup + d_out if self.tie_embeddings else d_lookup}, "body": body_grads}
        if not self.tie_embeddings:
            grads["head"] = {"W": d_out}
        return grads, None

    def per_example_backward(self, params, cache, dy):
        ids, body_cache, h = cache
        dh = lax.dot_general(dy, self._out_matrix(params), (((2,), (1,)), ((), ())))
        d_out = jnp.einsum("btv,btd->bvd", dy, h)  # (batch, vocab, d)
        body_grads, dh0 = self.body.per_example_backward(params["body"], body_cache, dh)
        d_lookup = per_example_scatter(params["token"]["E"].shape[0], ids, dh0)
        grads = {"token": {"E": d_lookup + d_out if self.tie_embeddings else d_lookup}, "body": body_grads}
        if not self.tie_embeddings:
            grads["head"] = {"W": jnp.swapaxes(d_out, 1, 2)}
        return grads, None

    def per_example_sq_norms(self, params, cache, dy, l2=0.0):
        ids, body_cache, h = cache
        M = self._out_matrix(params)
        dh = lax.dot_general(dy, M, (((2,), (1,)), ((), ())))
        body_sq, dh0 = self.body.per_example_sq_norms(params["body"], body_cache, dh, l2)
        lookup_sq = sq_norm_of_scatter(ids, dh0)
        if not self.tie_embeddings:  # the head's W is a weight named W: l2 applies to it
            return body_sq + lookup_sq + dense.per_example_sq_norms(h, dy, M, False, l2), None
        out_sq = dense.per_example_sq_norms(h, dy, M, False)
        # <A_i, B_i> with A_i the scatter of dh0 and B_i = dy_i^T h_i:
        #   sum_t dh0_t . B_i[ids_t] = sum_{t,s} (dh0_t . h_s) dy[s, ids_t]
        gram = jnp.einsum("btd,bsd->bts", dh0, h)
        b, t = ids.shape
        picked = jnp.take_along_axis(dy, jnp.broadcast_to(ids[:, None, :], (b, dy.shape[1], t)), axis=2)
        cross = jnp.einsum("bts,bst->b", gram, picked)
        return body_sq + lookup_sq + out_sq + 2 * cross, None

    def children(self, params, cache=None):
        ids, body_cache, _ = cache if cache is not None else (None, None, None)
        return ((self.token, params["token"], ids), (self.body, params["body"], body_cache))


def gpt(vocab_size, context, layers, heads, features, dropout=0.0, tie_embeddings=True):
    """A GPT language model: integer ids (batch, T <= context) -> next-token probabilities (batch, T, vocab).

    Sequential([GPT(...), Softmax()]); train it with loss="cross_entropy" and
    labels (batch, T) (the ids shifted by one): the loss averages over every
    position, computed stably from the logits. See `GPT` for the blocks, the
    initialisation and how the tied embedding's two gradients add.

        net = pn.gpt(vocab_size=65, context=64, layers=4, heads=4, features=128)
        params, state = pn.init(net, key)
    """
    model = GPT(vocab_size, context, layers, heads, features, dropout, bool(tie_embeddings))
    return Sequential([model, Softmax()], in_shape=(context,))
