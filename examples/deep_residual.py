"""Depth with and without skip connections: a 20-layer plain MLP against the same
depth built from pre-LayerNorm residual blocks, with tanh and with ReLU, on digits.

    plain      x -> [Dense -> g] x 20 -> Dense -> softmax
    residual   x -> Dense -> g -> [x + Dense(g(Dense(LayerNorm(x))))] x 10 -> LayerNorm -> Dense -> softmax

The residual net has the same 20 hidden Dense layers in its blocks, plus the
stem that maps the 64 pixels to the width. The residual path adds dy
straight through every block (dL/dx = dy + block's dL/dx), so the gradient
reaches the first layers undiminished. Prints test accuracy and the ratio of
the first to the last layer's gradient norm; plots gradient norms per layer
(from `pn.fit(..., diagnostics=...)`) and test accuracy per epoch.

    python examples/deep_residual.py [--depth 20] [--epochs 15]
"""
import argparse

import jax
import numpy as np

import purenet as pn
from _common import epochs, save

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation


def plain(depth, width, hidden):
    return pn.mlp([64] + [width] * depth + [10], hidden=hidden)


def residual(depth, width, hidden):
    """A stem Dense, then depth / 2 blocks x + Dense(g(Dense(LayerNorm(x))))."""
    act = pn.layers.ACTIVATIONS[hidden]
    init = "he_normal" if hidden == "relu" else "xavier_normal"
    blocks = [pn.Residual(pn.Sequential([pn.LayerNorm(), pn.Dense(width, init=init), act(),
                                         pn.Dense(width, init=init)]))
              for _ in range(depth // 2)]
    return pn.Sequential([pn.Dense(width, init=init), act(), *blocks, pn.LayerNorm(), pn.Dense(10, init=init),
                          pn.Softmax()], in_shape=64)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=20, help="hidden Dense layers (the residual net rounds odd depths down)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=epochs(15))
    parser.add_argument("--learning-rate", type=float, default=0.02)
    parser.add_argument("--out", default="deep_residual.png")
    args = parser.parse_args()

    data = pn.datasets.digits()
    probe = (data.x_train[:256], data.y_train[:256])
    histories = {}
    for hidden in ("tanh", "relu"):
        for kind, build in (("plain", plain), ("residual", residual)):
            name = f"{kind} {hidden}"
            result = pn.fit(build(args.depth, args.width, hidden), pn.optim.momentum(args.learning_rate),
                            (data.x_train, data.y_train), key=jax.random.key(0), epochs=args.epochs,
                            batch_size=32, validation=(data.x_test, data.y_test), diagnostics=probe)
            h = histories[name] = result.history
            g = h["grad_norm"][0]
            print(f"{name:<14} {len(g) - 1} hidden Dense layers; first/last layer gradient norm after epoch 1: "
                  f"{g[0] / g[-1]:.2e}; test accuracy: {h['val_accuracy'][-1]:.3f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, h in histories.items():
        style = "-" if name.startswith("residual") else "--"
        ax1.plot(np.arange(1, h["grad_norm"].shape[1] + 1), h["grad_norm"][0], style, marker="o", ms=3, label=name)
        ax2.plot(np.arange(1, len(h["val_accuracy"]) + 1), h["val_accuracy"], style, label=name)
    ax1.set_yscale("log"), ax1.set_xlabel("Dense layer"), ax1.set_ylabel("||dL/dW||")
    ax1.set_title("gradient norm per layer after epoch 1"), ax1.legend()
    ax2.set_xlabel("epoch"), ax2.set_ylabel("test accuracy"), ax2.set_title("test accuracy"), ax2.legend()
    fig.suptitle(f"{args.depth} hidden layers of {args.width} on digits, SGD with momentum "
                 f"(lr {args.learning_rate})")
    save(fig, args.out)


if __name__ == "__main__":
    main()
