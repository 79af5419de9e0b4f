"""The exact GGN diagonal three ways, and what a K-FAC step costs over an Adam step.

    python -m benchmarks.curvature [--quick] [--repeats 5] [--json benchmarks/results_curvature_cpu.json]
    python -m benchmarks.curvature --mode gpu      # on an accelerator (BackPACK on CUDA when torch has it)

Part 1: diag((1/N) sum_i J_i^T H_i J_i) of the 784-1024-1024-10 relu MLP under
softmax cross-entropy, batch 256 (--quick: 32), float32, the same weights and
data for every contender:

    purenet     jax.jit(pn.stats.ggn_diagonal): the loss Hessian's 10 square-root
                columns through the handwritten backward, squares summed inside it
    autodiff    the same columns s_c = sqrt(p_c)(e_c - p) of each example pulled
                back by jax.vjp of that example's logits w.r.t. the params, vmapped
                over the columns, squared and summed; examples in chunks (a
                lax.scan over chunks, vmapped within one) so memory stays bounded
    BackPACK    DiagGGNExact on the same torch model (torch.set_num_threads(cores))

The autodiff and BackPACK results are checked against purenet's first (max
relative difference per leaf, each against its own largest entry).

Part 2: one jitted training step (`pn.training.build_step`) of the
LeNet (examples/mnist_cnn.py) at batch 64 with pn.optim.kfac (fisher="mc":
factors from sampled labels, inverses every 10 steps) against pn.optim.adam;
two more K-FAC rows say where its overhead goes: fisher="empirical" (the
factors from the data's own backward, no second backward of sampled
labels) and fisher="mc" with factors_every=10.
Each contender runs a block of 20 steps per repeat (so each block holds two
inversion steps), interleaved; the per-step time is the block's over 20.

Every timing is the median (min-max) over interleaved repeats after a warm-up
call; "paired" is the median over repeats of the ratio within one repeat,
which cancels slow drifts of a shared machine.
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

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation

SIZES = [784, 1024, 1024, 10]


def summary(times):
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times)}


def max_relative(a, b):
    """Largest |a - b| / max|b| over the leaves (each against its own scale)."""
    return max(float(np.max(np.abs(u - v)) / (np.max(np.abs(v)) + 1e-30)) for u, v in zip(a, b))


def paired(times, who, base):
    return statistics.median(t / b for t, b in zip(times[who], times[base]))


def interleave(fns, repeats):
    """fns: name -> callable (blocks until done). Runs each once per repeat, in order; returns name -> times."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


# ------------------------------------------------------------------ part 1: the GGN diagonal


def logits(params, x):
    """The MLP's logits in plain jax.numpy, from purenet's params (W as (in, out))."""
    dense = [p for p in params if p]
    h = x
    for i, p in enumerate(dense):
        h = h @ p["W"] + p["b"]
        if i < len(dense) - 1:
            h = jax.nn.relu(h)
    return h


def autodiff_ggn(params, x, chunk):
    """diag((1/N) sum_i J_i^T H_i J_i) by jax.vjp per example, vmapped over the 10 columns of H_i's root."""
    n = x.shape[0]
    if n % chunk:
        raise ValueError(f"chunk {chunk} must divide the batch {n}")

    def one(xi):
        f, pullback = jax.vjp(lambda q: logits(q, xi), params)
        p = jax.nn.softmax(f)
        roots = jnp.sqrt(p)[:, None] * (jnp.eye(f.shape[0], dtype=f.dtype) - p[None, :])  # row c: s_c
        (cols,) = jax.vmap(pullback)(roots)   # J^T s_c for every c: leaves (10, *param)
        return jax.tree_util.tree_map(lambda g: jnp.sum(g * g, axis=0), cols)

    def body(total, xs):
        part = jax.vmap(one)(xs)
        return jax.tree_util.tree_map(lambda t, g: t + jnp.sum(g, axis=0), total, part), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    total, _ = jax.lax.scan(body, zeros, x.reshape(n // chunk, chunk, *x.shape[1:]))
    return jax.tree_util.tree_map(lambda t: t / n, total)


def leaves_np(tree):
    """[W0, b0, W1, b1, ...] as numpy, W as (in, out)."""
    return [np.asarray(p[k]) for p in tree if p for k in ("W", "b")]


def backpack_ggn(params, x, y, device):
    """BackPACK's DiagGGNExact on the same model: returns (timed callable, result leaves as W (in, out))."""
    import warnings

    import torch
    from backpack import backpack, extend

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    from backpack.extensions import DiagGGNExact

    dense = [p for p in params if p]
    layers = []
    for i, p in enumerate(dense):
        lin = torch.nn.Linear(*p["W"].shape)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.asarray(p["W"]).T.copy()))
            lin.bias.copy_(torch.from_numpy(np.asarray(p["b"]).copy()))
        layers.append(lin)
        if i < len(dense) - 1:
            layers.append(torch.nn.ReLU())
    model = extend(torch.nn.Sequential(*layers).to(device))
    lossfunc = extend(torch.nn.CrossEntropyLoss(reduction="mean"))
    xt = torch.from_numpy(np.array(x)).to(device)
    yt = torch.from_numpy(np.asarray(y).astype(np.int64)).to(device)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]

    def run():
        model.zero_grad()
        loss = lossfunc(model(xt), yt)
        with backpack(DiagGGNExact()):
            loss.backward()
        if device != "cpu":
            torch.cuda.synchronize()
        return linears

    run()
    result = []
    for lin in linears:
        result += [lin.weight.diag_ggn_exact.detach().cpu().numpy().T, lin.bias.diag_ggn_exact.detach().cpu().numpy()]
    return run, result


