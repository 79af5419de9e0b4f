"""The main job: an MLP on scikit-learn's embedded 8x8 digits (no download).

Trains 64-128-64-10 (relu, dropout 0.3, softmax, cross-entropy, Adam with a
cosine schedule, L2, early stopping on a validation part of the training set),
then prints test accuracy and the confusion matrix and writes the
loss/accuracy curves to a PNG.

    python examples/train_digits.py [--epochs 60] [--out digits_curves.png] [--cache [DIR]]

With --cache the compiled programs are kept on disk (pn.enable_compilation_cache),
so a second run skips XLA's compilation.
"""
import argparse
import time

import jax
import numpy as np

import purenet as pn
from _common import FAST, add_cache_option, epochs, save, use_cache

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=epochs(60))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="digits_curves.png")
    add_cache_option(parser)
    args = parser.parse_args()
    use_cache(args)

    data = pn.datasets.digits()
    n_val = 200  # validation rows held out of the training part, for early stopping
    x_fit, y_fit = data.x_train[n_val:], data.y_train[n_val:]
    validation = (data.x_train[:n_val], data.y_train[:n_val])
    print(f"digits: {len(x_fit)} training, {n_val} validation, {len(data.x_test)} test images")

    net = pn.mlp([64, 128, 64, 10], hidden="relu", output="softmax", dropout=0.3)
    steps = args.epochs * (len(x_fit) // args.batch_size)
    opt = pn.optim.adam(pn.schedules.cosine_decay(args.lr, steps, alpha=0.05))
    start = time.perf_counter()
    result = pn.fit(net, opt, (x_fit, y_fit), key=jax.random.key(args.seed), epochs=args.epochs,
                    batch_size=args.batch_size, l2=1e-3, validation=validation,
                    early_stopping=pn.EarlyStopping(patience=15, monitor="val_loss"), progress=not FAST)
    seconds = time.perf_counter() - start
    ran = len(result.history["loss"])
    print(f"trained {ran} epochs in {seconds:.1f} s (compile included)")

    confusion = np.asarray(pn.metrics.confusion_matrix(net, result.params, result.state,
                                                       data.x_test, data.y_test, 10))
    acc = float(np.trace(confusion) / confusion.sum())  # the accuracy, from the same pass (one program fewer)
    print(f"test accuracy: {acc:.4f}")
    print("confusion matrix (rows: true digit, columns: predicted)")
    print("     " + " ".join(f"{j:>3}" for j in range(10)))
    for i, row in enumerate(confusion):
        print(f"  {i}: " + " ".join(f"{v:>3}" for v in row))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(result.history["loss"], label="training loss")
    ax1.plot(result.history["val_loss"], label="validation loss")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("cross-entropy"), ax1.set_yscale("log"), ax1.legend()
    ax2.plot(result.history["val_accuracy"], label="validation accuracy")
    ax2.axhline(acc, color="k", ls="--", lw=1, label=f"test accuracy {acc:.3f}")
    ax2.set_xlabel("epoch"), ax2.set_ylabel("accuracy"), ax2.set_ylim(0.8, 1.0), ax2.legend()
    fig.suptitle("purenet: 64-128-64-10 MLP (dropout 0.3) on scikit-learn digits")
    save(fig, args.out)
    if not FAST and acc < 0.97:
        raise SystemExit(f"test accuracy {acc:.4f} is below the 0.97 target")


if __name__ == "__main__":
    main()
