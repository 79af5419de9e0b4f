"""Data parallelism on JAX's own machinery: a device mesh and named shardings.

The batch is split over the mesh's "data" axis; parameters, optimizer state
and batch-norm statistics are replicated. XLA's partitioner then inserts the
collectives itself: the weight gradient  sum_batch h^T dy  becomes per-device
partial sums plus an all-reduce, and batch norm's mean and variance are taken
over the *global* batch, so a sharded step computes what one device would.

    mesh = pn.distributed.data_mesh()                  # all local devices
    result = pn.fit(net, opt, (x, y), key=key, epochs=5, batch_size=256, mesh=mesh)

Several hosts: call `jax.distributed.initialize()` first on every host; the
mesh then spans every process's devices, and each host passes its own rows
to `global_batch` (see examples/data_parallel.py).
"""
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "AXIS", "batch_sharding", "check_divisible", "data_mesh", "global_batch", "replicate", "replicated", "shard_batch",
]

AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None, axis: str = AXIS) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (axis,))


def batch_sharding(mesh: Mesh, axis: str = AXIS) -> NamedSharding:
    """Rows split over the mesh axis, everything else whole."""
    return NamedSharding(mesh, PartitionSpec(axis))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every array whole on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def check_divisible(batch: int, mesh: Mesh, what: str = "batch size") -> None:
    """Raise unless `batch` rows split evenly over the mesh's devices."""
    n = mesh.devices.size
    if batch % n:
        raise ValueError(f"{what} {batch} is not divisible by the {n} devices of the mesh; "
                         f"use a multiple of {n} (each device takes batch / {n} rows)")


def shard_batch(x: Any, mesh: Mesh, axis: str = AXIS) -> jax.Array:
    """Place x with its rows split over the mesh (rows must divide evenly)."""
    check_divisible(np.shape(x)[0], mesh, "batch of")
    return jax.device_put(x, batch_sharding(mesh, axis))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every leaf of tree whole on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def global_batch(local_rows: Any, mesh: Mesh, axis: str = AXIS) -> jax.Array:
    """A global array from this process's rows (multi-host: each host passes its own part)."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh, axis), np.asarray(local_rows))
