"""Parameter roles: what each parameter is, declared by its layer, read by l2, weight decay and K-FAC.

    roles(net, params)        a tree like params of "weight" | "bias" | "gain" | "embedding" | "other"
    decay_mask(net, params)   True where the default weight decay (and l2) applies: the weights

A layer declares `roles = {"W": "weight", "b": "bias"}` (or `param_roles(params)`); a parameter
without a declared role is a "weight" when its rank is >= 2 and "other" below. Also here: what a
network reads (`id_layer`: token ids or floats) and what it outputs (`output_kind`).
"""
from typing import Any

import jax
import jax.numpy as jnp

from purenet.layers.base import PyTree
from purenet.layers.traversal import is_container, map_leaves

__all__ = [
    "DECAYED", "ROLES", "decay_mask", "id_layer", "layer_roles", "output_kind", "roles",
]

ROLES = ("weight", "bias", "gain", "embedding", "other")
# The roles the l2 penalty and the default weight-decay mask cover.
DECAYED = ("weight",)


def _default_role(value: Any) -> str:
    return "weight" if jnp.ndim(value) >= 2 else "other"


def layer_roles(layer: Any, params: PyTree) -> PyTree:
    """The role of each of one leaf layer's parameters, a tree of strings like params.

    Args:
        layer: a leaf layer (not a container).
        params: that layer's parameters.

    Returns:
        A tree like `params` of role names: the layer's `param_roles(params)`
            when it has one, else its `roles` entry for each key, else "weight"
            for a leaf of rank >= 2 and "other" below.
    """
    if hasattr(layer, "param_roles"):
        return layer.param_roles(params)
    declared = getattr(layer, "roles", {}) or {}
    if isinstance(params, dict):
        return {k: declared[k] if k in declared else jax.tree_util.tree_map(_default_role, v)
                for k, v in params.items()}
    return jax.tree_util.tree_map(_default_role, params)


def roles(net: Any, params: PyTree) -> PyTree:
    """Every parameter's role ("weight", "bias", "gain", "embedding", "other"), a tree like params.

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters, as `pn.init` returns them.

    Returns:
        A tree with the structure of `params` holding one role name (a str)
            per parameter leaf.
    """
    return map_leaves(net, lambda layer, p, frozen: layer_roles(layer, p), params)


def decay_mask(net: Any, params: PyTree, decayed: tuple[str, ...] = DECAYED) -> PyTree:
    """True where a parameter is trainable and its role is in `decayed` (default: weight matrices).

    The mask `l2` uses, and the default for weight decay
    (`pn.optim.add_decayed_weights(..., mask=pn.decay_mask(net, params))`).
    Frozen parameters are never decayed.

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters, as `pn.init` returns them.
        decayed: the roles to decay (default ("weight",)); e.g.
            ("weight", "embedding") decays embedding tables too.

    Returns:
        A tree with the structure of `params` holding one bool per parameter
            leaf: True where the leaf is decayed.
    """
    def leaf(layer: Any, p: PyTree, frozen: bool) -> PyTree:
        return jax.tree_util.tree_map(lambda r: (not frozen) and r in decayed, layer_roles(layer, p))
    return map_leaves(net, leaf, params)


def id_layer(layer: Any) -> Any:
    """The layer that reads a network's input as integer ids (an Embedding first), or None.

    A layer says so with the class attribute `accepts_ids = True`; a container
    takes ids when a child that reads its input does (any wrapper, any depth).

    Args:
        layer: a layer or a container.

    Returns:
        The first layer that reads the input as ids (it has `num_embeddings`),
            or None for a network that reads floats.
    """
    if getattr(layer, "accepts_ids", False):
        return layer
    if is_container(layer):
        for child in layer.input_children():
            found = id_layer(child)
            if found is not None:
                return found
    return None


def output_kind(net: Any) -> str:
    """What a network outputs: "probabilities" (it ends in Softmax), "logits" (GPT), or "values".

    A layer says so with the class attribute `outputs`; a container outputs
    what its output child does (through any wrapper, any depth).

    Args:
        net: a layer or a container.

    Returns:
        "probabilities", "logits" or "values".
    """
    while getattr(net, "outputs", None) is None and is_container(net) and net.output_child() is not None:
        net = net.output_child()
    return getattr(net, "outputs", None) or "values"


