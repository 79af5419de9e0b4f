"""The whole GPT training run: purenet's example against a PyTorch eager run, each in a fresh process, interleaved.

    python -m benchmarks.gpt_run [--pairs 3] [--iters 2000] [--torch-threads N] [--cache] [--json FILE]
    python -m benchmarks.gpt_run --smoke     # a tiny model for a few iterations: checks that both runs work

Both runs train nanoGPT's shakespeare_char CPU configuration (4 layers, 4
heads, 128 features, context 64, batch 12, tied embeddings, exact GELU, no
dropout; AdamW with beta2 0.99 and weight decay 0.1 on matrices, learning
rate warmed up over 100 steps to 1e-3 and cosine-decayed to 1e-4, clipping
at 1.0) on tiny Shakespeare's first 90%, with one protocol, the example's:
every 250 iterations the train and validation losses are estimated on 25
random batches each, and at the end on 200 random batches each.

    purenet   examples/shakespeare_gpt.py as a user runs it (its lax.scan chunks
              of steps, each batch in two halves side by side), with its plot
              and sample switched off
    pytorch   the same model (as benchmarks/gpt.py's: F.scaled_dot_product_attention)
              in a nanoGPT-style eager loop: torch.optim.AdamW, the learning rate set
              each iteration, loss.item() every iteration (nanoGPT's log_interval 1)

Each pair runs both, in alternating order. A run's wall time is its
process's, from launch to exit, measured here: interpreter start, imports,
data, compilation, training, loss estimates. Each run also reports its
training-loop time (first step to last, the periodic estimates included)
and the final validation loss; purenet's run splits its time into
compilation on the main thread (JAX's compile events: tracing, lowering and
XLA, per program), steps and loss estimates, and reports apart the
compilation its background thread does beside the steps. Reported:
medians over pairs and the median of the paired ratios purenet / PyTorch
(below 1: purenet's run is faster).
With --cache purenet's runs use a persistent compilation cache that one
untimed run fills first: the cost of a second run of the example.
"""
import argparse
import collections
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import torch_gpt

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "shakespeare_gpt.py"
DATA = os.environ.get("PURENET_SHAKESPEARE", str(ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"))
RUN = dict(iters=2000, layers=4, heads=4, features=128, context=64, batch_size=12, eval_every=250,
           eval_batches=25, final_eval_batches=200, seed=1337)
SMOKE = dict(RUN, iters=4, layers=1, heads=2, features=16, context=16, batch_size=4, eval_every=2,
             eval_batches=2, final_eval_batches=2)
LR, MIN_LR, WARMUP, B2, WD, CLIP = 1e-3, 1e-4, 100, 0.99, 0.1, 1.0


# ---------------------------------------------------------------- purenet: the example itself


def purenet_run(c, data, cache=None):
    """examples/shakespeare_gpt.py in this process, with JAX's compile events summed per program.

    Compilation on the main thread holds the run up; the example's estimate
    program compiles on a background thread beside the steps, reported apart
    ("background") and subtracted from nothing.
    """
    import runpy
    import threading

    import jax

    compile_s, background_s = collections.defaultdict(float), collections.defaultdict(float)

    def listen(event, secs, fun_name=None, **_):
        if event.startswith("/jax/core/compile/"):  # tracing, lowering to MLIR, XLA ("jit(name)" there)
            name = fun_name or "?"
            name = name[4:-1] if name.startswith("jit(") else name
            main = threading.current_thread() is threading.main_thread()
            (compile_s if main else background_s)[name] += secs

    jax.monitoring.register_event_duration_secs_listener(listen)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in c.items()]
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "run.json")
        sys.argv = [str(EXAMPLE), "--data", data, *flags, "--out", "", "--sample", "0", "--json", report,
                    *(["--cache", cache] if cache else [])]
        sys.path.insert(0, str(EXAMPLE.parent))
        runpy.run_path(str(EXAMPLE), run_name="__main__")
        with open(report) as f:
            out = json.load(f)
    in_loop = {name: compile_s.get(name, 0.0) for name in ("run", "evaluate")}
    return {"train_s": out["train_s"], "val_loss": out["val_loss"], "train_loss": out["train_loss"],
            "compile_s": sum(compile_s.values()), "compile_by_program": dict(compile_s),
            "background_compile_s": sum(background_s.values()), "background_by_program": dict(background_s),
            "steps_s": out["steps_s"] - in_loop["run"],
            "eval_s": out["eval_s"] + out["final_eval_s"] - in_loop["evaluate"]}


