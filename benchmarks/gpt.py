"""The GPT train step (nanoGPT's shakespeare_char CPU configuration) in every framework, interleaved.

    python -m benchmarks.gpt [--repeats 9] [--steps 20] [--json benchmarks/results_gpt_cpu.json]
    python -m benchmarks.gpt --smoke      # a tiny model, once: checks that every contender runs

One step = forward, backward, global-norm clipping at 1.0 and AdamW
(beta2 0.99, weight decay 0.1 on matrices) on a (12, 64) batch of
characters; the model is 4 layers, 4 heads, 128 features, context 64,
vocabulary 65, tied embeddings, exact GELU, as in nanoGPT. Contenders:

    purenet           pn.value_and_grad (the handwritten backward) + purenet's optimizer
    jax.grad          jax.grad of the same pn.loss + the same optimizer (isolates the backward)
    flax nnx          a nanoGPT model in flax.nnx + optax, nnx.jit
    equinox           a nanoGPT model in equinox + optax, eqx.filter_jit
    pytorch eager     a nanoGPT model (F.scaled_dot_product_attention), torch.optim.AdamW

Each repeat times a block of `--steps` steps of every contender back to back;
reported are medians over repeats of ms per step and, for each contender,
the median over repeats of the paired ratio (its time / purenet's time in
the same repeat; above 1: purenet is faster). Compile time is the first
call. For the two purenet-model contenders the compiled step's temporary
memory (XLA's memory analysis) is reported too.
"""
import argparse
import json
import math
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import purenet as pn
from benchmarks import torch_gpt

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation

CONFIG = dict(vocab=65, context=64, layers=4, heads=4, features=128, batch=12)
SMOKE = dict(vocab=11, context=8, layers=1, heads=2, features=16, batch=2)
LR, B2, WD, CLIP = 1e-3, 0.99, 0.1, 1.0


def _data(c, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, c["vocab"], (c["batch"], c["context"] + 1))
    return np.asarray(ids[:, :-1], np.int32), np.asarray(ids[:, 1:], np.int32)


# ---------------------------------------------------------------- purenet and jax.grad


def _purenet_opt():
    return pn.optim.chain(
        pn.optim.clip_by_global_norm(CLIP), pn.optim.scale_by_adam(b1=0.9, b2=B2, eps=1e-8),
        pn.optim.add_decayed_weights(WD, mask=lambda p: jax.tree_util.tree_map(lambda w: w.ndim >= 2, p)),
        learning_rate=LR)


def _pn_step(c, gradients):
    net = pn.gpt(c["vocab"], c["context"], c["layers"], c["heads"], c["features"])
    params, state = pn.init(net, jax.random.key(0), dtype=jnp.float32)
    opt = _purenet_opt()

    @jax.jit
    def step(opt_state, x, y):
        return opt.step(opt_state, gradients(net, opt_state.params, state, x, y))

    x, y = (jnp.asarray(a) for a in _data(c))
    opt_state = opt.init(params)
    compiled = step.lower(opt_state, x, y).compile()  # once: the timed executable is the measured one
    temp = compiled.memory_analysis()
    return (lambda s: compiled(s, x, y)), opt_state, getattr(temp, "temp_size_in_bytes", None)


def purenet_step(c):
    return _pn_step(c, lambda net, p, s, x, y: pn.value_and_grad(net, p, s, x, y, loss="cross_entropy")[1])


def jax_grad_step(c):
    return _pn_step(c, lambda net, p, s, x, y: jax.grad(
        lambda q: pn.loss(net, q, s, x, y, loss="cross_entropy")[0])(p))


def _optax_adamw():
    import optax
    return optax.chain(optax.clip_by_global_norm(CLIP), optax.adamw(
        LR, b1=0.9, b2=B2, eps=1e-8, weight_decay=WD,
        mask=lambda p: jax.tree_util.tree_map(lambda w: w.ndim >= 2, p)))


# ---------------------------------------------------------------- flax nnx


