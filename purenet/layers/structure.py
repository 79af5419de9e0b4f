"""What a layer's parameters enter: the products a layer declares once, for every feature to read.

A layer that says which products its parameters enter gets every per-example
feature and K-FAC from one rule per product kind, kept in that feature's
module (as kfac-jax's layer tags do), instead of one method per (feature x
layer). The layer declares them with two methods:

    structure(params) -> tuple of products          which products, over which parameters (no data)
    products(params, cache, dy) -> (inputs, dx)     each product's arrays, in the same order

`products` maps the layer's cache and output gradient dy to each product's
input and output gradient (the part of its backward before the parameters:
attention's dL/d[q k v], a recurrent layer's step gradients dz_t) and returns
dL/dx. The kinds, each with the gradient that defines it:

    DenseProduct(weights, biases)  inputs (a, g)     y = a W + b at every position; dW = sum_pos a^T g, db = sum_pos g
    ScaleShift(scale, shift)       inputs (xhat, g)  y = xhat * s + t on the last axis; ds = sum_pos xhat g, dt = sum_pos g
    Lookup(table)                  inputs (ids, g)   y = E[ids];  dE = sum_pos onehot(ids) g^T
    Convolution(weight, bias)      inputs (cache, g, conv)   a Conv2D's product, by tap (see the class)
    TiedTable(table)               inputs (ids, g, h, g_out)  a table looked up and read out:
                                   y = E[ids], logits = h E^T;  dE = sum_pos onehot(ids) g^T + g_out^T h

A layer whose parameters nest (GPT's ends: {"token": {"E"}, "head": {"W"}})
names them by path, "token/E" (`flat`). Arrays have the batch axis first: a (n, ..., d_in), g (n, ..., d_out); "pos"
is every axis between (positions, time steps, pixels). Every parameter of the
layer enters exactly one product (`check`, which `pn.init` runs), so the rules
cover the whole gradient. A layer that declares nothing gets the generic
default (its own backward, vmapped over the examples); the test suite proves
every rule equal to it for every layer that declares products.
"""
from typing import Any, NamedTuple, Sequence

import jax.numpy as jnp
from jax import lax

from purenet.layers.base import Array, PyTree, wide

__all__ = ["Convolution", "DenseProduct", "KINDS", "Lookup", "ScaleShift", "TiedTable", "batch_grads", "bind", "check", "columns",
           "bound", "conv_weight", "declared", "flat", "keys_of", "positions_of", "scaled", "split_columns", "tree_of"]


class DenseProduct(NamedTuple):
    """y = a W + b at every position: W the columns of `weights` side by side (each parameter read as
    (d_in, -1): a convolution kernel (kh, kw, C, F) as (kh kw C, F) against im2col patches a), b
    the matching `biases` (None where a weight has none).

        dW_i = sum_t a_it^T g_it   (example i's gradient),    db_i = sum_t g_it
    """

    weights: tuple                 # parameter keys, in column order
    biases: tuple                  # per weight its bias's key, or None
    a: Any = None                  # (n, ..., d_in)
    g: Any = None                  # (n, ..., d_out): dL/dy, d_out the weights' columns together


class ScaleShift(NamedTuple):
    """y = xhat * s + t, s and t vectors over the last axis, the same at every position (a norm's gain
    and bias).  ds_i = sum_t xhat_it * g_it,  dt_i = sum_t g_it."""

    scale: str                     # the key of s
    shift: str | None              # the key of t, or None
    xhat: Any = None               # (n, ..., d)
    g: Any = None                  # (n, ..., d)


class Lookup(NamedTuple):
    """y = E[ids] (rows of a table).  dE_i = sum_t onehot(ids_it) g_it^T."""

    table: str                     # the key of E
    ids: Any = None                # (n, ...) integers
    g: Any = None                  # (n, ..., d)


class Convolution(NamedTuple):
    """y = conv(x, W) + b on NHWC images (`purenet.layers.conv.Conv2D`): a dense product of each output
    pixel's patch p_t, dW_i = sum_t p_it^T g_it, db_i = sum_t g_it, that the rules compute tap by tap
    (no patches formed) with the layer's geometry. The weight is read as `conv`'s (kh, kw, C, F)."""

    weight: str
    bias: str | None
    cache: Any = None              # the convolution's cache (x, or its patches, and the input's size)
    g: Any = None                  # (N, Ho, Wo, F)
    conv: Any = None               # the Conv2D that ran (its geometry and formulation)


