"""The layer protocol's inventory: every name a layer or container may define, with its meaning.

This is the one list of the protocol in code. The features read these names
(`purenet.layers.base` and the analyses); `check_names(net)`, which `pn.init`
runs, reads this list to catch a misspelling: a public name on a layer that
is within a small edit distance of a protocol name, but is not one, would
otherwise be silently ignored (`mixes_example = True` on a layer that couples
the examples of a batch would let DP-SGD "clip" through it; a misspelt fast
path would silently fall back to the generic default).

    PROTOCOL["mixes_examples"]   # Name(kind="declaration", meaning="...")

Kinds: "required" (every layer), "container" (layers made of layers),
"declaration" (a class attribute or method that says what the layer is:
`structure` and `products` give every per-example feature and K-FAC from one
rule per product kind, `purenet.layers.structure`), "fast path" (a feature's
method a layer may define itself, which comes before the rules; the test
suite proves it equal to the generic default), "feature" (an optional method
one feature reads).
"""
import dataclasses
import difflib
from typing import Any, Iterator, NamedTuple

__all__ = ["KINDS", "Name", "PROTOCOL", "check_names", "suggestion"]

KINDS = ("required", "container", "declaration", "fast path", "feature")


class Name(NamedTuple):
    """One protocol name: its kind (one of KINDS) and what it means."""

    kind: str
    meaning: str


PROTOCOL: dict[str, Name] = {
    # every layer
    "init": Name("required", "init(key, in_shape, dtype=None) -> (params, state, out_shape)"),
    "forward": Name("required", "forward(params, state, x, train=False, key=None) -> (y, state, cache)"),
    "backward": Name("required", "backward(params, cache, dy) -> (dparams, dx): the handwritten VJP"),
    # containers (purenet.layers.base.Container)
    "children": Name("container", "children() -> the child layers, in forward order"),
    "split": Name("container", "split(tree) -> one params-shaped tree per child"),
    "join": Name("container", "join(parts) -> the container's tree from its children's"),
    "parts": Name("container", "parts(outs) -> an unshaped walk's outs per child"),
    "input_children": Name("container", "input_children() -> the children that read the container's input"),
    "output_child": Name("container", "output_child() -> the child whose output is the container's, or None"),
    "walk_back": Name("container", "walk_back(visit, params, caches, dys) -> (outs, dxs): the backward with a "
                                   "visitor at each leaf layer"),
    "without_output": Name("container", "without_output() -> the chain without its output child (a loss that "
                                        "fuses with that child reads the logits before it)"),
    "with_children": Name("container", "with_children(children) -> the same container around other children "
                                       "(taking the same params and state): pn.capture's and pn.hooked's taps"),
    "freezes": Name("container", "True: the children's parameters get no gradient (pn.Frozen)"),
    "chain": Name("container", "True: the children run one after another (pn.Sequential), so second-order "
                               "columns pass through"),
    # declarations
    "structure": Name("declaration", "structure(params) -> the products the parameters enter (DenseProduct, ScaleShift, "
                                     "Lookup of purenet.layers.structure): every per-example feature and K-FAC "
                                     "come from one rule per product kind"),
    "products": Name("declaration", "products(params, cache, dy) -> (each product's input arrays, dx), in the "
                                    "order of structure(params)"),
    "roles": Name("declaration", "{param key: role}: 'weight', 'bias', 'gain', 'embedding', 'other'"),
    "param_roles": Name("declaration", "param_roles(params) -> a tree of role names like params"),
    "accepts_ids": Name("declaration", "True: the layer reads integer token ids (an Embedding first)"),
    "positionwise": Name("declaration", "True: the layer acts on each position alone (decoding one token at a "
                                        "time needs no cache; the batch and positions may split)"),
    "outputs": Name("declaration", "what the layer outputs: 'probabilities', 'logits' or 'values'"),
    "fuses_with": Name("declaration", "the loss this output activation fuses with as a network's last layer "
                                      "(Softmax: 'cross_entropy'): the loss and its gradient come from the logits"),
    "piecewise_linear": Name("declaration", "True: the output is linear in each parameter and piecewise linear "
                                            "in the input (no second-order term: Hessian diagonal)"),
    "second_derivative": Name("declaration", "second_derivative(cache) -> g''(a) for an elementwise h = g(a)"),
    "mixes_examples": Name("declaration", "True: the output row of one example reads other examples (BatchNorm "
                                          "in training): no per-example gradient, refused by DP-SGD"),
    "learning_rule": Name("declaration", "the learning rule whose update the layer's backward gives in place of the "
                                         "loss's gradient (pn.learning_rules): curvature and DP refuse it"),
    "in_shape": Name("declaration", "one example's shape, when the layer knows it (pn.init may omit it)"),
    "context": Name("declaration", "the longest sequence the model reads (pn.generate crops to it)"),
    # fast paths: a feature's own method on a layer, before its products' rules; each equals the generic
    # default (vmap of the layer's own backward)
    "per_example_backward": Name("fast path", "per_example_backward(params, cache, dy) -> (grads with a "
                                              "leading batch axis, dx)"),
    "per_example_sq_norms": Name("fast path", "per_example_sq_norms(params, cache, dy, l2) -> "
                                              "(||g_i + l2 W||^2 per example, dx)"),
    "sq_norms_and_weighted_sum": Name("fast path", "sq_norms_and_weighted_sum(params, cache, dy) -> "
                                                   "(||g_i||^2, dx, w -> sum_i w_i g_i): one-pass clipping"),
    "per_example_sq": Name("fast path", "per_example_sq(params, cache, dy) -> (sum_i g_i**2 like params, dx)"),
    "per_example_sq_columns": Name("fast path", "per_example_sq_columns(params, cache, dy, axis_name) -> "
                                                "(sum over examples and cotangent columns of g**2, dx)"),
    "per_example_gram": Name("fast path", "per_example_gram(params, ca, dya, cb, dyb) -> ((na, nb) <g_i, g_j>, "
                                          "dxa, dxb)"),
    "kfac_factors": Name("fast path", "kfac_factors(params, cache, dy) -> (KFACFactors or KFACBlocks, dx)"),
    "kfac_dims": Name("fast path", "kfac_dims(params) -> the factors' dimensions (dim A, dim G)"),
    "cache_batch_axes": Name("fast path", "cache_batch_axes(cache, n) -> per cache leaf 0 (batch axis first) "
                                          "or None (shared): which leaves the generic default slices"),
    # features
    "tensor_split": Name("feature", "tensor_split(params, split_in) -> (axes, split_out): how the parameters "
                                    "split over the mesh's 'model' axis"),
    "decode_init": Name("feature", "decode_init(params, batch, length) -> the layer's key/value cache"),
    "decode": Name("feature", "decode(params, state, x, kv, pos) -> (y, kv): one position of generation"),
    "cached_input": Name("feature", "cached_input(cache) -> the layer's input, for diagnostics"),
    "cached_io": Name("feature", "cached_io(params, cache) -> (x, y): the input and output of a leaf its "
                                 "container runs itself (GPT's ends), for pn.capture's records"),
    "activation_stats": Name("feature", "activation_stats(cache) -> dead / saturated fractions, for diagnostics"),
}

