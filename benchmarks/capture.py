"""pn.capture's cost: every layer's records against the plain gradient and against flax's way (issue 45).

    python -m benchmarks.capture [--repeats 7] [--smoke] [--json benchmarks/results_capture_cpu.json]

Two models, float32, on the same shapes in every contender:

- the MLP 784-1024-1024-10 (relu, softmax cross-entropy), batch 128;
- a GPT (vocab 65, context 64, 2 layers, 4 heads, 128 features, tied ends),
  batch 16.

Contenders, each one compiled program (`jax.jit`), timed in this process,
interleaved repeat by repeat (medians, min-max):

- purenet `pn.value_and_grad`: the loss and the gradient, nothing else;
- purenet `pn.capture(layers=None)`: the same plus every leaf layer's
  Record(x, y, dy, dx);
- purenet `pn.capture(layers=[one])`: the records of one layer (the MLP's
  second Dense, the GPT's first attention);
- flax linen `jax.value_and_grad` of `apply(..., capture_intermediates=True)`
  with `self.perturb` at every layer output (flax's documented recipe for
  intermediate activations and their gradients): the gradient, every
  module's output (y) and the gradient at every perturbed output (dy);
- flax linen `jax.value_and_grad` alone (flax's own baseline).

Memory is the compiled program's: XLA's `memory_analysis()` temporaries
(what the program allocates beyond its arguments and outputs) and outputs
(the records themselves). The goal is one backward's cost: capturing
everything adds the records' bytes to the outputs and no second pass.
"""
import argparse
import importlib.util
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import purenet as pn

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation

MLP = dict(sizes=[784, 1024, 1024, 10], batch=128)
GPT = dict(vocab=65, context=64, layers=2, heads=4, features=128, batch=16)
SMOKE_MLP = dict(sizes=[8, 16, 16, 4], batch=8)
SMOKE_GPT = dict(vocab=11, context=8, layers=1, heads=2, features=8, batch=2)


# ---------------------------------------------------------------- purenet


def _purenet(net, params, state, x, y, one):
    plain = jax.jit(lambda p: pn.value_and_grad(net, p, state, x, y)[:2])
    every = jax.jit(lambda p: pn.capture(net, p, state, x, y))
    single = jax.jit(lambda p: pn.capture(net, p, state, x, y, layers=[one]))
    return {"purenet value_and_grad": (plain, params), "purenet capture (every layer)": (every, params),
            "purenet capture (one layer)": (single, params)}


def purenet_mlp(c):
    net = pn.mlp(c["sizes"])
    params, state = pn.init(net, jax.random.key(0), dtype=jnp.float32)
    x, y = _data_mlp(c)
    return _purenet(net, params, state, x, y, (2,))


def purenet_gpt(c):
    net = pn.gpt(vocab_size=c["vocab"], context=c["context"], layers=c["layers"], heads=c["heads"],
                 features=c["features"])
    params, state = pn.init(net, jax.random.key(0), in_shape=(c["context"],), dtype=jnp.float32)
    x, y = _data_gpt(c)
    return _purenet(net, params, state, x, y, (0, 1, 1, 0, 0, 1))


def _data_mlp(c):
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((c["batch"], c["sizes"][0])), jnp.float32),
            jnp.asarray(rng.integers(0, c["sizes"][-1], c["batch"]), jnp.int32))


def _data_gpt(c):
    ids = np.random.default_rng(0).integers(0, c["vocab"], (c["batch"], c["context"] + 1))
    return jnp.asarray(ids[:, :-1], jnp.int32), jnp.asarray(ids[:, 1:], jnp.int32)


# ---------------------------------------------------------------- flax linen: capture_intermediates + perturb


def _flax(model, x, y):
    import optax

    variables = model.init(jax.random.key(0), x)
    params = variables["params"]
    perturbations = variables["perturbations"]

    def loss(p, z):
        logits, inter = model.apply({"params": p, "perturbations": z}, x, capture_intermediates=True,
                                    mutable=["intermediates"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), inter

    every = jax.jit(lambda p: jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, perturbations))
    plain = jax.jit(lambda p: jax.value_and_grad(lambda q: loss(q, perturbations)[0])(p))
    return {"flax value_and_grad": (plain, params), "flax capture_intermediates + perturb": (every, params)}


