"""Run by test_distributed.py in a subprocess with 8 forced CPU devices.

Each check prints "ok <name>"; any failure raises and exits non-zero. With the argument "light"
(the default run), fit and DP-SGD check one network and one sampling each instead of two.
"""
import os
import sys

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402

import purenet as pn  # noqa: E402

assert jax.device_count() == 8, jax.devices()
light = sys.argv[1:] == ["light"]
mesh = pn.distributed.data_mesh()
data = pn.datasets.digits(dtype=np.float64)
x, y = data.x_train[:480], data.y_train[:480]


def rel(a, b):
    return max([0.0] + [float(jnp.max(jnp.abs(u - v)) / (jnp.max(jnp.abs(v)) + 1e-300))
               for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))])


def check(name):
    print("ok", name, flush=True)


# 1. value_and_grad on a sharded batch equals one device, batch norm over the global batch
net = pn.mlp([64, 32, 10], batchnorm=True, dropout=0.3)
params, state = pn.init(net, jax.random.key(0))
xb, yb = x[:64], y[:64]
step = jax.jit(lambda p, s, xx, yy: pn.value_and_grad(net, p, s, xx, yy, train=True, key=jax.random.key(1)))
single = step(params, state, xb, yb)
sharded = step(pn.distributed.replicate(params, mesh), pn.distributed.replicate(state, mesh),
               pn.distributed.shard_batch(xb, mesh), pn.distributed.shard_batch(yb, mesh))
assert rel(sharded, single) <= 1e-10, rel(sharded, single)
assert sharded[1][0]["W"].sharding.is_fully_replicated
check("value_and_grad")

# 2. shardings are what they claim
xs = pn.distributed.shard_batch(xb, mesh)
assert xs.sharding.spec == PartitionSpec("data")
assert [s.data.shape for s in xs.addressable_shards] == [(8, 64)] * 8
ps = pn.distributed.replicate(params, mesh)
assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree_util.tree_leaves(ps))
check("shardings")

# 3. fit on 8 devices equals fit on one over 50 steps, with batch norm, dropout and a schedule
for net in (pn.mlp([64, 32, 10], batchnorm=True, dropout=0.2), pn.mlp([64, 32, 10], hidden="tanh"))[light:]:
    kw = dict(key=jax.random.key(2), epochs=5, batch_size=48, validation=(data.x_test, data.y_test),
              augment=pn.augment.gaussian_noise(0.05))
    opt = pn.optim.adam(pn.schedules.cosine_decay(3e-3, 50))
    one = pn.fit(net, opt, (x, y), **kw)
    many = pn.fit(net, opt, (x, y), mesh=mesh, **kw)
    assert int(many.opt_state.count) == 50
    assert rel(many.params, one.params) <= 1e-6, rel(many.params, one.params)
    assert rel(many.state, one.state) <= 1e-6
    np.testing.assert_allclose(many.history["loss"], one.history["loss"], rtol=1e-6)
check("fit")

# 4. the pure trainer under jit, sharded
ts_one, h_one, _ = jax.jit(lambda k: pn.train(net, opt, (x, y), key=k, epochs=2, batch_size=48))(jax.random.key(3))
ts_many, h_many, _ = jax.jit(lambda k: pn.train(net, opt, (x, y), key=k, epochs=2, batch_size=48, mesh=mesh))(
    jax.random.key(3))
assert rel(ts_many.opt_state.params, ts_one.opt_state.params) <= 1e-6
hlo = jax.jit(lambda k: pn.train(net, opt, (x, y), key=k, epochs=1, batch_size=48, mesh=mesh)).lower(
    jax.random.key(3)).compile().as_text()
assert "all-reduce" in hlo  # the gradient sums really cross devices
check("train")

# 5. a batch that does not divide over the devices is a clear error
for call in (lambda: pn.fit(net, opt, (x, y), key=jax.random.key(0), epochs=1, batch_size=50, mesh=mesh),
             lambda: pn.distributed.shard_batch(x[:50], mesh)):
    try:
        call()
    except ValueError as e:
        assert "not divisible by the 8 devices" in str(e), e
    else:
        sys.exit("no error for a batch of 50 on 8 devices")
check("divisibility")

# 6. DP-SGD on 8 devices (Poisson batches, one-pass clipping, noise) equals one device
for dp in (pn.DPSGD(1.0, noise_multiplier=0.8), pn.DPSGD(1.0, noise_multiplier=0.8, sampling="shuffle",
                                                          chunk_size=16))[:2 - light]:
    net = pn.mlp([64, 32, 10], dropout=0.1)
    kw = dict(key=jax.random.key(4), epochs=2, batch_size=48, dp=dp)
    one = pn.fit(net, pn.optim.adam(3e-3), (x, y), **kw)
    many = pn.fit(net, pn.optim.adam(3e-3), (x, y), mesh=mesh, **kw)
    assert rel(many.params, one.params) <= 1e-6, rel(many.params, one.params)
    np.testing.assert_allclose(many.history["loss"], one.history["loss"], rtol=1e-6)
check("dp")
