"""A LLaMA-style character model on tiny Shakespeare at a context where dense attention does not fit.

pn.llama: pre-RMSNorm blocks, rotary positions, grouped-query attention
(4 query heads sharing 2 key/value heads), a SwiGLU MLP, untied logits.
First the compiled temporary memory of one training step (forward and
handwritten backward) is measured for both attention forms at T = 256 ...
4,096: dense keeps every layer's (batch, heads, T, T) probabilities for the
backward, quadratic in T; blockwise keeps each query's output and
log-sum-exp and recomputes the scores block by block, linear in T. The
context trained at is the shortest of those that the dense form cannot
afford within --budget-gib (default 4 GiB: T = 4,096 at batch 4), and it
trains with the blockwise form there: AdamW, random windows, the loss on held-out text
before and after, and a sample drawn with the key/value cache.

    python examples/long_context.py [--data ../shared/data/tinyshakespeare/input.txt] [--iters 150]
"""
import argparse
import dataclasses
import functools
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import purenet as pn
from _common import FAST, save

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
GIB = 2 ** 30


def step_memory(net, batch, t, implementation):
    """Compiled temporary bytes of value_and_grad at sequence length t (compiled, not run)."""
    net = dataclasses.replace(net, context=t, implementation=implementation)
    params, state = jax.eval_shape(lambda k: pn.init(net, k), jax.random.key(0))
    ids = jax.ShapeDtypeStruct((batch, t), jnp.int32)
    step = jax.jit(lambda p, x, y: pn.value_and_grad(net, p, state, x, y, loss="cross_entropy")[:2])
    return step.lower(params, ids, ids).compile().memory_analysis().temp_size_in_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("PURENET_SHAKESPEARE", str(DEFAULT)))
    parser.add_argument("--iters", type=int, default=8 if FAST else 150)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--layers", type=int, default=1 if FAST else 2)
    parser.add_argument("--features", type=int, default=32 if FAST else 128)
    parser.add_argument("--lengths", default="64,128" if FAST else "256,512,1024,2048,4096",
                        help="sequence lengths whose step memory is measured")
    parser.add_argument("--budget-gib", type=float, default=0.004 if FAST else 4.0)
    parser.add_argument("--sample", type=int, default=60 if FAST else 400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="long_context.png")
    args = parser.parse_args()

    text = Path(args.data).read_text()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.fromiter((index[c] for c in text), np.int32, len(text))
    split = int(0.9 * len(ids))
    train_ids, val_ids = jnp.asarray(ids[:split]), jnp.asarray(ids[split:])
    print(f"vocabulary {len(chars)}, {len(ids):,} characters")

    lengths = [int(t) for t in args.lengths.split(",")]
    base = pn.llama(len(chars), max(lengths), args.layers, 4, args.features, kv_heads=2)
    print(f"\ncompiled temporary memory of one training step, batch {args.batch_size} (MiB):")
    print(f"{'T':>6} {'dense':>10} {'blockwise':>10} {'ratio':>7}")
    memory = {}
    for t in lengths:
        memory[t] = {impl: step_memory(base, args.batch_size, t, impl) for impl in ("dense", "blockwise")}
        d, b = memory[t]["dense"], memory[t]["blockwise"]
        print(f"{t:>6} {d / 2**20:>10.1f} {b / 2**20:>10.1f} {d / b:>6.1f}x")
    unaffordable = [t for t in lengths if memory[t]["dense"] > args.budget_gib * GIB]
    context = min(unaffordable) if unaffordable else max(lengths)
    print(f"\nbudget {args.budget_gib * 1024:g} MiB: dense attention needs "
          f"{memory[context]['dense'] / 2**20:.1f} MiB at T = {context}; blockwise "
          f"{memory[context]['blockwise'] / 2**20:.1f} MiB. Training at context {context}, blockwise.")

    net = pn.llama(len(chars), context, args.layers, 4, args.features, kv_heads=2, implementation="blockwise")
    matrices = functools.partial(pn.decay_mask, net, decayed=("weight", "embedding"))
    opt = pn.optim.chain(pn.optim.clip_by_global_norm(1.0), pn.optim.scale_by_adam(b1=0.9, b2=0.99),
                         pn.optim.add_decayed_weights(0.1, mask=matrices),
                         learning_rate=pn.schedules.warmup_cosine_decay(0.0, 2e-3, max(1, args.iters // 10),
                                                                        args.iters, end_value=2e-4))
    params, state = pn.init(net, jax.random.key(args.seed))
    opt_state = opt.init(params)

    @jax.jit
    def step(opt_state, key):
        x, y = pn.datasets.windows(train_ids, key, args.batch_size, context)
        value, grads, _ = pn.value_and_grad(net, opt_state.params, state, x, y, loss="cross_entropy")
        return opt.step(opt_state, grads), value

    @jax.jit
    def held_out(params, key):
        x, y = pn.datasets.windows(val_ids, key, args.batch_size, context)
        return pn.loss(net, params, state, x, y, loss="cross_entropy")[0]

    eval_key = jax.random.key(args.seed + 1)
    before = float(held_out(params, eval_key))
    curve, start = [], time.perf_counter()
    for i, key in enumerate(jax.random.split(jax.random.key(args.seed + 2), args.iters)):
        opt_state, value = step(opt_state, key)
        curve.append(float(value))
        if (i + 1) % max(1, args.iters // 5) == 0:
            print(f"step {i + 1:4d}  train loss {curve[-1]:.3f}  ({time.perf_counter() - start:.0f} s)")
    after = float(held_out(opt_state.params, eval_key))
    print(f"validation loss at context {context}: {before:.3f} before, {after:.3f} after {args.iters} steps "
          f"({(time.perf_counter() - start) / args.iters:.2f} s a step)")

    prompt = val_ids[None, :32]
    sample = pn.generate(net, opt_state.params, state, prompt, jax.random.key(7), steps=args.sample,
                         temperature=0.8, cache=True)
    print("sample (temperature 0.8, key/value cache):")
    print("".join(chars[int(i)] for i in sample[0]))

    if args.out:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        for impl in ("dense", "blockwise"):
            left.plot(lengths, [memory[t][impl] / 2**20 for t in lengths], "o-", label=impl)
        left.axhline(args.budget_gib * 1024, color="gray", ls="--", label="budget")
        left.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="step temporary memory (MiB)",
                 title="attention memory: quadratic vs linear")
        left.set_xticks(lengths, [str(t) for t in lengths])
        left.minorticks_off()
        left.legend()
        right.plot(curve)
        right.set(xlabel="step", ylabel="training loss", title=f"pn.llama at context {context}")
        save(fig, args.out)


if __name__ == "__main__":
    main()
