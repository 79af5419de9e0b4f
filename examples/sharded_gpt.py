"""The GPT on a simulated 8-device mesh, with each sharding strategy: per-device parameter + optimizer memory.

    python examples/sharded_gpt.py            # 8 CPU devices are simulated when there is one device

Each strategy trains the same few steps; the losses equal the single-device run's.
"""
import os
import sys

if "jax" not in sys.modules and "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jax  # noqa: E402
import numpy as np  # noqa: E402

import purenet as pn  # noqa: E402

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation


def main(steps=4, batch=16, features=64):
    n = jax.device_count()
    tokens = np.asarray(jax.random.randint(jax.random.key(0), (steps * batch, 33), 0, 128))
    net = pn.gpt(vocab_size=128, context=32, layers=2, heads=4, features=features)
    kw = dict(key=jax.random.key(1), epochs=1, batch_size=batch)
    opt = pn.optim.adam(3e-3)
    one = pn.fit(net, opt, (tokens[:, :-1], tokens[:, 1:]), **kw)
    whole = sum(v.nbytes for v in jax.tree_util.tree_leaves(one.opt_state))
    print(f"{n} devices; params + Adam state: {whole / 1024:.1f} KiB on one device; loss {one.history['loss'][-1]:.4f}")
    meshes = {"fsdp": {"data": n}, "tensor": {"data": n // 4, "model": 4}, "fsdp+tensor": {"data": n // 4, "model": 4}}
    for strategy, axes in meshes.items():
        mesh = pn.distributed.mesh(axes)
        run = pn.fit(net, opt, (tokens[:, :-1], tokens[:, 1:]), mesh=mesh, strategy=strategy, **kw)
        held = pn.distributed.device_bytes(run.opt_state)
        print(f"{strategy:12s} mesh {axes}: {held / 1024:7.1f} KiB per device ({held / whole:.3f} of the whole); "
              f"loss {run.history['loss'][-1]:.4f}")


if __name__ == "__main__":
    main()
