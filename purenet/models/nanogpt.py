"""nanoGPT's GPT with its `bias` switch: `NanoGPT(..., bias=False)`.

nanoGPT's `GPTConfig.bias` drops the bias of every Linear (attention's
c_attn and c_proj, the MLP's c_fc and c_proj) and of every LayerNorm.
`pn.GPT` always has them; `NanoGPT` is `GPT` with that one switch, built
from purenet's own layers with use_bias=bias (`LayerNorm(use_bias=False)`
has only gamma, `MultiHeadAttention(use_bias=False)` only Wq/Wk/Wv/Wo,
`Dense(use_bias=False)` only W). Everything else (the tied ends, GPT-2's
initialisation, the traversal, the handwritten backward) is GPT's: a
subclass that overrides the body alone, so `gpt.py` stays as it is.
With bias=True it computes exactly what `GPT` computes, with the same
parameter tree; `pn.weights.nanogpt` returns `pn.gpt` itself then.
"""
import dataclasses

from purenet.layers import dense
from purenet.layers.activations import GELU
from purenet.layers.attention import MultiHeadAttention
from purenet.layers.compose import Residual
from purenet.layers.dropout import Dropout
from purenet.layers.embedding import PositionalEmbedding
from purenet.models.gpt import _STD, GPT
from purenet.layers.norm import LayerNorm
from purenet.layers.sequential import Sequential

__all__ = ["NanoGPT"]


@dataclasses.dataclass(frozen=True)
class NanoGPT(GPT):
    """`GPT` with nanoGPT's `bias` switch (bias=False: no Linear or LayerNorm biases).

    params as GPT's, without "beta" in the LayerNorms, "bq", "bk", "bv", "bo"
    in the attention and "b" in the MLP's Dense layers when bias=False.
    """

    bias: bool = True

    @property
    def body(self) -> Sequential:
        d, drop, bias = self.features, self.dropout, bool(self.bias)
        extra = [Dropout(drop)] if not (isinstance(drop, (int, float)) and drop == 0) else []
        blocks = [
            Sequential([
                Residual(Sequential([LayerNorm(use_bias=bias), MultiHeadAttention(self.heads, causal=True,
                                                                                   use_bias=bias), *extra])),
                Residual(Sequential([LayerNorm(use_bias=bias), dense.Dense(4 * d, use_bias=bias), GELU(),
                                     dense.Dense(d, use_bias=bias), *extra])),
            ])
            for _ in range(self.layers)
        ]
        return Sequential([PositionalEmbedding(self.context, stddev=_STD), *extra, *blocks,
                           LayerNorm(use_bias=bias)])
