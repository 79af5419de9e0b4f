"""Influence functions at scale: pn.influence against kronfluence 1.0.1 and TracIn (issue 46, item 2).

    python -m benchmarks.influence [--data ../shared/data/mnist] [--train 10000] [--queries 100]
        [--repeats 3] [--smoke] [--json benchmarks/results_influence_cpu.json]

The MNIST CNN of `examples/mnist_cnn.py` (conv 5x5 16, relu, max pool 2,
conv 5x5 32, relu, max pool 2, dense 128, relu, dense 10; 215,370
parameters), float32, random-initialised (pn.init, key
0: the cost does not depend on the weights). Its convolutions pad "SAME",
which for a 5x5 kernel at stride 1 is 2 on every side, so the PyTorch twin
(the same weights) uses Conv2d(padding=2): the same network. Training
data: the first `--train` images of the shared MNIST test set (10,000 by
default: all of it); queries: the first `--queries` (100) of them.

Contenders, every one in its own fresh process (so its peak resident
memory, `getrusage(RUSAGE_SELF).ru_maxrss` at its end, is its own and
compares across JAX and PyTorch), interleaved repeat by repeat:

- purenet EK-FAC: `pn.influence.fit(method="ekfac")` then `pn.influence.scores`
  (queries x training), kronfluence's heuristic damping.
- kronfluence EK-FAC: `Analyzer.fit_all_factors` (strategy "ekfac",
  `use_empirical_fisher=True`, float32 factors and scores as its defaults,
  eigendecomposition in float64 as its default) then
  `Analyzer.compute_pairwise_scores` (damping_factor=None: its heuristic),
  PyTorch on the CPU with `torch.set_num_threads` = the cores JAX uses.
- purenet identity (plain gradient dot products; "fit" reads no data): the
  TracIn comparison, as TracIn at one checkpoint is this dot product times
  the learning rate (K checkpoints: K such passes).

Each process first warms up on one batch of the training set (purenet:
compiles every program the timed run uses; PyTorch: first-call
allocations), reported as "warm-up"; then times the fit and the scores on
the whole set. Timings are medians (min-max) over repeats. The scores of
purenet's and kronfluence's EK-FAC are compared (correlation, max
difference relative to the largest score): both float32, so they agree to
float32's accumulated rounding, not to the last bit (tests/test_influence.py
checks them to float64 rounding).

--smoke: 256 training x 8 query examples, one repeat (seconds per process;
random images where the shared MNIST is absent).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
CONTENDERS = ("purenet ekfac", "kronfluence ekfac", "purenet identity")


# ---------------------------------------------------------------- one contender, in its own process


def _rss_mib(field="VmRSS"):
    """The process's resident memory now (VmRSS) or its peak so far (VmHWM), MiB, from /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _data(folder, n_train, n_queries, smoke):
    """(x, y) training and (xq, yq) queries: the first n_train MNIST test images, the first n_queries of them."""
    import purenet as pn

    try:
        x, y = pn.datasets.mnist(folder, part="test", shape="image")
        source = f"MNIST test set from {folder}"
    except FileNotFoundError:
        if not smoke:
            raise SystemExit(f"no MNIST IDX files in {folder}: pass --data FOLDER (or set PURENET_MNIST)")
        rs = np.random.RandomState(0)
        x, y = rs.rand(n_train, 28, 28, 1).astype(np.float32), rs.randint(0, 10, n_train)
        source = "random images (no MNIST found)"
    x, y = np.asarray(x[:n_train], np.float32), np.asarray(y[:n_train]).astype(np.int64)
    return (x, y), (x[:n_queries], y[:n_queries]), source


def _net_and_params():
    import jax
    import jax.numpy as jnp

    import purenet as pn
    from benchmarks.dp import lenet  # the examples/mnist_cnn.py network

    net = lenet()
    params, state = pn.init(net, jax.random.key(0), (28, 28, 1), dtype=jnp.float32)
    return net, params, state


def _purenet(method, train, queries, batch_size):
    import jax

    import purenet as pn

    pn.xla_flags.configure()
    net, params, state = _net_and_params()
    start = time.perf_counter()  # warm-up: one batch compiles every program of the timed run (fixed shapes)
    head = (train[0][:batch_size], train[1][:batch_size])
    f = pn.influence.fit(net, params, state, head, method=method, batch_size=batch_size)
    jax.block_until_ready(pn.influence.scores(net, params, state, f, queries, head, batch_size=batch_size))
    warm = time.perf_counter() - start
    rss_before = _rss_mib()
    start = time.perf_counter()
    factors = jax.block_until_ready(pn.influence.fit(net, params, state, train, method=method, batch_size=batch_size))
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    s = np.asarray(jax.block_until_ready(pn.influence.scores(net, params, state, factors, queries, train,
                                                             batch_size=batch_size)))
    return warm, fit_s, time.perf_counter() - start, rss_before, s


