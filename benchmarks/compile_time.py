"""Compile time per program of the examples (issue 48, item 3).

    python -m benchmarks.compile_time [EXAMPLE ...] [--fast] [--top 5] [--json benchmarks/results_compile_cpu.json]

Each example runs as a user runs it (or with PURENET_FAST=1 under --fast),
in its own fresh process, with a listener on JAX's monitoring events
(`jax.monitoring.register_event_duration_secs_listener`):

- "/jax/core/compile/backend_compile_duration": XLA compiling one program
  (`fun_name`: the jitted function's name);
- "/jax/core/compile/jaxpr_trace_duration" and
  "/jax/core/compile/jaxpr_to_mlir_module_duration": tracing the Python
  function and lowering it, before XLA sees it.

Per example it reports the whole process's wall time, how many programs XLA
compiled, their total compile time, tracing plus lowering, and the
programs that took longest (name, count, seconds). The persistent
compilation cache is off (each process compiles what it runs), unless
--cache DIR names one, which measures the second run of a user who asked
for it (`pn.enable_compilation_cache`).

Without arguments it runs the examples that train on data this machine has
(the shared MNIST, digits, tiny Shakespeare).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ("train_digits", "mnist_mlp", "mnist_cnn", "mnist_autoencoder", "shakespeare_gpt", "shakespeare_lstm")
EVENTS = {
    "/jax/core/compile/backend_compile_duration": "compile",
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
}

# Runs in the example's process: record every event, run the example as __main__, write the events out.
_BOOT = """
import json, runpy, sys, time
import jax
events = []
names = {events_map!r}
def listen(event, seconds, **kw):
    if event in names:
        events.append((names[event], kw.get("fun_name", "?"), seconds))
jax.monitoring.register_event_duration_secs_listener(listen)
sys.argv = [{script!r}]
sys.path[:0] = [{folder!r}, {root!r}]  # the example's folder, and this tree's purenet
try:
    runpy.run_path({script!r}, run_name="__main__")
finally:
    with open({out!r}, "w") as f:
        json.dump(events, f)
"""


def measure(example: str, fast: bool, cache: str | None) -> dict:
    """One example in a fresh process: wall time and the compile events, summarised."""
    script = ROOT / "examples" / f"{example}.py"
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "events.json")
        boot = _BOOT.format(events_map=EVENTS, script=str(script), folder=str(script.parent), root=str(ROOT), out=out)
        env = dict(os.environ, MPLBACKEND="Agg")
        env.pop("PURENET_FAST", None)
        if fast:
            env["PURENET_FAST"] = "1"
        if cache:
            env["PURENET_COMPILE_CACHE"] = cache
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", boot], cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{example} failed:\n{proc.stderr[-2000:]}")
        events = json.load(open(out))
    programs: dict = {}
    for kind, name, seconds in events:
        if kind == "compile":
            n, s = programs.get(name, (0, 0.0))
            programs[name] = (n + 1, s + seconds)
    return {
        "wall_s": wall,
        "programs": sum(n for n, _ in programs.values()),
        "compile_s": sum(s for kind, _, s in events if kind == "compile"),
        "trace_and_lower_s": sum(s for kind, _, s in events if kind != "compile"),
        "by_program": sorted(([name, n, s] for name, (n, s) in programs.items()), key=lambda r: -r[2]),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("examples", nargs="*", default=list(DEFAULT))
    ap.add_argument("--fast", action="store_true", help="PURENET_FAST=1: the examples' small mode")
    ap.add_argument("--cache", default=None, help="a persistent compilation cache folder (run twice to fill it)")
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    results = {}
    for example in args.examples:
        r = results[example] = measure(example, args.fast, args.cache)
        print(f"{example:22s} wall {r['wall_s']:6.1f} s   {r['programs']:3d} programs   compile {r['compile_s']:6.2f} s"
              f"   trace+lower {r['trace_and_lower_s']:5.2f} s", flush=True)
        for name, n, s in r["by_program"][:args.top]:
            print(f"    {s:6.2f} s  x{n:<3d} {name}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
