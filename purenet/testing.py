"""Gradient checking against autodiff, and hypothesis strategies for property tests.

This is the one library module that uses `jax.grad`: autodiff is the
reference that every handwritten backward is checked against.

    report = pn.check_grads(layer, x)                 # a layer: backward vs jax.grad, random cotangent
    report = pn.check_grads(net, x, y, loss="mse")    # a network: value_and_grad vs jax.grad(pn.loss)

Checks run in float64 and compare per leaf with the relative error
max|handwritten - autodiff| / max(max|autodiff leaf|, rms(autodiff tree)),
the whole gradient's root-mean-square entry standing in for a leaf whose true
gradient is zero or tiny (see `check_grads`); a failure names the leaf path.
"""
import dataclasses
from typing import TYPE_CHECKING, Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from purenet import _trees

if TYPE_CHECKING:  # imported late at run time (hypothesis is optional)
    from hypothesis.strategies import SearchStrategy

    from purenet.layers.base import LayerLike
    from purenet.layers.sequential import Sequential
    from purenet.losses import Loss

__all__ = [
    "ACTIVATIONS", "GradCheckReport", "NetCase", "OUTPUT_LOSSES", "TransformerCase", "check_grads", "check_per_example",
    "compare_trees", "net_cases", "relative_error", "rms", "transformer_block", "transformer_cases",
]


@dataclasses.dataclass
class GradCheckReport:
    """Relative error per gradient leaf (key path -> error) and the tolerance used."""

    errors: dict
    rtol: float
    value_error: float = 0.0

    @property
    def max_error(self) -> float:
        return max([self.value_error, *self.errors.values()], default=0.0)

    @property
    def ok(self) -> bool:
        return self.max_error <= self.rtol

    def failures(self) -> dict[str, float]:
        return {path: e for path, e in self.errors.items() if not e <= self.rtol}

    def __str__(self) -> str:
        width = max([len(p) for p in self.errors] + [4])
        lines = [f"{'leaf':<{width}}  relative error (rtol {self.rtol:g})"]
        for path, err in self.errors.items():
            mark = "ok" if err <= self.rtol else "FAIL"
            lines.append(f"{path:<{width}}  {err:.3e}  {mark}")
        return "\n".join(lines)


