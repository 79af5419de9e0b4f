"""Initialisation and activation at the start of training: Xavier vs He vs naive
N(0, 1) weights, with tanh, relu and leaky relu, in a 10-hidden-layer network.

For each combination it measures, on a batch of digits at initialisation,
the standard deviation of every hidden layer's activations and the norm of
every layer's weight gradient (from purenet's handwritten backward), and
plots both per layer. The lecture's advice shows: Xavier suits tanh, He suits
relu-type units; naive N(0, 1) weights saturate tanh (and blow up its
early layers' gradients) and make relu activations explode layer by layer.

    python examples/init_activation_study.py [--depth 10] [--width 128]
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np

import purenet as pn
from _common import save

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation

INITS = {"naive N(0,1)": "normal", "Xavier": "xavier_normal", "He": "he_normal"}
ACTIVATIONS = ("tanh", "relu", "leaky_relu")


def measure(depth, width, init, hidden, x, y):
    net = pn.mlp([64] + [width] * depth + [10], hidden=hidden, init=init)
    params, state = pn.init(net, jax.random.key(0))
    _, grads, _ = pn.value_and_grad(net, params, state, x, y)
    _, _, caches = net.forward(params, state, x)
    dense = [i for i, layer in enumerate(net.layers) if isinstance(layer, pn.Dense)]
    # the cache of each Dense is its input: the previous hidden layer's activations
    act_std = [float(jnp.std(caches[i])) for i in dense[1:]]
    grad_norm = [float(jnp.linalg.norm(grads[i]["W"])) for i in dense]
    return act_std, grad_norm


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--out", default="init_activation.png")
    args = parser.parse_args()

    data = pn.datasets.digits()
    x, y = data.x_train[:256], data.y_train[:256]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(ACTIVATIONS), figsize=(13, 7), sharex=True)
    print(f"{'activation':<11} {'init':<13} {'act std, last hidden':>21} {'grad norm, first/last':>22}")
    for col, hidden in enumerate(ACTIVATIONS):
        for label, init in INITS.items():
            act_std, grad_norm = measure(args.depth, args.width, init, hidden, x, y)
            ratio = grad_norm[0] / grad_norm[-1] if grad_norm[-1] > 0 else float("inf")
            print(f"{hidden:<11} {label:<13} {act_std[-1]:>21.3g} {ratio:>22.3g}")
            axes[0, col].plot(np.arange(1, len(act_std) + 1), act_std, marker="o", ms=3, label=label)
            axes[1, col].plot(np.arange(1, len(grad_norm) + 1), grad_norm, marker="o", ms=3, label=label)
        axes[0, col].set_title(hidden)
        axes[0, col].set_yscale("log"), axes[1, col].set_yscale("log")
        axes[1, col].set_xlabel("layer")
    axes[0, 0].set_ylabel("std of activations"), axes[1, 0].set_ylabel("||dL/dW||")
    axes[0, 0].legend()
    fig.suptitle(f"At initialisation: {args.depth} hidden layers of {args.width}, a batch of 256 digits")
    save(fig, args.out)


if __name__ == "__main__":
    main()
