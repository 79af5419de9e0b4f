"""Training on many devices: data parallel, parameters sharded over a mesh, sharded checkpoints.

    mesh = pn.distributed.mesh({"data": 2, "model": 4})
    params = pn.distributed.shard_params(net, params, mesh, strategy="fsdp+tensor")
    result = pn.fit(net, opt, (x, y), key=key, epochs=5, mesh=mesh, strategy="fsdp")
    pn.distributed.save_sharded(path, result.opt_state)      # each process writes its own shards

`data` is data parallelism (`data_mesh`, `shard_batch`, `replicate`, ...),
`mesh` builds meshes of named axes, `strategies` places parameters and
optimizer state ("fsdp", "tensor", "fsdp+tensor"), `checkpoints` saves and
restores sharded arrays onto any mesh.
"""
from purenet.distributed.checkpoints import load_sharded, save_sharded
from purenet.distributed.data import (AXIS, batch_sharding, batch_ways, check_divisible, data_axis, data_mesh,
                                      device_bytes, global_batch, put, replicate, replicated, shard_batch)
from purenet.distributed.mesh import MODEL, mesh
from purenet.distributed.strategies import (STRATEGIES, check_strategy, constrain, like_params, param_shardings,
                                            param_specs, shard_params, shard_tree, tensor_axes, tree_shardings)

__all__ = [
    "AXIS", "MODEL", "STRATEGIES", "batch_sharding", "batch_ways", "check_divisible", "check_strategy", "constrain",
    "data_axis", "data_mesh", "device_bytes", "global_batch", "like_params", "load_sharded", "mesh", "param_shardings",
    "param_specs", "put", "replicate", "replicated", "save_sharded", "shard_batch", "shard_params", "shard_tree",
    "tensor_axes", "tree_shardings",
]
