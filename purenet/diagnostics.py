"""Gradient-flow diagnostics per layer, from one forward and handwritten backward pass.

For a Sequential network on a probe batch, `gradient_flow` returns, for the
L Dense layers in order (arrays of length L):

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

from purenet.layers import Dense, LeakyReLU, ReLU, Sequential, Sigmoid, Tanh
from purenet.network import value_and_grad

_ACTIVATIONS = (ReLU, LeakyReLU, Sigmoid, Tanh)


def _layers(net):
    if not isinstance(net, Sequential):
        raise ValueError(f"gradient diagnostics need a Sequential network, got {type(net).__name__}")
    dense = [i for i, layer in enumerate(net.layers) if isinstance(layer, Dense)]
    acts = [i for i, layer in enumerate(net.layers) if isinstance(layer, _ACTIVATIONS)]
    return dense, acts


def gradient_flow(net, params, state, x, y, loss="cross_entropy", l2=0.0):
    """Per-layer gradient and activation statistics on (x, y); see the module docstring."""
    dense, acts = _layers(net)
    _, grads, _ = value_and_grad(net, params, state, x, y, loss=loss, l2=l2)
    _, _, caches = net.forward(params, state, x, train=False)
    nan = jnp.asarray(jnp.nan, x.dtype)
    dead, saturated = [], []
    for i in acts:
        layer, cache = net.layers[i], caches[i]
        if isinstance(layer, (ReLU, LeakyReLU)):  # cache: where the pre-activation is > 0 (>= 0 for leaky)
            dead.append(jnp.mean(~jnp.any(cache, axis=0)))
            saturated.append(nan)
        else:  # cache: the activation's output
            limit = jnp.abs(cache - 0.5) > 0.49 if isinstance(layer, Sigmoid) else jnp.abs(cache) > 0.99
            dead.append(nan)
            saturated.append(jnp.mean(limit))
    return {
        "grad_norm": jnp.stack([jnp.linalg.norm(grads[i]["W"]) for i in dense]),
        "weight_norm": jnp.stack([jnp.linalg.norm(params[i]["W"]) for i in dense]),
        "input_rms": jnp.stack([jnp.sqrt(jnp.mean(caches[i] ** 2)) for i in dense]),
        "dead_fraction": jnp.stack(dead).astype(x.dtype) if dead else jnp.zeros((0,), x.dtype),
        "saturated_fraction": jnp.stack(saturated).astype(x.dtype) if saturated else jnp.zeros((0,), x.dtype),
    }


def update_ratio(net, old_params, new_params):
    """||W_new - W_old|| / ||W_old|| for each Dense layer."""
    dense, _ = _layers(net)
    return jnp.stack([jnp.linalg.norm(new_params[i]["W"] - old_params[i]["W"])
                      / jnp.linalg.norm(old_params[i]["W"]) for i in dense])


def plot_gradient_flow(history, ax=None, label=None, epoch=0, key="grad_norm"):
    """Plot history[key][epoch] against layer number (log scale); returns the axes."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    values = jnp.asarray(history[key])[epoch]
    ax.plot(range(1, len(values) + 1), values, marker="o", ms=3, label=label)
    ax.set_yscale("log"), ax.set_xlabel("layer"), ax.set_ylabel(key.replace("_", " "))
    return ax
