"""A LLaMA-style language model (Touvron et al. 2023), and its builder `llama`.

    ids (batch, T) -> E[ids] -> blocks -> RMSNorm -> logits = h W (untied)       (batch, T, vocab)

    block:  x = x + Attention(RMSNorm(x))     causal, RoPE, no biases, `kv_heads` key/value heads
            x = x + SwiGLU(RMSNorm(x))

No learned positions: RoPE rotates each head's queries and keys by their
position, so a score depends on the distance between positions only.
"""
import dataclasses
from typing import Any

import jax.numpy as jnp

from purenet.layers.attention import MultiHeadAttention
from purenet.layers.base import Array, PyTree, Visit, Wrapper, as_shape
from purenet.layers.traversal import walk
from purenet.layers.compose import Residual
from purenet.layers.dense import Dense
from purenet.layers.embedding import Embedding, check_ids
from purenet.models.gpt import check_model_sizes
from purenet.layers.norm import RMSNorm
from purenet.layers.sequential import Sequential
from purenet.layers.swiglu import SwiGLU

__all__ = ["LLaMA", "llama"]


def default_hidden(features: int) -> int:
    """SwiGLU's width: 8d/3 (the parameters of a 4d two-matrix MLP), rounded up to a multiple of 8.

    Args:
        features: d, the model width.

    Returns:
        The smallest multiple of 8 that is at least 8 d / 3.
    """
    return -(-8 * features // 3 // 8) * 8


@dataclasses.dataclass(frozen=True)
class LLaMA(Wrapper):
    """A LLaMA-style decoder from token ids to next-token logits.

    Its params are its body's (a Sequential, the property `block`):
    body = [Embedding (N(0, 0.02^2)), blocks..., RMSNorm, Dense(vocab, no bias)]:
    every block a pre-RMSNorm residual attention (causal, RoPE, no biases,
    grouped-query with kv_heads) and a pre-RMSNorm residual SwiGLU(hidden).
    Every gradient is the body's (one Sequential's walk); train it with
    loss="cross_entropy" (computed from the logits) and labels (batch, T).

    Args:
        vocab_size: the number of token ids (the embedding's rows and the logits' width).
        context: the longest sequence T.
        layers: the number of transformer blocks.
        heads: the attention (query) heads per block; `features` must be a multiple of it.
        features: d, the model width.
        kv_heads: grouped-query attention's key/value heads, dividing `heads`;
            None (the default) for `heads`.
        hidden: the SwiGLU width; None (the default) for 8 features / 3,
            rounded up to a multiple of 8.
        implementation: the attention's formulation: "auto" (the default),
            "dense" or "blockwise" (see `pn.MultiHeadAttention`).
        replaced: a block in place of the one the configuration builds, or
            None (the default): set by `with_children` (the taps of
            `pn.capture` and `pn.hooked`), not by hand.

    Raises:
        ValueError: if `vocab_size`, `context`, `layers`, `heads` or
            `features` is not a positive int, or `features` is not a multiple
            of `heads` (and, at `init`, if `kv_heads` does not divide `heads`,
            `hidden` is not a positive int or `implementation` is unknown).
    """

    vocab_size: int
    context: int
    layers: int
    heads: int
    features: int
    kv_heads: int | None = None
    hidden: int | None = None
    implementation: str = "auto"
    replaced: Any = dataclasses.field(default=None, repr=False)

    accepts_ids = True
    outputs = "logits"

    def __post_init__(self) -> None:
        check_model_sizes(self, "llama")

    @property
    def num_embeddings(self) -> int:
        return self.vocab_size

    @property
    def in_shape(self) -> tuple[int, ...]:
        return (self.context,)

    @property
    def block(self) -> Sequential:
        if self.replaced is not None:
            return self.replaced
        attention = MultiHeadAttention(self.heads, causal=True, use_bias=False, num_kv_heads=self.kv_heads,
                                       rope=True, implementation=self.implementation)
        blocks = [
            Sequential([Residual(Sequential([RMSNorm(), attention])),
                        Residual(Sequential([RMSNorm(), SwiGLU(self.hidden or default_hidden(self.features))]))])
            for _ in range(self.layers)
        ]
        return Sequential([Embedding(self.vocab_size, self.features, stddev=0.02), *blocks, RMSNorm(),
                           Dense(self.vocab_size, init="lecun_normal", use_bias=False)])

    def init(self, key: Array, in_shape: Any = None, dtype: Any = None) -> tuple[PyTree, PyTree, tuple[int, ...]]:
        in_shape = as_shape((self.context,) if in_shape is None else in_shape)
        if len(in_shape) != 1 or in_shape[0] > self.context:
            raise ValueError(f"llama takes examples of shape (T,) of token ids with T <= context={self.context}, "
                             f"got {in_shape}")
        return self.block.init(key, in_shape, dtype)

    def forward(self, params: PyTree, state: PyTree, x: Array, train: bool = False,
                key: Array | None = None) -> tuple[Array, PyTree, PyTree]:
        check_ids(x, self.vocab_size, "llama")
        if jnp.ndim(x) != 2 or x.shape[1] > self.context:
            raise ValueError(f"llama takes ids of shape (batch, T <= {self.context}), got {jnp.shape(x)}")
        return self.block.forward(params, state, x, train=train, key=key)

    def walk_back(self, visit: Visit, params: PyTree, caches: tuple, dys: tuple) -> tuple[PyTree, tuple]:
        return walk(self.block, visit, params, caches, dys)

    def with_children(self, children: tuple | list) -> "LLaMA":
        (block,) = children
        return dataclasses.replace(self, replaced=block)


def llama(vocab_size: int, context: int, layers: int, heads: int, features: int, kv_heads: int | None = None,
          hidden: int | None = None, *, implementation: str = "auto") -> LLaMA:
    """Build a LLaMA-style language model: integer ids -> next-token logits.

    Maps ids (batch, T <= context) to logits (batch, T, vocab). kv_heads:
    grouped-query attention's key/value heads (default `heads`); hidden: the
    SwiGLU width (default 8 features / 3, rounded up to a multiple of 8);
    implementation: the attention's ("auto", "dense", "blockwise").

        net = pn.llama(vocab_size=65, context=256, layers=4, heads=8, features=256, kv_heads=2)
        params, state = pn.init(net, key)
        value, grads, state = pn.value_and_grad(net, params, state, ids, labels, loss="cross_entropy")

    Args:
        vocab_size: the number of token ids (the embedding's rows and the logits' width).
        context: the longest sequence T.
        layers: the number of transformer blocks.
        heads: the attention (query) heads per block; `features` must be a multiple of it.
        features: d, the model width.
        kv_heads: grouped-query attention's key/value heads, dividing `heads`;
            None (the default) for `heads`.
        hidden: the SwiGLU width; None (the default) for 8 features / 3,
            rounded up to a multiple of 8.
        implementation: the attention's formulation: "auto" (the default),
            "dense" or "blockwise" (see `pn.MultiHeadAttention`); keyword only.

    Returns:
        The `LLaMA` model; it knows its input shape (context,), so
            `pn.init(net, key)` needs no shape.

    Raises:
        ValueError: if a size is not a positive int or `features` is not a
            multiple of `heads`.
    """
    return LLaMA(vocab_size, context, layers, heads, features, kv_heads, hidden, implementation)
