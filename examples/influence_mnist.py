"""Finding mislabelled MNIST images by self-influence: EK-FAC, K-FAC, identity (TracIn-like) and random.

The experiment of the influence-function papers (Koh & Liang, 2017, section
5.4; George et al., 2018; Bae et al.'s kronfluence): flip the labels of 5% of
a training set, train on it, and rank the training examples by their
self-influence g_j^T (F + damping I)^-1 g_j (`pn.influence.self_influence`).
A mislabelled example is one the rest of the data argues against, so its
gradient stays large and points where the curvature is flat: a good
curvature estimate ranks the flipped labels first. Each method's ranking is
scored by the area under the ROC curve for picking out the flipped labels
(0.5 is chance) and by the fraction of them found when inspecting the top
5% and 10% of the ranking, against a random ranking.

The data: the shared MNIST test set (10,000 images), split with a fixed seed
into training images and held-out images; 5% of the training labels are
replaced by a different random class (fixed seed). The network (a CNN:
training it takes under a minute on 2 cores):
examples/mnist_cnn.py's LeNet (conv 5x5 16, max pool, conv 5x5 32, max pool,
Dense 128, Dense 10), trained with `pn.fit` (Adam, cosine decay, batch 64),
so the blocks are two convolutions and two dense layers. The curvature is the
empirical Fisher (kronfluence's `use_empirical_fisher=True`) over the
training set with kronfluence's heuristic damping (0.1 x the mean eigenvalue,
per block). The figure: the fraction of flipped labels found against the
fraction of the training set inspected, per method; and for a few held-out
images (the misclassified ones first) their most helpful and most harmful
training images by EK-FAC's `pn.influence.scores`, labelled with their
(possibly flipped) training label.

    python examples/influence_mnist.py [--data ../shared/data/mnist] [--train 3000] [--epochs 25] [--out influence_mnist.png]

The full run (the defaults: 3,000 training images, 150 of them flipped, 4,000
held out; 25 epochs, long enough that the network fits 99% of the flipped
labels, so a flipped label's training loss no longer gives it away) on a 2-core
CPU, 131 s in all (training 43 s; fit + self-influence 43 s EK-FAC, 14 s K-FAC,
6 s identity; EK-FAC scores of 4 held-out x 3,000 training images 12 s);
held-out accuracy 96.2%:

    method     AUC    flipped found in the top 5%   top 10%
    EK-FAC     0.979  74%                           90%
    K-FAC      0.971  67%                           87%
    identity   0.972  67%                           87%
    random     0.531   3%                           12%

EK-FAC finds the most; K-FAC and the identity tie. Trained for
8 epochs on 6,000 images instead (15% of the flipped labels fitted), every
method is near perfect (AUC 0.998, 0.997, 0.998): an unfitted wrong label
has a large loss, which any ranking by gradient size finds. Among the
held-out images' most helpful and most harmful training images 69% carry a
flipped label (5% of the training set): those examples have the largest
gradients, so they dominate pairwise scores too.

`PURENET_FAST=1`: 300 training images (15 flipped), 100 held out, 1 epoch;
the same four methods, the same table and figure, in 30-45 s on 2 cores
(mostly compilation).
"""
import argparse
import os
import time

import jax
import numpy as np

import purenet as pn
from _common import FAST, epochs, mnist_split, save
from mnist_cnn import DEFAULT, lenet

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation

METHODS = ("ekfac", "kfac", "identity")  # pn.influence's, plus a random ranking


def flip_labels(y, fraction, seed):
    """(y with `fraction` of its labels moved to a different random class, the flipped indices' mask)."""
    rng = np.random.default_rng(seed)
    flipped = np.zeros(len(y), bool)
    flipped[rng.choice(len(y), int(round(fraction * len(y))), replace=False)] = True
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, 10, flipped.sum())) % 10  # never the true class
    return noisy, flipped


