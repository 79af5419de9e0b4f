"""First-step latency: from a fresh process to the first finished train step (issue 48, item 3).

    python -m benchmarks.first_step [--rounds 3] [--batch 128] [--smoke] [--json benchmarks/results_first_step_cpu.json]

The LeNet of `examples/mnist_cnn.py` (the twins of `benchmarks.cnn`: purenet,
flax nnx, equinox and PyTorch eager, the same layers and Adam), batch 128,
float32. Each contender runs in its own fresh process, rounds interleaved;
the process reports, from its first line:

- import: importing the framework (and purenet's flags);
- build: the model, its parameters and the optimizer's state;
- first step: the first train step, finished (JAX: tracing, XLA's compile
  and the run; PyTorch: its first-call allocations and the run);
- second step: one more step, for scale;

and the whole process's wall time as the parent sees it (interpreter start
and exit included). Medians (min-max) over rounds.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTENDERS = ("purenet", "flax nnx", "equinox", "PyTorch eager")

_CHILD = """
import time
t0 = time.perf_counter()
import json, sys
sys.path.insert(0, {root!r})
name, batch = {name!r}, {batch}
if name == "PyTorch eager":  # the twin of benchmarks.cnn's, without importing JAX
    import numpy as np
    import torch
    from torch import nn
    t1 = time.perf_counter()
    torch.set_num_threads(__import__("os").cpu_count())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 5, padding=2),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(7 * 7 * 32, 128), nn.ReLU(),
                          nn.Linear(128, 10))
    opt, loss_fn = torch.optim.Adam(model.parameters(), lr=1e-3), nn.CrossEntropyLoss()
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((batch, 1, 28, 28)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 10, batch))

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    t2 = time.perf_counter()
    step()
    t3 = time.perf_counter()
    step()
    t4 = time.perf_counter()
else:
    import jax
    from benchmarks import cnn
    t1 = time.perf_counter()
    if name == "purenet":
        step, carry, data = cnn.purenet_step(cnn.lenet(), batch, cnn.handwritten)
    elif name == "flax nnx":
        step, carry, data = cnn.flax_lenet(batch, **cnn.LENET)
    else:
        step, carry, data = cnn.equinox_lenet(batch, **cnn.LENET)
    sync = cnn.S.sync
    sync(carry)
    t2 = time.perf_counter()
    carry = sync(step(carry, data))
    t3 = time.perf_counter()
    carry = sync(step(carry, data))
    t4 = time.perf_counter()
print(json.dumps(dict(import_s=t1 - t0, build_s=t2 - t1, first_step_s=t3 - t2, second_step_s=t4 - t3)))
"""


def one(name: str, batch: int) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _CHILD.format(root=str(ROOT), name=name, batch=batch)],
                         capture_output=True, text=True, env=dict(os.environ), cwd=str(ROOT))
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"{name}: {out.stderr[-2000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["process_s"] = wall
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--smoke", action="store_true", help="one round, batch 8")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rounds, batch = (1, 8) if args.smoke else (args.rounds, args.batch)
    import importlib.util
    present = [c for c, module in zip(CONTENDERS, ("jax", "flax", "equinox", "torch"))
               if importlib.util.find_spec(module) is not None]
    runs: dict = {c: [] for c in present}
    for _ in range(rounds):  # interleaved: a noisy machine slows every contender alike
        for c in present:
            runs[c].append(one(c, batch))
    results = {"batch": batch, "rounds": rounds, "contenders": {}}
    for c, rows in runs.items():
        summary = {k: {"median": statistics.median(r[k] for r in rows), "min": min(r[k] for r in rows),
                       "max": max(r[k] for r in rows)} for k in rows[0]}
        results["contenders"][c] = summary
        print(f"{c:14s} " + "  ".join(f"{k[:-2]} {v['median']:6.2f} s ({v['min']:.2f}-{v['max']:.2f})"
                                      for k, v in summary.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
