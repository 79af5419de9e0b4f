"""Gradient-flow diagnostics per layer, from one forward and handwritten backward pass.

For a network on a probe batch, `gradient_flow` returns, for its L layers
that have parameters (found at any depth by the one traversal, in forward
order; arrays of length L):

    grad_norm       ||dL/dW|| over the layer's weight matrices (role "weight"; all its
                    parameters when it has none, e.g. a LayerNorm's gains)
    weight_norm     ||W|| over the same parameters
    input_rms       root mean square of the layer's input, where the layer can say what
                    it was (`cached_input(cache)`, Dense); NaN elsewhere

and, for the activation layers in order (those with `activation_stats(cache)`:
ReLU, LeakyReLU, GELU, SiLU, Sigmoid, Tanh; arrays of length A):

    dead_fraction       share of units on the flat side (pre-activation <= 0; < 0 for leaky relu)
                        for every probe example
    saturated_fraction  share of sigmoid (< 0.01 or > 0.99) or tanh (|h| > 0.99) outputs

(NaN where a measure does not apply to that activation). `layer_names`
names the L layers. `update_ratio` gives ||W_new - W_old|| / ||W_old|| per
layer with parameters. `fit(..., diagnostics=(x_probe, y_probe))` records
all of them in the history every epoch, and `plot_gradient_flow` draws them.
"""
from typing import Any

import jax
import jax.numpy as jnp

from purenet.layers.base import Visit
from purenet.layers.defaults import has_params
from purenet.layers.roles import layer_roles
from purenet.layers.traversal import leaves, walk, walk_leaves
from purenet.network import value_and_grad

__all__ = ["gradient_flow", "layer_names", "plot_gradient_flow", "update_ratio"]


def _selected(layer: Any, params: Any) -> list:
    """The layer's weight-role leaves, or all its leaves when it has none."""
    roles = jax.tree_util.tree_leaves(layer_roles(layer, params))
    values = jax.tree_util.tree_leaves(params)
    weights = [v for v, r in zip(values, roles) if r == "weight"]
    return weights or values


def _norm(arrays: list) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(a.astype(jnp.promote_types(a.dtype, jnp.float32)))) for a in arrays))


def _with_params(net: Any, params: Any) -> list:
    return [leaf for leaf in leaves(net, params) if has_params(leaf.params)]


def layer_names(net: Any, params: Any) -> list[str]:
    """The names of the layers `gradient_flow` reports, in its order ("3: Dense", ...).

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters (only which layers hold parameters is read).

    Returns:
        One "index: layer class" string per layer with parameters, in forward order (length L).
    """
    return [f"{i}: {type(leaf.layer).__name__}" for i, leaf in enumerate(_with_params(net, params))]


def _record(layer: Any, params: Any, caches: tuple, dys: tuple) -> tuple:
    """Read one leaf's cache: its input rms and activation statistics (what the layer declares)."""
    (cache,), (dy,) = caches, dys
    dx = layer.backward(params, cache, dy)[1]
    rms = None
    if has_params(params) and hasattr(layer, "cached_input"):
        x = layer.cached_input(cache)
        rms = jnp.sqrt(jnp.mean(jnp.square(x)))
    stats = layer.activation_stats(cache) if hasattr(layer, "activation_stats") else None
    return (has_params(params), rms, stats), (dx,)


