"""A/B of two source trees of purenet: the same timed programs, in fresh processes, interleaved.

    python -m benchmarks.ab OLD_TREE NEW_TREE [--rounds 3] [--repeats 7] [--json results_ab_structure_cpu.json]

A library change can only be compared across processes (one process imports
one purenet), so each round starts one process per tree, alternating which
goes first; each process compiles every case once, then times `repeats`
interleaved repeats of `steps` calls per case and reports their medians. The
result per case is the median over rounds of new / old: a ratio taken within
a round, where both trees ran back to back on the same machine.

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
import json, statistics, sys, time
import jax, jax.numpy as jnp
import purenet as pn
pn.xla_flags.configure()
from benchmarks import dp

repeats, steps = int(sys.argv[1]), int(sys.argv[2])
cases = {}
for name, case, batch in (("mlp", dp.mlp_case, 256), ("lenet", dp.cnn_case, 256), ("gpt", dp.gpt_case, 12)):
    fns, carry = dp.purenet_steps(case, batch)
    for kind in ("plain", "dp"):
        cases[f"{name} {kind} step"] = (fns[kind][0], carry, True)
    net, x, y = case(batch)
    params, state = pn.init(net, jax.random.key(0), in_shape=x.shape[1:])
    if name != "gpt":
        for stat in ("fisher_diagonal", "gradient_gram", "kfac_factors"):
            def fn(p, stat=stat, net=net, state=state, x=x, y=y):
                if stat == "gradient_gram":
                    return pn.stats.gradient_gram(net, p, state, (x, y), (x[:64], y[:64]))
                return getattr(pn.stats, stat)(net, p, state, x, y)
            cases[f"{name} {stat}"] = (jax.jit(fn), params, False)
lstm = pn.Sequential([pn.LSTM(128), pn.Flatten(), pn.Dense(10), pn.Softmax()])
xl = jax.random.normal(jax.random.key(1), (64, 32, 32))
lp, ls = pn.init(lstm, jax.random.key(0), in_shape=(32, 32))
cases["lstm per-example norms"] = (jax.jit(lambda p: pn.per_example_grad_norms(lstm, p, ls, xl, jnp.arange(64) % 10)),
                                   lp, False)
times = {k: [] for k in cases}
for k, (fn, arg, is_step) in cases.items():
    jax.block_until_ready(fn(arg, jax.random.key(0)) if is_step else fn(arg))
for _ in range(repeats):
    for k, (fn, arg, is_step) in cases.items():
        start = time.perf_counter()
        out = arg
        for i in range(steps):
            out = fn(out, jax.random.key(i)) if is_step else fn(arg)
        jax.block_until_ready(out)
        times[k].append((time.perf_counter() - start) / steps * 1e3)
print("RESULT " + json.dumps({k: statistics.median(v) for k, v in times.items()}))
'''


def run_tree(tree: str, repeats: int, steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
    done = subprocess.run([sys.executable, "-c", CHILD, str(repeats), str(steps)], env=env, cwd=tree,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the run on {tree} failed:\n{done.stderr[-3000:]}")
    out = done.stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rounds = []
    for r in range(args.rounds):
        order = [("old", args.old), ("new", args.new)]
        if r % 2:
            order.reverse()
        result = {who: run_tree(tree, args.repeats, args.steps) for who, tree in order}
        rounds.append(result)
        print(f"round {r + 1}: " + ", ".join(f"{k} {result['new'][k] / result['old'][k]:.3f}" for k in result["old"]),
              flush=True)
    summary = {k: {"old_ms": statistics.median(r["old"][k] for r in rounds),
                   "new_ms": statistics.median(r["new"][k] for r in rounds),
                   "new_over_old": statistics.median(r["new"][k] / r["old"][k] for r in rounds)}
               for k in rounds[0]["old"]}
    print(f"{'case':32s} {'old ms':>9s} {'new ms':>9s} {'new/old':>8s}")
    for k, v in summary.items():
        print(f"{k:32s} {v['old_ms']:9.2f} {v['new_ms']:9.2f} {v['new_over_old']:8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"when": time.strftime("%Y-%m-%d"), "rounds": rounds, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