def relative_error(actual: Any, expected: Any, floor: float = 0.0) -> float:
    """max|actual - expected| / max(max|expected|, floor) (0 when they are equal, inf when that scale is 0)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        return float("inf")
    diff = np.max(np.abs(actual - expected), initial=0.0)
    scale = max(float(np.max(np.abs(expected), initial=0.0)), floor)
    if diff == 0:
        return 0.0
    return float(diff / scale) if scale > 0 else float("inf")


def rms(tree: Any) -> float:
    """The root-mean-square entry of every leaf of `tree` together (0 for no entries)."""
    leaves = [np.asarray(v, np.float64).ravel() for v in jax.tree_util.tree_leaves(tree)]
    size = sum(v.size for v in leaves)
    return float(np.sqrt(sum(float(np.sum(v * v)) for v in leaves) / size)) if size else 0.0


def compare_trees(actual: Any, expected: Any, tree_scale: bool = False) -> dict[str, float]:
    """Per-leaf relative errors (`relative_error`), keyed by path; raises naming structure mismatches.

    tree_scale: divide each leaf's largest error by max(the leaf's largest
    expected entry, `rms(expected)`) instead of the leaf's own scale alone,
    so a leaf whose expected values are zero is judged against the gradient's
    typical entry rather than against zero (`check_grads` does this).
    """
    a, e = _trees.by_path(actual), _trees.by_path(expected)
    m = _trees.first_mismatch(a, e, shape=False)
    if m is not None:
        raise AssertionError(f"gradient structure differs from params: missing {m.missing}, extra {m.extra}")
    floor = rms(expected) if tree_scale else 0.0
    return {path: relative_error(v, e[path], floor) for path, v in a.items()}


def _to_f64(tree):
    return jax.tree_util.tree_map(
        lambda v: jnp.asarray(v, jnp.float64) if jnp.issubdtype(jnp.result_type(v), jnp.floating) else v,
        tree,
    )


def check_grads(model: "LayerLike", x: Any, y: Any = None, *, loss: "str | Loss | None" = None, params: Any = None,
                state: Any = None, key: jax.Array | None = None, l2: float = 0.0, train: bool = False,
                rtol: float = 1e-10, raise_on_failure: bool = True) -> GradCheckReport:
    """Check a handwritten backward against `jax.grad` in float64.

    Without `loss`: `model` is a layer; its backward with a random cotangent c
    is compared with jax.grad of sum(forward(params, x) * c) for the params and x.
    With `loss` (and targets `y`): `model` is a network; pn.value_and_grad is
    compared with jax.value_and_grad(pn.loss).

    params/state default to a fresh init from `key` (default key 0). The same
    `key` drives dropout masks. Returns a GradCheckReport; raises
    AssertionError naming the failing leaves when raise_on_failure.

    The criterion, per leaf (a path of the params, or the input "x"):

        max|handwritten - autodiff| / max(max|autodiff leaf|, rms(autodiff, all leaves)) <= rtol

    The leaf's own largest entry sets the scale, so a leaf off by a relative
    1e-6 fails; but it is never smaller than the root-mean-square entry of the
    whole true gradient, because rounding errs in units of the terms that are
    summed, not of their result. A leaf whose true gradient is exactly zero
    (attention's key bias bk: softmax ignores a shift of a row's scores)
    computes as ~1e-17 and passes; nonzero garbage there fails.
    """
    from purenet import network  # late: network imports nothing from here

    key = jax.random.key(0) if key is None else key
    init_key, fwd_key, cot_key = jax.random.split(key, 3)
    with jax.enable_x64(True):
        x = _to_f64(jnp.asarray(x))
        if params is None:
            params, init_state, _ = model.init(init_key, x.shape[1:], dtype=jnp.float64)
            state = init_state if state is None else state
        params, state = _to_f64(params), _to_f64(state if state is not None else {})
        if loss is None:
            report = _check_layer(model, params, state, x, train, fwd_key, cot_key, rtol)
        else:
            report = _check_network(network, model, params, state, x, y, loss, l2, train, fwd_key, rtol)
    if raise_on_failure and not report.ok:
        raise AssertionError(f"handwritten gradient differs from jax.grad:\n{report}")
    return report


def _check_layer(layer, params, state, x, train, fwd_key, cot_key, rtol):
    # one layer runs op by op (few operations: faster than compiling); networks are compiled below
    y, _, cache = layer.forward(params, state, x, train=train, key=fwd_key)
    cot = jax.random.normal(cot_key, jnp.shape(y), jnp.float64)
    dparams, dx = layer.backward(params, cache, cot)

    def probe(p, xx):
        return jnp.sum(layer.forward(p, state, xx, train=train, key=fwd_key)[0] * cot)

    if not jnp.issubdtype(x.dtype, jnp.floating):  # integer ids (an Embedding): no input gradient
        if dx is not None:
            raise AssertionError(f"{layer} takes integer inputs, so its dx must be None, got {type(dx)}")
        errors = compare_trees({"params": dparams}, {"params": jax.grad(probe)(params, x)}, tree_scale=True)
        return GradCheckReport(errors, rtol)
    ref_params, ref_x = jax.grad(probe, argnums=(0, 1))(params, x)
    errors = compare_trees({"params": dparams, "x": dx}, {"params": ref_params, "x": ref_x}, tree_scale=True)
    return GradCheckReport(errors, rtol)


def _check_network(network, net, params, state, x, y, loss, l2, train, fwd_key, rtol):
    # Both sides compiled, the data closed over (so input checks such as label ranges still see
    # concrete values): a CNN's check is faster than op by op (measured in benchmarks/README.md,
    # "Measurements behind choices in the source").
    value, grads, _ = jax.jit(lambda p: network.value_and_grad(net, p, state, x, y, loss=loss, l2=l2,
                                                               train=train, key=fwd_key))(params)

    def reference(p):
        return network.loss(net, p, state, x, y, loss=loss, l2=l2, train=train, key=fwd_key)[0]

    ref_value, ref_grads = jax.jit(jax.value_and_grad(reference))(params)
    errors = compare_trees({"params": grads}, {"params": ref_grads}, tree_scale=True)
    return GradCheckReport(errors, rtol, relative_error(value, ref_value))


def check_per_example(net: "LayerLike", x: jax.Array, y: Any, *, loss: "str | Loss", params: Any, state: Any,
                      l2: float = 0.0, rtol: float = 1e-10) -> dict[str, float]:
    """Per-example gradients and their norms against `jax.vmap(jax.grad)` of each example's loss.

    Raises AssertionError naming the leaf when `pn.per_example_grads` differs
    by more than rtol (relative, per leaf), or when `pn.per_example_grad_norms`
    differs from the norms of the reference gradients by more than 1e-8.
    """
    from purenet import network
    from purenet.analysis import per_example

    def one(xi, yi):
        return jax.grad(lambda p: network.loss(net, p, state, xi[None], yi[None], loss=loss, l2=l2)[0])(params)

    reference = jax.vmap(one)(x, y)
    _, grads = per_example.per_example_grads(net, params, state, x, y, loss=loss, l2=l2)
    errors = compare_trees(grads, reference)
    bad = {path: e for path, e in errors.items() if not e <= rtol}
    if bad:
        raise AssertionError(f"per-example gradients differ from vmap of jax.grad: {bad}")
    norms = per_example.per_example_grad_norms(net, params, state, x, y, loss=loss, l2=l2)
    explicit = jnp.sqrt(sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, 1) for g in jax.tree_util.tree_leaves(reference)))
    np.testing.assert_allclose(norms, explicit, rtol=1e-8, atol=1e-12, err_msg="per-example gradient norms")
    return errors


# ---------------------------------------------------------------- hypothesis strategies

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
            impl = draw(st.sampled_from(["im2col", "xla"]))
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
