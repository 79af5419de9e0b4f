"""pn.enable_compilation_cache: a second process loads what the first compiled.

The cache is process-wide JAX configuration, so each run is a subprocess.
"""
import json
import os
import subprocess
import sys

import pytest

import purenet as pn

SCRIPT = """
import collections, json, sys, jax, jax.numpy as jnp
import purenet as pn
events = collections.Counter()
jax.monitoring.register_event_listener(lambda name, **kwargs: events.update([name]))
directory = pn.enable_compilation_cache(sys.argv[1])
net, opt = pn.mlp([4, 8, 3]), pn.optim.adam(1e-2)
params, state = pn.init(net, jax.random.key(0))
ts = pn.TrainState(opt.init(params), state, jnp.zeros((), jnp.int32))
x, y = jnp.linspace(-1, 1, 80).reshape(20, 4), jnp.arange(20) % 3
ts, loss = jax.jit(lambda ts: pn.train_epoch(net, opt, ts, x, y, jax.random.key(1), batch_size=4))(ts)
print(json.dumps({"directory": directory, "loss": float(loss),
                  "requests": events["/jax/compilation_cache/compile_requests_use_cache"],
                  "hits": events["/jax/compilation_cache/cache_hits"]}))
"""


def run(directory):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(directory)], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_run_compiles_nothing_new(tmp_path):
    cache = tmp_path / "nested" / "cache"
    first = run(cache)
    assert first["directory"] == str(cache)
    entries = set(os.listdir(cache))
    assert any(name.startswith("jit_") for name in entries)  # the epoch program, not just eager ops
    assert first["requests"] > 0 and first["hits"] == 0
    second = run(cache)
    assert second["hits"] == second["requests"] == first["requests"]  # every program loaded, none compiled
    assert set(os.listdir(cache)) == entries
    assert second["loss"] == first["loss"]


def test_default_directory_and_bad_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv(pn.compile_cache.ENV_VAR, str(tmp_path / "from-env"))
    assert pn.compile_cache.default_directory() == str(tmp_path / "from-env")
    monkeypatch.delenv(pn.compile_cache.ENV_VAR)
    assert pn.compile_cache.default_directory().endswith(os.path.join(".cache", "purenet", "xla"))
    with pytest.raises(ValueError, match="min_compile_time_s"):
        pn.enable_compilation_cache(tmp_path, min_compile_time_s=-1)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="cannot create the compilation cache directory"):
        pn.enable_compilation_cache(blocker / "cache")
