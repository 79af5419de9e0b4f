"""Device meshes of any named axes: `mesh({"data": 2, "model": 4})`."""
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

__all__ = ["MODEL", "mesh"]

MODEL = "model"  # the axis tensor parallelism splits over (the batch splits over distributed.data_axis(mesh))


def mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh of `devices` (default: every device of every process) with the named axes, in order.

    The devices, in `jax.devices()` order (process by process), fill the
    array of shape tuple(axes.values()) in C order: with several processes
    the first axis spans them, so {"data": n, ...} keeps each process's
    devices together on the later axes. The sizes' product must be the
    device count.

    Args:
        axes: axis name -> size, in order, e.g. {"data": 2, "model": 4}
            (`MODEL`, "model", is the axis tensor parallelism splits over).
        devices: the devices to arrange; None takes `jax.devices()`.

    Returns:
        A `jax.sharding.Mesh` of shape tuple(axes.values()) with axis names
            tuple(axes).

    Raises:
        ValueError: if `axes` is empty, maps a non-string name or a size that
            is not a positive int, or its sizes' product is not the number of
            devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not axes:
        raise ValueError("a mesh needs at least one named axis, e.g. pn.distributed.mesh({'data': 8})")
    for name, size in axes.items():
        if not isinstance(name, str) or isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"mesh axes map names to positive sizes, got {name!r}: {size!r}")
    if math.prod(axes.values()) != len(devices):
        raise ValueError(f"mesh axes {dict(axes)} hold {math.prod(axes.values())} devices, but there are "
                         f"{len(devices)}; choose sizes whose product is {len(devices)}")
    return Mesh(np.asarray(devices, dtype=object).reshape(tuple(axes.values())), tuple(axes))