def gradient_flow(net: Any, params: Any, state: Any, x: jax.Array, y: Any, loss: Any = "cross_entropy",
                  l2: Any = 0.0) -> dict[str, jax.Array]:
    """Per-layer gradient and activation statistics on (x, y); see the module docstring.

    One `pn.value_and_grad` for the gradients and one forward in evaluation mode
    (train=False) for the inputs and activations.

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters.
        state: its state (as `pn.init` returns it).
        x: a probe batch of inputs, shape `(batch, *in_shape)` (integer token ids when the
            network starts with an Embedding).
        y: the probe batch's targets for `loss`.
        loss: a registered loss name ("cross_entropy", "mse", ...) or a `pn.Loss`.
        l2: weight decay coefficient on the parameters whose role is "weight" (it enters
            the gradients whose norms are reported).

    Returns:
        A dict of 1-D arrays: "grad_norm", "weight_norm", "input_rms" (L,), one entry per
            layer with parameters (forward order, as `layer_names`), and "dead_fraction",
            "saturated_fraction" (A,), one per activation layer; NaN where a measure does
            not apply.

    Raises:
        ValueError: if `loss` is not a registered name or a `pn.Loss`, or `x` has no batch
            axis or is empty.
        TypeError: if `x` is not floating point (integer ids for a network that starts with
            an Embedding).
    """
    _, grads, _ = value_and_grad(net, params, state, x, y, loss=loss, l2=l2)
    out, _, cache = net.forward(params, state, x, train=False)
    records, _ = walk(net, Visit(_record, None, shaped=False), params, (cache,), (jnp.zeros_like(out),))
    records = walk_leaves(net, records)
    dtype = jnp.promote_types(jnp.result_type(x) if jnp.issubdtype(jnp.result_type(x), jnp.floating)
                              else jnp.float32, jnp.float32)
    nan = jnp.asarray(jnp.nan, dtype)
    layers = _with_params(net, params)
    grad_layers = _with_params(net, grads)
    dead, saturated = [], []
    for _, _, stats in records:
        if stats is None:
            continue
        d, s = stats
        dead.append(nan if d is None else jnp.mean(jnp.all(d, axis=0)).astype(dtype))
        saturated.append(nan if s is None else jnp.mean(s).astype(dtype))
    rms = [nan if r is None else r.astype(dtype) for has, r, _ in records if has]

    def stack(values: list) -> jax.Array:
        return jnp.stack(values).astype(dtype) if values else jnp.zeros((0,), dtype)

    return {
        "grad_norm": stack([_norm(_selected(a.layer, g.params)) for a, g in zip(layers, grad_layers)]),
        "weight_norm": stack([_norm(_selected(a.layer, a.params)) for a in layers]),
        "input_rms": stack(rms),
        "dead_fraction": stack(dead),
        "saturated_fraction": stack(saturated),
    }


def update_ratio(net: Any, old_params: Any, new_params: Any) -> jax.Array:
    """`||W_new - W_old|| / ||W_old||` for each layer with parameters (its weight matrices, see above).

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        old_params: the parameters before the update.
        new_params: the parameters after it (the same structure).

    Returns:
        (L,) the relative change of each layer with parameters, in `layer_names`' order
            ((0,) for a network without parameters).
    """
    pairs = [(_selected(a.layer, a.params), _selected(a.layer, b.params))
             for a, b in zip(_with_params(net, old_params), _with_params(net, new_params))]
    if not pairs:
        return jnp.zeros((0,))
    return jnp.stack([_norm([n - o for o, n in zip(old, new)]) / _norm(old) for old, new in pairs])


def plot_gradient_flow(history: dict, ax: Any = None, label: str | None = None, epoch: int = 0,
                       key: str = "grad_norm") -> Any:
    """Plot `history[key][epoch]` against layer number (log scale); returns the axes.

    Needs matplotlib.

    Args:
        history: a training history holding per-epoch diagnostics (from
            `fit(..., diagnostics=(x_probe, y_probe))`): `history[key]` holds one row per epoch.
        ax: the matplotlib axes to draw on (None: the current axes, `plt.gca()`).
        label: the line's legend label, or None.
        epoch: which epoch's row of `history[key]` to draw.
        key: which diagnostic: "grad_norm", "weight_norm", "input_rms", "dead_fraction"
            or "saturated_fraction".

    Returns:
        The matplotlib axes drawn on.
    """
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    values = jnp.asarray(history[key])[epoch]
    ax.plot(range(1, len(values) + 1), values, marker="o", ms=3, label=label)
    ax.set_yscale("log"), ax.set_xlabel("layer"), ax.set_ylabel(key.replace("_", " "))
    return ax
