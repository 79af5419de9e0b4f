"""Which training digits made the network misclassify a test digit? Influence functions on the digits.

The influence of a training example z on a test example z' (Koh & Liang,
2017; Grosse et al., 2023) is their gradients' inner product preconditioned
by the inverse curvature of the training loss,

    score(z', z) = grad L(z')^T (F + damping I)^-1 grad L(z),

with `pn.influence` (kronfluence's conventions): F fitted once over the
training set by EK-FAC (K-FAC's eigenbasis with its eigenvalues corrected,
George et al., 2018), the damping kronfluence's heuristic. A positive score
is a helpful training example (a step on it lowers the test digit's loss at
its true label), a negative one a harmful example (a step on it raises it);
`pn.influence.top_k` picks the most of each.

The comparison is "identity" (no curvature: the plain gradient dot product,
TracIn of Pruthi et al., 2020 at the final weights alone, up to its
learning-rate factor), checked here against per-example gradients formed
explicitly. For every misclassified test digit (at most --show of them) the
PNG shows its most helpful and most harmful training images by EK-FAC; the
printout says how often the helpful carry the true label and the harmful
the wrongly predicted one, by each method, and how much their choices
overlap.

    python examples/data_attribution.py [--epochs 30] [--out data_attribution.png]
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import purenet as pn
from _common import epochs, save

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=epochs(30, fast=5))
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--show", type=int, default=6, help="misclassified test digits in the figure")
    parser.add_argument("--top", type=int, default=3, help="most helpful and most harmful per digit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="data_attribution.png")
    args = parser.parse_args()

    data = pn.datasets.digits()
    train = (np.asarray(data.x_train), np.asarray(data.y_train))
    x_test, y_test = np.asarray(data.x_test), np.asarray(data.y_test)
    net = pn.mlp([64, 64, 10], hidden="tanh")
    start = time.perf_counter()
    result = pn.fit(net, pn.optim.sgd(args.lr), train, key=jax.random.key(args.seed), epochs=args.epochs,
                    batch_size=args.batch_size)
    params, state = result.params, result.state
    predicted = np.asarray(jnp.argmax(pn.forward(net, params, state, x_test)[0], axis=-1))
    wrong = np.flatnonzero(predicted != y_test)
    print(f"trained {args.epochs} epochs of SGD in {time.perf_counter() - start:.1f} s; test accuracy "
          f"{1 - len(wrong) / len(y_test):.4f}, {len(wrong)} misclassified test digits")
    if len(wrong) == 0:
        return
    shown = wrong[: args.show]
    queries = (x_test[shown], y_test[shown])  # each at its true label: what helped or hurt the right answer

    # The curvature once over the training set, then queries x training examples, per method.
    scores, seconds = {}, {}
    for method in ("ekfac", "identity"):
        start = time.perf_counter()
        factors = pn.influence.fit(net, params, state, train, method=method, batch_size=256)
        scores[method] = np.asarray(pn.influence.scores(net, params, state, factors, queries, train, batch_size=256))
        seconds[method] = time.perf_counter() - start
    n = len(train[1])
    print(f"influence scores ({len(shown)} x {n}) in {seconds['ekfac']:.2f} s by EK-FAC (fit + scores), "
          f"{seconds['identity']:.2f} s by identity (TracIn-like)")

    # identity is the plain gradient dot product: check one row against per-example gradients formed explicitly.
    _, g_test = pn.per_example_grads(net, params, state, queries[0][:1], queries[1][:1])
    _, g_train = pn.per_example_grads(net, params, state, train[0][:50], train[1][:50])
    explicit = sum(jnp.sum(a.reshape(1, -1) * b.reshape(50, -1), axis=1)
                   for a, b in zip(jax.tree_util.tree_leaves(g_test), jax.tree_util.tree_leaves(g_train)))
    error = float(np.max(np.abs(scores["identity"][0, :50] - explicit)) / np.max(np.abs(explicit)))
    print(f"identity scores against explicit per-example gradients: max relative difference {error:.1e}")

    labels = train[1]
    tops = {}
    for method, name in (("ekfac", "EK-FAC"), ("identity", "identity")):
        helpful, _, harmful, _ = (np.asarray(v) for v in pn.influence.top_k(scores[method], args.top))
        tops[method] = helpful, harmful
        print(f"{name:8s}: most helpful labelled with the true digit: "
              f"{np.mean(labels[helpful] == y_test[shown][:, None]):.0%}; most harmful labelled with the wrongly "
              f"predicted digit: {np.mean(labels[harmful] == predicted[shown][:, None]):.0%}")
    overlap = [len(set(a) & set(b)) / args.top for which in (0, 1)
               for a, b in zip(tops["ekfac"][which], tops["identity"][which])]
    corr = np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(scores["ekfac"], scores["identity"])])
    print(f"EK-FAC against identity: top-{args.top} overlap {np.mean(overlap):.0%}, mean correlation of the "
          f"scores {corr:.2f}")
    helpful, harmful = tops["ekfac"]
    for row, i in enumerate(shown):
        print(f"  test #{i}: true {y_test[i]}, predicted {predicted[i]}; EK-FAC helpful "
              f"{labels[helpful[row]].tolist()}, harmful {labels[harmful[row]].tolist()}")
    plot(args, data, shown, predicted, scores["ekfac"], helpful, harmful)


def plot(args, data, shown, predicted, scores, helpful, harmful):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = lambda x: np.asarray(x).reshape(-1, 8, 8)  # noqa: E731 - standardised pixels, shown as they are
    cols = 1 + 2 * args.top
    fig, axes = plt.subplots(len(shown), cols, figsize=(1.3 * cols, 1.45 * len(shown)), squeeze=False)
    for row, i in enumerate(shown):
        panels = [(images(data.x_test[i : i + 1])[0], f"test {data.y_test[i]}->{predicted[i]}", "black")]
        panels += [(images(data.x_train[j : j + 1])[0], f"+{scores[row, j]:.3g} ({data.y_train[j]})", "tab:green")
                   for j in helpful[row]]
        panels += [(images(data.x_train[j : j + 1])[0], f"{scores[row, j]:.3g} ({data.y_train[j]})", "tab:red")
                   for j in harmful[row]]
        for ax, (image, title, color) in zip(axes[row], panels):
            ax.imshow(image, cmap="gray_r")
            ax.set_title(title, fontsize=7, color=color)
            ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle("EK-FAC influence: misclassified test digits (true->predicted), their most helpful (green) and "
                 "most harmful (red) training images, score (label)", fontsize=8)
    save(fig, args.out)


if __name__ == "__main__":
    main()
