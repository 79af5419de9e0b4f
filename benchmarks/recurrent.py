"""The LSTM train step and per-example LSTM gradient norms, against PyTorch and jax.grad, interleaved.

    python -m benchmarks.recurrent [--repeats 9] [--steps 10] [--json benchmarks/results_recurrent_cpu.json]
    python -m benchmarks.recurrent --smoke        # tiny sizes, once: checks that every contender runs

Train step: forward, backward and an SGD update of pn.LSTM(256) -> Dense(16) ->
softmax cross-entropy at every step, on (32, 64, 128) sequences (batch, T, d)
with a label per step. Contenders:

    purenet          pn.value_and_grad (the handwritten BPTT: one reverse lax.scan)
    purenet unroll=k the same layer with lax.scan's unroll=k (forward and backward)
    purenet k parts  the batch's gradient as the mean over k equal slices, each its own scans, which
                     XLA:CPU runs side by side (as the examples' --parts)
    jax.grad         jax.grad of the same pn.loss (autodiff through the same forward lax.scan)
    pytorch eager    nn.LSTM(batch_first=True) -> nn.Linear -> F.cross_entropy, torch.optim.SGD
                     (torch.set_num_threads(n) for each n of --torch-threads: 1 and the CPU count,
                     which is what XLA's CPU client uses)

Each repeat times a block of `--steps` steps of every contender back to back;
reported are medians over repeats (ms per step) and each contender's median
paired ratio to purenet in the same repeat (above 1: purenet is faster).
The compiled steps' temporary memory is XLA's memory analysis.

Per-example gradient norms (batch 64, same sizes): pn.per_example_grad_norms
(the layer's ghost norm over time steps; whole batch, and chunk_size 16 and 8)
against the norms of vmap(jax.grad) of each example's loss: time and compiled
temporary memory.
"""
import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import purenet as pn
from benchmarks import steps as S

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation

CONFIG = dict(batch=32, T=64, d=128, h=256, classes=16, norms_batch=64)
SMOKE = dict(batch=2, T=3, d=4, h=5, classes=3, norms_batch=2)
LR = 0.1


def _data(c, batch, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, c["T"], c["d"])).astype(np.float32)
    y = rng.integers(0, c["classes"], (batch, c["T"])).astype(np.int32)
    return x, y


def _net(c, unroll=1):
    return pn.Sequential([pn.LSTM(c["h"], unroll=unroll), pn.Dense(c["classes"]), pn.Softmax()])


def _pn_step(c, gradients, unroll=1):
    net = _net(c, unroll)
    params, state = pn.init(net, jax.random.key(0), (c["T"], c["d"]), dtype=jnp.float32)
    opt = pn.optim.sgd(LR)

    @jax.jit
    def step(opt_state, x, y):
        return opt.step(opt_state, gradients(net, opt_state.params, state, x, y))

    x, y = (jnp.asarray(a) for a in _data(c, c["batch"]))
    opt_state = opt.init(params)
    compiled = step.lower(opt_state, x, y).compile()  # once: the timed executable is the measured one
    temp = compiled.memory_analysis()
    return (lambda s: compiled(s, x, y)), opt_state, getattr(temp, "temp_size_in_bytes", None)


def _purenet_grads(net, p, s, x, y):
    return pn.value_and_grad(net, p, s, x, y, loss="cross_entropy")[1]


def _in_parts(parts):
    """pn.value_and_grad on `parts` equal slices of the batch, averaged: the batch's gradient, as
    independent computations (one scan each) that XLA:CPU runs side by side (examples' --parts)."""
    def grads(net, p, s, x, y):
        r = x.shape[0] // parts
        g = [_purenet_grads(net, p, s, x[i * r:(i + 1) * r], y[i * r:(i + 1) * r]) for i in range(parts)]
        return jax.tree_util.tree_map(lambda *t: sum(t) / parts, *g)
    return grads


def _autodiff_grads(net, p, s, x, y):
    return jax.grad(lambda q: pn.loss(net, q, s, x, y, loss="cross_entropy")[0])(p)


