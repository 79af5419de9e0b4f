"""Data-parallel training on 8 CPU devices, in a subprocess so the rest of the
suite keeps its single device."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import purenet as pn

SCRIPT = Path(__file__).with_name("_multidevice.py")


# ~50 s in full: the default run fits one network (the tanh MLP, which pn.train reuses) and DP-SGD with
# Poisson sampling; the batch-norm-and-dropout fit and the shuffled, chunked DP-SGD run in `-m slow`.
@pytest.mark.parametrize("mode", ["light", pytest.param("full", marks=pytest.mark.slow)])
def test_sharded_training_equals_single_device_training(mode):
    env = pn.xla_flags.environ(dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"))
    out = subprocess.run([sys.executable, str(SCRIPT), mode], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("value_and_grad", "shardings", "fit", "train", "divisibility", "dp"):
        assert f"ok {name}" in out.stdout


def test_one_device_mesh_is_a_plain_run():
    mesh = pn.distributed.data_mesh()
    assert mesh.devices.size == 1 and mesh.axis_names == ("data",)
    with pytest.raises(ValueError, match="not divisible"):
        pn.distributed.check_divisible(3, pn.distributed.data_mesh([mesh.devices.flat[0]] * 2))