def found_curve(score, flipped):
    """The fraction of the flipped labels among the first k of the ranking by descending score, k = 0..n."""
    order = np.argsort(-score, kind="stable")
    return np.concatenate([[0.0], np.cumsum(flipped[order]) / flipped.sum()])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("PURENET_MNIST", str(DEFAULT)))
    parser.add_argument("--train", type=int, default=3000, help="training images (of the 10,000)")
    parser.add_argument("--held-out", type=int, default=4000)
    parser.add_argument("--flip", type=float, default=0.05, help="fraction of training labels flipped")
    parser.add_argument("--epochs", type=int, default=epochs(25, fast=1))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--queries", type=int, default=4, help="held-out images shown with their training images")
    parser.add_argument("--top", type=int, default=4, help="most helpful and most harmful per held-out image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="influence_mnist.png")
    args = parser.parse_args()
    started = time.perf_counter()

    n_train, n_test = (300, 100) if FAST else (args.train, args.held_out)
    x, y, train, test = mnist_split(args.data, "test", args.seed, n_train, n_test)
    x_train, y_clean = x[train], y[train]
    y_train, flipped = flip_labels(y_clean, args.flip, args.seed + 1)
    x_test, y_test = x[test], y[test]
    print(f"MNIST from {args.data}: {len(train)} training images ({flipped.sum()} labels flipped, "
          f"{flipped.mean():.0%}), {len(test)} held out")

    net = lenet()
    steps = args.epochs * (len(train) // args.batch_size)
    opt = pn.optim.adam(pn.schedules.cosine_decay(2e-3, max(steps, 1), alpha=0.05))
    start = time.perf_counter()
    result = pn.fit(net, opt, (x_train, y_train), key=jax.random.key(args.seed), epochs=args.epochs,
                    batch_size=args.batch_size, progress=not FAST)
    params, state = result.params, result.state
    train_s = time.perf_counter() - start
    predict = lambda x: np.asarray(pn.forward(net, params, state, x)[0]).argmax(-1)  # noqa: E731
    predicted_train, predicted_test = predict(x_train), predict(x_test)
    accuracy = float(np.mean(predicted_test == y_test))
    print(f"LeNet, {args.epochs} epochs of Adam in {train_s:.1f} s; held-out accuracy {accuracy:.4f}; "
          f"flipped training labels fitted (predicted as flipped): "
          f"{np.mean(predicted_train[flipped] == y_train[flipped]):.0%}")

    # Self-influence of every training example, per method; a random ranking beside them.
    self_scores, factors, seconds = {}, {}, {}
    for method in METHODS:
        start = time.perf_counter()
        factors[method] = pn.influence.fit(net, params, state, (x_train, y_train), method=method, batch_size=256)
        self_scores[method] = np.asarray(pn.influence.self_influence(net, params, state, factors[method],
                                                                     (x_train, y_train), batch_size=256))
        seconds[method] = time.perf_counter() - start
    self_scores["random"] = np.random.default_rng(args.seed + 2).random(len(train))
    seconds["random"] = 0.0

    from sklearn.metrics import roc_auc_score

    curves = {m: found_curve(s, flipped) for m, s in self_scores.items()}
    top = lambda curve, f: curve[int(np.ceil(f * len(train)))]  # noqa: E731 - found in the top fraction f
    print(f"\nAUC for finding flipped labels by self-influence ({len(train)} training images, "
          f"{flipped.sum()} flipped):")
    print(f"  {'method':10s} {'AUC':>6s} {'top 5%':>7s} {'top 10%':>8s} {'fit + self-influence':>21s}")
    for m, s in self_scores.items():
        print(f"  {m:10s} {roc_auc_score(flipped, s):6.3f} {top(curves[m], 0.05):7.0%} {top(curves[m], 0.10):8.0%}"
              f" {seconds[m]:19.1f} s")

    # The most helpful and most harmful training images of a few held-out images, by EK-FAC.
    wrong = np.flatnonzero(predicted_test != y_test)
    shown = np.concatenate([wrong, np.setdiff1d(np.arange(len(test)), wrong)])[: args.queries]
    start = time.perf_counter()
    scores = np.asarray(pn.influence.scores(net, params, state, factors["ekfac"], (x_test[shown], y_test[shown]),
                                            (x_train, y_train), batch_size=256))
    print(f"\nEK-FAC scores, {len(shown)} held-out x {len(train)} training images, "
          f"in {time.perf_counter() - start:.1f} s")
    helpful, _, harmful, _ = (np.asarray(v) for v in pn.influence.top_k(scores, args.top))
    print(f"  flipped labels among the most harmful: {flipped[harmful].mean():.0%}, among the most helpful: "
          f"{flipped[helpful].mean():.0%} (5% of the training set)")
    for row, i in enumerate(shown):
        print(f"  held-out #{i}: label {y_test[i]}, predicted {predicted_test[i]}; helpful labels "
              f"{y_train[helpful[row]].tolist()}, harmful labels {y_train[harmful[row]].tolist()}")
    plot(args, curves, x_train, y_train, y_clean, flipped, x_test, y_test, predicted_test, shown, scores,
         helpful, harmful)
    print(f"total {time.perf_counter() - started:.0f} s")


def plot(args, curves, x_train, y_train, y_clean, flipped, x_test, y_test, predicted, shown, scores, helpful, harmful):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 + 2 * args.top
    fig = plt.figure(figsize=(6 + 1.05 * cols, max(4.6, 1.45 * len(shown) + 0.8)))
    ax = fig.add_gridspec(1, 1, left=0.06, right=0.36, bottom=0.12, top=0.88).subplots()
    inspected = np.linspace(0, 1, len(y_train) + 1)
    styles = {"ekfac": ("EK-FAC", "tab:blue"), "kfac": ("K-FAC", "tab:orange"),
              "identity": ("identity (TracIn-like)", "tab:green"), "random": ("random", "gray")}
    for m, curve in curves.items():
        ax.plot(inspected, curve, label=styles[m][0], color=styles[m][1])
    ax.plot([0, flipped.mean(), 1], [0, 1, 1], ":", color="black", label="perfect")
    ax.set_xlim(0, 0.3)
    ax.set_xlabel("fraction of training data inspected (highest self-influence first)")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_title(f"{flipped.sum()} of {len(y_train)} labels flipped", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")

    grid = fig.add_gridspec(len(shown), cols, left=0.42, right=0.99, bottom=0.04, top=0.86, wspace=0.15, hspace=0.6)
    for row, i in enumerate(shown):
        panels = [(x_test[i], f"held-out {y_test[i]}->{predicted[i]}", "black")]
        for j, sign in [(j, "+") for j in helpful[row]] + [(j, "") for j in harmful[row]]:
            label = f"{y_train[j]} (was {y_clean[j]})" if flipped[j] else f"{y_train[j]}"
            panels.append((x_train[j], f"{sign}{scores[row, j]:.3g}\n{label}", "tab:green" if sign else "tab:red"))
        for col, (image, title, color) in enumerate(panels):
            a = fig.add_subplot(grid[row, col])
            a.imshow(np.asarray(image)[:, :, 0], cmap="gray_r")
            a.set_title(title, fontsize=7, color=color, fontweight="bold" if "was" in title else "normal")
            a.set_xticks([]), a.set_yticks([])
    fig.text(0.705, 0.93, f"EK-FAC: held-out images (label->predicted), their {args.top} most helpful (green) and "
             f"most harmful (red) training images,\nscore and training label (bold: a flipped label, was its true one)",
             ha="center", fontsize=8)
    fig.suptitle("Influence functions on MNIST: finding flipped labels by self-influence", x=0.21, fontsize=10)
    save(fig, args.out, tight=False)


if __name__ == "__main__":
    main()
