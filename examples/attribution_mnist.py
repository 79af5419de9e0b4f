"""Where a CNN looks: saliency, integrated gradients and Grad-CAM maps of MNIST digits (`pn.attribution`).

The LeNet of examples/mnist_cnn.py (conv 5x5 16, max pool, conv 5x5 32, max
pool, Dense 128, Dense 10, Softmax), trained briefly on the shared MNIST
test set's images (a seeded split, as mnist_cnn.py does), then explained on
held-out digits. Every map explains the logit of the predicted class (the
Softmax is left out), computed by the network's own backward from a one-hot
seed at the logits:

    saliency   |d logit / d pixel|                                 (Simonyan et al., 2014)
    IG         (x - 0) * integral of d logit / dx along 0 -> x     (Sundararajan et al., 2017;
               Captum's default rule: 50 Gauss-Legendre points, a black baseline)
    Grad-CAM   relu(sum_c mean(d logit / dA_c) A_c) at the second convolution's
               output A (14 x 14, before its ReLU), upsampled to 28 x 28 (Selvaraju et al., 2017)

Two checks, printed: integrated gradients' completeness (the attributions
of an image sum to logit(x) - logit(baseline), up to the quadrature's
error) and a deletion test: blank the 5% of pixels each map ranks highest
and count how often the prediction changes, against blanking 5% at random.
A map that finds the evidence changes far more predictions than chance.

    python examples/attribution_mnist.py [--data ../shared/data/mnist] [--epochs 3] [--out attribution_mnist.png]

The full run (the defaults: 8,000 training images, 3 epochs, 500 held-out
images explained) on a 2-core CPU shared with other jobs: 87 s in all
(training 43 s, the three maps of 500 images 37 s); held-out accuracy
97.2%; completeness holds to a median relative error of 3.9e-4 (a ReLU
network is only piecewise smooth, which 50 Gauss-Legendre points integrate
inexactly). Blanking the top 5% of pixels changes the prediction of:

    integrated gradients   55.8%
    saliency                9.6%
    Grad-CAM                4.0%
    random 5%               0.2%

Integrated gradients multiply by x - baseline, so they give a black pixel
nothing and rank only the ink; saliency (|gradient|) and Grad-CAM (14 x 14,
upsampled) also rank black background pixels, whose blanking changes
nothing. Grad-CAM's coarse map is the one to read for where the class's
evidence is (strokes and their ends); it is not a pixel ranking.

`PURENET_FAST=1`: 1,000 training images, 1 epoch, 200 held-out images for
the deletion test; the same maps and figure.
"""
import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import purenet as pn
from _common import FAST, epochs, mnist_split, save
from mnist_cnn import DEFAULT, lenet

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation

CONV = (3,)  # the path of the second Conv2D in lenet(): Sequential index 3
METHODS = ("saliency", "integrated gradients", "Grad-CAM")


def maps(net, params, state, x, target):
    """{method: (batch, 28, 28)} attribution maps of the target class's logit."""
    sal = jnp.abs(pn.attribution.saliency(net, params, state, x, target))[..., 0]
    ig = pn.attribution.integrated_gradients(net, params, state, x, target, chunk_size=10)[..., 0]
    cam = pn.attribution.grad_cam(net, params, state, x, target, CONV)  # (batch, 14, 14)
    cam = jax.image.resize(cam, (x.shape[0], 28, 28), "bilinear")
    return {"saliency": sal, "integrated gradients": ig, "Grad-CAM": cam}


