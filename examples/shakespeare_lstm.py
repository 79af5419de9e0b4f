"""A character-level LSTM on tiny Shakespeare, backpropagation through time written by hand.

Embedding(vocab, 64) -> pn.LSTM(256) -> Dense(vocab) -> softmax, trained on
random windows of 64 characters (the state starts at zero in every window),
batch 32, 1,500 iterations of Adam (learning rate warmed up over 100 steps to
3e-3, cosine-decayed to 3e-4), gradients clipped at 1.0. The same split,
training loop (a `lax.scan` over chunks of steps drawing windows on the
device, each batch taken in --parts slices side by side) and loss estimates as examples/shakespeare_gpt.py, whose functions
this imports. Prints the validation loss on 2,400 random windows, plots the
curves and prints a sample (each character drawn from the LSTM run over the
last 64 characters, the window it was trained on; pn.generate needs a
network that knows its context length, as pn.gpt does). --json FILE writes
the run's times and losses; benchmarks/torch_lstm.py trains the same model
in PyTorch for comparison.

    python examples/shakespeare_lstm.py [--data ../shared/data/tinyshakespeare/input.txt]
"""
import argparse
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import purenet as pn
from _common import FAST
from shakespeare_gpt import DEFAULT, make_estimate, make_steps, plot

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation


def model(vocab_size, embed, hidden):
    return pn.Sequential([pn.Embedding(vocab_size, embed), pn.LSTM(hidden), pn.Dense(vocab_size), pn.Softmax()])


def optimizer(iters, lr=3e-3, min_lr=3e-4, warmup=100):
    schedule = pn.schedules.warmup_cosine_decay(0.0, lr, min(warmup, iters // 2), iters, end_value=min_lr)
    return pn.optim.chain(pn.optim.clip_by_global_norm(1.0), pn.optim.scale_by_adam(b1=0.9, b2=0.99, eps=1e-8),
                          learning_rate=schedule)


def make_sampler(net, state, context, steps, temperature):
    """sample(params, window, key) -> `steps` ids, each drawn from the network run on the last
    `context` ids (a window of that length: the first is the prompt), one compiled lax.scan."""

    @jax.jit
    def sample(params, window, key):
        def step(window, k):
            probs = pn.forward(net, params, state, window[None])[0][0, -1]
            nxt = jax.random.categorical(k, jnp.log(jnp.maximum(probs, 1e-30)) / temperature).astype(window.dtype)
            return jnp.concatenate([window[1:], nxt[None]]), nxt

        return jax.lax.scan(step, window, jax.random.split(key, steps))[1]

    return sample


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("PURENET_SHAKESPEARE", str(DEFAULT)))
    parser.add_argument("--iters", type=int, default=40 if FAST else 1500)
    parser.add_argument("--embed", type=int, default=16 if FAST else 64)
    parser.add_argument("--hidden", type=int, default=32 if FAST else 256)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=20 if FAST else 250)
    parser.add_argument("--eval-batches", type=int, default=2 if FAST else 10)
    parser.add_argument("--final-eval-batches", type=int, default=4 if FAST else 75,
                        help="batches of --batch-size windows in the final estimate (75 x 32 = 2,400)")
    parser.add_argument("--sample", type=int, default=100 if FAST else 500, help="characters to generate")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--parts", type=int, default=2,
                        help="slices of each batch computed side by side (must divide --batch-size): each "
                             "slice's recurrence is its own scan, and XLA:CPU runs them concurrently")
    parser.add_argument("--out", default="shakespeare_lstm.png", help="the plot ('' for none)")
    parser.add_argument("--json", help="write the run's times and losses to this file")
    args = parser.parse_args()

    try:
        data = pn.datasets.text(args.data)
    except FileNotFoundError:
        raise SystemExit(f"no corpus at {args.data}: download tiny Shakespeare's input.txt and pass --data FILE "
                         f"(or set PURENET_SHAKESPEARE)")
    print(f"tiny Shakespeare: {len(data.train):,} training and {len(data.val):,} validation characters, "
          f"vocabulary {data.vocab_size}")
    net = model(data.vocab_size, args.embed, args.hidden)
    key = jax.random.key(args.seed)
    opt = optimizer(args.iters, args.lr, args.lr / 10)
    params, state = jax.jit(lambda k: pn.init(net, k, (args.context,)))(jax.random.fold_in(key, 0))
    opt_state = opt.init(params)
    print(f"{sum(p.size for p in jax.tree_util.tree_leaves(params)):,} parameters")

    train_ids, val_ids = jnp.asarray(data.train), jnp.asarray(data.val)
    run = make_steps(net, opt, state, train_ids, args.batch_size, args.context, args.parts)
    estimate = make_estimate(net, state, train_ids, val_ids, args.batch_size, args.context,
                             math.gcd(args.eval_batches, args.final_eval_batches))
    estimate.compile_ahead(opt_state.params, key)

    curve, evals, done, eval_s = [], [], 0, 0.0
    start = time.perf_counter()
    while done < args.iters:
        n = min(args.eval_every - done % args.eval_every, args.iters - done)
        opt_state, values = run(opt_state, jax.random.fold_in(key, 1000 + done), n)
        curve.extend(np.asarray(values).tolist())
        done += n
        if done % args.eval_every == 0 or done == args.iters:
            k, eval_start = jax.random.fold_in(key, 10**6 + done), time.perf_counter()
            tr, va = estimate(opt_state.params, k, args.eval_batches)
            eval_s += time.perf_counter() - eval_start
            evals.append((done, tr, va))
            print(f"iter {done:5d}: train loss {tr:.4f}, val loss {va:.4f}", flush=True)
    train_time = time.perf_counter() - start
    final_start = time.perf_counter()
    train_loss, val_loss = estimate(opt_state.params, jax.random.key(args.seed + 1), args.final_eval_batches)
    final_eval_s = time.perf_counter() - final_start
    windows = args.final_eval_batches * args.batch_size
    print(f"{args.iters} iterations in {train_time:.1f} s ({1000 * train_time / args.iters:.1f} ms/iteration, "
          f"compilation and {eval_s:.1f} s of loss estimates included)")
    print(f"final train loss {train_loss:.4f}, validation loss {val_loss:.4f} "
          f"(each on {windows} random windows of {args.context}; {final_eval_s:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"iters": args.iters, "train_s": train_time, "eval_s": eval_s, "final_eval_s": final_eval_s,
                       "train_loss": train_loss, "val_loss": val_loss, "curve": curve}, f)
    if args.out:
        plot(args, curve, evals, val_loss, data.vocab_size, model="LSTM")
    if args.sample:
        prompt = jnp.asarray(data.val[:args.context])
        sample = make_sampler(net, state, args.context, args.sample, 0.8)(opt_state.params, prompt,
                                                                            jax.random.fold_in(key, 2))
        print("sample (temperature 0.8), after the first 64 validation characters:")
        print(data.decode(sample))


if __name__ == "__main__":
    main()