def ggn_part(batch, repeats, chunk, device, with_backpack=True):
    net = pn.mlp(SIZES)
    params, state = pn.init(net, jax.random.key(0), dtype=jnp.float32)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, SIZES[0])), jnp.float32)
    y = jnp.asarray(rng.integers(0, SIZES[-1], batch), jnp.int32)

    ours = jax.jit(lambda p, x, y: pn.stats.ggn_diagonal(net, p, state, x, y))
    ref = jax.jit(lambda p, x: autodiff_ggn(p, x, chunk))
    row = {"network": "-".join(map(str, SIZES)), "batch": batch, "dtype": "float32", "autodiff_chunk": chunk}
    compiled, outputs = {}, {}
    for name, fn, args in (("purenet", ours, (params, x, y)), ("autodiff (vmap of jax.vjp)", ref, (params, x))):
        start = time.perf_counter()
        c = fn.lower(*args).compile()
        row.setdefault("compile_s", {})[name] = time.perf_counter() - start
        mem = c.memory_analysis()
        row.setdefault("temp_MiB", {})[name] = None if mem is None else mem.temp_size_in_bytes / 2**20
        outputs[name] = leaves_np(jax.block_until_ready(c(*args)))   # warm-up
        compiled[name] = (c, args)
    fns = {name: (lambda c=c, a=a: jax.block_until_ready(c(*a))) for name, (c, a) in compiled.items()}
    base = outputs["purenet"]
    row["max_relative_difference"] = {"autodiff (vmap of jax.vjp)": max_relative(outputs["autodiff (vmap of jax.vjp)"],
                                                                                 base)}
    if with_backpack:
        import torch

        if device == "cpu":
            torch.set_num_threads(os.cpu_count())
        row["torch_threads"] = torch.get_num_threads()
        run, result = backpack_ggn(params, x, y, device)
        row["max_relative_difference"]["BackPACK DiagGGNExact"] = max_relative(result, base)
        fns["BackPACK DiagGGNExact"] = run
    for name, diff in row["max_relative_difference"].items():
        print(f"  check: {name} against purenet, max relative difference {diff:.2e}", flush=True)
    assert row["max_relative_difference"]["autodiff (vmap of jax.vjp)"] < 1e-3, row["max_relative_difference"]
    if with_backpack:
        assert row["max_relative_difference"]["BackPACK DiagGGNExact"] < 1e-3, row["max_relative_difference"]
    times = interleave(fns, repeats)
    row["times"] = {name: summary(t) for name, t in times.items()}
    row["paired_over_purenet"] = {name: paired(times, name, "purenet") for name in times if name != "purenet"}
    row["speedup_of_medians"] = {name: row["times"][name]["median_ms"] / row["times"]["purenet"]["median_ms"]
                                 for name in times if name != "purenet"}
    for name in times:
        t = row["times"][name]
        extra = "" if name == "purenet" else (f"  {row['speedup_of_medians'][name]:.2f}x purenet's time "
                                              f"(paired {row['paired_over_purenet'][name]:.2f}x)")
        print(f"  {name:28s} {t['median_ms']:9.1f} ms ({t['min_ms']:.1f}-{t['max_ms']:.1f}){extra}", flush=True)
    return row


# ------------------------------------------------------------------ part 2: the K-FAC step