def torch_step(c, threads):
    import torch
    from torch.nn import functional as F

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(c["d"], c["h"], batch_first=True)
    head = torch.nn.Linear(c["h"], c["classes"])
    opt = torch.optim.SGD(list(lstm.parameters()) + list(head.parameters()), lr=LR)
    x, y = (torch.from_numpy(a) for a in _data(c, c["batch"]))
    y = y.long()

    def run(state):
        torch.set_num_threads(threads)  # per contender (a no-op within its block)
        out, _ = lstm(x)
        loss = F.cross_entropy(head(out).reshape(-1, c["classes"]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return run, None, None


def contenders(c, unrolls, parts, torch_threads):
    out = {"purenet": lambda: _pn_step(c, _purenet_grads)}
    for k in unrolls:
        out[f"purenet unroll={k}"] = lambda k=k: _pn_step(c, _purenet_grads, unroll=k)
    for k in parts:
        if c["batch"] % k == 0:
            out[f"purenet {k} parts"] = lambda k=k: _pn_step(c, _in_parts(k))
    out["jax.grad"] = lambda: _pn_step(c, _autodiff_grads)
    for n in torch_threads:
        out[f"pytorch eager ({n} thread{'s' * (n > 1)})"] = lambda n=n: torch_step(c, n)
    return out


def _sync(state):
    if hasattr(state, "item") and not isinstance(state, jax.Array):
        state.item()  # torch
    else:
        jax.block_until_ready(jax.tree_util.tree_leaves(state))
    return state


def train_steps(c, repeats, n, unrolls, parts, torch_threads):
    built, compile_s, temp = {}, {}, {}
    for name, make in contenders(c, unrolls, parts, torch_threads).items():
        try:
            run, state, temp[name] = make()
        except ImportError as e:
            print(f"skipping {name}: {e}")
            continue
        start = time.perf_counter()
        state = _sync(run(state))
        compile_s[name] = time.perf_counter() - start
        state = _sync(run(state))
        built[name] = [run, state]
    times: dict = {name: [] for name in built}
    for _ in range(repeats):
        for name, slot in built.items():
            run, state = slot
            start = time.perf_counter()
            for _ in range(n):
                state = run(state)
            _sync(state)
            times[name].append((time.perf_counter() - start) / n)
            slot[1] = state
    base = times["purenet"]
    results = {}
    for name, ts in times.items():
        results[name] = {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                         "compile_s": compile_s[name],
                         "paired_time_over_purenet": statistics.median(t / b for t, b in zip(ts, base)),
                         "temp_bytes": temp.get(name)}
    return results


def per_example_norms(c, repeats):
    net = _net(c)
    params, state = pn.init(net, jax.random.key(0), (c["T"], c["d"]), dtype=jnp.float32)
    x, y = (jnp.asarray(a) for a in _data(c, c["norms_batch"], seed=1))
    # S.per_example_norms_against_vmap's loss is the default, cross-entropy: what this net trains with.
    # Whole batch, and in chunks of 16 and 8 examples (pn.per_example_grad_norms(chunk_size=)): the
    # stacked gates and their gradients (B, T, 4h) are most of the memory, and a chunk holds its share.
    chunks = tuple(k for k in (16, 8) if k < c["norms_batch"])
    return S.per_example_norms_against_vmap(net, params, state, x, y, repeats, chunk_sizes=chunks)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--unroll", type=int, nargs="*", default=[2, 4], help="extra purenet contenders")
    parser.add_argument("--parts", type=int, nargs="*", default=[2, 4],
                        help="extra purenet contenders: the batch in this many slices side by side")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--torch-threads", type=int, nargs="*", default=sorted({1, os.cpu_count() or 1}),
                        help="one PyTorch contender per thread count (XLA uses every core; on an "
                             "oversubscribed machine torch's spinning OpenMP pool is far slower than 1 thread)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    c = SMOKE if args.smoke else CONFIG
    repeats, n = (1, 1) if args.smoke else (args.repeats, args.steps)

    steps = train_steps(c, repeats, n, args.unroll, args.parts, args.torch_threads)
    print(f"LSTM train step, {c}, {repeats} repeats x {n} steps; {platform.machine()}, jax {jax.__version__} "
          f"on {jax.default_backend()}, {os.cpu_count()} CPUs")
    print(f"{'contender':<26} {'median ms':>9} {'min-max ms':>17} {'compile s':>9} {'paired':>7} {'temp MiB':>9}")
    for name, r in steps.items():
        mib = "" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:.2f}"
        print(f"{name:<26} {1e3 * r['median_s']:9.2f} {1e3 * r['min_s']:8.2f}-{1e3 * r['max_s']:<8.2f} "
              f"{r['compile_s']:9.2f} {r['paired_time_over_purenet']:7.2f} {mib:>9}")
    norms = per_example_norms(c, repeats)
    print(f"per-example gradient norms at batch {c['norms_batch']}:")
    ref = norms["vmap(jax.grad)"]
    for name, r in norms.items():
        r["vmap_time_over_this"] = ref["median_s"] / r["median_s"]
        r["vmap_memory_over_this"] = ref["temp_MiB"] / r["temp_MiB"] if r["temp_MiB"] else None
        print(f"{name:<48} {1e3 * r['median_s']:9.2f} ms {r['temp_MiB']:10.2f} MiB temp   vmap(jax.grad) "
              f"takes {r['vmap_time_over_this']:.2f}x the time, {r['vmap_memory_over_this'] or float('nan'):.2f}x the memory")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": c, "repeats": repeats, "steps": n, "torch_threads": args.torch_threads,
                       "machine": platform.machine(), "jax": jax.__version__,
                       "train_step": steps, "per_example_norms": norms}, f, indent=1)
    return steps, norms


if __name__ == "__main__":
    main()
