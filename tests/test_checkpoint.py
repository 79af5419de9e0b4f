"""Checkpoints: round trips, verification, atomic writes, resumable training, crash safety."""
import collections
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import purenet as pn
from purenet.io.checkpoint import CheckpointError


def sample_tree():
    net = pn.mlp([3, 4, 2], batchnorm=True)
    params, state = pn.init(net, jax.random.key(0))
    opt_state = pn.optim.adam(1e-3).init(params)
    return {"opt": opt_state, "state": state, "key": jax.random.key(3), "nothing": None,
            "history": [jnp.arange(3.0), jnp.ones((2, 2), jnp.bfloat16)], "step": jnp.int32(7)}


def test_round_trip_keeps_structure_values_and_dtypes(tmp_path):
    tree = sample_tree()
    path = pn.save(tmp_path / "a.ckpt", tree)
    for loaded in (pn.load(path), pn.load(path, like=tree)):
        assert isinstance(loaded["opt"], pn.optim.OptState)
        assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(tree)
        chex.assert_trees_all_equal(jax.random.key_data(loaded["key"]), jax.random.key_data(tree["key"]))
        plain = lambda t: {k: v for k, v in t.items() if k != "key"}  # noqa: E731
        chex.assert_trees_all_equal(plain(loaded), plain(tree))
        chex.assert_trees_all_equal_shapes_and_dtypes(plain(loaded), plain(tree))


def test_save_replaces_atomically_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "a.ckpt"
    pn.save(path, {"w": jnp.zeros(3)})
    pn.save(path, {"w": jnp.ones(3)})
    np.testing.assert_array_equal(pn.load(path)["w"], 1.0)
    assert os.listdir(tmp_path) == ["a.ckpt"]


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "a.ckpt"
    pn.save(path, {"w": jnp.ones(3)})
    with pytest.raises(TypeError):
        pn.save(path, {"w": jnp.zeros(3), "bad": object()})
    np.testing.assert_array_equal(pn.load(path)["w"], 1.0)
    assert os.listdir(tmp_path) == ["a.ckpt"]


def test_truncated_file_is_an_error(tmp_path):
    path = pn.save(tmp_path / "a.ckpt", sample_tree())
    raw = Path(path).read_bytes()
    for cut in (5, 40, len(raw) // 2, len(raw) - 1):
        Path(path).write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match="truncated"):
            pn.load(path)


def test_every_single_flipped_byte_is_detected(tmp_path):
    path = pn.save(tmp_path / "a.ckpt", {"w": jnp.arange(4.0), "b": {"c": jnp.ones(2)}})
    raw = bytearray(Path(path).read_bytes())
    for i in range(len(raw)):
        corrupt = bytearray(raw)
        corrupt[i] ^= 0x10
        Path(path).write_bytes(bytes(corrupt))
        with pytest.raises((CheckpointError, ValueError)):
            pn.load(path)
    Path(path).write_bytes(bytes(raw))
    np.testing.assert_array_equal(pn.load(path)["w"], jnp.arange(4.0))


def test_flipped_data_byte_names_the_leaf(tmp_path):
    path = pn.save(tmp_path / "a.ckpt", {"w": jnp.arange(4.0), "b": jnp.ones(2)})
    raw = bytearray(Path(path).read_bytes())
    raw[-3] ^= 0x01  # inside the last leaf's data ("w": dict keys are stored sorted)
    Path(path).write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"checksum mismatch in leaf \['w'\]"):
        pn.load(path)


def test_checkpoint_of_another_architecture_names_the_leaf_and_shapes(tmp_path):
    params, _ = pn.init(pn.mlp([3, 4, 2]), jax.random.key(0))
    other, _ = pn.init(pn.mlp([3, 5, 2]), jax.random.key(0))
    path = pn.save(tmp_path / "a.ckpt", other)
    with pytest.raises(CheckpointError, match=r"leaf \[0\]\['W'\] has shape \(3, 5\), expected \(3, 4\)"):
        pn.load(path, like=params)


def test_missing_and_extra_leaves_are_named(tmp_path):
    path = pn.save(tmp_path / "a.ckpt", {"W": jnp.ones(2), "extra": jnp.ones(1)})
    with pytest.raises(CheckpointError, match=r"missing leaves \[\"\['b'\]\"\], extra leaves \[\"\['extra'\]\"\]"):
        pn.load(path, like={"W": jnp.ones(2), "b": jnp.ones(2)})


def test_wrong_dtype_against_like(tmp_path):
    path = pn.save(tmp_path / "a.ckpt", {"W": jnp.ones(2, jnp.float32)})
    with pytest.raises(CheckpointError, match="dtype float32, expected float64"):
        pn.load(path, like={"W": jnp.ones(2, jnp.float64)})


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("these are not the weights you are looking for" * 3)
    with pytest.raises(CheckpointError, match="not a purenet checkpoint"):
        pn.load(path)


