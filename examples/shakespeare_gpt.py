"""A character-level GPT on tiny Shakespeare, every gradient handwritten.

nanoGPT's CPU configuration of `train_shakespeare_char`: 4 layers, 4 heads,
128 features, context 64, batch 12, 2,000 iterations; AdamW (beta2 0.99,
weight decay 0.1 on matrices only), learning rate warmed up over 100 steps
to 1e-3 and cosine-decayed to 1e-4, gradients clipped at 1.0, no dropout.
The training loop is a `lax.scan` over chunks of steps that draws its
random windows on the device; the loss is estimated every 250 iterations.
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
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import purenet as pn
from _common import FAST, save

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def optimizer(iters, lr=1e-3, min_lr=1e-4, warmup=100):
    """nanoGPT's AdamW: clip at 1.0, beta2 0.99, weight decay 0.1 on the matrices (ndim >= 2) only."""
    schedule = pn.schedules.warmup_cosine_decay(0.0, lr, min(warmup, iters // 2), iters, end_value=min_lr)
    matrices = functools.partial(jax.tree_util.tree_map, lambda p: p.ndim >= 2)
    return pn.optim.chain(
        pn.optim.clip_by_global_norm(1.0),
        pn.optim.scale_by_adam(b1=0.9, b2=0.99, eps=1e-8),
        pn.optim.add_decayed_weights(0.1, mask=matrices),
        learning_rate=schedule,
    )


def make_steps(net, opt, state, train_ids, batch_size, context):
    """A jitted run of `n` training steps (a lax.scan), each on fresh random windows."""

    @functools.partial(jax.jit, static_argnames="n", donate_argnums=0)
    def run(opt_state, key, n):
        def step(opt_state, k):
            x, y = pn.datasets.windows(train_ids, k, batch_size, context)
            value, grads, _ = pn.value_and_grad(net, opt_state.params, state, x, y, loss="cross_entropy")
            return opt.step(opt_state, grads), value

        return jax.lax.scan(step, opt_state, jax.random.split(key, n))

    return run


def make_eval(net, state, batch_size, context):
    @functools.partial(jax.jit, static_argnames="n")
    def evaluate(params, train_ids, val_ids, key, n):
        """The mean losses on the training and validation ids, each over n random batches of windows
        (n * batch_size windows). One program for both splits: one compilation per n, not two."""
        def mean_loss(ids):
            def one(_, k):
                x, y = pn.datasets.windows(ids, k, batch_size, context)
                return None, pn.loss(net, params, state, x, y, loss="cross_entropy")[0]

            return jnp.mean(jax.lax.scan(one, None, jax.random.split(key, n))[1])

        return mean_loss(train_ids), mean_loss(val_ids)

    return evaluate


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
    parser.add_argument("--out", default="shakespeare_gpt.png", help="the plot ('' for none)")
    parser.add_argument("--json", help="write the run's times and losses to this file")
    parser.add_argument("--cache", nargs="?", const="", metavar="DIR",
                        help="persistent compilation cache (default directory: ~/.cache/purenet/xla)")
    args = parser.parse_args()
    if args.cache is not None:
        print(f"compilation cache: {pn.enable_compilation_cache(args.cache or None)}")

    try:
        data = pn.datasets.text(args.data)
    except FileNotFoundError:
        raise SystemExit(f"no corpus at {args.data}: download tiny Shakespeare's input.txt and pass --data FILE "
                         f"(or set PURENET_SHAKESPEARE)")
    print(f"tiny Shakespeare: {len(data.train):,} training and {len(data.val):,} validation characters, "
          f"vocabulary {data.vocab_size}")
    net = pn.gpt(data.vocab_size, args.context, args.layers, args.heads, args.features)
    key = jax.random.key(args.seed)
    params, state = pn.init(net, jax.random.fold_in(key, 0))
    print(f"{sum(p.size for p in jax.tree_util.tree_leaves(params)):,} parameters")

    opt = optimizer(args.iters)
    opt_state = opt.init(params)
    train_ids, val_ids = jnp.asarray(data.train), jnp.asarray(data.val)
    run = make_steps(net, opt, state, train_ids, args.batch_size, args.context)
    evaluate = make_eval(net, state, args.batch_size, args.context)

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
                tr, va = map(float, evaluate(opt_state.params, train_ids, val_ids, k, args.eval_batches))
                eval_s += time.perf_counter() - eval_start
                evals.append((done, tr, va))
                bar.set_postfix(train=f"{tr:.3f}", val=f"{va:.3f}")
                tqdm.write(f"iter {done:5d}: train loss {tr:.4f}, val loss {va:.4f}")
    train_time = time.perf_counter() - start
    final_key, final_start = jax.random.key(args.seed + 1), time.perf_counter()
    train_loss, val_loss = map(float, evaluate(opt_state.params, train_ids, val_ids, final_key,
                                               args.final_eval_batches))
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


def plot(args, curve, evals, val_loss, vocab_size):
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
           title=f"GPT on tiny Shakespeare: validation loss {val_loss:.3f}")
    ax.legend()
    save(fig, args.out)


if __name__ == "__main__":
    main()
