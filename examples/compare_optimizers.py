"""The lecture's optimizers on the same network and data: vanilla GD, momentum,
Nesterov, AdaGrad, RMSProp and Adam, training-loss curves on one plot.

Same 64-64-10 tanh MLP, same initial weights, same mini-batches (batch 64,
same key) on scikit-learn digits; only the optimizer changes.

    python examples/compare_optimizers.py [--epochs 30] [--out optimizers.png]
"""
import argparse

import jax
import numpy as np

import purenet as pn
from _common import epochs, save

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation

OPTIMIZERS = {  # learning rates picked per method from a coarse grid
    "vanilla GD": pn.optim.sgd(0.1),
    "momentum": pn.optim.momentum(0.03, 0.9),
    "Nesterov": pn.optim.nesterov(0.03, 0.9),
    "AdaGrad": pn.optim.adagrad(0.05),
    "RMSProp": pn.optim.rmsprop(1e-3),
    "Adam": pn.optim.adam(1e-3),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=epochs(30))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="optimizers.png")
    args = parser.parse_args()

    data = pn.datasets.digits()
    net = pn.mlp([64, 64, 10], hidden="tanh")
    params, state = pn.init(net, jax.random.key(args.seed))
    results = {}
    for name, opt in OPTIMIZERS.items():
        result = pn.fit(net, opt, (data.x_train, data.y_train), key=jax.random.key(args.seed), epochs=args.epochs,
                        batch_size=64, params=params, state=state, validation=(data.x_test, data.y_test))
        results[name] = result.history
    print(f"{'optimizer':<12} {'final loss':>10} {'test acc':>9}")
    for name, h in results.items():
        print(f"{name:<12} {h['loss'][-1]:>10.4f} {h['val_accuracy'][-1]:>9.4f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, h in results.items():
        ax.plot(np.arange(1, len(h["loss"]) + 1), h["loss"], label=name)
    ax.set_yscale("log"), ax.set_xlabel("epoch"), ax.set_ylabel("training cross-entropy")
    ax.set_title("Same network, data and batches; only the optimizer differs"), ax.legend()
    save(fig, args.out)


if __name__ == "__main__":
    main()
