"""Benchmark runner: `python -m benchmarks [--smoke] [--gpu] [--repeats 7] [--json results.json]`.

Every comparison runs in this one process, interleaved repeat by repeat, so
a noisy machine slows all contenders alike; the reported numbers are medians
(with min-max) of per-step times after warm-up, compile time separately, and
ratios taken within the same run. --smoke runs every case tiny and once: it
checks that each runs, not how fast. --gpu adds a 4096-wide network at batch
4096 and runs every train step in float32 and bfloat16, each against the
device's own matmul peak in that dtype.
"""
import argparse
import importlib.util
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import purenet as pn
from benchmarks import steps as S
from benchmarks import to97

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation

SIZES = {"digits": [64, 128, 128, 10], "mnist": [784, 1024, 1024, 10], "wide": [4096, 4096, 4096, 10]}
CASES = [("digits", 64), ("mnist", 128), ("mnist", 1024)]
GPU_CASES = [("digits", 64), ("mnist", 1024), ("wide", 4096)]
SMOKE_SIZES, SMOKE_BATCH = [8, 16, 16, 4], 8


def clock(fn, n):
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def summary(times):
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


# ---------------------------------------------------------------- train steps


def train_steps(sizes, batch, repeats, n, names, dtype="float32"):
    built, compile_s = {}, {}
    for name in names:
        try:
            step, state, data = S.STEPS[name](sizes, batch, dtype=dtype)
            start = time.perf_counter()
            state = S.sync(step(state, data))
            compile_s[name] = time.perf_counter() - start
            built[name] = [step, state, data]
        except Exception as e:  # a missing peer or an offline torch.compile
            print(f"  {name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
    times, counts = {name: [] for name in built}, {}
    for name, entry in built.items():  # steps per timed block: ~0.3 s of work, at most n
        start = time.perf_counter()
        entry[1] = S.sync(entry[0](entry[1], entry[2]))
        counts[name] = int(min(n, max(2, 0.3 / (time.perf_counter() - start))))
    for _ in range(repeats):
        for name, entry in built.items():
            step, state, data = entry

            def run():
                entry[1] = step(entry[1], data)

            run()
            S.sync(entry[1])
            start = time.perf_counter()
            for _ in range(counts[name]):
                run()
            S.sync(entry[1])
            times[name].append((time.perf_counter() - start) / counts[name])
    flops = S.flops_per_step(sizes, batch)
    base = times.get("purenet")
    return {name: {**summary(t), "compile_s": compile_s[name], "gflops": flops / statistics.median(t) / 1e9,
                   # blocks of one repeat run back to back: their ratio cancels the machine's slow drifts
                   **({"paired_speedup": statistics.median(a / b for a, b in zip(t, base))} if base else {})}
            for name, t in times.items()}


def matmul_peak(n=2048, repeats=5, dtype="float32"):
    """The best GFLOP/s of an n x n matmul in JAX and in PyTorch (each framework's own ceiling)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, a).block_until_ready()
    jax_t = min(clock(lambda: f(a, a).block_until_ready(), 5) for _ in range(repeats))
    peaks = {"jax": 2 * n**3 / jax_t / 1e9}
    try:
        import torch

        torch.set_num_threads(os.cpu_count())
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.backends.cuda.matmul.allow_tf32 = device == "cuda"  # as in benchmarks.steps
        t = torch.ones(n, n, dtype=getattr(torch, dtype), device=device)
        sync = S.TorchSync().block_until_ready
        torch.mm(t, t)
        sync()
        peaks["torch"] = 2 * n**3 / min(clock(lambda: (torch.mm(t, t), sync()), 5) for _ in range(repeats)) / 1e9
    except ImportError:
        pass
    return peaks


# ---------------------------------------------------------------- scan vs loop, vmapped models


def epoch_scan_vs_loop(repeats, smoke):
    data = pn.datasets.digits()
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    sizes = SMOKE_SIZES[:1] + [16, 10] if smoke else SIZES["digits"]
    sizes = [64] + sizes[1:]
    net, opt = pn.mlp(sizes), pn.optim.adam(S.LR)
    params, state = pn.init(net, jax.random.key(0))
    ts = pn.TrainState(opt.init(params), state, jnp.zeros((), jnp.int32))
    batch = 64
    epoch = jax.jit(lambda ts: pn.train_epoch(net, opt, ts, x, y, jax.random.key(1), batch_size=batch))
    step_fn = jax.jit(lambda ts, xb, yb: pn.train_epoch(net, opt, ts, xb, yb, jax.random.key(1), batch_size=batch))
    order = np.asarray(jax.random.permutation(jax.random.key(2), len(x)))[: len(x) // batch * batch]
    batches = [(x[i], y[i]) for i in order.reshape(-1, batch)]

    def loop():
        t = ts
        for xb, yb in batches:
            t, _ = step_fn(t, xb, yb)
        return jax.block_until_ready(t)

    contenders = {"scan": lambda: jax.block_until_ready(epoch(ts)), "python loop of jitted steps": loop}
    try:  # the same epoch as flax users write it: a Python loop of nnx.jit steps
        flax_step, flax_state, _ = S.flax_nnx_step(sizes, batch)

        def flax_loop():
            for xb, yb in batches:
                flax_step(flax_state, (xb, yb))
            return S.sync(flax_state)

        contenders["flax nnx.jit loop"] = flax_loop
    except ImportError:
        pass
    times = {name: [] for name in contenders}
    for fn in contenders.values():
        fn()
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(clock(fn, 3))
    return {**{name: summary(t) for name, t in times.items()}, "steps_per_epoch": len(batches)}


def vmapped_models(repeats, smoke, models=32):
    data = pn.datasets.digits()
    xy = (jnp.asarray(data.x_train), jnp.asarray(data.y_train))
    net = pn.mlp([64, 16, 10] if smoke else SIZES["digits"])
    models = 2 if smoke else models

    def run(seed):
        ts, _, _ = pn.train(net, pn.optim.adam(S.LR), xy, key=jax.random.key(seed), epochs=1, batch_size=64)
        return ts.opt_state.params

    many = jax.jit(jax.vmap(run))
    one = jax.jit(run)
    seeds = jnp.arange(models)
    jax.block_until_ready(many(seeds))
    jax.block_until_ready(one(0))
    vm, seq = [], []
    for _ in range(repeats):
        vm.append(clock(lambda: jax.block_until_ready(many(seeds)), 1))
        seq.append(clock(lambda: [jax.block_until_ready(one(s)) for s in range(models)], 1))
    return {"models": models, "vmapped": summary(vm), "sequential": summary(seq)}


# ---------------------------------------------------------------- time to 97% on digits


def time_to_accuracy(target, max_epochs):
    """Training time and compile time to `target` digits test accuracy, in this process."""
    out = {"purenet": to97.purenet_run(target, max_epochs)}
    try:
        out["pytorch eager"] = to97.torch_run(target, max_epochs)
    except ImportError:
        pass
    return out


def whole_run_wall(target, max_epochs, repeats):
    """Wall time of whole processes (python -m benchmarks.to97 ...): imports, data, compile, training.

    purenet without a cache, purenet's second run with pn.enable_compilation_cache
    (a first run fills a fresh cache), and PyTorch eager; medians over repeats,
    with the compile and training times each process reports of itself.
    """
    # this process already holds JAX's preallocated share of a GPU: children take memory as they need it
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}

    def run(*args):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "benchmarks.to97", *args, "--target", str(target),
                              "--max-epochs", str(max_epochs)], check=True, capture_output=True, text=True, env=env)
        return {"wall_s": time.perf_counter() - start, **json.loads(out.stdout.strip().splitlines()[-1])}

    modes = {"purenet, no cache": ["purenet"], "purenet, second run with cache": ["purenet", "--cache"],
             "pytorch eager": ["pytorch"]}
    if importlib.util.find_spec("torch") is None:
        del modes["pytorch eager"]
    runs = {name: [] for name in modes}
    with tempfile.TemporaryDirectory() as cache:
        run("purenet", "--cache", cache)
        for _ in range(repeats):
            for name, args in modes.items():
                runs[name].append(run(*args, cache) if "--cache" in args else run(*args))
    return {name: {**summary([r["wall_s"] for r in rs]),
                   **{f"median_{k}": statistics.median(r[k] for r in rs) for k in ("compile_s", "train_s", "setup_s")
                      if k in rs[0]}}
            for name, rs in runs.items()}


# ---------------------------------------------------------------- per-example gradient norms


def per_example_norms(repeats, smoke):
    sizes, batch = ([16, 32, 32, 4], 16) if smoke else (SIZES["mnist"], 1024)
    net = pn.mlp(sizes)
    params, state = pn.init(net, jax.random.key(0))
    x, y = (jnp.asarray(a) for a in S._data(sizes, batch))
    return S.per_example_norms_against_vmap(net, params, state, x, y, min(repeats, 3))


# ---------------------------------------------------------------- report


def table(rows, header):
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="every case tiny and once (CI)")
    parser.add_argument("--gpu", action="store_true", help="add the 4096-wide case; float32 and bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50, help="train steps timed per repeat")
    parser.add_argument("--frameworks", nargs="*", default=list(S.STEPS))
    parser.add_argument("--json", default="benchmark_results.json")
    parser.add_argument("--steps-only", action="store_true", help="only the train-step cases (an A/B run)")
    args = parser.parse_args()
    repeats, n = (1, 2) if args.smoke else (args.repeats, args.steps)
    if args.smoke:  # torch.compile alone takes ~40 s to compile: not for a smoke run
        args.frameworks = [f for f in args.frameworks if f != "torch.compile"]
    dtypes = ["float32", "bfloat16"] if args.gpu else ["float32"]
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "devices": [str(d) for d in jax.devices()], "jax": jax.__version__},
               "command": " ".join(["python -m benchmarks", *sys.argv[1:]]), "matmul_peak_gflops": {}, "train_step": {}}

    # the ceiling: each framework's best matmul throughput, measured before and after every case
    # (a noisy moment can slow one measurement; the best of all of them is the machine's peak)
    peak_n = 256 if args.smoke else 8192 if args.gpu else 2048
    seen = {dtype: [] for dtype in dtypes}

    def measure_peaks():
        for dtype in dtypes:
            seen[dtype].append(matmul_peak(peak_n, 1 if args.smoke else 5, dtype))

    measure_peaks()
    cases = [("smoke", SMOKE_BATCH)] if args.smoke else GPU_CASES if args.gpu else CASES
    for (size_name, batch), dtype in itertools.product(cases, dtypes):
        sizes = SMOKE_SIZES if args.smoke else SIZES[size_name]
        key = f"{'-'.join(map(str, sizes))} @ batch {batch}" + ("" if dtype == "float32" else f" {dtype}")
        print(f"train step {key}", flush=True)
        results["train_step"][key] = train_steps(sizes, batch, repeats, n, args.frameworks, dtype)
        measure_peaks()
    for dtype, runs in seen.items():
        peaks = {fw: max(run[fw] for run in runs) for fw in runs[0]}
        results["matmul_peak_gflops"][dtype] = {**peaks, "measurements": runs}
        print(f"{dtype} matmul peak ({peak_n}^2, best of {len(runs)} measurements): "
              + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()))
    for key, res in results["train_step"].items():
        dtype = "bfloat16" if key.endswith("bfloat16") else "float32"
        peaks = results["matmul_peak_gflops"][dtype]
        base = res.get("purenet", {}).get("median_s")
        for name, r in res.items():  # each framework against its own matmul peak
            r["fraction_of_own_peak"] = r["gflops"] / peaks["torch" if "torch" in name else "jax"]
        rows = [[name, f"{r['median_s'] * 1e6:.0f}", f"{r['min_s'] * 1e6:.0f}-{r['max_s'] * 1e6:.0f}",
                 f"{r['compile_s']:.2f}", f"{r['median_s'] / base:.2f}x" if base else "-",
                 f"{r['paired_speedup']:.2f}x" if "paired_speedup" in r else "-",
                 f"{r['gflops']:.1f} ({100 * r['fraction_of_own_peak']:.0f}%)"] for name, r in res.items()]
        print(f"train step {key}")
        print(table(rows, ["framework", "median us", "min-max us", "compile s", "purenet speedup",
                           "paired", f"GFLOP/s (% of own {dtype} matmul peak)"]))
    save(results, args.json)  # after every section: a run cut short keeps what it measured
    if args.steps_only:
        return
    target, max_epochs = (1.01, 1) if args.smoke else (0.97, 60)  # smoke: exactly one epoch
    sections = [
        ("epoch_scan_vs_loop", lambda: epoch_scan_vs_loop(repeats, args.smoke), report_epoch),
        ("vmapped_models", lambda: vmapped_models(repeats, args.smoke), report_vmapped),
        ("time_to_97", lambda: time_to_accuracy(target, max_epochs), report_time_to(target)),
        ("whole_run_wall", lambda: whole_run_wall(target, max_epochs, repeats), report_whole_run(target)),
        ("per_example_norms", lambda: per_example_norms(repeats, args.smoke), report_per_example),
    ]
    for name, run, report in sections:
        results[name] = run()
        report(results[name])
        save(results, args.json)


def report_epoch(r):
    scan = r["scan"]["median_s"]
    print(f"epoch ({r['steps_per_epoch']} steps): " + ", ".join(
        f"{name} {v['median_s'] * 1e3:.1f} ms ({v['median_s'] / scan:.2f}x the scan)"
        for name, v in r.items() if name != "steps_per_epoch"))


def report_vmapped(r):
    print(f"{r['models']} models, 1 epoch: vmapped {r['vmapped']['median_s']:.2f} s, sequential "
          f"{r['sequential']['median_s']:.2f} s ({r['sequential']['median_s'] / r['vmapped']['median_s']:.2f}x)")


def report_time_to(target):
    def report(r):
        for name, v in r.items():
            print(f"digits to {target:.0%}: {name}: {v['train_s']:.2f} s training"
                  + (f" + {v['compile_s']:.2f} s compile" if "compile_s" in v else "")
                  + f", {v['epochs']} epochs, accuracy {v['accuracy']:.4f}")

    return report


def report_whole_run(target):
    def report(r):
        for name, v in r.items():
            print(f"digits to {target:.0%}, whole process: {name}: {v['median_s']:.2f} s "
                  f"({v['min_s']:.2f}-{v['max_s']:.2f})"
                  + (f", of which compile {v['median_compile_s']:.2f} s" if "median_compile_s" in v else ""))

    return report


def report_per_example(r):
    for name, v in r.items():
        print(f"per-example grad norms: {name}: {v['median_s'] * 1e3:.1f} ms, temp {v['temp_MiB']:.1f} MiB")


def save(results, path):
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