def flax_mlp(c):
    from flax import linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i, width in enumerate(c["sizes"][1:-1]):
                x = self.perturb(f"dense{i}", nn.Dense(width)(x))
                x = self.perturb(f"relu{i}", nn.relu(x))
            return self.perturb("out", nn.Dense(c["sizes"][-1])(x))

    return _flax(MLP(), *_data_mlp(c))


def flax_gpt(c):
    from flax import linen as nn

    d, h = c["features"], c["heads"]

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            b, t, _ = x.shape
            a = self.perturb("ln1", nn.LayerNorm()(x))
            q, k, v = jnp.split(self.perturb("qkv", nn.Dense(3 * d)(a)), 3, axis=-1)
            q, k, v = (z.reshape(b, t, h, d // h) for z in (q, k, v))
            o = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, d)
            x = x + self.perturb("proj", nn.Dense(d)(o))
            m = self.perturb("ln2", nn.LayerNorm()(x))
            m = self.perturb("gelu", jax.nn.gelu(self.perturb("fc", nn.Dense(4 * d)(m)), approximate=False))
            return x + self.perturb("out", nn.Dense(d)(m))

    class GPT(nn.Module):
        @nn.compact
        def __call__(self, ids):
            wte = nn.Embed(c["vocab"], d)
            x = self.perturb("embed", wte(ids) + nn.Embed(c["context"], d)(jnp.arange(ids.shape[1])))
            for _ in range(c["layers"]):
                x = Block()(x)
            return self.perturb("logits", wte.attend(self.perturb("ln_f", nn.LayerNorm()(x))))

    return _flax(GPT(), *_data_gpt(c))


# ---------------------------------------------------------------- the run


def _memory(fn, arg):
    mem = fn.lower(arg).compile().memory_analysis()
    return {"temp_MiB": mem.temp_size_in_bytes / 2**20, "output_MiB": mem.output_size_in_bytes / 2**20}


def _time(fn, arg, n):
    start = time.perf_counter()
    for _ in range(n):
        out = fn(arg)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / n


def run(model, contenders, repeats, steps):
    rows = {}
    for name, (fn, arg) in contenders.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(arg))
        rows[name] = {**_memory(fn, arg), "compile_and_first_s": time.perf_counter() - start, "times": []}
    for _ in range(repeats):  # interleaved: a noisy machine slows every contender alike
        for name, (fn, arg) in contenders.items():
            rows[name]["times"].append(_time(fn, arg, steps))
    base = statistics.median(rows["purenet value_and_grad"]["times"])
    for name, row in rows.items():
        t = row.pop("times")
        row.update(median_ms=1e3 * statistics.median(t), min_ms=1e3 * min(t), max_ms=1e3 * max(t),
                   vs_purenet_value_and_grad=statistics.median(t) / base)
        print(f"{model:4s} {name:38s} {row['median_ms']:8.2f} ms ({row['min_ms']:.2f}-{row['max_ms']:.2f})  "
              f"x{row['vs_purenet_value_and_grad']:.2f}   temp {row['temp_MiB']:7.2f} MiB   "
              f"outputs {row['output_MiB']:7.2f} MiB", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10, help="calls per timed repeat")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat: checks that each runs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    mlp, gpt = (SMOKE_MLP, SMOKE_GPT) if args.smoke else (MLP, GPT)
    repeats, steps = (1, 1) if args.smoke else (args.repeats, args.steps)
    results = {"machine": platform.processor() or platform.machine(), "jax": jax.__version__,
               "devices": str(jax.devices()), "mlp": mlp, "gpt": gpt}
    flax = importlib.util.find_spec("flax") is not None  # the `bench` extra; skipped when missing
    if not flax:
        print("flax is not installed (pip install -e '.[bench]'): its contenders are skipped", flush=True)
    results["MLP"] = run("mlp", {**purenet_mlp(mlp), **(flax_mlp(mlp) if flax else {})}, repeats, steps)
    results["GPT"] = run("gpt", {**purenet_gpt(gpt), **(flax_gpt(gpt) if flax else {})}, repeats, steps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