# ---------------------------------------------------------------- PyTorch eager, nanoGPT style


def _datasets_without_jax():
    """purenet/data/datasets.py (numpy only) loaded on its own: the same split and vocabulary, no JAX import."""
    spec = importlib.util.spec_from_file_location("purenet_datasets", ROOT / "purenet" / "data" / "datasets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def learning_rate(it, iters):
    """pn.schedules.warmup_cosine_decay(0, LR, min(WARMUP, iters // 2), iters, end_value=MIN_LR) at step it."""
    import math

    warmup = min(WARMUP, iters // 2)
    if it < warmup:
        return LR * it / warmup
    t = min(it - warmup, iters - warmup) / max(iters - warmup, 1)
    return MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * t))


def torch_run(c, data, threads=None):
    """The same model, optimizer, schedule and loss estimates in PyTorch eager; returns the run's times and losses."""
    import numpy as np
    import torch
    from torch.nn import functional as F

    if threads:
        torch.set_num_threads(threads)
    text = _datasets_without_jax().text(data)
    train_ids, val_ids = (torch.from_numpy(np.asarray(a, np.int64)) for a in (text.train, text.val))
    torch.manual_seed(c["seed"])
    d, h, t, b, layers = c["features"], c["heads"], c["context"], c["batch_size"], c["layers"]

    model = torch_gpt.gpt(text.vocab_size, t, layers, h, d, gpt2_init=True)

    def loss_of(x, y):
        logits = model(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))

    def batch(ids):
        starts = torch.randint(len(ids) - t, (b,))
        idx = starts[:, None] + torch.arange(t)
        return ids[idx], ids[idx + 1]

    @torch.no_grad()
    def estimate(ids, n):
        model.eval()
        loss = sum(loss_of(*batch(ids)).item() for _ in range(n)) / n
        model.train()
        return loss

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, B2), eps=1e-8)
    iters, every = c["iters"], c["eval_every"]
    curve, eval_s = [], 0.0  # curve: the per-iteration losses, as the example keeps them
    start = time.perf_counter()
    for it in range(iters):
        for group in opt.param_groups:
            group["lr"] = learning_rate(it, iters)
        loss = loss_of(*batch(train_ids))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        curve.append(loss.item())
        if (it + 1) % every == 0 or it + 1 == iters:
            eval_start = time.perf_counter()
            estimate(train_ids, c["eval_batches"])
            estimate(val_ids, c["eval_batches"])
            eval_s += time.perf_counter() - eval_start
    train_s = time.perf_counter() - start
    final_start = time.perf_counter()
    val_loss, train_loss = estimate(val_ids, c["final_eval_batches"]), estimate(train_ids, c["final_eval_batches"])
    final_eval_s = time.perf_counter() - final_start
    return {"train_s": train_s, "val_loss": val_loss, "train_loss": train_loss, "steps_s": train_s - eval_s,
            "eval_s": eval_s + final_eval_s}


# ---------------------------------------------------------------- the runner