def twin(params):
    """The PyTorch twin of benchmarks.dp.lenet with the same weights (NHWC images in, as purenet's)."""
    import torch
    from torch import nn
    import torch.nn.functional as F

    def dense(p):
        layer = nn.Linear(*p["W"].shape)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor(np.asarray(p["W"]).T))
            layer.bias.copy_(torch.tensor(np.asarray(p["b"])))
        return layer

    def conv(p):
        w = np.asarray(p["W"])  # (kh, kw, C, F) -> (F, C, kh, kw); "SAME" at 5x5, stride 1 = 2 on every side
        layer = nn.Conv2d(w.shape[2], w.shape[3], w.shape[:2], padding=2)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor(w.transpose(3, 2, 0, 1)))
            layer.bias.copy_(torch.tensor(np.asarray(p["b"])))
        return layer

    class LeNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.fc1, self.fc2 = conv(params[0]), conv(params[3]), dense(params[7]), dense(params[9])

        def forward(self, x):
            h = F.max_pool2d(torch.relu(self.c1(x.permute(0, 3, 1, 2))), 2)
            h = F.max_pool2d(torch.relu(self.c2(h)), 2)
            h = h.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # flatten as purenet does (NHWC)
            return self.fc2(torch.relu(self.fc1(h)))
    return LeNet()


def _kronfluence(train, queries, batch_size, threads):
    import logging
    import warnings

    import torch
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    torch.set_num_threads(threads)
    _, params, _ = _net_and_params()

    class Summed(Task):
        """Each batch's loss summed over its examples: kronfluence's convention (and purenet's)."""

        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

    task = Summed()
    model = prepare_model(twin(params), task)
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=True)  # float32; eigh in float64
    score_args = ScoreArguments(damping_factor=None)  # its heuristic, 0.1 x mean(Lambda) per module
    data = TensorDataset(torch.tensor(train[0]), torch.tensor(train[1]))
    head = TensorDataset(torch.tensor(train[0][:batch_size]), torch.tensor(train[1][:batch_size]))
    query_data = TensorDataset(torch.tensor(queries[0]), torch.tensor(queries[1]))
    nq = len(queries[0])
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's GradScaler deprecation, inside kronfluence
        analyzer = Analyzer("bench", model, task, cpu=True, disable_tqdm=True, output_dir=out,
                            log_level=logging.WARNING)

        def run(name, train_set):
            t0 = time.perf_counter()
            analyzer.fit_all_factors(name, train_set, per_device_batch_size=batch_size, factor_args=factor_args,
                                     overwrite_output_dir=True)
            t1 = time.perf_counter()
            analyzer.compute_pairwise_scores(name, name, query_data, train_set, per_device_query_batch_size=nq,
                                             per_device_train_batch_size=batch_size, score_args=score_args,
                                             overwrite_output_dir=True)
            return t0, t1, time.perf_counter()

        w0, _, w1 = run("warm", head)  # warm-up: one batch through every phase
        rss_before = _rss_mib()
        t0, t1, t2 = run("full", data)
        s = analyzer.load_pairwise_scores("full")["all_modules"].numpy()
    return w1 - w0, t1 - t0, t2 - t1, rss_before, s


def worker(args):
    threads = len(os.sched_getaffinity(0))
    train, queries, source = _data(args.data, args.train, args.queries, args.smoke)
    rss_data = _rss_mib()
    start = time.perf_counter()
    if args.worker == "kronfluence ekfac":
        warm, fit_s, scores_s, rss_before, s = _kronfluence(train, queries, args.batch_size, threads)
    else:
        warm, fit_s, scores_s, rss_before, s = _purenet(args.worker.split()[1], train, queries, args.batch_size)
    total = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    np.save(args.scores, s)
    out = {"contender": args.worker, "fit_s": fit_s, "scores_s": scores_s, "warm_up_s": warm,
           "in_process_s": total, "peak_rss_MiB": peak, "rss_after_data_MiB": rss_data,
           "rss_before_timed_work_MiB": rss_before, "threads": threads, "data": source,
           "scores_shape": list(s.shape)}
    Path(args.result).write_text(json.dumps(out))


# ---------------------------------------------------------------- the runner