def deleted(x, score, fraction):
    """x with the `fraction` of pixels of highest score set to 0 (black, the background), per image."""
    flat = score.reshape(len(x), -1)
    k = int(round(fraction * flat.shape[1]))
    top = np.argsort(-flat, axis=1)[:, :k]
    out = x.reshape(len(x), -1).copy()
    np.put_along_axis(out, top, 0.0, axis=1)
    return out.reshape(x.shape)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("PURENET_MNIST", str(DEFAULT)))
    parser.add_argument("--epochs", type=int, default=epochs(3, fast=1))
    parser.add_argument("--train", type=int, default=8000)
    parser.add_argument("--held-out", type=int, default=500, help="held-out images explained (100 per call)")
    parser.add_argument("--show", type=int, default=6, help="digits shown in the figure")
    parser.add_argument("--delete", type=float, default=0.05, help="fraction of pixels blanked")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="attribution_mnist.png")
    args = parser.parse_args()
    started = time.perf_counter()

    n_train, n_test = (1000, 200) if FAST else (args.train, args.held_out)
    x, y, train, test = mnist_split(args.data, "test", args.seed, n_train, n_test)
    print(f"MNIST from {args.data}: {len(train)} training images, {len(test)} held out")
    net = lenet()
    steps = args.epochs * (len(train) // 64)
    opt = pn.optim.adam(pn.schedules.cosine_decay(2e-3, max(steps, 1), alpha=0.05))
    start = time.perf_counter()
    result = pn.fit(net, opt, (x[train], y[train]), key=jax.random.key(args.seed), epochs=args.epochs,
                    batch_size=64, progress=not FAST)
    params, state = result.params, result.state
    x_test, y_test = x[test], y[test]
    predicted = np.asarray(pn.forward(net, params, state, x_test)[0]).argmax(-1)
    print(f"LeNet, {args.epochs} epochs in {time.perf_counter() - start:.1f} s; held-out accuracy "
          f"{np.mean(predicted == y_test):.4f}")

    # The maps of every held-out image, for its predicted class: one compiled program, 100 images a call
    # (integrated gradients: 50 points x 100 images, 10 points at a time: 1,000 rows per pass).
    start = time.perf_counter()
    run = jax.jit(lambda p, v, t: maps(net, p, state, v, t))
    parts = [run(params, x_test[i:i + 100], predicted[i:i + 100]) for i in range(0, len(x_test), 100)]
    attributions = {m: np.concatenate([np.asarray(part[m]) for part in parts]) for m in METHODS}
    print(f"saliency, integrated gradients (50 points) and Grad-CAM of {len(test)} images in "
          f"{time.perf_counter() - start:.1f} s")

    body, bparams, bstate = net.without_output(), params[:-1], state[:-1]
    logit = lambda v: np.asarray(pn.forward(body, bparams, bstate, v)[0])[np.arange(len(v)), predicted]  # noqa: E731
    gap = logit(x_test) - logit(np.zeros_like(x_test))
    total = attributions["integrated gradients"].sum(axis=(1, 2))
    print(f"integrated gradients' completeness: sum of attributions against logit(x) - logit(black), "
          f"median relative error {np.median(np.abs(total - gap) / np.abs(gap)):.1e}")

    print(f"deletion test: blank the top {args.delete:.0%} of pixels by each map; predictions changed")
    scores = {**attributions, "random": np.random.default_rng(args.seed).random(x_test.shape[:3])}
    changed = {}
    for m, score in scores.items():
        after = np.asarray(pn.forward(net, params, state, deleted(x_test, score, args.delete))[0]).argmax(-1)
        changed[m] = float(np.mean(after != predicted))
        print(f"  {m:22s} {changed[m]:6.1%}")
    plot(args, x_test, y_test, predicted, attributions, changed)
    print(f"total {time.perf_counter() - started:.0f} s")


def plot(args, x, y, predicted, attributions, changed):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wrong = np.flatnonzero(predicted != y)
    shown = np.concatenate([np.setdiff1d(np.arange(len(x)), wrong)[: args.show - min(2, len(wrong))],
                            wrong[:2]])
    cols = ["image"] + list(attributions)
    fig, axes = plt.subplots(len(shown), len(cols), figsize=(2.0 * len(cols), 2.0 * len(shown) + 0.6))
    for row, i in enumerate(shown):
        for col, name in enumerate(cols):
            ax = axes[row, col]
            if name == "image":
                ax.imshow(x[i, :, :, 0], cmap="gray_r")
            else:
                a = attributions[name][i]
                if name == "integrated gradients":  # signed: red for, blue against the class
                    lim = np.abs(a).max() or 1.0
                    ax.imshow(a, cmap="RdBu_r", vmin=-lim, vmax=lim)
                else:
                    ax.imshow(a, cmap="magma")
                ax.contour(x[i, :, :, 0], levels=[0.5], colors="limegreen", linewidths=0.6)  # the digit's outline
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(name if name == "image" else f"{name}\n(top {args.delete:.0%} blanked: "
                             f"{changed[name]:.0%} changed)", fontsize=8)
        color = "black" if predicted[i] == y[i] else "tab:red"
        axes[row, 0].set_ylabel(f"label {y[i]}, predicted {predicted[i]}", fontsize=8, color=color)
    fig.suptitle(f"Which pixels the LeNet's logit of its prediction rests on (random 5%: "
                 f"{changed['random']:.0%} changed)", fontsize=10)
    save(fig, args.out)


if __name__ == "__main__":
    main()
