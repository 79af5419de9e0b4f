"""The Hessian's top eigenvalues over training, from pn.hvp: sharpness against learning rate.

Trains 64-32-10 (tanh, linear output, squared error on one-hot targets, as
in Cohen et al.'s experiments) on scikit-learn's digits by full-batch
gradient descent at several learning rates at once (the pure trainer is
vmapped over the rates), and every few steps measures the top
eigenvalues of the training loss's Hessian by Lanczos iteration on
`pn.hvp`, the forward-mode derivative of the handwritten gradient (no
Hessian is ever formed: it has (#params)^2 entries).

Gradient descent at rate lr is stable on a quadratic only where the
curvature is below 2/lr; Cohen et al. (2021) observed that full-batch
training drives the sharpness (the top eigenvalue) up to that edge of
stability and holds it there: at the end it is about min(2/lr, the
sharpness that a small rate reaches). The PNG shows sharpness over training
with the 2/lr lines, the loss, and the top eigenvalues at the end against lr.

    python examples/hessian_spectrum.py [--steps 3000] [--every 100] [--out hessian_spectrum.png]
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import purenet as pn
from _common import FAST, save

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation

RATES = (0.02, 0.1, 0.15, 0.2, 0.25)  # 0.3 diverges: the sharpness at initialisation is 20


def lanczos(matvec, dim, iters, key, dtype):
    """The Ritz values of a symmetric operator after `iters` Lanczos steps, largest first.

    Builds an orthonormal basis V of the Krylov space {v, Av, A^2 v, ...}
    (with full reorthogonalisation) and the tridiagonal T = V^T A V, whose
    extreme eigenvalues converge fast to A's.
    """
    v0 = jax.random.normal(key, (dim,), dtype)
    basis = jnp.zeros((iters + 1, dim), dtype).at[0].set(v0 / jnp.linalg.norm(v0))

    def step(i, carry):
        basis, alphas, betas = carry
        w = matvec(basis[i])
        alpha = jnp.vdot(w, basis[i])
        for _ in range(2):  # Gram-Schmidt twice against the whole basis (rows past i are still zero)
            w = w - basis.T @ (basis @ w)
        beta = jnp.linalg.norm(w)
        return basis.at[i + 1].set(w / beta), alphas.at[i].set(alpha), betas.at[i].set(beta)

    zeros = jnp.zeros((iters,), dtype)
    _, alphas, betas = jax.lax.fori_loop(0, iters, step, (basis, zeros, zeros))
    t = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    return jnp.linalg.eigvalsh(t)[::-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300 if FAST else 3000, help="full-batch gradient steps")
    parser.add_argument("--every", type=int, default=50 if FAST else 100, help="steps between Hessian measurements")
    parser.add_argument("--lanczos", type=int, default=10 if FAST else 40, help="Lanczos iterations")
    parser.add_argument("--top", type=int, default=5, help="eigenvalues to report")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="hessian_spectrum.png")
    args = parser.parse_args()

    data = pn.datasets.digits()
    x, y = jnp.asarray(data.x_train), jax.nn.one_hot(data.y_train, 10, dtype=data.x_train.dtype)
    net = pn.mlp([64, 32, 10], hidden="tanh", output="identity")
    params, state = pn.init(net, jax.random.key(args.seed))
    flat, unravel = ravel_pytree(params)
    print(f"digits: {len(x)} training images; {flat.size} parameters (a Hessian of {flat.size ** 2:,} entries)")

    def train(p, rate):
        """`every` full-batch gradient steps at `rate`: returns (params, loss before each step)."""
        def step(p, _):
            value, grads, _ = pn.value_and_grad(net, p, state, x, y, loss="mse")
            return jax.tree_util.tree_map(lambda w, g: w - rate * g, p, grads), value

        return jax.lax.scan(step, p, None, length=args.every)

    def spectrum(p, key):
        hvp = lambda v: ravel_pytree(pn.hvp(net, p, state, x, y, unravel(v), loss="mse"))[0]
        return lanczos(hvp, flat.size, args.lanczos, key, flat.dtype)[:args.top]

    rates = jnp.asarray(RATES, flat.dtype)
    train_all = jax.jit(jax.vmap(train))                      # every rate in one program
    spectrum_all = jax.jit(jax.vmap(spectrum, in_axes=(0, None)))
    members = jax.tree_util.tree_map(lambda w: jnp.broadcast_to(w, (len(RATES),) + w.shape), params)
    key = jax.random.key(args.seed + 1)
    checkpoints, tops, losses = [0], [np.asarray(spectrum_all(members, key))], []
    start = time.perf_counter()
    for done in range(args.every, args.steps + 1, args.every):
        members, values = train_all(members, rates)
        losses.append(np.asarray(values))
        checkpoints.append(done)
        tops.append(np.asarray(spectrum_all(members, jax.random.fold_in(key, done))))
    tops, losses = np.stack(tops, axis=1), np.concatenate(losses, axis=1)  # (rate, checkpoint, k), (rate, step)
    print(f"{args.steps} steps x {len(RATES)} rates, {len(checkpoints)} spectra of {args.lanczos} Lanczos "
          f"steps each: {time.perf_counter() - start:.1f} s")
    accuracy = jax.vmap(lambda p: pn.metrics.accuracy(net, p, state, data.x_test, data.y_test))(members)
    print("top Hessian eigenvalues at step 0: " + ", ".join(f"{v:.2f}" for v in tops[0, 0]))
    for r, rate in enumerate(RATES):
        print(f"  lr {rate:<4g} 2/lr {2 / rate:5.1f}   sharpness at the end {tops[r, -1, 0]:5.2f}   top {args.top}: "
              + ", ".join(f"{v:.2f}" for v in tops[r, -1])
              + f"   loss {losses[r, -1]:.4f}   test accuracy {accuracy[r]:.3f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for r, rate in enumerate(RATES):
        ax1.plot(checkpoints, tops[r, :, 0], "o-", ms=3, color=colors[r], label=f"lr {rate:g}")
        ax1.axhline(2 / rate, color=colors[r], ls="--", lw=1)
        ax2.plot(losses[r], color=colors[r], label=f"lr {rate:g}")
    ax1.set_xlabel("step"), ax1.set_ylabel("top Hessian eigenvalue"), ax1.set_ylim(0, 1.15 * tops[:, :, 0].max())
    ax1.set_title("sharpness over training (dashed: 2 / lr)"), ax1.legend()
    ax2.set_xlabel("step"), ax2.set_ylabel("training loss (squared error)"), ax2.set_yscale("log"), ax2.legend()
    ax2.set_title("full-batch gradient descent")
    grid = np.geomspace(min(RATES), max(RATES), 50)
    ax3.plot(grid, 2 / grid, "k--", lw=1, label="2 / lr")
    for k in range(args.top):
        label = "sharpness (top eigenvalue)" if k == 0 else f"eigenvalues 2-{args.top}" if k == 1 else None
        ax3.plot(RATES, tops[:, -1, k], "o-", ms=4, label=label, color=colors[0] if k == 0 else "0.6",
                 lw=2 if k == 0 else 1)
    ax3.set_xscale("log"), ax3.set_yscale("log"), ax3.set_xlabel("learning rate")
    ax3.set_xticks(RATES, [f"{r:g}" for r in RATES]), ax3.minorticks_off()
    ax3.set_ylabel(f"top {args.top} eigenvalues at step {args.steps}"), ax3.legend()
    ax3.set_title("sharpness against learning rate")
    save(fig, args.out)


if __name__ == "__main__":
    main()