def _one(contender, args, scores_path):
    """Run one contender in a fresh process; its result dict (with the whole process's wall time)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = f.name
    cmd = [sys.executable, "-m", "benchmarks.influence", "--worker", contender, "--result", result,
           "--scores", scores_path, "--data", args.data, "--train", str(args.train), "--queries", str(args.queries),
           "--batch-size", str(args.batch_size)] + (["--smoke"] if args.smoke else [])
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"{contender} failed:\n{out.stdout}\n{out.stderr}")
    row = json.loads(Path(result).read_text())
    os.unlink(result)
    row["process_wall_s"] = wall
    return row


def _summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def agreement(ours, theirs):
    """How close two score matrices are: correlation, max |difference| / max |theirs|, the sign and the
    top-10 training examples per query."""
    a, b = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    top = lambda m: np.argsort(-m, axis=1)[:, :10]  # noqa: E731
    overlap = np.mean([len(set(u) & set(v)) / 10 for u, v in zip(top(a), top(b))])
    return {"pearson": float(np.corrcoef(a.ravel(), b.ravel())[0, 1]),
            "max_abs_diff_over_max_abs": float(np.abs(a - b).max() / np.abs(b).max()),
            "median_relative_diff": float(np.median(np.abs(a - b) / (np.abs(b) + 1e-12 * np.abs(b).max()))),
            "sign_agreement": float(np.mean(np.sign(a) == np.sign(b))),
            "top10_overlap": float(overlap)}


def run(args):
    contenders = [c for c in CONTENDERS if c in args.contenders]
    rows = {c: [] for c in contenders}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {c: os.path.join(tmp, c.replace(" ", "_") + ".npy") for c in contenders}
        for r in range(args.repeats):
            order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]  # rotate who goes first
            for c in order:
                row = _one(c, args, paths[c])
                rows[c].append(row)
                print(f"repeat {r + 1}/{args.repeats} {c:18s} fit {row['fit_s']:7.2f} s  "
                      f"scores {row['scores_s']:7.2f} s"
                      f"  warm-up {row['warm_up_s']:6.2f} s  peak RSS {row['peak_rss_MiB']:7.0f} MiB"
                      f"  (process {row['process_wall_s']:.1f} s)", flush=True)
        scores = {c: np.load(p) for c, p in paths.items()}
    first = next(iter(rows.values()))[0]
    results = {"network": "MNIST CNN of examples/mnist_cnn.py (benchmarks.dp.lenet), float32, pn.init key 0",
               "train": args.train, "queries": args.queries, "batch_size": args.batch_size,
               "threads": first["threads"], "data": first["data"], "repeats": args.repeats, "contenders": {}}
    for c, rs in rows.items():
        results["contenders"][c] = {
            **{k: _summary([r[k] for r in rs]) for k in ("fit_s", "scores_s", "warm_up_s", "process_wall_s",
                                                          "peak_rss_MiB", "rss_after_data_MiB",
                                                          "rss_before_timed_work_MiB")},
            "runs": rs}
    if "purenet ekfac" in scores and "kronfluence ekfac" in scores:
        results["agreement_ekfac"] = agreement(scores["purenet ekfac"], scores["kronfluence ekfac"])
        a = results["agreement_ekfac"]
        print(f"EK-FAC scores, purenet against kronfluence (float32, {args.queries} x {args.train}): "
              f"correlation {a['pearson']:.8f}, max |diff| / max |score| {a['max_abs_diff_over_max_abs']:.1e}, "
              f"median relative diff {a['median_relative_diff']:.1e}, same sign {a['sign_agreement']:.4f}, "
              f"top-10 overlap {a['top10_overlap']:.3f}")
    if "purenet identity" in scores and "purenet ekfac" in scores:
        results["identity_vs_ekfac_pearson"] = float(np.corrcoef(scores["purenet identity"].ravel(),
                                                                 scores["purenet ekfac"].ravel())[0, 1])
    print(f"\n{args.train} training x {args.queries} queries, batch {args.batch_size}, {first['threads']} threads, "
          f"median (min-max) of {args.repeats}")
    print("| contender | fit s | scores s | fit + scores s | warm-up s | peak RSS MiB | RSS before MiB |")
    print("|---|---|---|---|---|---|---|")
    for c, s in results["contenders"].items():
        both = statistics.median([r["fit_s"] + r["scores_s"] for r in s["runs"]])
        rng = lambda d, f="{:.2f}": f"{f.format(d['median'])} ({f.format(d['min'])}-{f.format(d['max'])})"  # noqa: E731
        print(f"| {c} | {rng(s['fit_s'])} | {rng(s['scores_s'])} | {both:.2f} | {rng(s['warm_up_s'])} | "
              f"{rng(s['peak_rss_MiB'], '{:.0f}')} | {s['rss_before_timed_work_MiB']['median']:.0f} |")
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("PURENET_MNIST", str(DEFAULT)))
    parser.add_argument("--train", type=int, default=None, help="training examples (10000; --smoke 256)")
    parser.add_argument("--queries", type=int, default=None, help="query examples (100; --smoke 8)")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per batch (128; --smoke 64)")
    parser.add_argument("--repeats", type=int, default=None, help="fresh processes per contender (3; --smoke 1)")
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (CI)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--worker", default=None, choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scores", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    small = args.smoke
    args.train = args.train or (256 if small else 10000)
    args.queries = args.queries or (8 if small else 100)
    args.batch_size = args.batch_size or (64 if small else 128)
    args.repeats = args.repeats or (1 if small else 3)
    if args.worker:
        return worker(args)
    import jax
    import torch

    print(f"JAX {jax.__version__} on {jax.default_backend()}, torch {torch.__version__}, "
          f"{len(os.sched_getaffinity(0))} cores; load average {os.getloadavg()}", flush=True)
    results = run(args)
    results["load_average_at_end"] = list(os.getloadavg())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
