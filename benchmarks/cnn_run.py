"""Whole processes: examples/mnist_cnn.py and examples/mnist_autoencoder.py against their PyTorch eager twins.

    python -m benchmarks.cnn_run [--pairs 3] [--models lenet autoencoder] [--json FILE]
    python -m benchmarks.cnn_run --cache      # purenet's example with a warm persistent compilation cache
    python -m benchmarks.cnn_run --smoke      # one epoch each, one pair: checks that the four runs work

Each pair runs, for each model, purenet's example as a user runs it (its
figure written to a temporary folder) and benchmarks/torch_cnn.py's twin
(same data, model, optimizer, schedule, batch and epochs, the same
per-epoch validation and the same figure), and the twin's bare loop
(`--bare`: training and one held-out pass only, no per-epoch validation,
no figure: the twin before 2026-12-07, which did less work than the
example), in rotating order, each in a fresh process; a run's wall time is its process's, from
launch to exit: interpreter start, imports, data, compilation, training and
the held-out evaluation. purenet's runs also report their compilation time
on the main thread (JAX's compile events: tracing, lowering and XLA) and
`fit`'s own time (compile included), so the whole process splits into
start-up (imports, data), fit and the rest (evaluation, figure). Reported:
medians over pairs and the median of the paired ratios purenet / PyTorch,
against the twin and against the bare loop (below 1: purenet's process is
faster). With --cache, purenet's example runs with `--cache DIR` on a
cache that one untimed run of it filled first (a user's second run).
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {"lenet": ("mnist_cnn.py", 10), "autoencoder": ("mnist_autoencoder.py", 5)}
# runs the example with a listener on JAX's compile events, which it prints at exit
PROBE = """
import atexit, collections, runpy, sys, jax.monitoring as m
t = collections.Counter()
m.register_event_duration_secs_listener(lambda name, secs, **kw: t.__setitem__(name, t[name] + secs))
atexit.register(lambda: print("COMPILE " + repr(dict(t))))
sys.argv = sys.argv[1:]
sys.path.insert(0, sys.argv[0].rsplit("/", 1)[0])
runpy.run_path(sys.argv[0], run_name="__main__")
"""
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def run(cmd, env=None):
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
    return wall, out.stdout


def purenet_run(model, epochs, folder, smoke=False, cache=None):
    script, _ = EXAMPLES[model]
    env = dict(os.environ, PYTHONPATH=str(ROOT), **({"PURENET_FAST": "1"} if smoke else {}))  # fast: no target
    wall, out = run([sys.executable, "-c", PROBE, str(ROOT / "examples" / script), "--epochs", str(epochs),
                     "--out", str(Path(folder) / f"{model}.png"), *(["--cache", cache] if cache else [])], env)
    fit = float(re.search(r"epochs in ([\d.]+) s", out).group(1))
    events = eval(re.search(r"COMPILE (\{.*\})", out).group(1))  # our own repr of a dict of floats
    metric = re.search(r"(held-out accuracy: [\d.]+|MSE per pixel\): [\d.]+)", out).group(1)
    return dict(wall_s=wall, fit_s=fit, compile_s=sum(events.get(k, 0.0) for k in COMPILE_EVENTS),
                xla_compile_s=events.get(COMPILE_EVENTS[2], 0.0), result=metric)


def torch_run(model, epochs, folder, bare=False):
    wall, out = run([sys.executable, "-m", "benchmarks.torch_cnn", "--model", model, "--epochs", str(epochs),
                     *(["--bare"] if bare else ["--out", str(Path(folder) / f"{model}_torch.png")])])
    fit = float(re.search(r"epochs in ([\d.]+) s", out).group(1))
    metric = re.search(r"(held-out accuracy: [\d.]+|MSE per pixel\): [\d.]+)", out).group(1)
    return dict(wall_s=wall, fit_s=fit, result=metric)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(EXAMPLES), choices=list(EXAMPLES))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--cache", action="store_true", help="purenet with a warm persistent compilation cache")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    pairs = 1 if args.smoke else args.pairs
    contenders = ("purenet", "pytorch", "pytorch bare")
    runs: dict = {m: {who: [] for who in contenders} for m in args.models}
    with tempfile.TemporaryDirectory() as folder:
        cache = str(Path(folder) / "xla") if args.cache else None
        if cache:
            for model in args.models:  # fills the cache, untimed
                purenet_run(model, 1 if args.smoke else EXAMPLES[model][1], folder, args.smoke, cache)
        for p in range(pairs):
            for model in args.models:
                epochs = 1 if args.smoke else EXAMPLES[model][1]
                for who in contenders[p % 3:] + contenders[:p % 3]:  # each contender first in turn
                    r = (purenet_run(model, epochs, folder, args.smoke, cache) if who == "purenet"
                         else torch_run(model, epochs, folder, bare=who == "pytorch bare"))
                    runs[model][who].append(r)
                    print(f"pair {p}: {model} {who}: {r}", flush=True)
    summary = {}
    for model, rs in runs.items():
        med = {who: {k: statistics.median(r[k] for r in v) for k in v[0] if k != "result"} for who, v in rs.items()}
        ratios = {who: statistics.median(a["wall_s"] / b["wall_s"] for a, b in zip(rs["purenet"], rs[who]))
                  for who in contenders[1:]}
        summary[model] = dict(median=med, paired_ratio=ratios["pytorch"], paired_ratio_bare=ratios["pytorch bare"],
                              results={w: [r["result"] for r in v] for w, v in rs.items()})
        pm, tm, bm = med["purenet"], med["pytorch"], med["pytorch bare"]
        print(f"{model}: purenet {pm['wall_s']:.1f} s (fit {pm['fit_s']:.1f} s, compile on the main thread "
              f"{pm['compile_s']:.1f} s) against PyTorch eager {tm['wall_s']:.1f} s (training {tm['fit_s']:.1f} s): "
              f"paired ratio {ratios['pytorch']:.2f}; against the bare loop {bm['wall_s']:.1f} s (training "
              f"{bm['fit_s']:.1f} s): {ratios['pytorch bare']:.2f}")
    record = dict(benchmark="cnn_run", pairs=pairs, cache=args.cache, epochs={m: EXAMPLES[m][1] for m in args.models},
                  platform=platform.platform(), cpus=os.cpu_count(), load_before=os.getloadavg(),
                  summary=summary, runs=runs)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