# How close a name must be to a protocol name to be taken for a misspelling of it: difflib's ratio.
_CLOSE = 0.85


# The names a misspelling of which fails silently: a missing required or container method fails loudly.
_OPTIONAL = tuple(n for n, v in PROTOCOL.items() if v.kind in ("declaration", "fast path", "feature"))


def suggestion(name: str) -> str | None:
    """The optional protocol name `name` probably misspells (close but not equal), or None."""
    if name in PROTOCOL or name.startswith("_"):
        return None
    close = difflib.get_close_matches(name, _OPTIONAL, n=1, cutoff=_CLOSE)
    return close[0] if close else None


def _own_names(layer: Any) -> Iterator[str]:
    """The public names a layer defines: its class's attributes and methods (any base below purenet's
    own) and its dataclass fields."""
    for cls in type(layer).__mro__:
        if cls.__module__.startswith("purenet.layers.base") or cls is object:
            continue
        yield from (n for n in vars(cls) if not n.startswith("_"))
    if dataclasses.is_dataclass(layer):
        yield from (f.name for f in dataclasses.fields(layer))
    yield from (n for n in getattr(layer, "__dict__", {}) if not n.startswith("_"))


def check_names(net: Any) -> None:
    """Raise naming the layer and the name when any layer of `net` (containers included, any depth)
    defines a public name that looks like a misspelt protocol name ("did you mean `mixes_examples`?")."""
    layer_type = type(net).__name__
    for name in sorted(set(_own_names(net))):
        close = suggestion(name)
        if close is not None:
            raise AttributeError(f"{layer_type} defines {name!r}, which is not a name of the layer protocol: did "
                                 f"you mean {close!r}? ({PROTOCOL[close].kind}: {PROTOCOL[close].meaning}). "
                                 f"Misspelt, it would be silently ignored; rename it (a helper of your own: a "
                                 f"name that starts with '_')")
    if hasattr(net, "children") and hasattr(net, "walk_back"):
        for child in net.children():
            check_names(child)