class TiedTable(NamedTuple):
    """One table E (rows, d) read two ways (GPT's tied ends): looked up, y = E[ids], and read out,
    logits = h E^T. Its gradient is the two products' sum:

        dE_i = sum_t onehot(ids_it) g_it^T + sum_s g_out_is^T h_is

    so its norm has a cross term 2 <lookup_i, readout_i> (the rules in `purenet.analysis.per_example`)."""

    table: str
    ids: Any = None                # (n, T) integers
    g: Any = None                  # (n, T, d): dL/d(looked-up rows)
    h: Any = None                  # (n, S, d): the read-out's input
    g_out: Any = None              # (n, S, rows): dL/dlogits


KINDS = (DenseProduct, ScaleShift, Lookup, Convolution, TiedTable)
# The arrays each kind's inputs fill, in order, and which of them are output gradients (linear in dL/dy).
_INPUTS = {DenseProduct: ("a", "g"), ScaleShift: ("xhat", "g"), Lookup: ("ids", "g"),
           Convolution: ("cache", "g", "conv"), TiedTable: ("ids", "g", "h", "g_out")}
_GRADIENTS = {TiedTable: ("g", "g_out")}


def keys_of(product: Any) -> list[str]:
    """The parameter keys a product's gradient fills."""
    if isinstance(product, DenseProduct):
        return [*product.weights, *(b for b in product.biases if b is not None)]
    if isinstance(product, ScaleShift):
        return [product.scale] + ([product.shift] if product.shift is not None else [])
    if isinstance(product, (Lookup, TiedTable)):
        return [product.table]
    if isinstance(product, Convolution):
        return [product.weight] + ([product.bias] if product.bias is not None else [])
    raise TypeError(f"{type(product).__name__} is not a product kind ({', '.join(k.__name__ for k in KINDS)})")


def check(layer: Any, params: PyTree) -> None:
    """Raise, naming the layer, unless every parameter of it enters exactly one product of its
    `structure` (a layer that declares none passes)."""
    if not hasattr(layer, "structure"):
        return
    name = type(layer).__name__
    if not hasattr(layer, "products"):
        raise TypeError(f"{name} declares a structure but no products(params, cache, dy) -> (inputs, dx)")
    if not isinstance(params, dict):
        raise TypeError(f"{name}.structure needs a dict of parameters, got {type(params).__name__}")
    seen: list[str] = [k for p in layer.structure(params) for k in keys_of(p)]
    twice = sorted({k for k in seen if seen.count(k) > 1})
    missing, unknown = sorted(set(flat(params)) - set(seen)), sorted(set(seen) - set(flat(params)))
    if twice or missing or unknown:
        raise ValueError(f"{name}.structure must place every parameter in exactly one product: "
                         + "; ".join(f"{what} {keys}" for what, keys in (("in two", twice), ("missing", missing),
                                                                       ("not a parameter", unknown)) if keys))


def bind(tags: Sequence[Any], inputs: Sequence[tuple], layer: Any = None) -> tuple:
    """The declared products with their arrays filled in from `inputs` (one tuple per product)."""
    if len(tags) != len(inputs):
        raise ValueError(f"{type(layer).__name__}.products gave {len(inputs)} inputs for the {len(tags)} products "
                         f"of its structure")
    return tuple(t._replace(**dict(zip(_INPUTS[type(t)], arrays))) for t, arrays in zip(tags, inputs))


def declared(layer: Any, params: PyTree, cache: PyTree, dy: PyTree) -> tuple[tuple, Any] | None:
    """(products with their arrays, dx) from the layer's declaration, or None for a layer that declares none."""
    if not hasattr(layer, "structure"):
        return None
    return bound(layer, params, cache, dy)


def bound(layer: Any, params: PyTree, cache: PyTree, dy: PyTree) -> tuple[tuple, Any]:
    """(products with their arrays, dx) of a layer that declares its structure."""
    inputs, dx = layer.products(params, cache, dy)
    return bind(layer.structure(params), inputs, layer), dx


def flat(tree: PyTree) -> dict:
    """A layer's parameters (or roles) keyed by path, "token/E" for tree["token"]["E"]; a flat dict
    is returned as it is. The rules read parameters by these keys."""
    if not any(isinstance(v, dict) for v in tree.values()):
        return tree
    out = {}
    for k, v in tree.items():
        out.update({f"{k}/{sub}": leaf for sub, leaf in flat(v).items()} if isinstance(v, dict) else {k: v})
    return out


def positions_of(t: Array) -> Array:
    """(n, ..., d) -> (n, positions, d): rows become one position each."""
    return jnp.reshape(t, (t.shape[0], -1, t.shape[-1]))


