"""Gradient statistics (pn.stats) against their vmap(jax.grad) constructions.

    python -m benchmarks.stats [--smoke] [--repeats 3] [--json benchmarks/results_stats_cpu.json]

On the 784-1024-1024-10 relu MLP at batch 1024 (float32), each statistic
is computed by purenet (from the per-example backward, without forming the
per-example gradients) and by the usual autodiff construction: every
example's gradient by jax.vmap(jax.grad) (batch x params floats), then

    Fisher diagonal   mean_i g_i**2
    noise scale       tr(S) / |mean g|^2 from the g_i
    Gram matrix       [g_i . g_j] of the batch with itself (flattened g_i, one matmul)
    K-FAC factors     A from the layer inputs, G from the per-example bias gradients (= dy_i)

Both are jitted; the numbers are the median (min-max) of timed calls after
a warm-up call (compile excluded), and XLA's temporary memory of the
compiled program (`memory_analysis().temp_size_in_bytes`). --smoke runs a
tiny network once (CI checks that it runs).
"""
import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import purenet as pn
from benchmarks import steps as S

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation


def per_example(net, state):
    def grads(p, x, y):
        return jax.vmap(lambda xi, yi: jax.grad(lambda q: pn.loss(net, q, state, xi[None], yi[None])[0])(p))(x, y)

    return grads


def cases(net, state):
    """name -> (purenet function, vmap(jax.grad) function, comparison of the results), all f(params, x, y)."""
    pe = per_example(net, state)

    def fisher_ref(p, x, y):
        return jax.tree_util.tree_map(lambda g: jnp.mean(g * g, axis=0), pe(p, x, y))

    def noise_ref(p, x, y):
        g = pe(p, x, y)
        leaves = jax.tree_util.tree_leaves(g)
        mean_sq = sum(jnp.sum(jnp.mean(v * v, axis=0)) for v in leaves)
        g2 = sum(jnp.sum(jnp.mean(v, axis=0) ** 2) for v in leaves)
        n = x.shape[0]
        return n / (n - 1) * (mean_sq - g2) / g2

    def gram_ref(p, x, y):
        n = x.shape[0]
        return sum(g.reshape(n, -1) @ g.reshape(n, -1).T for g in jax.tree_util.tree_leaves(pe(p, x, y)))

    def kfac_ref(p, x, y):
        g = pe(p, x, y)
        _, _, caches = net.forward(p, state, x)
        out = []
        for i, layer in enumerate(net.layers):
            if isinstance(layer, pn.Dense):
                h = jnp.concatenate([caches[i], jnp.ones((x.shape[0], 1), x.dtype)], axis=1)
                dy = g[i]["b"]  # the per-example bias gradient is dy_i
                out.append((h.T @ h / x.shape[0], dy.T @ dy / x.shape[0]))
        return out

    def kfac_ours(p, x, y):
        return [tuple(f) for f in pn.stats.kfac_factors(net, p, state, x, y) if f is not None]

    return {
        "Fisher diagonal": (lambda p, x, y: pn.stats.fisher_diagonal(net, p, state, x, y), fisher_ref),
        "gradient noise scale": (lambda p, x, y: pn.stats.gradient_noise_scale(net, p, state, x, y), noise_ref),
        "gradient Gram matrix": (lambda p, x, y: pn.stats.gradient_gram(net, p, state, (x, y)), gram_ref),
        "K-FAC factors": (kfac_ours, kfac_ref),
    }


def summary(times):
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def close(a, b):
    """Largest relative difference between two trees, each leaf against its own scale."""
    return max(float(jnp.max(jnp.abs(u - v)) / (jnp.max(jnp.abs(v)) + 1e-30))
               for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def run(smoke=False, repeats=3, max_gib=9.0):
    sizes, batch = ([16, 32, 32, 4], 16) if smoke else ([784, 1024, 1024, 10], 1024)
    net = pn.mlp(sizes)
    params, state = pn.init(net, jax.random.key(0), dtype=jnp.float32)
    x, y = S._data(sizes, batch)
    results = {"network": "-".join(map(str, sizes)), "batch": batch, "cases": {}}
    for name, (ours, ref) in cases(net, state).items():
        row = {}
        outputs = {}
        for who, fn in (("purenet", ours), ("vmap(jax.grad)", ref)):
            compiled = jax.jit(fn).lower(params, x, y).compile()
            mem = compiled.memory_analysis()
            if mem is not None and mem.temp_size_in_bytes > max_gib * 2**30:
                raise SystemExit(f"{name} by {who} needs {mem.temp_size_in_bytes / 2**30:.1f} GiB of temporary "
                                 f"memory, above --max-gib {max_gib}")
            outputs[who] = jax.block_until_ready(compiled(params, x, y))  # warm-up
            times = []
            for _ in range(1 if smoke else repeats):
                start = time.perf_counter()
                jax.block_until_ready(compiled(params, x, y))
                times.append(time.perf_counter() - start)
            row[who] = {**summary(times), "temp_MiB": None if mem is None else mem.temp_size_in_bytes / 2**20}
            del compiled
        row["max_relative_difference"] = close(outputs["purenet"], outputs["vmap(jax.grad)"])
        ours_t, ref_t = row["purenet"], row["vmap(jax.grad)"]
        row["speedup"] = ref_t["median_s"] / ours_t["median_s"]
        if ours_t["temp_MiB"] is not None:
            row["memory_ratio"] = ref_t["temp_MiB"] / max(ours_t["temp_MiB"], 1e-9)
        results["cases"][name] = row
        print(f"{name}: purenet {ours_t['median_s'] * 1e3:.1f} ms, {ours_t['temp_MiB']:.1f} MiB; vmap(jax.grad) "
              f"{ref_t['median_s'] * 1e3:.1f} ms, {ref_t['temp_MiB']:.1f} MiB: {row['speedup']:.1f}x faster, "
              f"{row.get('memory_ratio', float('nan')):.1f}x less memory (max rel. diff "
              f"{row['max_relative_difference']:.1e})", flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a tiny network, once (CI)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--max-gib", type=float, default=12.0, help="refuse to run a program needing more "
                        "temporary memory than this")
    args = parser.parse_args()
    print(f"JAX {jax.__version__} on {jax.default_backend()}")
    results = run(args.smoke, args.repeats, args.max_gib)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    np.testing.assert_array_less(0, [r["purenet"]["median_s"] for r in results["cases"].values()])


if __name__ == "__main__":
    main()
