"""Regularisation on a small training subset: none, L2, dropout, batch norm,
early stopping and augmentation, side by side (the lecture's regularisation slide).

Trains the same 64-256-256-10 MLP on 300 digits images and reports train and
test accuracy for each method, with test-accuracy curves in a PNG.

    python examples/regularization_study.py [--epochs 80] [--train-size 300]
"""
import argparse

import jax
import numpy as np

import purenet as pn
from _common import epochs, save

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=epochs(80))
    parser.add_argument("--train-size", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="regularization_study.png")
    args = parser.parse_args()

    data = pn.datasets.digits()
    n = args.train_size
    x, y = data.x_train[:n], data.y_train[:n]
    val = (data.x_train[n:n + 200], data.y_train[n:n + 200])   # for early stopping only
    test = (data.x_test, data.y_test)
    sizes = [64, 256, 256, 10]
    methods = {
        "none": dict(net=pn.mlp(sizes)),
        "L2 (1e-2)": dict(net=pn.mlp(sizes), l2=1e-2),
        "dropout 0.5": dict(net=pn.mlp(sizes, dropout=0.5)),
        "batch norm": dict(net=pn.mlp(sizes, batchnorm=True)),
        "early stopping": dict(net=pn.mlp(sizes), validation=val,
                               early_stopping=pn.EarlyStopping(patience=10, monitor="val_loss")),
        "augmentation": dict(net=pn.mlp(sizes), augment=pn.augment.compose(
            pn.augment.random_translation((8, 8), 1), pn.augment.gaussian_noise(0.3))),
    }
    rows, curves = [], {}
    for name, cfg in methods.items():
        net = cfg.pop("net")
        result = pn.fit(net, pn.optim.adam(1e-3), (x, y), key=jax.random.key(args.seed), epochs=args.epochs,
                        batch_size=32, **{"validation": test, **cfg})
        train_acc = float(pn.metrics.accuracy(net, result.params, result.state, x, y))
        test_acc = float(pn.metrics.accuracy(net, result.params, result.state, *test))
        rows.append((name, train_acc, test_acc, len(result.history["loss"])))
        curves[name] = result.history.get("val_accuracy")
        if name == "early stopping":  # its validation was the held-out part, not the test set
            curves[name] = None

    print(f"{n} training images, {len(test[0])} test images, {args.epochs} epochs max")
    print(f"{'method':<16} {'train acc':>9} {'test acc':>9} {'gap':>7} {'epochs':>7}")
    for name, tr, te, ep in rows:
        print(f"{name:<16} {tr:>9.4f} {te:>9.4f} {tr - te:>7.4f} {ep:>7d}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in curves.items():
        if curve is not None:
            ax1.plot(curve, label=name)
    ax1.set_xlabel("epoch"), ax1.set_ylabel("test accuracy"), ax1.set_ylim(0.7, 1.0), ax1.legend(fontsize=8)
    names = [r[0] for r in rows]
    pos = np.arange(len(rows))
    ax2.bar(pos - 0.2, [r[1] for r in rows], 0.4, label="train")
    ax2.bar(pos + 0.2, [r[2] for r in rows], 0.4, label="test")
    ax2.set_xticks(pos, names, rotation=30, ha="right", fontsize=8)
    ax2.set_ylim(0.8, 1.005), ax2.set_ylabel("accuracy"), ax2.legend()
    fig.suptitle(f"Regularisation with {n} training digits")
    save(fig, args.out)


if __name__ == "__main__":
    main()