def kfac_part(batch, repeats, block):
    from purenet.training import build_step, init_run
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    from mnist_cnn import lenet

    net = lenet()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(0, 1, (batch, 28, 28, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    opts = {"adam": pn.optim.adam(1e-3), "kfac (fisher='mc')": pn.optim.kfac(net, 0.1, damping=1.0),
            # where the overhead goes: no sampled backward, and the factors on every 10th step only
            "kfac (fisher='empirical')": pn.optim.kfac(net, 0.1, damping=1.0, fisher="empirical"),
            "kfac (mc, factors_every=10)": pn.optim.kfac(net, 0.1, damping=1.0, factors_every=10)}
    row = {"network": "LeNet (examples/mnist_cnn.py)", "batch": batch, "steps_per_block": block, "compile_s": {}}
    fns = {}
    for name, opt in opts.items():
        ts = init_run(net, opt, x, jax.random.key(0), None, None)
        step = jax.jit(build_step(net, opt))
        carry = (ts.opt_state, ts.model_state)
        start = time.perf_counter()
        c = step.lower(carry, (x, y, jax.random.key(1))).compile()
        row["compile_s"][name] = time.perf_counter() - start
        box = {"carry": carry, "i": 0}

        def run(c=c, box=box):
            carry = box["carry"]
            for _ in range(block):
                box["i"] += 1
                carry, value = c(carry, (x, y, jax.random.key(box["i"])))
            jax.block_until_ready(value)
            box["carry"] = carry

        run()  # warm-up
        fns[name] = run
    times = interleave(fns, repeats)
    per_step = {name: [t / block for t in ts] for name, ts in times.items()}
    row["times_per_step"] = {name: summary(t) for name, t in per_step.items()}
    row["over_adam_paired"] = {name: paired(per_step, name, "adam") for name in per_step if name != "adam"}
    row["kfac_over_adam_paired"] = paired(per_step, "kfac (fisher='mc')", "adam")
    row["kfac_over_adam_medians"] = (row["times_per_step"]["kfac (fisher='mc')"]["median_ms"]
                                     / row["times_per_step"]["adam"]["median_ms"])
    for name, t in row["times_per_step"].items():
        ratio = "" if name == "adam" else f"  {row['over_adam_paired'][name]:.2f}x Adam's (paired)"
        print(f"  {name:28s} {t['median_ms']:9.2f} ms per step ({t['min_ms']:.2f}-{t['max_ms']:.2f}){ratio}",
              flush=True)
    print(f"  K-FAC step / Adam step: {row['kfac_over_adam_medians']:.2f}x (paired {row['kfac_over_adam_paired']:.2f}x)",
          flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 32 and 3 repeats")
    parser.add_argument("--mode", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--batch", type=int, default=None, help="the GGN's batch (default 256; --quick 32)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 5; --quick 3)")
    parser.add_argument("--chunk", type=int, default=None, help="examples per vmapped chunk of the autodiff way "
                        "(default 4 on the CPU, 32 on a GPU)")
    parser.add_argument("--kfac-repeats", type=int, default=None, help="repeats of the K-FAC step (default 7; --quick 3)")
    parser.add_argument("--no-backpack", action="store_true")
    parser.add_argument("--json", default=None, help="where to write the results (default "
                        "benchmarks/results_curvature_<mode>.json; --quick: none)")
    args = parser.parse_args()
    if args.mode == "gpu" and jax.default_backend() == "cpu":
        raise SystemExit("--mode gpu needs JAX with an accelerator; this JAX runs on the CPU")
    batch = args.batch or (32 if args.quick else 256)
    repeats = args.repeats or (3 if args.quick else 5)
    chunk = args.chunk or (4 if args.mode == "cpu" else 32)
    chunk = min(chunk, batch)
    device = "cpu"
    if args.mode == "gpu":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"JAX {jax.__version__} on {jax.default_backend()}; {os.cpu_count()} cores; BackPACK on {device}")
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "cores": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend()},
               "mode": args.mode, "quick": args.quick, "repeats": repeats}
    try:
        import torch
        import backpack

        results["machine"].update(torch=torch.__version__, backpack=getattr(backpack, "__version__", "?"))
    except ImportError:
        args.no_backpack = True
    print(f"GGN diagonal, {'-'.join(map(str, SIZES))} relu MLP, softmax cross-entropy, batch {batch}, float32, "
          f"{repeats} interleaved repeats (autodiff in chunks of {chunk})", flush=True)
    results["ggn_diagonal"] = ggn_part(batch, repeats, chunk, device, not args.no_backpack)
    kfac_repeats = args.kfac_repeats or (3 if args.quick else 7)
    print(f"training step, LeNet, batch 64, blocks of 20 steps, {kfac_repeats} interleaved repeats", flush=True)
    results["kfac_step"] = kfac_part(64, kfac_repeats, 20)
    path = args.json or (None if args.quick else f"benchmarks/results_curvature_{args.mode}.json")
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