def test_strings_round_trip_and_other_dtypes_are_refused_at_save(tmp_path):
    tree = {"names": np.array(["digits", "ünïcode", ""]), "raw": np.array([b"x", b"yz"]), "title": "run 7",
            "big_endian": np.arange(3, dtype=">i4")}
    loaded = pn.load(pn.save(tmp_path / "s.ckpt", tree))
    for k in ("names", "raw"):
        assert loaded[k].dtype == tree[k].dtype
        np.testing.assert_array_equal(loaded[k], tree[k])
    assert str(loaded["title"]) == "run 7"
    np.testing.assert_array_equal(loaded["big_endian"], [0, 1, 2])
    with pytest.raises(TypeError, match=r"leaf \['t'\] has dtype datetime64\[D\], which checkpoints do not store"):
        pn.save(tmp_path / "d.ckpt", {"t": np.array(["2024-01-01"], "datetime64[D]")})


def test_file_modes_follow_the_umask_and_are_kept_on_replace(tmp_path):
    path = tmp_path / "m.ckpt"
    old = os.umask(0o022)
    try:
        pn.save(path, {"w": jnp.ones(2)})
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644  # as open(path, "w") would make it
        os.chmod(path, 0o640)
        pn.save(path, {"w": jnp.zeros(2)})
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    finally:
        os.umask(old)


def test_ordered_dict_leaves_are_named_by_their_key(tmp_path):
    tree = collections.OrderedDict([("b", jnp.ones(2)), ("a", jnp.arange(4.0))])  # insertion order is not sorted
    path = pn.save(tmp_path / "o.ckpt", tree)
    raw = bytearray(Path(path).read_bytes())
    raw[-3] ^= 0x01  # inside the last leaf in the file: "b" (keys are stored sorted)
    Path(path).write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"checksum mismatch in leaf \['b'\]"):
        pn.load(path)
    path = pn.save(tmp_path / "p.ckpt", tree)
    with pytest.raises(CheckpointError, match=r"leaf \['a'\] has shape \(4,\), expected \(3,\)"):
        pn.load(path, like=collections.OrderedDict([("b", jnp.ones(2)), ("a", jnp.ones(3))]))


# ------------------------------------------------------------------ resumable training


def test_interrupted_and_resumed_fit_is_bit_identical(tmp_path):
    d = pn.datasets.digits(dtype=np.float32)
    net = pn.mlp([64, 32, 10], dropout=0.2, batchnorm=True)

    def run(epochs, **kw):
        return pn.fit(net, pn.optim.adam(pn.schedules.exponential_decay(1e-2, 40, 0.5)),
                      (d.x_train[:400], d.y_train[:400]), key=jax.random.key(5), epochs=epochs, batch_size=32,
                      validation=(d.x_test, d.y_test), early_stopping=pn.EarlyStopping(20),
                      augment=pn.augment.gaussian_noise(0.1), **kw)

    whole = run(6)
    path = tmp_path / "run.ckpt"
    first = run(4, checkpoint=path, checkpoint_every=2)  # "interrupted" after 4 epochs
    assert len(first.history["loss"]) == 4
    resumed = run(6, checkpoint=path, resume=True)
    chex.assert_trees_all_equal(resumed.params, whole.params)
    chex.assert_trees_all_equal(resumed.state, whole.state)
    chex.assert_trees_all_equal(resumed.opt_state, whole.opt_state)
    for k in whole.history:
        np.testing.assert_array_equal(resumed.history[k], whole.history[k])
    with pytest.raises(CheckpointError, match="different key"):
        pn.fit(net, pn.optim.adam(1e-2), (d.x_train[:400], d.y_train[:400]), key=jax.random.key(6),
               epochs=6, checkpoint=path, resume=True, early_stopping=pn.EarlyStopping(20),
               validation=(d.x_test, d.y_test))


SMALL = pn.mlp([64, 16, 10])


@pytest.fixture(scope="module")
def small():
    d = pn.datasets.digits(dtype=np.float32)
    return (d.x_train[:120], d.y_train[:120]), (d.x_test[:60], d.y_test[:60])


def fit_small(data, epochs, **kw):
    return pn.fit(SMALL, pn.optim.sgd(0.1), data, key=jax.random.key(0), epochs=epochs, batch_size=40, **kw)


def test_fit_checks_the_checkpoint_path_before_training(tmp_path, small, monkeypatch):
    monkeypatch.setattr(sys.modules["purenet.training.fit"], "prepare_run", None)  # no run is prepared: it would fail
    with pytest.raises(CheckpointError, match="the directory .*missing does not exist"):
        fit_small(small[0], 2, checkpoint=tmp_path / "missing" / "run.ckpt", checkpoint_every=10)
    with pytest.raises(CheckpointError, match="is a directory"):
        fit_small(small[0], 2, checkpoint=tmp_path)


