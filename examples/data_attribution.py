"""Which training digits made the network misclassify a test digit? TracIn on the digits.

TracIn (Pruthi et al., 2020) scores how much a training example z moved the
loss on a test example z' over training: with checkpoints w_1..w_K of plain
SGD at learning rate lr,

    TracIn(z, z') = sum_k lr <grad L(w_k, z), grad L(w_k, z')>.

Positive scores are proponents (training on z lowered the loss on z'),
negative ones opponents. The inner products come from pn.stats.gradient_gram,
which never forms a per-example gradient: for each Dense layer it is
(H1 H2^T) * (D1 D2^T) from the layer's inputs and output gradients.

For every misclassified test digit (at most --show of them) the PNG shows
its strongest proponents and opponents among the training images.

    python examples/data_attribution.py [--epochs 30] [--checkpoints 5] [--out data_attribution.png]
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
    parser.add_argument("--checkpoints", type=int, default=5, help="TracIn checkpoints, evenly spaced")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--show", type=int, default=6, help="misclassified test digits in the figure")
    parser.add_argument("--top", type=int, default=3, help="proponents and opponents per digit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="data_attribution.png")
    args = parser.parse_args()

    data = pn.datasets.digits()
    x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    net = pn.mlp([64, 64, 10], hidden="tanh")
    params, state = pn.init(net, jax.random.key(args.seed))
    per_segment = max(args.epochs // args.checkpoints, 1)

    # Train in segments of plain SGD (TracIn's setting), keeping the params after each.
    opt = pn.optim.sgd(args.lr)
    segment = jax.jit(lambda p, s, k: pn.train(net, opt, (x_train, y_train), key=k, epochs=per_segment,
                                               batch_size=args.batch_size, params=p, state=s)[0])
    start = time.perf_counter()
    checkpoints = []
    for k in range(args.checkpoints):
        trained = segment(params, state, jax.random.key(args.seed + 1 + k))
        params, state = trained.opt_state.params, trained.model_state
        checkpoints.append(params)
    train_s = time.perf_counter() - start
    predicted = np.asarray(jnp.argmax(pn.forward(net, params, state, x_test)[0], axis=-1))
    wrong = np.flatnonzero(predicted != np.asarray(y_test))
    print(f"trained {per_segment * args.checkpoints} epochs of SGD in {train_s:.1f} s; test accuracy "
          f"{1 - len(wrong) / len(y_test):.4f}, {len(wrong)} misclassified test digits")
    if len(wrong) == 0:
        return
    shown = wrong[: args.show]
    xq, yq = x_test[shown], y_test[shown]

    # TracIn: the Gram matrix between the misclassified test digits and every training digit, per checkpoint.
    gram = jax.jit(lambda p: pn.stats.gradient_gram(net, p, state, (xq, yq), (x_train, y_train)))
    start = time.perf_counter()
    scores = sum(args.lr * gram(p) for p in checkpoints)
    scores = np.asarray(jax.block_until_ready(scores))
    print(f"TracIn scores ({len(shown)} x {len(y_train)}, {args.checkpoints} checkpoints) in "
          f"{time.perf_counter() - start:.2f} s")

    # Check one row against the per-example gradients formed explicitly.
    _, g_test = pn.per_example_grads(net, params, state, xq[:1], yq[:1])
    _, g_train = pn.per_example_grads(net, params, state, x_train[:50], y_train[:50])
    explicit = sum(jnp.sum(a.reshape(1, -1) * b.reshape(50, -1), axis=1)
                   for a, b in zip(jax.tree_util.tree_leaves(g_test), jax.tree_util.tree_leaves(g_train)))
    error = float(jnp.max(jnp.abs(gram(params)[0, :50] - explicit)) / jnp.max(jnp.abs(explicit)))
    print(f"gradient_gram against explicit per-example gradients: max relative difference {error:.1e}")

    proponents = np.argsort(-scores, axis=1)[:, : args.top]
    opponents = np.argsort(scores, axis=1)[:, : args.top]
    labels = np.asarray(y_train)
    print(f"top proponents labelled with the true digit: {np.mean(labels[proponents] == np.asarray(yq)[:, None]):.0%}; "
          f"top opponents labelled with the wrongly predicted digit: "
          f"{np.mean(labels[opponents] == predicted[shown][:, None]):.0%}")
    for row, i in enumerate(shown):
        print(f"  test #{i}: true {int(y_test[i])}, predicted {predicted[i]}; proponents "
              f"{[int(y_train[j]) for j in proponents[row]]}, opponents {[int(y_train[j]) for j in opponents[row]]}")
    plot(args, data, shown, predicted, scores, proponents, opponents)


def plot(args, data, shown, predicted, scores, proponents, opponents):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = lambda x: np.asarray(x).reshape(-1, 8, 8)  # noqa: E731 - standardised pixels, shown as they are
    cols = 1 + 2 * args.top
    fig, axes = plt.subplots(len(shown), cols, figsize=(1.3 * cols, 1.45 * len(shown)), squeeze=False)
    for row, i in enumerate(shown):
        panels = [(images(data.x_test[i : i + 1])[0], f"test {data.y_test[i]}->{predicted[i]}", "black")]
        panels += [(images(data.x_train[j : j + 1])[0], f"+{scores[row, j]:.2f} ({data.y_train[j]})", "tab:green")
                   for j in proponents[row]]
        panels += [(images(data.x_train[j : j + 1])[0], f"{scores[row, j]:.2f} ({data.y_train[j]})", "tab:red")
                   for j in opponents[row]]
        for ax, (image, title, color) in zip(axes[row], panels):
            ax.imshow(image, cmap="gray_r")
            ax.set_title(title, fontsize=7, color=color)
            ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle("TracIn: misclassified test digits (true->predicted), their top proponents (green) and "
                 "opponents (red), score (label)", fontsize=8)
    save(fig, args.out)


if __name__ == "__main__":
    main()