def run_child(kind, c, data, threads=None, cache=None):
    """One whole run in a fresh process; its record, with the process's wall time from launch to exit."""
    cmd = [sys.executable, "-m", "benchmarks.gpt_run", "--child", kind, "--config", json.dumps(c), "--data", data]
    if threads:
        cmd += ["--torch-threads", str(threads)]
    if cache and kind == "purenet":
        cmd += ["--cache-dir", cache]
    env = {k: v for k, v in os.environ.items() if k != "PURENET_FAST"}
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(f"the {kind} run failed:\n{out.stderr[-3000:]}")
    return {"wall_s": wall, **json.loads(out.stdout.strip().splitlines()[-1])}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--iters", type=int, default=RUN["iters"])
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch.set_num_threads in the PyTorch run (default: torch's own)")
    parser.add_argument("--cache", action="store_true", help="purenet with a warm persistent compilation cache")
    parser.add_argument("--smoke", action="store_true", help="a tiny model for 4 iterations, one pair")
    parser.add_argument("--json")
    parser.add_argument("--child", choices=("purenet", "pytorch"), help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        c = json.loads(args.config)
        out = (purenet_run(c, args.data, args.cache_dir) if args.child == "purenet"
               else torch_run(c, args.data, args.torch_threads))
        print(json.dumps(out))
        return out
    if not os.path.exists(args.data):
        raise SystemExit(f"no corpus at {args.data}: pass --data FILE (tiny Shakespeare's input.txt)")
    c = SMOKE if args.smoke else dict(RUN, iters=args.iters)
    pairs = 1 if args.smoke else args.pairs
    kinds = ["purenet", "pytorch"]
    if importlib.util.find_spec("torch") is None:
        print("torch is not installed: purenet's run only")
        kinds = ["purenet"]
    runs = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as cache:
        cache = cache if args.cache else None
        if cache:
            run_child("purenet", c, args.data, cache=cache)  # fills the cache, untimed
        for i in range(pairs):
            for kind in kinds if i % 2 == 0 else kinds[::-1]:
                r = run_child(kind, c, args.data, args.torch_threads, cache)
                runs[kind].append(r)
                print(f"pair {i + 1} {kind:8s} wall {r['wall_s']:7.1f} s  loop {r['train_s']:7.1f} s  "
                      f"val loss {r['val_loss']:.4f}", flush=True)
    summary = {}
    for kind, rs in runs.items():
        summary[kind] = {f"median_{k}": statistics.median(r[k] for r in rs)
                         for k in ("wall_s", "train_s", "steps_s", "eval_s", "compile_s", "background_compile_s",
                                   "val_loss") if k in rs[0]}
    if len(kinds) == 2:
        for k in ("wall_s", "train_s"):
            summary[f"paired_{k}_purenet_over_pytorch"] = statistics.median(
                p[k] / t[k] for p, t in zip(runs["purenet"], runs["pytorch"]))
    print(f"\nGPT whole run, {c}, {pairs} pairs{', purenet with a warm compilation cache' if args.cache else ''}; "
          f"machine: {platform.machine()}, {os.cpu_count()} cores")
    print(f"{'run':<8} {'wall s':>8} {'loop s':>8} {'compile s':>9} {'steps s':>8} {'eval s':>7} {'val loss':>8}")
    for kind, s in summary.items():
        if kind in runs:
            compile_s = f"{s['median_compile_s']:9.1f}" if "median_compile_s" in s else f"{'':9}"
            print(f"{kind:<8} {s['median_wall_s']:8.1f} {s['median_train_s']:8.1f} {compile_s} "
                  f"{s['median_steps_s']:8.1f} {s['median_eval_s']:7.1f} {s['median_val_loss']:8.4f}")
    for k, name in (("wall_s", "wall"), ("train_s", "loop")):
        if f"paired_{k}_purenet_over_pytorch" in summary:
            print(f"paired {name} time, purenet / pytorch: {summary[f'paired_{k}_purenet_over_pytorch']:.3f}")
    s = summary["purenet"]
    parts = {"compile": s["median_compile_s"], "steps": s["median_steps_s"], "loss estimates": s["median_eval_s"]}
    parts["the rest (start, imports, data, init, exit)"] = s["median_wall_s"] - sum(parts.values())
    print("purenet's wall time: " + ", ".join(f"{k} {100 * v / s['median_wall_s']:.0f}%" for k, v in parts.items()))
    by_program = collections.defaultdict(list)
    for r in runs["purenet"]:
        for name in ("run", "evaluate"):
            by_program[name].append(r["compile_by_program"].get(name, 0.0))
        by_program["others (eager ops, setup, ...)"].append(r["compile_s"] - by_program["run"][-1]
                                                            - by_program["evaluate"][-1])
        by_program["on a background thread, beside the steps"].append(r["background_compile_s"])
    print("purenet's compilation: " + ", ".join(f"{k} {statistics.median(v):.1f} s" for k, v in by_program.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": c, "pairs": pairs, "torch_threads": args.torch_threads, "cache": args.cache,
                       "runs": runs, "summary": summary}, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
