"""Sharding: per-device params + optimizer memory at 8-way FSDP vs replicated, and step time vs data parallel.

    python benchmarks/sharding.py                 # a simulated 8-device CPU mesh
    python benchmarks/sharding.py --mode gpu      # the devices there are (one GPU: a 1-device mesh)

Step times are medians of interleaved repeats (data parallel, then each strategy, in turn).
"""
import argparse
import os
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
ap.add_argument("--repeats", type=int, default=5)
ap.add_argument("--features", type=int, default=128)
args = ap.parse_args()
if args.mode == "cpu":
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
import jax  # noqa: E402
import numpy as np  # noqa: E402

import purenet as pn  # noqa: E402

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

n = jax.device_count()
net = pn.gpt(vocab_size=256, context=64, layers=2, heads=8, features=args.features)
params, state = pn.init(net, jax.random.key(0))
opt = pn.optim.adam(1e-3)
tokens = np.asarray(jax.random.randint(jax.random.key(1), (8 * n, 65), 0, 256))
data = pn.distributed.data_mesh()
whole = sum(v.nbytes for v in jax.tree_util.tree_leaves(opt.init(params)))
setups = {"data parallel": (data, None), "fsdp": (pn.distributed.mesh({"data": n}), "fsdp")}
if n % 4 == 0 and n >= 4:
    setups["fsdp+tensor"] = (pn.distributed.mesh({"data": n // 4, "model": 4}), "fsdp+tensor")
steps = {}
for name, (mesh, strategy) in setups.items():
    step = jax.jit(pn.training.build_step(net, opt, mesh=mesh, strategy=strategy))
    carry = ((pn.distributed.shard_tree(net, (opt.init(params), state), params, mesh, strategy) if strategy
              else pn.distributed.replicate((opt.init(params), state), mesh)))
    batch = (pn.distributed.shard_batch(tokens[:, :-1], mesh), pn.distributed.shard_batch(tokens[:, 1:], mesh),
             jax.random.key(0))
    carry, loss = step(carry, batch)
    jax.block_until_ready(loss)
    held = pn.distributed.device_bytes(carry[0])
    print(f"{name:14s} per-device params + Adam state {held / 2**20:.3f} MiB = {held / whole:.4f} of {whole / 2**20:.3f}"
          f" MiB (target for 8-way fsdp: <= 1/8 + 5% = {1.05 / 8:.4f})", flush=True)
    steps[name] = (step, carry, batch, [])
for _ in range(args.repeats):
    for name, (step, carry, batch, times) in steps.items():
        t = time.perf_counter()
        jax.block_until_ready(step(carry, batch))
        times.append(time.perf_counter() - t)
base = np.median(steps["data parallel"][3])
for name, (_, _, _, times) in steps.items():
    print(f"{name:14s} step {np.median(times) * 1e3:8.2f} ms median of {args.repeats} ({np.median(times) / base:.2f}x "
          f"data parallel)")
