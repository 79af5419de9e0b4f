"""K-FAC (the true Fisher) against Adam on the shared MNIST LeNet.

The network, data and Adam recipe are examples/mnist_cnn.py's: LeNet, 8,000
training images of the shared MNIST test set and 2,000 held out, Adam with
cosine_decay(2e-3, steps, alpha=0.05), batch 64, 10 epochs. K-FAC
(`pn.optim.kfac`, fisher="mc": G from labels sampled from the model's own
predictive distribution, Martens & Grosse 2015) trains the same network from
the same initial parameters on the same batches. The question: does K-FAC
reach Adam's epoch-10 held-out accuracy in fewer epochs, and what does each
of its steps cost?

Both runs are the step `pn.fit` runs (`pn.training.build_step`),
one jitted epoch at a time (`run_epoch_steps`: fit's epoch, with every
step's loss), so each step's loss and each epoch's wall time can be
recorded. Prints the held-out accuracy of both after every epoch, the
first K-FAC epoch at or above Adam's final accuracy, each method's wall
time and time per step; plots the training loss against steps and against
wall time.

    python examples/kfac_mnist.py [--epochs 10] [--kfac-epochs 5] [--lr 0.1] [--damping 1.0] [--out docs/kfac_mnist.png]
"""
import argparse
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import purenet as pn
from purenet.training import build_step, evaluate, init_run, run_epoch_steps
from _common import FAST, epochs, mnist_split, save
from mnist_cnn import DEFAULT, lenet

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation

FIGURE = Path(__file__).resolve().parents[1] / "docs" / "kfac_mnist.png"


def kfac_schedule(lr, warmup, steps, alpha):
    """Linear warm-up from lr / 10 over `warmup` steps, then cosine decay to alpha lr at `steps`."""
    if warmup == 0:
        return pn.schedules.cosine_decay(lr, steps, alpha=alpha)
    return pn.schedules.warmup_cosine_decay(lr / 10, lr, warmup, steps, end_value=alpha * lr)