def test_a_failed_save_warns_and_fit_still_returns_its_result(tmp_path, small, monkeypatch):
    def full_disk(path, tree):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pn.checkpoint, "save", full_disk)
    with pytest.warns(RuntimeWarning, match="could not save checkpoint .* after epoch 2 .*No space left"):
        result = fit_small(small[0], 2, checkpoint=tmp_path / "run.ckpt", checkpoint_every=10)
    assert len(result.history["loss"]) == 2 and result.params is not None


def test_resume_says_which_input_differs(tmp_path, small):
    (x, y), validation = small
    path = tmp_path / "run.ckpt"
    fit_small((x, y), 1, checkpoint=path, validation=validation)
    with pytest.raises(CheckpointError, match="written by a run with validation data; pass the same validation="):
        fit_small((x, y), 2, checkpoint=path, resume=True)
    with pytest.raises(CheckpointError, match="written with different validation data"):
        fit_small((x, y), 2, checkpoint=path, resume=True, validation=(validation[0][:30], validation[1][:30]))
    with pytest.raises(CheckpointError, match="written with different training data"):
        fit_small((x[:100], y[:100]), 2, checkpoint=path, resume=True, validation=validation)
    assert len(fit_small((x, y), 2, checkpoint=path, resume=True, validation=validation).history["loss"]) == 2
    path = tmp_path / "plain.ckpt"
    fit_small((x, y), 1, checkpoint=path)
    with pytest.raises(CheckpointError, match="written by a run without validation data"):
        fit_small((x, y), 2, checkpoint=path, resume=True, validation=validation)


# ------------------------------------------------------------------ crash safety

WRITER = """
import sys
import numpy as np
from purenet.io.checkpoint import save
path = sys.argv[1]
i = int(sys.argv[2])
print("ready", flush=True)
while True:
    i += 1
    save(path, {"step": np.int64(i), "big": np.full((256, 256), i, np.float64), "small": [np.full(3, i)]})
"""


def test_sigkill_while_saving_never_loses_the_last_checkpoint(tmp_path):
    path = str(tmp_path / "crash.ckpt")
    pn.save(path, {"step": np.int64(0), "big": np.zeros((256, 256)), "small": [np.zeros(3, np.int64)]})
    rng = random.Random(0)
    last, start = 0, time.monotonic()
    kills = 0
    while kills < 12 and time.monotonic() - start < 45:
        proc = subprocess.Popen([sys.executable, "-c", WRITER, path, str(last)], stdout=subprocess.PIPE)
        proc.stdout.readline()  # imports done: now it is saving in a loop
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        tree = pn.load(path)
        step = int(tree["step"])
        assert step >= last
        np.testing.assert_array_equal(tree["big"], step)
        np.testing.assert_array_equal(tree["small"][0], step)
        last = step
    assert kills >= 5 and last > 0
    leftovers = [f for f in os.listdir(tmp_path) if f != "crash.ckpt"]
    assert all(f.endswith(".tmp") for f in leftovers)  # a killed writer may leave its temp file, never a bad target


# ---------------------------------------------------------------- checkpoints written before the tree moved

DATA = Path(__file__).resolve().parent / "data"  # written by tests/data/write_7208650.py at commit 7208650


def test_checkpoints_written_before_the_tree_moved_load_as_they_were(tmp_path):
    """7208650 kept datasets, checkpoint and the analyses at the package root; its files name
    purenet.datasets:Split and the training types. They load to the same types and arrays, and a fit
    checkpoint resumes."""
    import shutil

    split = pn.load(DATA / "split_7208650.ckpt")["split"]
    assert type(split) is pn.datasets.Split
    digits = pn.datasets.digits()
    for saved, now in zip(split, digits):
        np.testing.assert_array_equal(np.asarray(saved), np.asarray(now)[:4])
    run = pn.load(DATA / "fit_7208650.ckpt")
    assert type(run["train_state"]).__name__ == "TrainState"
    assert type(run["train_state"].opt_state) is pn.optim.OptState
    assert type(run["early_stopping"]).__name__ == "EarlyStoppingState"
    path = tmp_path / "run.ckpt"
    shutil.copy(DATA / "fit_7208650.ckpt", path)
    # resumed in a process of its own: the file is float32, and this process may run with x64 switched on
    script = f"""
import jax, numpy as np, purenet as pn
d = pn.datasets.digits()
run = pn.load({str(DATA / "fit_7208650.ckpt")!r})
resumed = pn.fit(pn.mlp([64, 8, 10]), pn.optim.adam(1e-2), (d.x_train[:64], d.y_train[:64]), key=jax.random.key(0),
                 epochs=2, batch_size=32, early_stopping=pn.EarlyStopping(patience=3),
                 validation=(d.x_test[:32], d.y_test[:32]), checkpoint={str(path)!r}, resume=True)
assert len(resumed.history["loss"]) == 2
np.testing.assert_array_equal(resumed.history["loss"][:1], run["history"]["loss"])
print("resumed")
"""
    env = pn.xla_flags.environ(dict(os.environ, JAX_ENABLE_X64="0", JAX_PLATFORMS="cpu"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "resumed" in out.stdout, out.stderr