def flax_step(c):
    import optax
    from flax import nnx

    d, h = c["features"], c["heads"]
    init = nnx.initializers.normal(0.02)

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
            self.attn = nnx.Linear(d, 3 * d, kernel_init=init, rngs=rngs)
            self.proj = nnx.Linear(d, d, kernel_init=init, rngs=rngs)
            self.fc = nnx.Linear(d, 4 * d, kernel_init=init, rngs=rngs)
            self.out = nnx.Linear(4 * d, d, kernel_init=init, rngs=rngs)

        def __call__(self, x):
            b, t, _ = x.shape
            q, k, v = jnp.split(self.attn(self.ln1(x)), 3, axis=-1)
            q, k, v = (z.reshape(b, t, h, d // h) for z in (q, k, v))
            o = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, d)
            x = x + self.proj(o)
            return x + self.out(jax.nn.gelu(self.fc(self.ln2(x)), approximate=False))

    class GPT(nnx.Module):
        def __init__(self, rngs):
            self.wte = nnx.Embed(c["vocab"], d, embedding_init=init, rngs=rngs)
            self.wpe = nnx.Embed(c["context"], d, embedding_init=init, rngs=rngs)
            self.blocks = nnx.List([Block(rngs) for _ in range(c["layers"])])
            self.ln_f = nnx.LayerNorm(d, rngs=rngs)

        def __call__(self, ids):
            x = self.wte(ids) + self.wpe(jnp.arange(ids.shape[1]))
            for blk in self.blocks:
                x = blk(x)
            return self.wte.attend(self.ln_f(x))

    model = GPT(nnx.Rngs(0))
    opt = nnx.Optimizer(model, _optax_adamw(), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        def loss(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        grads = nnx.grad(loss)(model)
        opt.update(model, grads)

    x, y = (jnp.asarray(a) for a in _data(c))

    def run(state):
        step(model, opt, x, y)
        return model

    return run, model, None


# ---------------------------------------------------------------- equinox


def equinox_step(c):
    import equinox as eqx
    import optax

    d, h = c["features"], c["heads"]

    def normal(key, shape):
        return 0.02 * jax.random.normal(key, shape)

    class Block(eqx.Module):
        ln1: eqx.nn.LayerNorm
        ln2: eqx.nn.LayerNorm
        attn: eqx.nn.Linear
        proj: eqx.nn.Linear
        fc: eqx.nn.Linear
        out: eqx.nn.Linear

        def __init__(self, key):
            ks = jax.random.split(key, 4)
            self.ln1, self.ln2 = eqx.nn.LayerNorm(d), eqx.nn.LayerNorm(d)
            self.attn, self.proj = eqx.nn.Linear(d, 3 * d, key=ks[0]), eqx.nn.Linear(d, d, key=ks[1])
            self.fc, self.out = eqx.nn.Linear(d, 4 * d, key=ks[2]), eqx.nn.Linear(4 * d, d, key=ks[3])

        def __call__(self, x):  # x: (T, d), one example (vmapped over the batch)
            t = x.shape[0]
            q, k, v = jnp.split(jax.vmap(self.attn)(jax.vmap(self.ln1)(x)), 3, axis=-1)
            q, k, v = (z.reshape(t, h, d // h) for z in (q, k, v))
            o = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(t, d)
            x = x + jax.vmap(self.proj)(o)
            return x + jax.vmap(self.out)(jax.nn.gelu(jax.vmap(self.fc)(jax.vmap(self.ln2)(x)), approximate=False))

    class GPT(eqx.Module):
        wte: jax.Array
        wpe: jax.Array
        blocks: list
        ln_f: eqx.nn.LayerNorm

        def __init__(self, key):
            ks = jax.random.split(key, c["layers"] + 2)
            self.wte, self.wpe = normal(ks[0], (c["vocab"], d)), normal(ks[1], (c["context"], d))
            self.blocks = [Block(k) for k in ks[2:]]
            self.ln_f = eqx.nn.LayerNorm(d)

        def __call__(self, ids):
            x = self.wte[ids] + self.wpe[: ids.shape[0]]
            for blk in self.blocks:
                x = blk(x)
            return jax.vmap(self.ln_f)(x) @ self.wte.T

    model = GPT(jax.random.key(0))
    tx = _optax_adamw()
    opt_state = tx.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state, x, y):
        def loss(m):
            return optax.softmax_cross_entropy_with_integer_labels(jax.vmap(m)(x), y).mean()

        grads = eqx.filter_grad(loss)(model)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state

    x, y = (jnp.asarray(a) for a in _data(c))
    return (lambda s: step(*s, x, y)), (model, opt_state), None


# ---------------------------------------------------------------- PyTorch eager


def torch_step(c):
    import torch
    from torch.nn import functional as F

    torch.manual_seed(0)
    model = torch_gpt.gpt(c["vocab"], c["context"], c["layers"], c["heads"], c["features"])
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, B2))
    x, y = (torch.from_numpy(a).long() for a in _data(c))

    def run(state):
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        return loss

    return run, None, None


CONTENDERS = {"purenet": purenet_step, "jax.grad": jax_grad_step, "flax nnx": flax_step,
              "equinox": equinox_step, "pytorch eager": torch_step}


def _sync(state):
    if hasattr(state, "item") and not isinstance(state, jax.Array):
        state.item()  # torch
    else:
        jax.block_until_ready(jax.tree_util.tree_leaves(state))
    return state


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--contenders", nargs="*", default=list(CONTENDERS))
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own; on an oversubscribed machine "
                             "torch's spinning OpenMP pool can be 10x slower than one thread)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.torch_threads:
        import torch
        torch.set_num_threads(args.torch_threads)
    c = SMOKE if args.smoke else CONFIG
    repeats, n = (1, 2) if args.smoke else (args.repeats, args.steps)

    built, compile_s, temp = {}, {}, {}
    for name in args.contenders:
        try:
            run, state, temp[name] = CONTENDERS[name](c)
            start = time.perf_counter()
            state = _sync(run(state))
            compile_s[name] = time.perf_counter() - start
            state = _sync(run(state))  # one more warm-up step
            built[name] = [run, state]
        except ImportError as e:
            print(f"skipping {name}: {e}")
    times = {name: [] for name in built}
    for _ in range(repeats):
        for name, slot in built.items():
            run, state = slot
            start = time.perf_counter()
            for _ in range(n):
                state = run(state)
            _sync(state)
            times[name].append((time.perf_counter() - start) / n)
            slot[1] = state
    base = times.get("purenet")
    results = {}
    print(f"GPT train step, {c}, {repeats} repeats x {n} steps; machine: {platform.machine()}, "
          f"jax {jax.__version__} on {jax.default_backend()}")
    print(f"{'contender':<15} {'median ms':>9} {'min-max ms':>15} {'compile s':>9} {'paired':>7} {'temp MiB':>9}")
    for name, ts in times.items():
        paired = statistics.median(t / b for t, b in zip(ts, base)) if base else math.nan
        results[name] = {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                         "compile_s": compile_s[name], "paired_time_over_purenet": paired,
                         "temp_bytes": temp.get(name)}
        mib = "" if temp.get(name) is None else f"{temp[name] / 2**20:.2f}"
        print(f"{name:<15} {1e3 * statistics.median(ts):9.2f} {1e3 * min(ts):7.2f}-{1e3 * max(ts):<7.2f} "
              f"{compile_s[name]:9.2f} {paired:7.2f} {mib:>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": c, "repeats": repeats, "steps": n, "torch_threads": args.torch_threads,
                       "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
