"""Vanishing gradients, made visible: a deep sigmoid network (Xavier) against a
He-initialised ReLU network of the same shape, trained side by side on digits
with purenet's gradient-flow diagnostics recorded every epoch.

    python examples/vanishing_gradients.py [--depth 8] [--epochs 10]
"""
import argparse

import jax
import numpy as np

import purenet as pn
from _common import epochs, save

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=epochs(10))
    parser.add_argument("--out", default="vanishing_gradients.png")
    args = parser.parse_args()

    data = pn.datasets.digits()
    probe = (data.x_train[:256], data.y_train[:256])
    sizes = [64] + [args.width] * args.depth + [10]
    nets = {"sigmoid, Xavier": pn.mlp(sizes, hidden="sigmoid", init="xavier_normal"),
            "ReLU, He": pn.mlp(sizes, hidden="relu", init="he_normal")}
    histories = {}
    for name, net in nets.items():
        result = pn.fit(net, pn.optim.sgd(0.05), (data.x_train, data.y_train), key=jax.random.key(0),
                        epochs=args.epochs, batch_size=32, validation=(data.x_test, data.y_test),
                        diagnostics=probe)
        histories[name] = result.history
        g = result.history["grad_norm"][0]
        print(f"{name:<16} first/last layer gradient norm after epoch 1: {g[0] / g[-1]:.2e}; "
              f"test accuracy after {args.epochs} epochs: {result.history['val_accuracy'][-1]:.3f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4))
    for name, h in histories.items():
        pn.diagnostics.plot_gradient_flow(h, ax=ax1, label=name)
        pn.diagnostics.plot_gradient_flow(h, ax=ax2, label=name, key="update_ratio")
        ax3.plot(np.arange(1, len(h["val_accuracy"]) + 1), h["val_accuracy"], label=name)
    ax1.set_title("||dL/dW|| per layer after epoch 1"), ax1.legend()
    ax2.set_title("update / weight norm per layer, epoch 1")
    ax3.set_title("test accuracy"), ax3.set_xlabel("epoch"), ax3.legend()
    fig.suptitle(f"{args.depth} hidden layers of {args.width}, plain SGD (lr 0.05)")
    save(fig, args.out)


if __name__ == "__main__":
    main()
