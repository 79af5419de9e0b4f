"""Hypothesis strategies for property tests: random networks (`net_cases`) and transformers
(`transformer_cases`) with their data, for checking every feature against autodiff. hypothesis is
imported when a strategy is built (it is a test dependency, not a library one).
"""
import dataclasses
from typing import TYPE_CHECKING, Any, Sequence

import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # imported late at run time (hypothesis is optional)
    from hypothesis.strategies import SearchStrategy

    from purenet.layers.sequential import Sequential

__all__ = ["ACTIVATIONS", "NetCase", "OUTPUT_LOSSES", "TransformerCase", "net_cases", "transformer_block",
           "transformer_cases"]


# Every hidden activation by name (purenet.layers.ACTIVATIONS, less the alias "linear").
ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu", "identity", "gelu", "silu", "elu", "softplus")
# (output activation, loss) pairs the library supports.
OUTPUT_LOSSES = (
    ("softmax", "cross_entropy"), ("softmax", "mse"),
    ("sigmoid", "binary_cross_entropy"), ("sigmoid", "mse"),
    ("identity", "mse"),
)


@dataclasses.dataclass(frozen=True)
class NetCase:
    """A random network problem drawn by `net_cases`."""

    net: Any
    in_shape: tuple
    batch: int
    output: str
    loss: str
    l2: float
    seed: int
    soft_targets: bool = False

    @property
    def in_dim(self) -> int:
        return self.in_shape[-1]

    def data(self, dtype: Any = jnp.float64) -> tuple[Any, Any, jax.Array, jax.Array]:
        """(params, state, x, y) for this case, from its seed.

        Targets have the output's shape, or without its last axis for labels.
        """
        kp, kx, ky = jax.random.split(jax.random.key(self.seed), 3)
        params, state, out_shape = self.net.init(kp, self.in_shape, dtype=dtype)
        x = jax.random.normal(kx, (self.batch, *self.in_shape), dtype)
        out_shape = (self.batch, *out_shape)
        if self.loss == "cross_entropy" and not self.soft_targets:
            y = jax.random.randint(ky, out_shape[:-1], 0, out_shape[-1])
        elif self.loss == "cross_entropy":
            y = jax.nn.softmax(jax.random.normal(ky, out_shape, dtype))
        elif self.loss == "binary_cross_entropy":
            y = jax.random.uniform(ky, out_shape, dtype)
        else:
            y = jax.random.normal(ky, out_shape, dtype)
        return params, state, x, y


def net_cases(max_depth: int = 3, widths: Sequence[int] = (1, 2, 5), batches: Sequence[int] = (1, 2, 5),
              dropout: bool = False, batchnorm: bool = False, compose: bool = False, sequences: bool = False,
              images: bool = False) -> "SearchStrategy[NetCase]":
    """A hypothesis strategy of NetCase: random depth, widths, batch size
    (batch norm skips sizes below 2), hidden activation, initializer,
    output/loss pair, target kind and l2 on/off.

    compose=True draws, instead of an mlp, a chain of random blocks: Dense +
    activation, Residual blocks (optionally pre-normalised), Parallel
    branches merged by concat or sum, LayerNorm, RMSNorm; any activation,
    GELU in both forms. sequences=True (with compose) also gives inputs of
    shape (3, width): every layer then acts on each of the 3 positions, the
    loss averages over them, and some nets Flatten them first.

    images=True draws small CNNs on (5, 6, channels) images instead: Conv2D
    with random kernels, strides, paddings, dilations and either
    implementation, max and average pools, BatchNorm (with batchnorm=True),
    residual conv blocks, then Flatten or a global average pool, and Dense.

    Widths and batch sizes come from small sets (1 included) because each new
    shape costs JAX a compile; values are drawn freely from the seed.

    With batch norm, batches have >= 3 rows and layers feeding it >= 2 inputs:
    a batch of 2 normalises to exactly -1 and +1 whatever the input, and a
    single-input Dense before batch norm is scale-invariant, so the true
    gradient upstream is zero (up to eps) and any two implementations
    differ only in rounding noise, where a relative error means nothing.
    Layer and RMS norms likewise only normalise widths of 3 or more.
    """
    from hypothesis import strategies as st

    from purenet.layers import mlp

    @st.composite
    def draw(draw):
        depth = draw(st.integers(0, max_depth))
        bn = draw(st.booleans()) if batchnorm else False
        inner = [w for w in widths if w >= 2] if bn else widths
        output, loss = draw(st.sampled_from(OUTPUT_LOSSES))
        init = draw(st.sampled_from(["xavier_normal", "he_normal", "lecun_normal", "he_uniform"]))
        out_width = draw(st.sampled_from(widths))
        if output == "softmax" and out_width == 1 and loss == "cross_entropy":
            out_width = 2
        if images:
            net, in_shape = draw(_conv_nets(depth, out_width, output, init, bn))
        elif compose:
            net, in_shape = draw(_composed_nets(depth, widths, out_width, output, init, sequences))
        else:
            sizes = draw(st.lists(st.sampled_from(inner), min_size=depth + 1, max_size=depth + 1))
            sizes.append(out_width)
            hidden = draw(st.sampled_from(ACTIVATIONS))
            rate = draw(st.sampled_from([0.0, 0.25, 0.5])) if dropout else 0.0
            net, in_shape = mlp(sizes, hidden=hidden, output=output, init=init, dropout=rate, batchnorm=bn), \
                (sizes[0],)
        batch = draw(st.sampled_from([b for b in batches if b >= 3] if bn else batches))
        return NetCase(
            net=net, in_shape=in_shape, batch=batch, output=output, loss=loss,
            l2=draw(st.sampled_from([0.0, 0.1])), seed=draw(st.integers(0, 2**31 - 1)),
            soft_targets=draw(st.booleans()),
        )

    return draw()


