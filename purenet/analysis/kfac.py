"""K-FAC's Kronecker factors of one layer, from the products it declares (`purenet.layers.structure`).

For a dense product y = a W + b at every position t of each example (rows:
one position), with a = [h, 1] when W has a bias (KFC, Grosse & Martens 2016;
over time steps and sequence positions the "expand" setting of Eschenhagen et
al. 2023, positions taken as independent examples of the weight-sharing):

    A = 1/(N T) sum_{i,t} a_it a_it^T          G = 1/N sum_{i,t} g_it g_it^T

so that the Fisher block of vec([W; b]) is approximated by A (x) G. A product
of several weights side by side (attention's Wq | Wk | Wv) gives each weight
its own G over its columns and the shared A. Convolutions are dense products
on their im2col patches. The other kinds (a norm's scale and shift, a lookup
table) hold no "weight"-role parameter and keep the plain gradient.

    factors, dx = layer_kfac_factors(layer, params, cache, dy)   # KFACFactors, or KFACBlocks of several
    dims        = layer_kfac_dims(layer, params)                  # (dim A, dim G), or KFACBlocks of them

A layer may instead define its own `kfac_factors` and `kfac_dims` methods.
`pn.stats.kfac_factors` walks a network with these; `pn.optim.kfac`
preconditions with them.
"""
from typing import Any, Callable

import jax

from purenet.layers import conv, dense, structure
from purenet.layers.base import Array, KFACBlocks, PyTree, kfac_key
from purenet.layers.roles import layer_roles
from purenet.layers.structure import Convolution, DenseProduct

__all__ = ["KFAC_RULES", "kfac_eligible", "kfac_weights", "layer_kfac_dims", "layer_kfac_factors", "uncovered_weights"]


def _dense_factors(p: DenseProduct, params: PyTree, weights: list) -> dict:
    """{(weight, bias): KFACFactors} for the product's K-FAC weights: A of its input rows (with the 1
    of a bias), G of each weight's columns of g."""
    out = {}
    for w, b, s, n in structure.columns(p, params):
        if w in weights:
            g = p.g if n == p.g.shape[-1] else p.g[..., s:s + n]
            out[(w, b)] = dense.kfac_factors(p.a, g, b is not None)
    return out


def _dense_dims(p: DenseProduct, params: PyTree, weights: list) -> dict:
    cols = {w: (b, n) for w, b, _, n in structure.columns(p, params)}
    return {(w, cols[w][0]): (params[w].size // cols[w][1] + (cols[w][0] is not None), cols[w][1]) for w in weights}


def _conv_factors(p: Convolution, params: PyTree, weights: list) -> dict:
    """KFC (Grosse & Martens, 2016): the dense product's factors on the im2col patches [p, 1], G summed
    over the output pixels."""
    patches = conv.conv_patches(p.conv, structure.conv_weight(p, params), p.cache)
    return {(p.weight, p.bias): dense.kfac_factors(patches, p.g, p.bias is not None)}


def _conv_dims(p: Convolution, params: PyTree, weights: list) -> dict:
    w = params[p.weight]
    return {(p.weight, p.bias): (w.size // w.shape[-1] + (p.bias is not None), w.shape[-1])}


# Per product kind: its factors, and their dimensions, for the given weights of it.
KFAC_RULES: dict[type, tuple[Callable[..., dict], Callable[..., dict]]] = {DenseProduct: (_dense_factors, _dense_dims), Convolution: (_conv_factors, _conv_dims)}


def _weight_keys(p: Any) -> tuple:
    if isinstance(p, DenseProduct):
        return p.weights
    if isinstance(p, Convolution):
        return (p.weight,)
    return ()


def kfac_weights(layer: Any, params: PyTree, products: Any = None) -> list[tuple[Any, list[str]]]:
    """[(product, its "weight"-role keys K-FAC preconditions)] of a layer that declares a structure: of
    its structure's products, or of `products` (the same, with their arrays)."""
    roles = structure.flat(layer_roles(layer, params))
    found = []
    for p in layer.structure(params) if products is None else products:
        weights = [w for w in _weight_keys(p) if roles.get(w) == "weight"]
        if weights and type(p) in KFAC_RULES:
            found.append((p, weights))
    return found


def kfac_eligible(layer: Any, params: PyTree) -> bool:
    """Whether K-FAC preconditions any of the layer's weights."""
    if hasattr(layer, "kfac_factors") and hasattr(layer, "kfac_dims"):
        return True
    return hasattr(layer, "structure") and bool(kfac_weights(layer, params))


def _single(layer: Any, params: PyTree, pairs: dict) -> bool:
    """One weight with every bias of the layer: a plain KFACFactors (Dense, a convolution), else blocks."""
    if len(pairs) != 1:
        return False
    roles = structure.flat(layer_roles(layer, params))
    (w, b), = pairs
    biases = [k for k, r in roles.items() if r == "bias"]
    return [k for k, r in roles.items() if r == "weight"] == [w] and biases == ([b] if b is not None else [])


def _assemble(layer: Any, params: PyTree, pairs: dict) -> Any:
    if _single(layer, params, pairs):
        return next(iter(pairs.values()))
    return KFACBlocks({kfac_key(w, b): v for (w, b), v in pairs.items()})


def layer_kfac_factors(layer: Any, params: PyTree, cache: PyTree, dy: Array) -> tuple[Any, Any]:
    """(KFACFactors or KFACBlocks, dx): the layer's own `kfac_factors`, else its products' rules."""
    if hasattr(layer, "kfac_factors"):
        return layer.kfac_factors(params, cache, dy)
    products, dx = structure.bound(layer, params, cache, dy)
    pairs: dict = {}
    for p, weights in kfac_weights(layer, params, products):
        pairs.update(KFAC_RULES[type(p)][0](p, structure.flat(params), weights))
    return _assemble(layer, params, pairs), dx


def layer_kfac_dims(layer: Any, params: PyTree) -> Any:
    """(dim A, dim G), or KFACBlocks of them: the layer's own `kfac_dims`, else its products' rules."""
    if hasattr(layer, "kfac_dims"):
        return layer.kfac_dims(params)
    pairs: dict = {}
    for tag, weights in kfac_weights(layer, params):
        pairs.update(KFAC_RULES[type(tag)][1](tag, structure.flat(params), weights))
    return _assemble(layer, params, pairs)


def uncovered_weights(layer: Any, params: PyTree) -> list[str]:
    """The layer's "weight"-role parameters K-FAC leaves on the plain gradient (all of them for a layer
    with neither K-FAC methods nor a structure)."""
    weights = [jax.tree_util.keystr(path) for path, r in jax.tree_util.tree_leaves_with_path(layer_roles(layer, params))
               if r == "weight"]
    if hasattr(layer, "kfac_factors") and hasattr(layer, "kfac_dims"):
        return []
    if not hasattr(layer, "structure"):
        return weights
    covered = {jax.tree_util.keystr(tuple(jax.tree_util.DictKey(k) for k in w.split("/")))
               for _, ws in kfac_weights(layer, params) for w in ws}
    return [w for w in weights if w not in covered]
