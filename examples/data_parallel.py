"""Data-parallel training on every local device, with JAX's meshes and shardings.

Each batch is split over the devices of a 1-D mesh; params and optimizer
state are replicated; XLA all-reduces the gradients. On a CPU-only machine,
fake several devices to see it work:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/data_parallel.py

Several hosts: run the same script on every host with --coordinator
HOST:PORT --num-processes N --process-id I; jax.distributed.initialize()
joins them, the mesh spans all their devices, and every host passes the
same data to fit. --multihost-dry-run takes that code path as a single
process on this machine.
"""
import argparse
import time

import jax
import numpy as np

import purenet as pn
from _common import epochs

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=epochs(20))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--coordinator", help="HOST:PORT of process 0, for multi-host runs")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--multihost-dry-run", action="store_true",
                        help="initialise jax.distributed as a single process on this machine")
    args = parser.parse_args()

    if args.multihost_dry_run:
        args.coordinator = args.coordinator or "127.0.0.1:12765"
    if args.coordinator:
        jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
        print(f"process {jax.process_index()} of {jax.process_count()}, "
              f"{jax.local_device_count()} local of {jax.device_count()} devices")

    mesh = pn.distributed.data_mesh()
    n = mesh.devices.size
    batch = max(n, args.batch_size // n * n)  # a multiple of the device count
    print(f"mesh: {n} devices {[d.id for d in mesh.devices.flat]}; batch {batch} = {batch // n} rows per device")

    data = pn.datasets.digits()
    net = pn.mlp([64, 128, 10], batchnorm=True)
    start = time.perf_counter()
    result = pn.fit(net, pn.optim.adam(1e-3), (data.x_train, data.y_train), key=jax.random.key(0),
                    epochs=args.epochs, batch_size=batch, validation=(data.x_test, data.y_test), mesh=mesh)
    leaf = result.params[0]["W"]
    print(f"{args.epochs} epochs in {time.perf_counter() - start:.1f} s; params replicated: "
          f"{leaf.sharding.is_fully_replicated}")
    print(f"test accuracy: {float(np.asarray(result.history['val_accuracy'])[-1]):.4f}")


if __name__ == "__main__":
    main()