def _composed_nets(depth, widths, out_width, output, init, sequences):
    """(net, in_shape): `depth` random blocks, then Dense(out_width) and the output activation."""
    from hypothesis import strategies as st

    from purenet import layers as L

    def activation(draw):
        name = draw(st.sampled_from(ACTIVATIONS))
        if name == "gelu":
            return L.GELU(approximate=draw(st.booleans()))
        return L.ACTIVATIONS[name]()

    def dense(draw, width):
        return L.Dense(width, init=init, use_bias=draw(st.booleans()))

    def norm(draw, width):
        if width < 3:
            return None
        return draw(st.sampled_from([L.LayerNorm(), L.LayerNorm(use_bias=False), L.RMSNorm()]))

    @st.composite
    def draw(draw):
        width = draw(st.sampled_from(widths))
        in_shape = (3, width) if sequences and draw(st.booleans()) else (width,)
        layers = []
        for _ in range(depth):
            kind = draw(st.sampled_from(["dense", "residual", "parallel", "norm"]))
            if kind == "dense":
                width = draw(st.sampled_from(widths))
                layers += [dense(draw, width), activation(draw)]
            elif kind == "residual":
                inside = [n for n in [norm(draw, width)] if n is not None and draw(st.booleans())]
                hidden = draw(st.sampled_from(widths))
                inside += [dense(draw, hidden), activation(draw), dense(draw, width)]
                layers.append(L.Residual(L.Sequential(inside)))
            elif kind == "parallel":
                merge = draw(st.sampled_from(["concat", "sum"]))
                w1 = draw(st.sampled_from(widths))
                w2 = w1 if merge == "sum" else draw(st.sampled_from(widths))
                branches = [L.Sequential([dense(draw, w1), activation(draw)]), dense(draw, w2)]
                layers.append(L.Parallel(branches, merge=merge))
                width = w1 if merge == "sum" else w1 + w2
            else:
                layers += [n for n in [norm(draw, width)] if n is not None]
        if len(in_shape) > 1 and draw(st.booleans()):
            layers.append(L.Flatten())
        output_layer = {"softmax": L.Softmax, "sigmoid": L.Sigmoid, "identity": L.Identity}[output]()
        layers += [L.Dense(out_width, init=init), output_layer]
        return L.Sequential(layers, in_shape=in_shape), in_shape

    return draw()


def _conv_nets(depth, out_width, output, init, batchnorm):
    """(net, in_shape): up to `depth` conv / pool blocks on (5, 6, c) images, then a Dense head."""
    from hypothesis import strategies as st

    from purenet import layers as L
    from purenet.layers.base import as_shape

    @st.composite
    def draw(draw):
        in_shape = (5, 6, draw(st.sampled_from([1, 3])))
        layers, shape = [], in_shape
        for _ in range(max(depth, 1)):
            kind = draw(st.sampled_from(["conv", "conv", "pool", "residual"]))
            impl = draw(st.sampled_from(["im2col", "xla", "taps"]))
            if kind == "conv":
                layer = L.Conv2D(draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([1, 2, 3, (2, 3)])),
                                 strides=draw(st.sampled_from([1, 2])),
                                 padding=draw(st.sampled_from(["SAME", "VALID", ((1, 0), (0, 1))])),
                                 dilation=draw(st.sampled_from([1, 1, 2])), init=init,
                                 use_bias=draw(st.booleans()), implementation=impl)
                block = [layer, *([L.BatchNorm()] if batchnorm and draw(st.booleans()) else []),
                         L.ACTIVATIONS[draw(st.sampled_from(ACTIVATIONS))]()]
            elif kind == "pool":
                pool = draw(st.sampled_from([L.MaxPool2D, L.AvgPool2D]))
                block = [pool(draw(st.sampled_from([2, (1, 2)])), strides=draw(st.sampled_from([None, 1])),
                              padding=draw(st.sampled_from(["VALID", "SAME"])))]
            else:
                block = [L.Residual(L.Sequential([L.Conv2D(shape[-1], 3, init=init, implementation=impl), L.Tanh()]))]
            try:  # a window that no longer fits the shrunken image: skip the block
                shape = as_shape(L.Sequential(block).init(jax.random.key(0), shape)[2])
            except ValueError:
                continue
            layers += block
        head = draw(st.sampled_from(["flatten", "global"]))
        layers.append(L.Flatten() if head == "flatten" else L.GlobalAvgPool2D())
        output_layer = {"softmax": L.Softmax, "sigmoid": L.Sigmoid, "identity": L.Identity}[output]()
        layers += [L.Dense(out_width, init=init), output_layer]
        return L.Sequential(layers, in_shape=in_shape), in_shape

    return draw()


