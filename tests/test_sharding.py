"""Parameters sharded over a mesh ("fsdp", "tensor", "fsdp+tensor") on 8 CPU devices, in a subprocess
so the rest of the suite keeps its single device; and the strategies' checks on one device."""
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import purenet as pn

SCRIPT = Path(__file__).with_name("_sharded.py")


@pytest.mark.parametrize("checks", [
    ("gpt", "checkpoint", "noise"),  # attention heads split over the model axis, sharded checkpoints, DP noise
    pytest.param(("mlp", "cnn", "dp"), marks=pytest.mark.slow),
])
def test_sharded_strategies_equal_one_device(checks):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, str(SCRIPT), *checks], capture_output=True, text=True, env=env,
                         timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in checks:
        assert f"ok {'dp and float32' if name == 'dp' else name}" in out.stdout


def test_mesh_and_strategy_errors_name_the_fix():
    with pytest.raises(ValueError, match="product is 1"):
        pn.distributed.mesh({"data": 2, "model": 4})
    mesh = pn.distributed.mesh({"data": 1})
    assert mesh.axis_names == ("data",)
    net = pn.mlp([4, 8, 2])
    params, _ = pn.init(net, jax.random.key(0))
    with pytest.raises(ValueError, match="unknown sharding strategy"):
        pn.distributed.shard_params(net, params, mesh, strategy="zero")
    with pytest.raises(ValueError, match="axis 'model'"):
        pn.distributed.shard_params(net, params, mesh, strategy="tensor")
    with pytest.raises(ValueError, match="needs a mesh"):
        pn.fit(net, pn.optim.sgd(0.1), (jax.numpy.ones((4, 4)), jax.numpy.zeros(4, int)), key=jax.random.key(0),
               epochs=1, strategy="fsdp")


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_fsdp_as_one_device(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    script, port = str(Path(__file__).with_name("_two_process.py")), str(_free_port())
    procs = [subprocess.Popen([sys.executable, script, str(i), port, str(tmp_path)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out
        assert f"ok two-process {i}" in out
    # each process wrote only its own shards; one device restores them bit-identically
    assert len([f for f in os.listdir(tmp_path) if f.startswith("shards-")]) == 2
    reference = pn.checkpoint.load(str(tmp_path / "reference.ckpt"))
    restored = pn.distributed.load_sharded(str(tmp_path), reference)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(reference)):
        assert a.dtype == b.dtype and bytes(memoryview(jax.numpy.asarray(a).__array__())) == bytes(
            memoryview(jax.numpy.asarray(b).__array__()))
