"""Run by test_sharding.py as 2 processes of 4 CPU devices each: fsdp training over both equals one device.

argv: process id, coordinator port, output directory. Each process trains the
same MLP with strategy="fsdp" on an 8-device mesh spanning both processes and,
as the reference, on its own first device; it checks they agree, then both
save the sharded result (each process writes its own shard file).
"""
import sys

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
process, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process,
                           local_device_ids=list(range(4)))
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import purenet as pn  # noqa: E402

assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
data = pn.datasets.digits(dtype=np.float64)
x, y = data.x_train[:64], data.y_train[:64]
net = pn.mlp([64, 32, 10])
kw = dict(key=jax.random.key(0), epochs=1, batch_size=16)
one = pn.fit(net, pn.optim.adam(1e-2), (x, y), **kw)
mesh = pn.distributed.mesh({"data": 8})
many = pn.fit(net, pn.optim.adam(1e-2), (x, y), mesh=mesh, strategy="fsdp", **kw)
w = many.params[0]["W"]
assert not w.is_fully_addressable and w.addressable_shards[0].data.shape == (8, 32)
gathered = multihost_utils.process_allgather(many.params, tiled=True)
for a, b in zip(jax.tree_util.tree_leaves(gathered), jax.tree_util.tree_leaves(one.params)):
    err = float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))
    assert err <= 1e-10, err
np.testing.assert_allclose(many.history["loss"], one.history["loss"], rtol=1e-10)
pn.distributed.save_sharded(out, many.params)
if process == 0:
    pn.checkpoint.save(out + "/reference.ckpt", jax.device_get(gathered))
print("ok two-process", process, flush=True)