# ---------------------------------------------------------------- transformers


@dataclasses.dataclass(frozen=True)
class TransformerCase:
    """A random sequence problem drawn by `transformer_cases`: a GPT on ids, or blocks on floats."""

    net: Any
    kind: str           # "gpt" (integer ids in, next-token labels) or "blocks" (floats in, mse)
    batch: int
    length: int
    vocab: int
    features: int
    seed: int
    train: bool = False  # dropout active (with the key from the seed)

    @property
    def loss(self) -> str:
        return "cross_entropy" if self.kind == "gpt" else "mse"

    def data(self, dtype: Any = jnp.float64) -> tuple[Any, Any, jax.Array, jax.Array]:
        """(params, state, x, y): ids and labels for a GPT, floats and targets for blocks."""
        kp, kx, ky = jax.random.split(jax.random.key(self.seed), 3)
        in_shape = (self.length,) if self.kind == "gpt" else (self.length, self.features)
        params, state, out_shape = self.net.init(kp, in_shape, dtype=dtype)
        if self.kind == "gpt":
            x = jax.random.randint(kx, (self.batch, self.length), 0, self.vocab)
            y = jax.random.randint(ky, (self.batch, self.length), 0, self.vocab)
        else:
            x = jax.random.normal(kx, (self.batch, *in_shape), dtype)
            y = jax.random.normal(ky, (self.batch, *out_shape), dtype)
        return params, state, x, y


def transformer_block(features: int, heads: int, causal: bool = True, use_bias: bool = True,
                      dropout: float = 0.0) -> "Sequential":
    """A pre-LayerNorm transformer block (attention, then a 4x GELU MLP, both residual)."""
    from purenet import layers as L

    extra = [L.Dropout(dropout)] if dropout else []
    return L.Sequential([
        L.Residual(L.Sequential([L.LayerNorm(), L.MultiHeadAttention(heads, causal=causal, use_bias=use_bias),
                                 *extra])),
        L.Residual(L.Sequential([L.LayerNorm(), L.Dense(4 * features), L.GELU(), L.Dense(features), *extra])),
    ])


def transformer_cases(lengths: Sequence[int] = (1, 3), features: Sequence[int] = (4, 8), heads: Sequence[int] = (1, 2),
                      batches: Sequence[int] = (1, 2), vocab: int = 5, max_layers: int = 2,
                      dropout: bool = False) -> "SearchStrategy[TransformerCase]":
    """A hypothesis strategy of TransformerCase: a whole `pn.gpt` (tied or not) or a
    stack of random transformer blocks (causal or not, with or without biases),
    tiny sizes, optionally with dropout in training mode."""
    from hypothesis import strategies as st
    from purenet import layers as L

    @st.composite
    def case(draw):
        kind = draw(st.sampled_from(["gpt", "blocks"]))
        t, f, h, b = (draw(st.sampled_from(v)) for v in (lengths, features, heads, batches))
        n = draw(st.integers(1, max_layers))
        rate = draw(st.sampled_from([0.0, 0.3])) if dropout else 0.0
        seed = draw(st.integers(0, 2**31 - 1))
        if kind == "gpt":
            context = draw(st.sampled_from([t, t + 2]))
            net = L.gpt(vocab, context, n, h, f, dropout=rate, tie_embeddings=draw(st.booleans()))
        else:
            net = L.Sequential([transformer_block(f, h, draw(st.booleans()), draw(st.booleans()), rate)
                                for _ in range(n)])
        return TransformerCase(net, kind, b, t, vocab, f, seed, train=rate > 0)

    return case()
