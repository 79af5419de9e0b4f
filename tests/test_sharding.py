"""Parameters sharded over a mesh ("fsdp", "tensor", "fsdp+tensor") on 8 CPU devices, in a subprocess
so the rest of the suite keeps its single device; the strategies' checks on one device; and sharded
checkpoints: every leaf kind pn.save stores, and hostile index files."""
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import purenet as pn

SCRIPT = Path(__file__).with_name("_sharded.py")


@pytest.mark.parametrize("checks", [
    ("gpt", "checkpoint", "noise"),  # attention heads split over the model axis, sharded checkpoints, DP noise
    pytest.param(("mlp", "cnn", "dp"), marks=pytest.mark.slow),
])
def test_sharded_strategies_equal_one_device(checks):
    env = pn.xla_flags.environ(dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"))
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
    env = pn.xla_flags.environ(dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"))
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


def leaf_kinds():
    """One leaf of every kind pn.save stores: Python and numpy scalars, bools, strings, None, 0-d and zero-size
    arrays, typed PRNG keys, and dtypes JAX cannot hold without x64."""
    return {"float": 1.5, "int": 3, "bool": True, "none": None, "str": "abc", "f32": np.float32(2.5),
            "i64_scalar": np.int64(-7), "np_bool": np.bool_(False), "zero_d": jnp.asarray(4.0, jnp.float32),
            "empty": jnp.zeros((0, 3), jnp.float32), "np_empty": np.zeros((2, 0), np.int16),
            "key": jax.random.key(7), "keys": jax.random.split(jax.random.key(1), 3),
            "rbg": jax.random.key(0, impl="rbg"), "i64": np.array([-2**40, 5], np.int64),
            "f64": np.array([1e300, 1 / 3]), "u64": np.array([2**64 - 1], np.uint64), "c128": np.array([1 + 2j]),
            "bf16": np.array([1.5, -0.0], ml_dtypes.bfloat16), "strings": np.array(["ab", "c"]),
            "bytes": np.array([b"x", b"yz"]), "seq": [np.ones(2, np.float32), (None, jnp.arange(3))]}


def same_leaf(a, b):
    """Both a jax array or both numpy, one dtype and shape, the same bits (a PRNG key: its impl and data)."""
    if isinstance(a, jax.Array) != isinstance(b, jax.Array) or a.dtype != b.dtype or a.shape != b.shape:
        return False
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        a, b = jax.random.key_data(a), jax.random.key_data(b)
    return np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.mark.parametrize("x64", [True, False])
def test_save_sharded_round_trips_every_leaf_pn_save_stores(tmp_path, x64):
    with jax.enable_x64(x64):
        tree = leaf_kinds()
        pn.distributed.save_sharded(tmp_path / "sharded", tree)
        expected = pn.checkpoint.load(pn.checkpoint.save(tmp_path / "one.ckpt", tree))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        for got in (pn.distributed.load_sharded(tmp_path / "sharded"),
                    pn.distributed.load_sharded(tmp_path / "sharded", like=tree, shardings=device)):
            assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(expected)
            for (where, a), b in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree_util.tree_leaves(got)):
                assert same_leaf(a, b), (jax.tree_util.keystr(where), a, b)
        assert isinstance(got["f64"], np.ndarray) != x64  # float64 without x64: numpy, as pn.load gives it
        with pytest.raises(pn.CheckpointError, match=r"leaf \['key'\] is key<fry>\[\] in the checkpoint, like has "
                                                      r"key<rbg>\[\]"):
            pn.distributed.load_sharded(tmp_path / "sharded", like={**tree, "key": jax.random.key(0, impl="rbg")})


def test_save_sharded_refuses_what_pn_save_refuses_before_writing(tmp_path):
    pn.distributed.save_sharded(tmp_path, {"w": np.ones(2, np.float32)})
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    with pytest.raises(TypeError, match=r"leaf \['bad'\]\[1\] is not an array"):
        pn.distributed.save_sharded(tmp_path, {"w": np.ones(2, np.float32), "bad": [1, object()]})
    with pytest.raises(TypeError, match=r"leaf \['t'\] has dtype timedelta64"):
        pn.distributed.save_sharded(tmp_path, {"t": np.array([1], "m8[s]")})
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
    assert pn.distributed.load_sharded(tmp_path)["w"].tolist() == [1.0, 1.0]


def crafted_index(tmp_path, **changes):
    """A real one-leaf sharded save, then its index rewritten with `changes` (what an attacker controls)."""
    pn.distributed.save_sharded(tmp_path, {"x": np.ones(3, np.float32)})
    index = pn.checkpoint.load(tmp_path / "index.ckpt")
    pn.checkpoint.save(tmp_path / "index.ckpt", {**index, **changes})
    return tmp_path


HOSTILE_INDEXES = [
    ("larger than the shard files", {"shapes": {"x": np.array([2**27], np.int64)}},
     r"leaf \['x'\] has shape \[134217728\] and dtype float32 \(536870912 bytes\), more than the \d+ bytes"),
    ("larger than the shard files together", {"shapes": {"x": np.array([150]), "y": np.array([150])},
                                              "dtypes": ["float32", "float32"]},
     r"leaf \['y'\] has shape \[150\] and dtype float32 \(600 bytes\), with the leaves before it, more than"),
    ("too large for any array", {"shapes": {"x": np.array([2**62, 2**62], np.int64)}},
     r"leaf \['x'\] has shape \[4611686018427387904, 4611686018427387904\], too large for any array"),
    ("zero-size but too large", {"shapes": {"x": np.array([0, 2**62, 2**62], np.int64)}}, "too large for any array"),
    ("negative", {"shapes": {"x": np.array([-3], np.int64)}}, r"leaf \['x'\] has shape \[-3\], not"),
    ("float", {"shapes": {"x": np.array([3.0])}}, r"leaf \['x'\] has shape \[3.0\], not"),
    ("two-dimensional", {"shapes": {"x": np.array([[3]], np.int64)}}, r"leaf \['x'\] has shape \[\[3\]\], not"),
    ("too many axes", {"shapes": {"x": np.ones(33, np.int64)}}, r"leaf \['x'\] has shape \[1, 1,"),
    ("unknown dtype", {"dtypes": ["object"]}, r"leaf \['x'\] has unknown dtype 'object'"),
    ("dtype not a string", {"dtypes": [np.array([1, 2])]}, r"leaf \['x'\] has unknown dtype"),
    ("processes", {"processes": 0}, "processes must be a positive integer, got 0"),
    ("id", {"id": "../../elsewhere"}, "id must be 16 hexadecimal digits, got '../../elsewhere'"),
    ("key impl", {"keys": {"0": "threefry2x32"}}, r"leaf \['x'\] is a PRNG key of dtype float32"),
]


@pytest.mark.parametrize("changes,message", [c[1:] for c in HOSTILE_INDEXES], ids=[c[0] for c in HOSTILE_INDEXES])
def test_load_sharded_refuses_a_crafted_index_before_allocating(tmp_path, changes, message):
    import time
    import tracemalloc

    path = crafted_index(tmp_path, **changes)
    tracemalloc.start()
    began = time.perf_counter()
    try:
        with pytest.raises(pn.CheckpointError, match=message):
            pn.distributed.load_sharded(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20 and time.perf_counter() - began < 5, (peak, time.perf_counter() - began)


SHARDED_KEYS = """
import sys, jax, numpy as np, purenet as pn
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = pn.distributed.mesh({"data": 4})
rows, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
keys = jax.device_put(jax.random.split(jax.random.key(3), 8), rows)
tree = {"keys": keys, "f64": np.arange(4.0), "n": 7, "w": jax.device_put(np.ones((8, 4), np.float32), rows)}
pn.distributed.save_sharded(sys.argv[1], tree)
for spec in (rows, whole):
    back = pn.distributed.load_sharded(sys.argv[1], tree, {"keys": spec, "f64": rows, "n": whole, "w": spec})
    assert back["keys"].dtype == keys.dtype and back["keys"].sharding.is_equivalent_to(spec, 1)
    assert np.array_equal(jax.random.key_data(back["keys"]), jax.random.key_data(keys))
    assert type(back["f64"]) is np.ndarray and back["f64"].dtype == np.float64 and back["n"].dtype == np.int64
    assert back["w"].sharding.is_equivalent_to(spec, 2) and np.array_equal(back["w"], tree["w"])
print("ok sharded keys")
"""


def test_sharded_prng_keys_and_64_bit_leaves_round_trip_on_four_devices(tmp_path):
    env = pn.xla_flags.environ(dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"))
    out = subprocess.run([sys.executable, "-c", SHARDED_KEYS, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0 and "ok sharded keys" in out.stdout, out.stdout + out.stderr