def train(net, opt, x, y, validation, *, key, epochs, batch_size, name):
    """Returns per-step losses, per-epoch held-out accuracy / loss, per-epoch wall time (compile apart)."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    validation = tuple(jnp.asarray(v) for v in validation)
    train_state = init_run(net, opt, x, key, None, None)
    step = build_step(net, opt)
    run = jax.jit(lambda ts, xx, yy, k: run_epoch_steps(step, ts, xx, yy, k, batch_size))
    ev = jax.jit(lambda p, s, v: evaluate(net, p, s, v, "cross_entropy"))
    shuffle_key = jax.random.fold_in(key, 1)
    t0 = time.perf_counter()
    run_c = run.lower(train_state, x, y, shuffle_key).compile()
    ev_c = ev.lower(train_state.opt_state.params, train_state.model_state, validation).compile()
    compile_s = time.perf_counter() - t0
    losses, acc, val_loss, seconds = [], [], [], []
    for e in range(epochs):
        t = time.perf_counter()
        train_state, values = run_c(train_state, x, y, shuffle_key)
        values = np.asarray(jax.block_until_ready(values))
        seconds.append(time.perf_counter() - t)  # the epoch's steps alone
        m = ev_c(train_state.opt_state.params, train_state.model_state, validation)
        losses.append(values)
        acc.append(float(m["val_accuracy"]))
        val_loss.append(float(m["val_loss"]))
        print(f"  {name} epoch {e + 1:2d}: training loss {values.mean():.4f}, held-out loss {val_loss[-1]:.4f}, "
              f"accuracy {acc[-1]:.4f}  ({seconds[-1]:.2f} s)", flush=True)
    return {"loss": np.concatenate(losses), "val_accuracy": np.array(acc), "val_loss": np.array(val_loss),
            "epoch_s": np.array(seconds), "compile_s": compile_s, "steps_per_epoch": len(losses[0])}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("PURENET_MNIST", str(DEFAULT)))
    parser.add_argument("--epochs", type=int, default=epochs(10, fast=1), help="Adam's epochs (mnist_cnn's 10)")
    parser.add_argument("--kfac-epochs", type=int, default=epochs(5, fast=1),
                        help="K-FAC's epochs (its cosine schedule spans them)")
    parser.add_argument("--train", type=int, default=8000)
    parser.add_argument("--held-out", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1, help="K-FAC's peak learning rate")
    parser.add_argument("--alpha", type=float, default=0.05, help="K-FAC's cosine floor (fraction of --lr)")
    parser.add_argument("--warmup", type=int, default=0, help="K-FAC's linear warm-up steps (from --lr / 10)")
    parser.add_argument("--damping", type=float, default=1.0)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--inverse-every", type=int, default=10)
    parser.add_argument("--skip-adam", action="store_true", help="K-FAC only (for tuning)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="kfac_mnist.png" if FAST else str(FIGURE),
                        help="the figure (default docs/kfac_mnist.png; in fast mode ./kfac_mnist.png)")
    args = parser.parse_args()
    kfac_epochs = args.kfac_epochs

    n_train, n_test = (512, 256) if FAST else (args.train, args.held_out)
    x, y, train_i, test_i = mnist_split(args.data, "test", args.seed, n_train, n_test)
    xt, yt, val = x[train_i], y[train_i], (x[test_i], y[test_i])
    per_epoch = n_train // args.batch_size
    print(f"MNIST from {args.data}: {n_train} training, {n_test} held-out images; batch {args.batch_size}, "
          f"{per_epoch} steps per epoch")

    net = lenet()
    key = jax.random.key(args.seed)
    runs = {}
    if not args.skip_adam:
        adam = pn.optim.adam(pn.schedules.cosine_decay(2e-3, args.epochs * per_epoch, alpha=0.05))
        print(f"Adam: cosine_decay(2e-3, {args.epochs * per_epoch}, alpha=0.05), {args.epochs} epochs")
        runs["Adam"] = train(net, adam, xt, yt, val, key=key, epochs=args.epochs, batch_size=args.batch_size,
                             name="Adam")
    kfac = pn.optim.kfac(net, kfac_schedule(args.lr, args.warmup, kfac_epochs * per_epoch, args.alpha),
                         momentum=args.momentum, damping=args.damping, inverse_every=args.inverse_every,
                         fisher="mc")
    print(f"K-FAC (fisher='mc'): {args.warmup} warm-up steps to {args.lr}, cosine to {args.alpha} x that at step "
          f"{kfac_epochs * per_epoch}, "
          f"momentum {args.momentum}, damping {args.damping}, inverse every {args.inverse_every} steps, "
          f"{kfac_epochs} epochs")
    runs["K-FAC"] = train(net, kfac, xt, yt, val, key=key, epochs=kfac_epochs, batch_size=args.batch_size,
                          name="K-FAC")

    print("\nheld-out accuracy per epoch")
    print("  epoch " + "".join(f"{name:>9s}" for name in runs))
    for e in range(max(len(r["val_accuracy"]) for r in runs.values())):
        cells = [f"{r['val_accuracy'][e]:9.4f}" if e < len(r["val_accuracy"]) else " " * 9 for r in runs.values()]
        print(f"  {e + 1:5d} " + "".join(cells))
    for name, r in runs.items():
        steps = len(r["loss"])
        print(f"{name}: {r['epoch_s'].sum():.1f} s for {steps} steps ({r['epoch_s'].sum() / steps * 1e3:.2f} ms per "
              f"step; median epoch {np.median(r['epoch_s']):.2f} s), compile {r['compile_s']:.1f} s, final held-out "
              f"accuracy {r['val_accuracy'][-1]:.4f}")
    matched = None
    if "Adam" in runs:
        target = runs["Adam"]["val_accuracy"][-1]
        hits = np.nonzero(runs["K-FAC"]["val_accuracy"] >= target)[0]
        matched = int(hits[0]) + 1 if len(hits) else None
        ratio = (np.median(runs["K-FAC"]["epoch_s"]) / np.median(runs["Adam"]["epoch_s"]))
        print(f"K-FAC step / Adam step (median epochs): {ratio:.2f}x")
        own = int(np.nonzero(runs["Adam"]["val_accuracy"] >= target)[0][0]) + 1
        print(f"(Adam itself first reached {target:.4f} at epoch {own} of its {args.epochs}-epoch schedule)")
        if matched is None:
            print(f"K-FAC did not reach Adam's epoch-{args.epochs} accuracy {target:.4f} in {kfac_epochs} epochs")
        else:
            wall = runs["K-FAC"]["epoch_s"][:matched].sum()
            print(f"K-FAC reached Adam's epoch-{args.epochs} held-out accuracy {target:.4f} at epoch {matched} "
                  f"({wall:.1f} s of training against Adam's {runs['Adam']['epoch_s'].sum():.1f} s)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, r in runs.items():
        loss = r["loss"]
        window = max(1, min(25, len(loss) // 10))
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        steps = np.arange(window, len(loss) + 1)
        # wall time of each step: its epoch's time spread evenly over the epoch's steps
        clock = np.cumsum(np.repeat(r["epoch_s"] / r["steps_per_epoch"], r["steps_per_epoch"]))
        line, = ax1.plot(steps, smooth, label=name)
        ax2.plot(clock[window - 1:], smooth, color=line.get_color(), label=name)
        epochs_run = np.arange(1, len(r["val_accuracy"]) + 1)
        ax3.plot(epochs_run, r["val_accuracy"], "o-", color=line.get_color(), label=name)
    ax1.set_xlabel("step"), ax1.set_ylabel("training loss (running mean)"), ax1.set_yscale("log"), ax1.legend()
    ax2.set_xlabel("wall time, s (training steps, compile excluded)"), ax2.set_yscale("log"), ax2.legend()
    ax2.set_ylabel("training loss (running mean)")
    if "Adam" in runs:
        ax3.axhline(runs["Adam"]["val_accuracy"][-1], color="gray", ls=":", label="Adam's final")
    ax3.set_xlabel("epoch"), ax3.set_ylabel("held-out accuracy"), ax3.legend()
    fig.suptitle("LeNet on MNIST: K-FAC (true Fisher) against Adam"
                 + ("" if matched is None else f"; K-FAC matches Adam's final accuracy at epoch {matched}"))
    save(fig, args.out)


if __name__ == "__main__":
    main()
