"""Run by test_sharding.py in a subprocess with 8 forced CPU devices: parameters sharded over a mesh.

Each check prints "ok <name>" (and "collectives <model> <strategy> {...}", the
counts of the compiled training step's collectives); any failure raises. Arguments
name the checks to run (mlp, cnn, gpt, dp, checkpoint; default all); checkpoint
needs gpt.
"""
import math
import os
import re
import sys
import tempfile

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import purenet as pn  # noqa: E402

assert jax.device_count() == 8, jax.devices()
MESHES = {"fsdp": {"data": 8}, "tensor": {"data": 2, "model": 4}, "fsdp+tensor": {"data": 2, "model": 4}}
WAYS = {"fsdp": 8, "tensor": 4, "fsdp+tensor": 8}  # how many parts the strategy splits a weight matrix into
HLO = "--collectives" in sys.argv  # print the compiled step's collectives (benchmarks/sharding.py)
only = set(sys.argv[1:]) - {"--collectives"}


def selected(name):
    return not only or name in only


def rel(a, b):
    return max([0.0] + [float(jnp.max(jnp.abs(u - v)) / (jnp.max(jnp.abs(v)) + 1e-300))
               for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))])


def check(name):
    print("ok", name, flush=True)


def collectives(hlo):
    return {op: len(re.findall(rf"= [^=]*? {op}(-start)?\(", hlo))
            for op in ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")}


digits = pn.datasets.digits(dtype=np.float64)
tokens = np.asarray(jax.random.randint(jax.random.key(5), (48, 17), 0, 64))
MODELS = {
    "mlp": (pn.mlp([64, 32, 10]), digits.x_train[:48], digits.y_train[:48]),
    "cnn": (pn.Sequential([pn.Conv2D(8, 3), pn.ReLU(), pn.BatchNorm(), pn.Conv2D(8, 3), pn.ReLU(),
                           pn.GlobalAvgPool2D(), pn.Dense(16), pn.ReLU(), pn.Dense(10), pn.Softmax()],
                          in_shape=(8, 8, 1)),
            digits.x_train[:48].reshape(-1, 8, 8, 1), digits.y_train[:48]),
    "gpt": (pn.gpt(vocab_size=64, context=16, layers=1, heads=4, features=32), tokens[:, :-1], tokens[:, 1:]),
}

for model, (net, x, y) in MODELS.items():
    if not selected(model):
        continue
    params, state = pn.init(net, jax.random.key(0), in_shape=x.shape[1:])
    grad = jax.jit(lambda p, s, xx, yy: pn.value_and_grad(net, p, s, xx, yy, train=True))
    single = grad(params, state, x[:16], y[:16])
    opt = pn.optim.adam(1e-2)
    kw = dict(key=jax.random.key(2), epochs=1, batch_size=16, params=params, state=state)
    one = pn.fit(net, opt, (x, y), **kw)
    for strategy, axes in MESHES.items():
        mesh = pn.distributed.mesh(axes)
        # gradients with sharded params and a sharded batch equal one device's
        sharded = pn.distributed.shard_params(net, params, mesh, strategy)
        if model != "gpt" or strategy == "fsdp+tensor":  # suite time: the GPT's on both axes; its steps below
            got = grad(sharded, pn.distributed.replicate(state, mesh), pn.distributed.shard_batch(x[:16], mesh),
                       pn.distributed.shard_batch(y[:16], mesh))
            assert rel(got, single) <= 1e-10, (model, strategy, rel(got, single))
        if model == "gpt" and strategy == "fsdp+tensor":  # pn.capture on the mesh: the records of an attention
            capture = jax.jit(lambda p, s, xx, yy: pn.capture(net, p, s, xx, yy, layers=[(0, 1, 1, 0, 0, 1)]))
            want = capture(params, state, x[:16], y[:16])
            got = capture(sharded, pn.distributed.replicate(state, mesh), pn.distributed.shard_batch(x[:16], mesh),
                          pn.distributed.shard_batch(y[:16], mesh))
            assert list(got.layers) == [(0, 1, 1, 0, 0, 1)] and rel(got, want) <= 1e-10, rel(got, want)
        # three Adam steps with batch norm equal one device's
        many = pn.fit(net, opt, (x, y), mesh=mesh, strategy=strategy, **kw)
        assert int(many.opt_state.count) == 3
        assert rel(many.params, one.params) <= 1e-10, (model, strategy, rel(many.params, one.params))
        assert rel(many.state, one.state) <= 1e-10
        assert rel(many.opt_state, one.opt_state) <= 1e-10
        np.testing.assert_allclose(many.history["loss"], one.history["loss"], rtol=1e-10)
        # every weight matrix is really split, and its Adam moments with it
        roles = jax.tree_util.tree_leaves(pn.layers.base.roles(net, params))
        for role, w in zip(roles, jax.tree_util.tree_leaves(many.params)):
            if role in ("weight", "embedding") and w.ndim >= 2:
                shard = w.addressable_shards[0].data.shape
                assert math.prod(shard) < w.size, (model, strategy, w.shape, shard)
        for slot in ("m", "v"):  # Adam's moments are split as the params are
            assert jax.tree_util.tree_all(jax.tree_util.tree_map(
                lambda p, m: p.sharding.is_equivalent_to(m.sharding, p.ndim), many.params,
                getattr(many.opt_state.slots[0], slot)))
        # per-device bytes of params + optimizer state <= 1/n of the whole + the leaves not split n ways
        whole = sum(v.nbytes for v in jax.tree_util.tree_leaves(many.opt_state))
        small = sum(v.nbytes for v in jax.tree_util.tree_leaves(many.opt_state)
                    if math.prod(v.addressable_shards[0].data.shape) * WAYS[strategy] != v.size)
        held = pn.distributed.device_bytes(many.opt_state)
        assert held <= whole / WAYS[strategy] + small, (model, strategy, held, whole, small)
        print(f"bytes {model} {strategy} per-device {held} of {whole} ({held / whole:.4f}; "
              f"not split {WAYS[strategy]} ways: {small})", flush=True)
        if not HLO:
            continue
        step = pn.training.loop.build_step(net, opt, mesh=mesh, strategy=strategy)
        carry = pn.distributed.shard_tree(net, (opt.init(params), state), params, mesh, strategy)
        batch = (pn.distributed.shard_batch(x[:16], mesh), pn.distributed.shard_batch(y[:16], mesh),
                 jax.random.key(0))
        hlo = jax.jit(step).lower(carry, batch).compile().as_text()
        print("collectives", model, strategy, collectives(hlo), flush=True)
    check(model)
    if model == "gpt":
        gpt_result, gpt_params = many, params  # the last strategy's run: fsdp+tensor on the 2x4 mesh


def check_dp():
    """The MLP under every strategy: per-example norms, DP-SGD and a float32 step equal one device."""
    net, x, y = MODELS["mlp"]
    params, state = pn.init(net, jax.random.key(0))
    norms = jax.jit(lambda p, xx, yy: pn.per_example_grad_norms(net, p, state, xx, yy))
    dp = pn.DPSGD(clip_norm=0.5, noise_multiplier=1.1, sampling="shuffle")
    kw = dict(key=jax.random.key(3), epochs=1, batch_size=16, params=params, state=state, dp=dp)
    dp_one = pn.fit(net, pn.optim.sgd(0.1), (x, y), **kw)
    p32, s32 = pn.init(net, jax.random.key(0), dtype=jnp.float32)
    kw32 = dict(key=jax.random.key(3), epochs=1, batch_size=16, params=p32, state=s32)
    one32 = pn.fit(net, pn.optim.adam(1e-2), (x.astype(np.float32), y), **kw32)
    for strategy, axes in MESHES.items():
        mesh = pn.distributed.mesh(axes)
        sharded = pn.distributed.shard_params(net, params, mesh, strategy)
        got = norms(sharded, pn.distributed.shard_batch(x[:16], mesh), pn.distributed.shard_batch(y[:16], mesh))
        assert rel(got, norms(params, x[:16], y[:16])) <= 1e-10, strategy
        dp_many = pn.fit(net, pn.optim.sgd(0.1), (x, y), mesh=mesh, strategy=strategy, **kw)
        assert rel(dp_many.params, dp_one.params) <= 1e-10, (strategy, rel(dp_many.params, dp_one.params))
        many32 = pn.fit(net, pn.optim.adam(1e-2), (x.astype(np.float32), y), mesh=mesh, strategy=strategy, **kw32)
        assert jax.tree_util.tree_leaves(many32.params)[0].dtype == jnp.float32
        assert rel(many32.params, one32.params) <= 1e-5, (strategy, rel(many32.params, one32.params))
    check("dp and float32")


def check_checkpoint(gpt_result, gpt_params):
    """Sharded checkpoints: save on the 2x4 mesh, restore on 8x1 and on one device, bit-identical."""
    net = MODELS["gpt"][0]
    tree = gpt_result.opt_state
    with tempfile.TemporaryDirectory() as tmp:
        pn.distributed.save_sharded(tmp, tree)
        pn.distributed.save_sharded(tmp, tree)  # a second save replaces the first's shard files
        assert sorted(os.listdir(tmp))[0] == "index.ckpt" and len(os.listdir(tmp)) == 2, os.listdir(tmp)
        mesh8 = pn.distributed.mesh({"data": 8})
        back8 = pn.distributed.load_sharded(tmp, tree, pn.distributed.tree_shardings(net, tree, gpt_params, mesh8, "fsdp"))
        back1 = pn.distributed.load_sharded(tmp, tree)
        for a, b, c in zip(*(jax.tree_util.tree_leaves(t) for t in (tree, back8, back1))):
            assert np.array_equal(np.asarray(a), np.asarray(b)) and np.array_equal(np.asarray(a), np.asarray(c))
            assert len(c.devices()) == 1
        assert back8.params[0]["body"][1][0][1]["Wq"].sharding.spec == jax.sharding.PartitionSpec("data", None)
        assert type(back8) is type(tree)
        shard = [f for f in os.listdir(tmp) if f.startswith("shards-")][0]
        raw = open(os.path.join(tmp, shard), "rb").read()
        for bad, what in ((raw[:-7], "truncated"), (raw[:-20] + bytes([raw[-20] ^ 1]) + raw[-19:], "checksum")):
            with open(os.path.join(tmp, shard), "wb") as f:
                f.write(bad)
            try:
                pn.distributed.load_sharded(tmp, tree)
            except pn.CheckpointError as e:
                assert shard in str(e), e
            else:
                sys.exit(f"a {what} shard file loaded")
        os.remove(os.path.join(tmp, shard))
        try:
            pn.distributed.load_sharded(tmp, tree)
        except pn.CheckpointError as e:
            assert "is missing" in str(e), e
        else:
            sys.exit("a missing shard file loaded")
    check("checkpoint")


def check_noise():
    """DP's float32 noise on FSDP-sharded params: the values one device draws, each device hashing only
    its own part (no params-sized buffer per device)."""
    net = pn.mlp([784, 512, 256, 10])
    params, _ = pn.init(net, jax.random.key(0), dtype=jnp.float32)
    sharded = pn.distributed.shard_params(net, params, pn.distributed.mesh(MESHES["fsdp"]), "fsdp")
    draw = jax.jit(pn.noise.standard_normal_like)
    one, many = draw(params, jax.random.key(5)), draw(sharded, jax.random.key(5))
    for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(many)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    memory = draw.lower(sharded, jax.random.key(5)).compile().memory_analysis()
    total = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(params))
    if memory is not None:
        assert memory.temp_size_in_bytes < total / 4, (memory.temp_size_in_bytes, total)
    check("noise")


if selected("noise"):
    check_noise()
if selected("dp"):
    check_dp()
if selected("checkpoint"):  # needs "gpt"
    check_checkpoint(gpt_result, gpt_params)
