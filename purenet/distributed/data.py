"""Data parallelism on JAX's own machinery: a device mesh and named shardings.

The batch is split over the mesh's data axis (`data_axis`: the axis named
"data", or the only axis of a 1-D mesh whatever its name); parameters,
optimizer state and batch-norm statistics are replicated. XLA's partitioner
then inserts the collectives itself: the weight gradient `sum_batch h^T dy` becomes per-device
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
    "AXIS", "batch_sharding", "batch_ways", "check_divisible", "data_axis", "data_mesh", "device_bytes",
    "global_batch", "put", "replicate", "replicated", "shard_batch",
]

AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None, axis: str = AXIS) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process).

    Its one axis, of any name, is the data axis the batch splits over.

    Args:
        devices: the devices, in order; None takes `jax.devices()`.
        axis: the axis' name.

    Returns:
        A `jax.sharding.Mesh` of shape (len(devices),) with the one axis `axis`.
    """
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (axis,))


def data_axis(mesh: Mesh, axis: str | None = None) -> str | None:
    """The mesh axis a batch splits over.

    That is `axis` when given (it must be one of the mesh's axes), else
    "data" (AXIS) when the mesh has it, else the only axis of a 1-D mesh
    (`data_mesh(axis="batch")`, `mesh({"model": 8})`); None on a mesh of
    several axes without "data" (the batch stays whole).

    Args:
        mesh: the device mesh.
        axis: the axis to use, or None to pick it as above.

    Returns:
        The axis name, or None when the batch is not split.

    Raises:
        ValueError: if `axis` is given and is not one of the mesh's axes.
    """
    if axis is not None:
        if axis not in mesh.axis_names:
            raise ValueError(f"the mesh has no axis {axis!r} to split the batch over; its axes are "
                             f"{tuple(mesh.axis_names)}")
        return axis
    if AXIS in mesh.axis_names:
        return AXIS
    return str(mesh.axis_names[0]) if len(mesh.axis_names) == 1 else None


def batch_sharding(mesh: Mesh, axis: str | None = None) -> NamedSharding:
    """Rows split over the mesh's data axis (`data_axis(mesh, axis)`), everything else whole.

    On a mesh of several axes without "data", such as {"a": 2, "b": 4}, the
    batch is whole.

    Args:
        mesh: the device mesh.
        axis: the data axis, or None to pick it (`data_axis`).

    Returns:
        A `NamedSharding` with `PartitionSpec(axis)` (or `PartitionSpec()`).

    Raises:
        ValueError: if `axis` is given and is not one of the mesh's axes.
    """
    name = data_axis(mesh, axis)
    return NamedSharding(mesh, PartitionSpec() if name is None else PartitionSpec(name))


def batch_ways(mesh: Mesh, axis: str | None = None) -> int:
    """How many parts a batch splits into: the size of the mesh's data axis (1 when it has none).

    Args:
        mesh: the device mesh.
        axis: the data axis, or None to pick it (`data_axis`).

    Returns:
        The number of parts, an int >= 1.

    Raises:
        ValueError: if `axis` is given and is not one of the mesh's axes.
    """
    name = data_axis(mesh, axis)
    return 1 if name is None else int(mesh.shape[name])


def replicated(mesh: Mesh) -> NamedSharding:
    """Every array whole on every device of the mesh.

    Args:
        mesh: the device mesh.

    Returns:
        A `NamedSharding` with `PartitionSpec()`.
    """
    return NamedSharding(mesh, PartitionSpec())


def check_divisible(batch: int, mesh: Mesh, what: str = "batch size", axis: str | None = None) -> None:
    """Raise unless `batch` rows split evenly over the mesh's data axis (`data_axis(mesh, axis)`).

    Args:
        batch: the number of rows.
        mesh: the device mesh.
        what: how the error message names `batch`.
        axis: the data axis, or None to pick it (`data_axis`).

    Raises:
        ValueError: if `batch` is not a multiple of `batch_ways(mesh, axis)`,
            or `axis` is not one of the mesh's axes.
    """
    n = batch_ways(mesh, axis)
    if batch % n:
        where = (f"the {n} devices of the mesh" if n == mesh.devices.size
                 else f"the {n} devices of the mesh's {data_axis(mesh, axis)!r} axis")
        raise ValueError(f"{what} {batch} is not divisible by {where}; "
                         f"use a multiple of {n} (each device takes batch / {n} rows)")


def shard_batch(x: Any, mesh: Mesh, axis: str | None = None) -> jax.Array:
    """Place x with its rows split over the mesh's data axis (rows must divide evenly).

    Args:
        x: an array, shape (batch, ...).
        mesh: the device mesh.
        axis: the data axis, or None to pick it (`data_axis`).

    Returns:
        x as a `jax.Array` with `batch_sharding(mesh, axis)`.

    Raises:
        ValueError: if batch does not divide by the size of the data axis.
    """
    check_divisible(np.shape(x)[0], mesh, "batch of", axis)
    return jax.device_put(x, batch_sharding(mesh, axis))


def put(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """Place one array with `sharding`.

    On a mesh spanning several processes each process passes the same whole
    value and keeps only its own devices' parts. A typed PRNG key is placed
    as its key data and rewrapped.

    Args:
        x: an array (numpy, jax or a typed PRNG key) or anything numpy converts.
        sharding: where its parts go.

    Returns:
        x as a global `jax.Array` with `sharding`.
    """
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):  # a key: place its raw data
        return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every leaf of tree whole on every device of the mesh.

    Args:
        tree: a pytree of arrays (params, optimizer state, data).
        mesh: the device mesh.

    Returns:
        The tree with every leaf a `jax.Array` replicated over `mesh`.
    """
    sharding = replicated(mesh)
    return jax.tree_util.tree_map(lambda leaf: put(leaf, sharding), tree)


def global_batch(local_rows: Any, mesh: Mesh, axis: str | None = None) -> jax.Array:
    """A global array from this process's rows (multi-host: each host passes its own part).

    Args:
        local_rows: this process's rows, shape (local_batch, ...); the global
            batch is the rows of every process together.
        mesh: the device mesh (spanning every process).
        axis: the data axis, or None to pick it (`data_axis`).

    Returns:
        A global `jax.Array` of shape (global_batch, ...) with
            `batch_sharding(mesh, axis)`.

    Raises:
        ValueError: if `axis` is given and is not one of the mesh's axes.
    """
    return jax.make_array_from_process_local_data(batch_sharding(mesh, axis), np.asarray(local_rows))


def device_bytes(tree: Any) -> int:
    """The most bytes that any one device holds of tree's arrays (their addressable shards).

    Args:
        tree: a pytree of `jax.Array`s.

    Returns:
        The largest per-device total of shard bytes, over this process's
            devices (0 for an empty tree).
    """
    per: dict = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
    return max(per.values(), default=0)
