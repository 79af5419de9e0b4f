"""Gradient-flow diagnostics per layer, from one forward and handwritten backward pass.

For a network on a probe batch, `gradient_flow` returns, for its L Dense
layers in forward order, found at any depth inside Sequential, Residual and
Parallel (arrays of length L):

    grad_norm       ||dL/dW||
    weight_norm     ||W||
    input_rms       root mean square of the Dense layer's input (for layer 1, the data)

and, for the activation layers in order (arrays of length A):

    dead_fraction       share of relu / leaky relu units that are <= 0 for every probe example
    saturated_fraction  share of sigmoid (< 0.01 or > 0.99) or tanh (|h| > 0.99) outputs

(NaN where a measure does not apply to that activation). `update_ratio`
gives ||W_new - W_old|| / ||W_old|| per Dense layer. `fit(..., diagnostics=
(x_probe, y_probe))` records all of them in the history every epoch, and
`plot_gradient_flow` draws them.
"""
import jax.numpy as jnp

from purenet.layers import Dense, LeakyReLU, ReLU, Sigmoid, Tanh
from purenet.network import value_and_grad

_ACTIVATIONS = (ReLU, LeakyReLU, Sigmoid, Tanh)


def leaf_layers(net, params, grads=None, cache=None):
    """[(layer, params, grads, cache)] for every layer without children, in forward order.

    Containers (Sequential, Residual, Parallel) say through `children` how
    their params and cache split among their layers; grads split like params.
    """
    if not hasattr(net, "children"):
        return [(net, params, grads, cache)]
    kids = net.children(params, cache)
    kid_grads = [g for _, g, _ in net.children(grads)] if grads is not None else [None] * len(kids)
    return [leaf for (layer, p, c), g in zip(kids, kid_grads) for leaf in leaf_layers(layer, p, g, c)]


def gradient_flow(net, params, state, x, y, loss="cross_entropy", l2=0.0):
    """Per-layer gradient and activation statistics on (x, y); see the module docstring."""
    _, grads, _ = value_and_grad(net, params, state, x, y, loss=loss, l2=l2)
    _, _, caches = net.forward(params, state, x, train=False)
    leaves = leaf_layers(net, params, grads, caches)
    dense = [leaf for leaf in leaves if isinstance(leaf[0], Dense)]
    acts = [leaf for leaf in leaves if isinstance(leaf[0], _ACTIVATIONS)]
    nan = jnp.asarray(jnp.nan, x.dtype)
    dead, saturated = [], []
    for layer, _, _, cache in acts:
        if isinstance(layer, (ReLU, LeakyReLU)):  # cache: where the pre-activation is > 0 (>= 0 for leaky)
            dead.append(jnp.mean(~jnp.any(cache, axis=0)))
            saturated.append(nan)
        else:  # cache: the activation's output
            limit = jnp.abs(cache - 0.5) > 0.49 if isinstance(layer, Sigmoid) else jnp.abs(cache) > 0.99
            dead.append(nan)
            saturated.append(jnp.mean(limit))
    return {
        "grad_norm": jnp.stack([jnp.linalg.norm(g["W"]) for _, _, g, _ in dense]),
        "weight_norm": jnp.stack([jnp.linalg.norm(p["W"]) for _, p, _, _ in dense]),
        "input_rms": jnp.stack([jnp.sqrt(jnp.mean(c ** 2)) for _, _, _, c in dense]),
        "dead_fraction": jnp.stack(dead).astype(x.dtype) if dead else jnp.zeros((0,), x.dtype),
        "saturated_fraction": jnp.stack(saturated).astype(x.dtype) if saturated else jnp.zeros((0,), x.dtype),
    }


def update_ratio(net, old_params, new_params):
    """||W_new - W_old|| / ||W_old|| for each Dense layer."""
    pairs = [(old["W"], new["W"]) for layer, old, new, _ in leaf_layers(net, old_params, new_params)
             if isinstance(layer, Dense)]
    return jnp.stack([jnp.linalg.norm(new - old) / jnp.linalg.norm(old) for old, new in pairs])


def plot_gradient_flow(history, ax=None, label=None, epoch=0, key="grad_norm"):
    """Plot history[key][epoch] against layer number (log scale); returns the axes."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    values = jnp.asarray(history[key])[epoch]
    ax.plot(range(1, len(values) + 1), values, marker="o", ms=3, label=label)
    ax.set_yscale("log"), ax.set_xlabel("layer"), ax.set_ylabel(key.replace("_", " "))
    return ax
