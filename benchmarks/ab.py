"""A/B of two source trees of purenet: the same timed programs, in fresh processes, interleaved.

    python -m benchmarks.ab OLD_TREE NEW_TREE [--rounds 3] [--repeats 5] [--steps 5] [--json results_ab_structure_cpu.json]
    python -m benchmarks.ab TREE TREE --smoke         # tiny cases, once: checks that it runs

A library change can only be compared across processes (one process imports
one purenet), so each round starts one process per tree, alternating which
goes first; each process compiles every case once, then times `repeats`
interleaved repeats of `steps` calls per case and reports their medians. The
result per case is the median over rounds of new / old: a ratio taken within
a round, where both trees ran back to back on the same machine.

Each process also reports the compiled program's op histogram (how many of
each HLO instruction): where the two trees' histograms are equal, XLA runs
the same program and any ratio is the machine's noise; where they differ,
the ratio is the change's.

The cases are the paths a change to the layers' per-example machinery moves:
the DP-SGD step (one-pass clipping, noise, Adam) and the plain step for the
MLP, LeNet and GPT of `benchmarks.dp`, the LSTM's per-example norms, and the
Fisher diagonal, the Gram matrix and K-FAC's factors of the MLP and LeNet.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD = r'''
import collections, json, re, statistics, sys, time
import jax, jax.numpy as jnp
import purenet as pn
pn.xla_flags.configure()
from benchmarks import dp

repeats, steps, smoke = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
sizes = (("mlp", dp.mlp_case, 8),) if smoke else (("mlp", dp.mlp_case, 256), ("lenet", dp.cnn_case, 256),
                                                  ("gpt", dp.gpt_case, 12))
cases, ops = {}, {}
for name, case, batch in sizes:
    fns, carry = dp.purenet_steps(case, batch)
    for kind in ("plain", "dp"):
        cases[f"{name} {kind} step"] = (fns[kind][0], carry, True)
    net, x, y = case(batch)
    params, state = pn.init(net, jax.random.key(0), in_shape=x.shape[1:])
    if name != "gpt":
        for stat in ("fisher_diagonal", "gradient_gram", "kfac_factors"):
            def fn(p, stat=stat, net=net, state=state, x=x, y=y):
                if stat == "gradient_gram":
                    return pn.stats.gradient_gram(net, p, state, (x, y), (x[: len(x) // 4], y[: len(y) // 4]))
                return getattr(pn.stats, stat)(net, p, state, x, y)
            cases[f"{name} {stat}"] = (jax.jit(fn).lower(params).compile(), params, False)
if not smoke:
    lstm = pn.Sequential([pn.LSTM(128), pn.Flatten(), pn.Dense(10), pn.Softmax()])
    xl = jax.random.normal(jax.random.key(1), (64, 32, 32))
    lp, ls = pn.init(lstm, jax.random.key(0), in_shape=(32, 32))
    norms = jax.jit(lambda p: pn.per_example_grad_norms(lstm, p, ls, xl, jnp.arange(64) % 10))
    cases["lstm per-example norms"] = (norms.lower(lp).compile(), lp, False)
for k, (fn, arg, is_step) in cases.items():
    ops[k] = collections.Counter(re.findall(r"=\s*\S+\s+([a-z\-]+)\(", fn.as_text()))
    jax.block_until_ready(fn(arg, jax.random.key(0)) if is_step else fn(arg))
times = {k: [] for k in cases}
for _ in range(repeats):
    for k, (fn, arg, is_step) in cases.items():
        start = time.perf_counter()
        out = arg
        for i in range(steps):
            out = fn(out, jax.random.key(i)) if is_step else fn(arg)
        jax.block_until_ready(out)
        times[k].append((time.perf_counter() - start) / steps * 1e3)
print("RESULT " + json.dumps({"ms": {k: statistics.median(v) for k, v in times.items()}, "ops": ops}))
'''


def run_tree(tree: str, repeats: int, steps: int, smoke: bool) -> dict:
    """{"ms": {case: median ms}, "ops": {case: {HLO op: count}}} from one fresh process on `tree`."""
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
    done = subprocess.run([sys.executable, "-c", CHILD, str(repeats), str(steps), "1" if smoke else "0"], env=env,
                          cwd=tree, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the run on {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="the MLP at batch 8, one round of one call")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.repeats, args.steps = 1, 1, 1
    rounds = []
    for r in range(args.rounds):
        order = [("old", args.old), ("new", args.new)]
        if r % 2:
            order.reverse()
        result = {who: run_tree(tree, args.repeats, args.steps, args.smoke) for who, tree in order}
        rounds.append(result)
        print(f"round {r + 1}: " + ", ".join(f"{k} {result['new']['ms'][k] / result['old']['ms'][k]:.3f}"
                                             for k in result["old"]["ms"]), flush=True)
    first = rounds[0]
    summary = {k: {"old_ms": statistics.median(r["old"]["ms"][k] for r in rounds),
                   "new_ms": statistics.median(r["new"]["ms"][k] for r in rounds),
                   "new_over_old": statistics.median(r["new"]["ms"][k] / r["old"]["ms"][k] for r in rounds),
                   "same_program": first["old"]["ops"][k] == first["new"]["ops"][k]}
               for k in first["old"]["ms"]}
    print(f"{'case':26s} {'old ms':>9s} {'new ms':>9s} {'new/old':>8s}  compiled program")
    for k, v in summary.items():
        print(f"{k:26s} {v['old_ms']:9.2f} {v['new_ms']:9.2f} {v['new_over_old']:8.3f}  "
              f"{'the same ops' if v['same_program'] else 'differs'}")
    out = {"when": time.strftime("%Y-%m-%d"), "trees": {"old": args.old, "new": args.new},
           "summary": summary, "rounds": [{who: r[who]["ms"] for who in r} for r in rounds]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
