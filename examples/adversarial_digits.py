"""Adversarial digits: FGSM and PGD attacks on the digits MLP with pn.input_grad.

Trains 64-128-64-10 on scikit-learn's 8x8 digits (pixels scaled to [0, 1]),
then attacks every test image inside an L-infinity ball of radius eps:

    FGSM (Goodfellow et al., 2015)  x' = clip(x + eps sign(dL/dx), 0, 1)
    PGD  (Madry et al., 2018)       x <- clip(proj_eps(x + alpha sign(dL/dx)), 0, 1), `steps` times

dL/dx comes from the handwritten backward (`pn.input_grad`: the input
gradient that every backward pass computes anyway), and equals autodiff's
gradient through `pn.as_function(net)`. Prints test accuracy against eps
(with random-sign noise of the same size for comparison) and writes a PNG of
the curves and of a few perturbed digits.

    python examples/adversarial_digits.py [--epochs 40] [--steps 20] [--out adversarial_digits.png]
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import purenet as pn
from _common import FAST, epochs, save

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation

EPS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)  # a pixel level of the 8x8 digits is 1/16 = 0.0625


def fgsm(net, params, state, x, y, eps):
    dx = pn.input_grad(net, params, state, x, y)
    return jnp.clip(x + eps * jnp.sign(dx), 0.0, 1.0)


def pgd(net, params, state, x, y, eps, steps):
    """Projected gradient ascent on the loss in the eps-ball around x (no random start)."""
    alpha = 2.5 * eps / steps

    def step(_, xa):
        xa = xa + alpha * jnp.sign(pn.input_grad(net, params, state, xa, y))
        return jnp.clip(jnp.clip(xa, x - eps, x + eps), 0.0, 1.0)

    return jax.lax.fori_loop(0, steps, step, x)


def noise(x, eps, key):
    return jnp.clip(x + eps * jax.random.rademacher(key, x.shape, x.dtype), 0.0, 1.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=epochs(40, fast=8))
    parser.add_argument("--steps", type=int, default=5 if FAST else 20, help="PGD steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="adversarial_digits.png")
    args = parser.parse_args()

    data = pn.datasets.digits(standardized=False)  # pixels in [0, 1], so eps is a fraction of full scale
    net = pn.mlp([64, 128, 64, 10], hidden="relu", output="softmax")
    start = time.perf_counter()
    result = pn.fit(net, pn.optim.adam(1e-3), (data.x_train, data.y_train), key=jax.random.key(args.seed),
                    epochs=args.epochs, batch_size=32, l2=1e-4, progress=not FAST)
    params, state = result.params, result.state
    print(f"trained {args.epochs} epochs in {time.perf_counter() - start:.1f} s")
    x, y = jnp.asarray(data.x_test), jnp.asarray(data.y_test)

    # The same dL/dx from autodiff of user code around the bridge, which runs the handwritten backward.
    apply = pn.as_function(net)

    def user_loss(z):  # the mean negative log-probability of the true class
        probs, _ = apply(params, state, z)
        return -jnp.mean(jnp.log(jnp.take_along_axis(probs, y[:, None], axis=1)))

    by_bridge = jax.grad(user_loss)(x)
    diff = float(jnp.max(jnp.abs(by_bridge - pn.input_grad(net, params, state, x, y))))
    print(f"input_grad vs autodiff through pn.as_function: max difference {diff:.1e}")

    eps = jnp.asarray(EPS, x.dtype)
    attacks = {
        "noise": jax.vmap(lambda e: noise(x, e, jax.random.key(args.seed + 1))),
        "FGSM": jax.vmap(lambda e: fgsm(net, params, state, x, y, e)),
        f"PGD-{args.steps}": jax.vmap(lambda e: pgd(net, params, state, x, y, e, args.steps)),
    }
    accuracy = jax.vmap(lambda xa: pn.metrics.accuracy(net, params, state, xa, y))
    start = time.perf_counter()
    adversarial = {name: jax.jit(attack)(eps) for name, attack in attacks.items()}  # every eps at once
    acc = {name: np.asarray(accuracy(xa)) for name, xa in adversarial.items()}
    print(f"attacked {len(x)} test images at {len(EPS)} radii in {time.perf_counter() - start:.1f} s")
    print("test accuracy against the L-inf radius eps (pixels in [0, 1]):")
    print("   eps  " + "  ".join(f"{name:>7}" for name in acc))
    for i, e in enumerate(EPS):
        print(f"  {e:4.2f}  " + "  ".join(f"{a[i]:7.3f}" for a in acc.values()))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 4.5))
    ax = fig.add_subplot(1, 2, 1)
    for name, a in acc.items():
        ax.plot(EPS, a, "o-", label=name)
    ax.set_xlabel("L-inf radius eps (pixel scale 0..1)"), ax.set_ylabel("test accuracy"), ax.set_ylim(0, 1.02)
    ax.set_title("digits MLP under attack"), ax.legend()
    pgd_name = f"PGD-{args.steps}"
    shown, radii = np.arange(5), [0, EPS.index(0.1), EPS.index(0.2)]
    predicted = {r: np.asarray(pn.metrics.predicted_classes(net, params, state, adversarial[pgd_name][r][shown]))
                 for r in radii}
    for row, r in enumerate(radii):
        for col, i in enumerate(shown):
            sub = fig.add_subplot(len(radii), 2 * len(shown), row * 2 * len(shown) + len(shown) + col + 1)
            sub.imshow(np.asarray(adversarial[pgd_name][r][i]).reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
            ok = predicted[r][col] == int(y[i])
            sub.set_title(f"{predicted[r][col]}", color="k" if ok else "r", fontsize=9)
            sub.set_xticks([]), sub.set_yticks([])
            if col == 0:
                sub.set_ylabel(f"eps {EPS[r]:g}", fontsize=9)
    fig.text(0.73, 0.96, f"{pgd_name} digits, with the predicted class (red: wrong)", ha="center")
    save(fig, args.out)


if __name__ == "__main__":
    main()