def columns(product: DenseProduct, params: PyTree) -> list[tuple[str, str | None, int, int]]:
    """(weight key, bias key, first column, width) of each weight of a DenseProduct."""
    out, start = [], 0
    for w, b in zip(product.weights, product.biases):
        width = params[w].shape[-1]
        out.append((w, b, start, width))
        start += width
    return out


def split_columns(product: DenseProduct, params: PyTree, dw: Array | None, db: Array | None,
                  lead: tuple[int, ...]) -> dict[str, Array]:
    """Each weight's (and bias's) share of a gradient over the product's columns: dw (*lead, d_in,
    d_out) reshaped to each weight's shape, db (*lead, d_out); `lead` the leading (batch) axes."""
    out = {}
    for w, b, start, width in columns(product, params):
        if dw is not None:
            out[w] = jnp.reshape(dw[..., start:start + width], (*lead, *params[w].shape)).astype(params[w].dtype)
        if b is not None and db is not None:
            out[b] = db[..., start:start + width].astype(params[b].dtype)
    return out


def batch_grads(product: Any, params: PyTree) -> dict[str, Array]:
    """The product's parameter gradients summed over the batch (the definition above, n examples
    summed): its part of the layer's backward."""
    if isinstance(product, DenseProduct):
        a2, g2 = jnp.reshape(product.a, (-1, product.a.shape[-1])), jnp.reshape(product.g, (-1, product.g.shape[-1]))
        # a^T g as XLA's own transpose of a @ W (autodiff's rounding), accumulated in >= float32
        dw = lax.dot_general(g2, a2, (((0,), (0,)), ((), ())), preferred_element_type=wide(g2).dtype).T
        return split_columns(product, params, dw, jnp.sum(g2, axis=0), ())
    if isinstance(product, ScaleShift):
        lead = tuple(range(product.g.ndim - 1))
        out = {product.scale: jnp.sum(product.g * product.xhat, axis=lead).astype(params[product.scale].dtype)}
        if product.shift is not None:
            out[product.shift] = jnp.sum(product.g, axis=lead).astype(params[product.shift].dtype)
        return out
    if isinstance(product, Lookup):
        from purenet.layers.embedding import scatter_rows  # late: embedding declares its Lookup from here
        table = params[product.table]
        return {product.table: scatter_rows(table.shape[0], product.ids, product.g).astype(table.dtype)}
    if isinstance(product, TiedTable):
        from purenet.layers.embedding import scatter_rows
        table = params[product.table]
        h2, g2 = jnp.reshape(product.h, (-1, product.h.shape[-1])), jnp.reshape(product.g_out, (-1, table.shape[0]))
        readout = lax.dot_general(g2, h2, (((0,), (0,)), ((), ())))  # g_out^T h: (rows, d)
        return {product.table: (scatter_rows(table.shape[0], product.ids, product.g) + readout).astype(table.dtype)}
    if isinstance(product, Convolution):
        w = params[product.weight]
        own = {"W": conv_weight(product, params)} | ({"b": params[product.bias]} if product.bias else {})
        grads = product.conv.backward(own, product.cache, product.g)[0]
        return {product.weight: grads["W"].reshape(w.shape),
                **({product.bias: grads["b"]} if product.bias else {})}
    keys_of(product)  # raises on an unknown kind
    raise AssertionError  # pragma: no cover


def conv_weight(product: "Convolution", params: PyTree) -> Array:
    """A Convolution's weight as its Conv2D's (kh, kw, C, F) kernel."""
    w = params[product.weight]
    return jnp.reshape(w, (*product.conv.kernel_size, -1, w.shape[-1]))


def scaled(product: Any, w: Array) -> Any:
    """The product with example i's output gradient rows multiplied by w_i (sum_i w_i g_i is then its
    batch gradient: every gradient above is linear in g)."""
    def times_w(g: Array) -> Array:
        return g * jnp.reshape(w, (-1,) + (1,) * (g.ndim - 1)).astype(g.dtype)
    return product._replace(**{f: times_w(getattr(product, f)) for f in _GRADIENTS.get(type(product), ("g",))})


def tree_of(layer_params: PyTree, parts: Sequence[dict]) -> PyTree:
    """The layer's gradient dict from its products' parts (keyed as `flat` keys them), nested and
    ordered as the layer's params."""
    merged: dict = {}
    for part in parts:
        merged.update(part)

    def nest(tree: dict, prefix: str) -> dict:
        return {k: nest(v, f"{prefix}{k}/") if isinstance(v, dict) else merged[prefix + k] for k, v in tree.items()}
    return nest(layer_params, "")
