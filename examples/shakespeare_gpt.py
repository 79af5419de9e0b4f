"""A character-level GPT on tiny Shakespeare, every gradient handwritten.

nanoGPT's CPU configuration of `train_shakespeare_char`: 4 layers, 4 heads,
128 features, context 64, batch 12, 2,000 iterations; AdamW (beta2 0.99,
weight decay 0.1 on matrices only), learning rate warmed up over 100 steps
to 1e-3 and cosine-decayed to 1e-4, gradients clipped at 1.0, no dropout.
The training loop is a `lax.scan` over chunks of steps that draws its
random windows on the device and takes each batch in two halves side by
side (--parts); the loss is estimated every 250 iterations, by one
program compiled on a background thread while the first steps run.
Prints the validation loss on 2,400 random windows, plots the curves and
prints a sample (--out '' and --sample 0 skip those two; --json FILE writes
the run's times and losses, as `python -m benchmarks.gpt_run` reads them).

    python examples/shakespeare_gpt.py [--data ../shared/data/tinyshakespeare/input.txt] [--cache [DIR]]

With --cache the compiled programs are kept on disk (pn.enable_compilation_cache),
so a second run skips XLA's compilation.
"""
import argparse
import functools
import json
import math
import os
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import purenet as pn
from _common import FAST, add_cache_option, save, use_cache

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def optimizer(net, iters, lr=1e-3, min_lr=1e-4, warmup=100):
    """nanoGPT's AdamW: clip at 1.0, beta2 0.99, weight decay 0.1 on the matrices only: the parameters
    whose role is a weight or an embedding (nanoGPT decays every tensor of rank >= 2: the same set)."""
    schedule = pn.schedules.warmup_cosine_decay(0.0, lr, min(warmup, iters // 2), iters, end_value=min_lr)
    matrices = functools.partial(pn.decay_mask, net, decayed=("weight", "embedding"))
    return pn.optim.chain(
        pn.optim.clip_by_global_norm(1.0),
        pn.optim.scale_by_adam(b1=0.9, b2=0.99, eps=1e-8),
        pn.optim.add_decayed_weights(0.1, mask=matrices),
        learning_rate=schedule,
    )


def make_setup(net, opt):
    """params, model state and optimizer state from a key, in one compiled program.

    Run eagerly, every initializer call of a new shape compiles on its own
    (2.7 s for this GPT); compiled as one program it takes a fraction of that.
    """

    @jax.jit
    def setup(key):
        params, state = pn.init(net, key)
        return opt.init(params), state

    return setup


def make_steps(net, opt, state, train_ids, batch_size, context, parts=1):
    """A jitted run of `n` training steps (a lax.scan), each on fresh random windows.

    With parts > 1 each step's batch is cut into `parts` equal slices whose
    losses and gradients are computed apart and averaged: the batch's mean
    loss and gradient (a mean of equal slices' means), as independent
    computations that XLA:CPU runs side by side. One batch of 12 windows
    leaves the second core idle much of the step; two halves take 6% less
    time here.
    """
    if batch_size % parts:
        raise ValueError(f"--parts {parts} must divide --batch-size {batch_size}")
    rows = batch_size // parts

    def value_and_grad(params, x, y):
        slices = [pn.value_and_grad(net, params, state, x[i * rows:(i + 1) * rows], y[i * rows:(i + 1) * rows],
                                    loss="cross_entropy")[:2] for i in range(parts)]
        return jax.tree_util.tree_map(lambda *s: sum(s) / parts, *slices)

    @functools.partial(jax.jit, static_argnames="n", donate_argnums=0)
    def run(opt_state, key, n):
        def step(opt_state, k):
            x, y = pn.datasets.windows(train_ids, k, batch_size, context)
            value, grads = value_and_grad(opt_state.params, x, y)
            return opt.step(opt_state, grads), value

        return jax.lax.scan(step, opt_state, jax.random.split(key, n))

    return run


def make_estimate(net, state, train_ids, val_ids, batch_size, context, block):
    """estimate(params, key, n) -> the mean losses on the training and validation ids, each over
    n random batches of windows (n * batch_size windows), n a multiple of `block`.

    One compiled program computes both splits' means over `block` batches;
    longer estimates average several calls (key i: fold_in(key, i)), so every
    estimate shares one compilation. The batches are independent and the
    scan is unrolled 5 times, so XLA:CPU runs 5 forward passes side by side
    (a quarter less time than one at a time).
    """

    @jax.jit
    def evaluate(params, key):
        def mean_loss(ids):
            def one(_, k):
                x, y = pn.datasets.windows(ids, k, batch_size, context)
                return None, pn.loss(net, params, state, x, y, loss="cross_entropy")[0]

            return jnp.mean(jax.lax.scan(one, None, jax.random.split(key, block), unroll=5)[1])

        return jnp.stack([mean_loss(train_ids), mean_loss(val_ids)])

    def estimate(params, key, n):
        """The mean (train, validation) losses over n batches each."""
        if n % block:
            raise ValueError(f"{n} batches is not a multiple of the estimate's block of {block}")
        means = [evaluate(params, jax.random.fold_in(key, i)) for i in range(n // block)]
        return tuple(float(m) for m in np.mean(np.asarray(means), axis=0))

    def compile_ahead(params, key):
        """Compile the program for arguments like these on a background thread (XLA compiles
        without holding Python's lock); later calls with such arguments find it compiled."""
        thread = threading.Thread(target=lambda: evaluate.lower(params, key).compile(), daemon=True)
        thread.start()
        return thread

    estimate.compile_ahead = compile_ahead
    return estimate


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("PURENET_SHAKESPEARE", str(DEFAULT)))
    parser.add_argument("--iters", type=int, default=60 if FAST else 2000)
    parser.add_argument("--layers", type=int, default=1 if FAST else 4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--features", type=int, default=32 if FAST else 128)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--eval-every", type=int, default=30 if FAST else 250)
    parser.add_argument("--eval-batches", type=int, default=4 if FAST else 25)
    parser.add_argument("--final-eval-batches", type=int, default=20 if FAST else 200)
    parser.add_argument("--sample", type=int, default=100 if FAST else 500, help="characters to generate")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--parts", type=int, default=2,
                        help="slices of each batch computed side by side (must divide --batch-size)")
    parser.add_argument("--out", default="shakespeare_gpt.png", help="the plot ('' for none)")
    parser.add_argument("--json", help="write the run's times and losses to this file")
    add_cache_option(parser)
    args = parser.parse_args()
    use_cache(args)

    try:
        data = pn.datasets.text(args.data)
    except FileNotFoundError:
        raise SystemExit(f"no corpus at {args.data}: download tiny Shakespeare's input.txt and pass --data FILE "
                         f"(or set PURENET_SHAKESPEARE)")
    print(f"tiny Shakespeare: {len(data.train):,} training and {len(data.val):,} validation characters, "
          f"vocabulary {data.vocab_size}")
    net = pn.gpt(data.vocab_size, args.context, args.layers, args.heads, args.features)
    key = jax.random.key(args.seed)
    opt = optimizer(net, args.iters)
    opt_state, state = make_setup(net, opt)(jax.random.fold_in(key, 0))
    print(f"{sum(p.size for p in jax.tree_util.tree_leaves(opt_state.params)):,} parameters")

    train_ids, val_ids = jnp.asarray(data.train), jnp.asarray(data.val)
    run = make_steps(net, opt, state, train_ids, args.batch_size, args.context, args.parts)
    estimate = make_estimate(net, state, train_ids, val_ids, args.batch_size, args.context,
                             math.gcd(args.eval_batches, args.final_eval_batches))
    # The estimate is first needed after --eval-every steps: its compilation runs meanwhile, beside
    # the steps' (one batch's steps leave the second core idle much of the time).
    estimate.compile_ahead(opt_state.params, key)

    from tqdm import tqdm
    curve, evals, done, steps_s, eval_s = [], [], 0, 0.0, 0.0
    start = time.perf_counter()
    with tqdm(total=args.iters, desc="training", unit="it", disable=FAST) as bar:
        while done < args.iters:
            n = min(args.eval_every - done % args.eval_every, args.iters - done)
            steps_start = time.perf_counter()
            opt_state, values = run(opt_state, jax.random.fold_in(key, 1000 + done), n)
            curve.extend(np.asarray(values).tolist())
            steps_s += time.perf_counter() - steps_start
            done += n
            bar.update(n)
            if done % args.eval_every == 0 or done == args.iters:
                k, eval_start = jax.random.fold_in(key, 10**6 + done), time.perf_counter()
                tr, va = estimate(opt_state.params, k, args.eval_batches)
                eval_s += time.perf_counter() - eval_start
                evals.append((done, tr, va))
                bar.set_postfix(train=f"{tr:.3f}", val=f"{va:.3f}")
                tqdm.write(f"iter {done:5d}: train loss {tr:.4f}, val loss {va:.4f}")
    train_time = time.perf_counter() - start
    final_key, final_start = jax.random.key(args.seed + 1), time.perf_counter()
    train_loss, val_loss = estimate(opt_state.params, final_key, args.final_eval_batches)
    final_eval_s = time.perf_counter() - final_start
    windows = args.final_eval_batches * args.batch_size
    print(f"{args.iters} iterations in {train_time:.1f} s ({1000 * train_time / args.iters:.1f} ms/iteration, "
          f"compilation and {eval_s:.1f} s of loss estimates included)")
    print(f"final train loss {train_loss:.4f}, validation loss {val_loss:.4f} "
          f"(each on {windows} random windows of {args.context}; {final_eval_s:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"iters": args.iters, "train_s": train_time, "steps_s": steps_s, "eval_s": eval_s,
                       "final_eval_s": final_eval_s, "train_loss": train_loss, "val_loss": val_loss,
                       "curve": curve}, f)
    if args.out:
        plot(args, curve, evals, val_loss, data.vocab_size)
    if args.sample:
        prompt = data.encode("\n")
        sample = pn.generate(net, opt_state.params, state, prompt, jax.random.fold_in(key, 2), args.sample,
                             temperature=0.8)
        print("sample (temperature 0.8):")
        print(data.decode(sample))


def plot(args, curve, evals, val_loss, vocab_size, model="GPT"):
    """The per-batch training losses (smoothed) and the loss estimates, saved to args.out."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    width = max(1, min(50, len(curve) // 10))
    smooth = np.convolve(curve, np.ones(width) / width, mode="valid")
    ax.plot(np.arange(width, len(curve) + 1), smooth, lw=1, alpha=0.6, label=f"training batches (mean of {width})")
    it, tr, va = zip(*evals)
    ax.plot(it, tr, "o-", label="train (estimated)")
    ax.plot(it, va, "s-", label="validation (estimated)")
    ax.axhline(math.log(vocab_size), color="gray", ls=":", lw=1, label="uniform guess")
    ax.set(xlabel="iteration", ylabel="cross-entropy (nats per character)",
           title=f"{model} on tiny Shakespeare: validation loss {val_loss:.3f}")
    ax.legend()
    save(fig, args.out)


if __name__ == "__main__":
    main()
