"""Long sequences: blockwise attention against dense forms and PyTorch, and the KV cache of pn.generate.

    python -m benchmarks.attention [kernel] [--repeats 5] [--json benchmarks/results_attention_cpu.json]
    python -m benchmarks.attention generate [--steps 1000]
    python -m benchmarks.attention all        # kernel, then generate
    python -m benchmarks.attention gpu        # on an accelerator only: blockwise against cuDNN
    python -m benchmarks.attention --smoke    # kernel and generate, tiny and once (CI)

kernel (the default): causal attention's forward + backward (from q, k, v
and an output gradient do to dq, dk, dv) at T = 4096, 8 heads of 64, batch
1, float32, q already scaled by 1/sqrt(dh) (as `attention_kernels` takes it):

    blockwise      purenet's blockwise forward + handwritten backward (`attention_kernels`,
                   block `default_block(T, 8)`), jitted
    jax.vjp dense  jax.vjp of softmax(q k^T) v written plainly (masked scores, jax.nn.softmax), jitted
    purenet dense  purenet's dense forward (P kept) + handwritten backward, jitted
    torch sdpa     torch.nn.functional.scaled_dot_product_attention(is_causal=True, scale=1) + .backward()

Each repeat runs every contender for a block of ~0.3 s of calls (at least
one), back to back; reported are medians (min-max) over repeats and paired
ratios (the median over repeats of contender / blockwise in the same
repeat: above 1, blockwise is faster). Temporary memory is XLA's memory
analysis of the compiled program (`temp_size_in_bytes`). Then: the
blockwise block size swept over 64-512 at T = 4096 (time), the temporary
memory of blockwise and jax.vjp dense over T = 512-4096, and purenet dense
against blockwise at T = 128-1024 (where `MultiHeadAttention`'s "auto"
switches; it picks blockwise from T >= 512 on the CPU).

generate: a 2-layer, 4-head, 128-feature pn.gpt (vocabulary 65, context
1024) samples `--steps` (1000) new ids from a 24-id prompt with pn.generate,
cache=True against cache=False; each program is compiled ahead (reported
apart) and timed `--generate-repeats` times, interleaved. --no-cache-steps N
times the no-cache path for N steps only and extrapolates per-step time x
steps (labelled so in the output).

gpu: blockwise against `jax.nn.dot_product_attention(implementation="cudnn")`
(its backward through jax.vjp) and the "xla" implementation, at the same
shapes in bfloat16 and float32; it stops with a message on a machine with
no GPU.

The JSON file keeps the sections of earlier runs it does not redo (a
`generate` run keeps a file's `kernel` section).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import purenet as pn
from purenet.layers import attention_kernels as K

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation

FULL = dict(batch=1, heads=8, t=4096, dh=64)
SMOKE = dict(batch=1, heads=2, t=64, dh=16)
BLOCKS = (64, 128, 256, 512)
MEMORY_TS = (512, 1024, 2048, 4096)
THRESHOLD_TS = (128, 256, 512, 1024)
GEN = dict(vocab=65, context=1024, layers=2, heads=4, features=128, prompt=24)
GEN_SMOKE = dict(vocab=11, context=32, layers=1, heads=2, features=16, prompt=4)


def summary(ts):
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts)}


def inputs(c, dtype=jnp.float32, seed=0):
    """q (B, K, 1, T, dh) scaled by 1/sqrt(dh), k and v (B, K, T, dh), do (B, K, 1, T, dh)."""
    rng = np.random.default_rng(seed)
    b, h, t, dh = c["batch"], c["heads"], c["t"], c["dh"]
    q = rng.standard_normal((b, h, 1, t, dh), np.float32) / np.sqrt(dh)
    k, v = (rng.standard_normal((b, h, t, dh), np.float32) for _ in range(2))
    do = rng.standard_normal((b, h, 1, t, dh), np.float32)
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v, do))


# ---------------------------------------------------------------- the contenders: (q, k, v, do) -> (dq, dk, dv)


def blockwise_fb(block, causal=True):
    def f(q, k, v, do):
        o, lse = K.blockwise_attention(q, k, v, causal, block)
        return K.blockwise_attention_backward(q, k, v, o, lse, do, causal, block)
    return f


def dense_fb(causal=True):
    def f(q, k, v, do):
        o, p = K.dense_attention(q, k, v, causal)
        return K.dense_attention_backward(q, k, v, p, do)
    return f


def plain_attention(q, k, v, causal=True):
    """softmax(q k^T) v as a user writes it: the autodiff reference."""
    s = jnp.einsum("bkgtd,bksd->bkgts", q, k)
    if causal:
        t = q.shape[3]
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    return jnp.einsum("bkgts,bksd->bkgtd", jax.nn.softmax(s, axis=-1), v)


def vjp_dense_fb(causal=True):
    def f(q, k, v, do):
        _, pullback = jax.vjp(lambda q, k, v: plain_attention(q, k, v, causal), q, k, v)
        return pullback(do)
    return f


def jitted(f, args):
    """(call, compile seconds, temporary bytes) of jax.jit(f) at args."""
    start = time.perf_counter()
    compiled = jax.jit(f).lower(*args).compile()
    compile_s = time.perf_counter() - start
    temp = getattr(compiled.memory_analysis(), "temp_size_in_bytes", None)
    return (lambda: jax.block_until_ready(compiled(*args))), compile_s, temp


def temp_bytes(f, args):
    return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes


def torch_sdpa(c, threads):
    import torch
    from torch.nn import functional as F

    torch.set_num_threads(threads)
    q, k, v, do = (torch.from_numpy(np.array(a)) for a in inputs(c))
    q, k, v, do = q[:, :, 0], k, v, do[:, :, 0]  # (B, H, T, dh)
    q, k, v = (a.clone().requires_grad_(True) for a in (q, k, v))

    def run():
        for a in (q, k, v):
            a.grad = None
        F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0).backward(do)
        return q.grad, k.grad, v.grad

    return run


def interleave(runs, repeats, budget=0.3, smoke=False):
    """{name: [seconds per call, one per repeat]}: each repeat times a block of calls of every contender."""
    counts = {}
    for name, run in runs.items():  # warm-up call, and calls per block: ~budget seconds, at least 1
        run()
        start = time.perf_counter()
        run()
        counts[name] = 1 if smoke else max(1, int(budget / (time.perf_counter() - start)))
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(counts[name]):
                run()
            times[name].append((time.perf_counter() - start) / counts[name])
    return times, counts


def paired(times, base):
    return {name: statistics.median(t / b for t, b in zip(ts, times[base])) for name, ts in times.items()}


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)))) for x, y in zip(a, b))


# ---------------------------------------------------------------- kernel mode


def kernel(args):
    c = SMOKE if args.smoke else FULL
    repeats = 1 if args.smoke else args.repeats
    args_ = inputs(c)
    rows = c["batch"] * c["heads"]
    block = K.default_block(c["t"], rows)
    out = {"config": {**c, "causal": True, "dtype": "float32", "default_block": block},
           "repeats": repeats, "torch_threads": args.torch_threads}
    print(f"attention forward+backward, {c}, causal, float32, default block {block}; {repeats} repeats", flush=True)

    contenders = {"blockwise": blockwise_fb(block), "jax.vjp dense": vjp_dense_fb(), "purenet dense": dense_fb()}
    runs, compile_s, temp = {}, {}, {}
    for name, f in contenders.items():
        runs[name], compile_s[name], temp[name] = jitted(f, args_)
    results = {name: jax.device_get(run()) for name, run in runs.items()}
    try:
        runs["torch sdpa"] = torch_sdpa(c, args.torch_threads)
        compile_s["torch sdpa"], temp["torch sdpa"] = 0.0, None
        tq, tk, tv = (a.detach().numpy() for a in runs["torch sdpa"]())
        results["torch sdpa"] = (tq[:, :, None], tk, tv)
    except ImportError as e:
        print(f"skipping torch sdpa: {e}")
    diffs = {name: max_diff(r, results["jax.vjp dense"]) for name, r in results.items()}
    times, counts = interleave(runs, repeats, smoke=args.smoke)
    ratios = paired(times, "blockwise")
    flops = 3 * K.flops(c["batch"], c["heads"], c["t"], c["dh"], True)  # forward + backward (2x forward)
    out["main"] = {name: {**summary(ts), "calls_per_block": counts[name], "compile_s": compile_s[name],
                          "temp_bytes": temp[name], "paired_over_blockwise": ratios[name],
                          "gflops": flops / statistics.median(ts) / 1e9, "max_abs_diff_vs_vjp_dense": diffs[name]}
                   for name, ts in times.items()}
    print(f"{'contender':<15} {'median ms':>10} {'min-max ms':>17} {'compile s':>9} {'paired':>7} "
          f"{'temp MiB':>9} {'GFLOP/s':>8} {'max |diff|':>10}")
    for name, r in out["main"].items():
        mib = "" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:.1f}"
        print(f"{name:<15} {1e3 * r['median_s']:10.1f} {1e3 * r['min_s']:8.1f}-{1e3 * r['max_s']:<8.1f} "
              f"{r['compile_s']:9.2f} {r['paired_over_blockwise']:7.2f} {mib:>9} {r['gflops']:8.1f} "
              f"{r['max_abs_diff_vs_vjp_dense']:10.1e}", flush=True)
    del runs, results

    # the block size at T = 4096 (time)
    blocks = (16, 32) if args.smoke else BLOCKS
    runs = {}
    for b in blocks:
        runs[b] = jitted(blockwise_fb(b), args_)[0]
    times, _ = interleave({f"block {b}": r for b, r in runs.items()}, repeats, smoke=args.smoke)
    ratios = paired(times, f"block {block if block in blocks else blocks[0]}")
    out["block_sweep"] = {name: {**summary(ts), "paired_over_default": ratios[name]} for name, ts in times.items()}
    print(f"block size at T = {c['t']}: " + ", ".join(
        f"{name} {1e3 * r['median_s']:.1f} ms ({r['paired_over_default']:.2f})" for name, r in out["block_sweep"].items()),
        flush=True)
    del runs

    # temporary memory over T (compile only)
    out["memory_over_t"] = {}
    for t in ((32, 64) if args.smoke else MEMORY_TS):
        a = inputs({**c, "t": t})
        bw = temp_bytes(blockwise_fb(K.default_block(t, rows)), a)
        vd = temp_bytes(vjp_dense_fb(), a)
        out["memory_over_t"][str(t)] = {"blockwise_bytes": bw, "vjp_dense_bytes": vd, "block": K.default_block(t, rows),
                                       "vjp_dense_over_blockwise": vd / bw if bw else None}
        print(f"temp memory, T = {t}: blockwise {bw / 2**20:.2f} MiB, jax.vjp dense {vd / 2**20:.2f} MiB "
              f"({vd / max(bw, 1):.1f}x)", flush=True)

    # dense against blockwise where "auto" switches
    out["threshold"] = {}
    for t in ((16, 32) if args.smoke else THRESHOLD_TS):
        a = inputs({**c, "t": t})
        b = K.default_block(t, rows)
        runs = {"purenet dense": jitted(dense_fb(), a)[0], f"blockwise (block {b})": jitted(blockwise_fb(b), a)[0]}
        if b != 128 and t > 128:
            runs["blockwise (block 128)"] = jitted(blockwise_fb(128), a)[0]
        times, _ = interleave(runs, repeats, budget=0.2, smoke=args.smoke)
        ratios = paired(times, "purenet dense")
        row = {name: {**summary(ts), "paired_over_dense": ratios[name]} for name, ts in times.items()}
        faster = min(row, key=lambda n: row[n]["median_s"])
        out["threshold"][str(t)] = {**row, "faster": faster, "auto_picks": "blockwise" if t >= 512 else "dense"}
        print(f"T = {t}: " + ", ".join(f"{n} {1e3 * r['median_s']:.2f} ms ({r['paired_over_dense']:.2f})"
                                       for n, r in row.items()) + f"; faster: {faster}", flush=True)
    return out


# ---------------------------------------------------------------- generate mode


def generate(args):
    c = GEN_SMOKE if args.smoke else GEN
    steps = 4 if args.smoke else args.steps
    repeats = 1 if args.smoke else args.generate_repeats
    net = pn.gpt(c["vocab"], c["context"], c["layers"], c["heads"], c["features"])
    params, state = pn.init(net, jax.random.key(0))
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, c["vocab"], (1, c["prompt"])), jnp.int32)
    key = jax.random.key(1)
    nc_steps = min(steps, args.no_cache_steps or steps)
    print(f"pn.generate, gpt {c}, {steps} new ids (no cache: {nc_steps}), {repeats} timed runs", flush=True)

    programs, compile_s = {}, {}
    for name, cache, n in (("cache=True", True, steps), ("cache=False", False, nc_steps)):
        f = jax.jit(lambda p, s, ids, k, cache=cache, n=n: pn.generate(net, p, s, ids, k, n, 1.0, cache=cache))
        start = time.perf_counter()
        programs[name] = f.lower(params, state, prompt, key).compile()
        compile_s[name] = time.perf_counter() - start
    outs = {name: jax.block_until_ready(p(params, state, prompt, key)) for name, p in programs.items()}  # warm-up
    same = bool(np.array_equal(np.asarray(outs["cache=True"])[:, :c["prompt"] + nc_steps],
                               np.asarray(outs["cache=False"])))
    times = {name: [] for name in programs}
    for _ in range(repeats):
        for name, p in programs.items():
            start = time.perf_counter()
            jax.block_until_ready(p(params, state, prompt, key))
            times[name].append(time.perf_counter() - start)
    res = {"config": c, "steps": steps, "no_cache_steps_measured": nc_steps, "repeats": repeats,
           "same_tokens": same}
    for name, ts in times.items():
        n = steps if name == "cache=True" else nc_steps
        res[name] = {**summary(ts), "compile_s": compile_s[name], "steps": n, "per_token_s": statistics.median(ts) / n}
    cached, uncached = res["cache=True"], res["cache=False"]
    res["cache=False"]["for_all_steps_s"] = uncached["per_token_s"] * steps
    res["cache=False"]["extrapolated"] = nc_steps != steps
    res["speedup_with_cache"] = res["cache=False"]["for_all_steps_s"] / cached["median_s"]
    label = " (extrapolated: per-token time x steps)" if nc_steps != steps else ""
    print(f"cache=True : {cached['median_s']:.2f} s for {steps} ids ({1e3 * cached['per_token_s']:.2f} ms/id), "
          f"compile {cached['compile_s']:.2f} s")
    print(f"cache=False: {uncached['median_s']:.2f} s for {nc_steps} ids ({1e3 * uncached['per_token_s']:.2f} ms/id), "
          f"compile {uncached['compile_s']:.2f} s; for {steps} ids {uncached['for_all_steps_s']:.2f} s{label}")
    print(f"speedup with the cache: {res['speedup_with_cache']:.1f}x; same tokens: {same}", flush=True)
    return res


# ---------------------------------------------------------------- gpu mode


def gpu(args):
    if jax.default_backend() != "gpu":
        raise SystemExit(f"benchmarks.attention gpu needs a GPU: JAX's backend here is {jax.default_backend()!r} "
                         f"({jax.devices()}). Run it on a machine with CUDA JAX; the CPU modes are kernel and generate.")
    c = FULL
    rows = c["batch"] * c["heads"]
    res = {"device": str(jax.devices()[0]), "config": c}
    for dtype in ("bfloat16", "float32"):
        q, k, v, do = inputs(c, jnp.dtype(dtype))
        # jax.nn.dot_product_attention's layout: (B, T, N, H)
        tq, tk, tv, tdo = (jnp.moveaxis(a[:, :, 0] if a.ndim == 5 else a, 1, 2) for a in (q, k, v, do))

        def sdpa_fb(impl):
            def f(q, k, v, do):
                _, pullback = jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(
                    q, k, v, scale=1.0, is_causal=True, implementation=impl), q, k, v)
                return pullback(do)
            return f

        block = K.default_block(c["t"], rows)
        cands = {f"blockwise (block {b})": (blockwise_fb(b), (q, k, v, do)) for b in sorted({block, *BLOCKS})}
        cands["purenet dense"] = (dense_fb(), (q, k, v, do))
        cands["cudnn (jax.vjp)"] = (sdpa_fb("cudnn"), (tq, tk, tv, tdo))
        cands["xla sdpa (jax.vjp)"] = (sdpa_fb("xla"), (tq, tk, tv, tdo))
        runs, comp, temp = {}, {}, {}
        for name, (f, a) in cands.items():
            try:
                runs[name], comp[name], temp[name] = jitted(f, a)
            except Exception as e:  # cudnn may refuse a dtype or shape
                print(f"  {dtype} {name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        times, counts = interleave(runs, args.repeats, budget=0.2)
        base = f"blockwise (block {block})"
        ratios = paired(times, base)
        res[dtype] = {name: {**summary(ts), "compile_s": comp[name], "temp_bytes": temp[name],
                             "paired_over_default_blockwise": ratios[name]} for name, ts in times.items()}
        print(f"{dtype}, {c}, causal:")
        for name, r in res[dtype].items():
            print(f"  {name:<22} {1e3 * r['median_s']:8.3f} ms  paired {r['paired_over_default_blockwise']:5.2f}  "
                  f"temp {r['temp_bytes'] / 2**20:8.1f} MiB", flush=True)
    return res


# ---------------------------------------------------------------- the runner


def save(section, results, path):
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    old.update({"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                            "devices": [str(d) for d in jax.devices()]}, section: results})
    old.setdefault("commands", {})[section] = " ".join(["python -m benchmarks.attention", *sys.argv[1:]])
    with open(path + ".tmp", "w") as f:
        json.dump(old, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="kernel", choices=("kernel", "generate", "all", "gpu"))
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (kernel, gpu)")
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1000, help="new ids to generate")
    parser.add_argument("--no-cache-steps", type=int, default=None,
                        help="time the no-cache path for this many steps only and extrapolate to --steps")
    parser.add_argument("--generate-repeats", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="kernel and generate, tiny and once (CI)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    modes = {"kernel": ["kernel"], "generate": ["generate"], "all": ["kernel", "generate"], "gpu": ["gpu"]}[args.mode]
    if args.smoke and args.mode != "gpu":
        modes = ["kernel", "generate"]
    out = {}
    for mode in modes:
        out[mode] = {"kernel": kernel, "generate": generate, "gpu": gpu}[mode](args)
        if args.json:
            save(mode, out[mode], args.json)
    return out


if __name__ == "__main__":
    main()
