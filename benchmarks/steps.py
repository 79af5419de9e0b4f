"""One MLP train step (forward, backward, Adam update) per framework, all on the same math.

Each builder takes (sizes, batch, seed, dtype) and returns (step, state, data):
calling state = step(state, data) runs one training step; `sync(state)` waits
for it (on a GPU too). dtype is the compute and parameter dtype, "float32" or
"bfloat16" (purenet keeps its Adam slots of bfloat16 params in float32; the
peers keep theirs in the param dtype). Peers are imported lazily and skipped
when missing; PyTorch runs on CUDA when it has it.
"""
import jax
import jax.numpy as jnp
import numpy as np

import purenet as pn

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation

LR = 1e-3


def _data(sizes, batch, seed=0, dtype="float32"):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, sizes[0])), dtype)
    y = jnp.asarray(rng.integers(0, sizes[-1], batch), jnp.int32)
    return x, y


def flops_per_step(sizes, batch):
    """Matmul FLOPs of forward (2 b i o) and backward (4 b i o) per Dense layer."""
    return 6 * batch * sum(i * o for i, o in zip(sizes[:-1], sizes[1:]))


def sync(state):
    if isinstance(state, TorchSync):
        state.block_until_ready()
    elif hasattr(state, "block_until_ready") or isinstance(state, (tuple, list, dict)):
        jax.block_until_ready(state)
    return state


def _purenet_adam_step(gradients, sizes, batch, seed, dtype):
    """A jitted (forward, backward, Adam) step of pn.mlp(sizes); gradients(net, params, state, x, y) -> grads."""
    net = pn.mlp(list(sizes))
    params, state = pn.init(net, jax.random.key(seed), dtype=dtype)
    opt = pn.optim.adam(LR)

    @jax.jit
    def step(carry, data):
        opt_state, model_state = carry
        return opt.step(opt_state, gradients(net, opt_state.params, model_state, *data)), model_state

    return step, (opt.init(params), state), _data(sizes, batch, seed, dtype)


def purenet_step(sizes, batch, seed=0, dtype="float32"):
    """purenet's handwritten backward."""
    return _purenet_adam_step(lambda net, p, s, x, y: pn.value_and_grad(net, p, s, x, y)[1],
                              sizes, batch, seed, dtype)


def autodiff_purenet_opt_step(sizes, batch, seed=0, dtype="float32"):
    """The same loss through jax.grad: isolates the cost of the backward."""
    return _purenet_adam_step(lambda net, p, s, x, y: jax.grad(lambda q: pn.loss(net, q, s, x, y)[0])(p),
                              sizes, batch, seed, dtype)


def jax_optax_step(sizes, batch, seed=0, dtype="float32"):
    import optax

    keys = jax.random.split(jax.random.key(seed), len(sizes) - 1)
    params = [(jax.nn.initializers.he_normal()(k, (i, o), dtype), jnp.zeros(o, dtype))
              for k, i, o in zip(keys, sizes[:-1], sizes[1:])]

    def loss(params, x, y):
        for W, b in params[:-1]:
            x = jax.nn.relu(x @ W + b)
        W, b = params[-1]
        return optax.softmax_cross_entropy_with_integer_labels((x @ W + b).astype(jnp.float32), y).mean()

    tx = optax.adam(LR)

    @jax.jit
    def step(carry, data):
        params, opt_state = carry
        grads = jax.grad(loss)(params, *data)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step, (params, tx.init(params)), _data(sizes, batch, seed, dtype)


def flax_nnx_step(sizes, batch, seed=0, dtype="float32"):
    import optax
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(i, o, dtype=dtype, param_dtype=dtype, rngs=rngs)
                                    for i, o in zip(sizes[:-1], sizes[1:])])

        def __call__(self, x):
            for layer in self.layers[:-1]:
                x = nnx.relu(layer(x))
            return self.layers[-1](x)

    model = MLP(nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(LR), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x).astype(jnp.float32), y).mean()

        grads = nnx.grad(loss_fn)(model)
        optimizer.update(model, grads)

    def step(carry, data):
        train_step(*carry, *data)
        return carry

    return step, (model, optimizer), _data(sizes, batch, seed, dtype)


def equinox_step(sizes, batch, seed=0, dtype="float32"):
    import equinox as eqx
    import optax

    model = eqx.nn.MLP(sizes[0], sizes[-1], sizes[1], len(sizes) - 2, activation=jax.nn.relu,
                       key=jax.random.key(seed), dtype=jnp.dtype(dtype))
    assert [layer.weight.shape for layer in model.layers] == [(o, i) for i, o in zip(sizes[:-1], sizes[1:])]
    tx = optax.adam(LR)

    def loss(model, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(jax.vmap(model)(x).astype(jnp.float32), y).mean()

    state = (model, tx.init(eqx.filter(model, eqx.is_array)))
    return equinox_step_of(loss, tx), state, _data(sizes, batch, seed, dtype)


def equinox_step_of(loss, tx):
    """An equinox train step on (model, opt_state): eqx.filter_grad of loss(model, x, y), then tx."""
    import equinox as eqx

    @eqx.filter_jit
    def step(carry, data):
        model, opt_state = carry
        grads = eqx.filter_grad(loss)(model, *data)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state

    return step


class TorchSync:
    """Stands in for a PyTorch step's state: block_until_ready waits for CUDA's queue."""

    def block_until_ready(self):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return self


def torch_step(sizes, batch, seed=0, dtype="float32", compile=False):
    import os

    import torch

    torch.set_num_threads(os.cpu_count())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 dots in TF32, as JAX's default precision on GPUs
    torch.manual_seed(seed)
    layers = []
    for i, o in zip(sizes[:-2], sizes[1:-1]):
        layers += [torch.nn.Linear(i, o), torch.nn.ReLU()]
    tdtype = getattr(torch, dtype)
    model = torch.nn.Sequential(*layers, torch.nn.Linear(sizes[-2], sizes[-1])).to(device, tdtype)
    x, y = (np.array(v.astype(jnp.float32)) for v in _data(sizes, batch, seed, dtype))
    return torch_adam_step(model, torch.from_numpy(x).to(device, tdtype), torch.from_numpy(y.astype(np.int64)).to(device),
                           compile)


def torch_adam_step(model, x, y, compile=False):
    """(step, state, data) of one PyTorch train step (forward, cross-entropy, backward, Adam) on (x, y)."""
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = torch.nn.CrossEntropyLoss()

    def train_step(x, y):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x).float(), y).backward()
        opt.step()

    if compile:
        train_step = torch.compile(train_step)

    def step(carry, data):
        train_step(*data)
        return carry

    return step, TorchSync(), (x, y)


def per_example_norms_against_vmap(net, params, state, x, y, repeats, chunk_sizes=()):
    """Time and temporary memory of pn.per_example_grad_norms (whole batch, and in each of
    `chunk_sizes`) against the vmap(jax.grad) construction."""
    import statistics
    import time

    batch = x.shape[0]
    contenders = {"purenet per_example_grad_norms": jax.jit(
        lambda p, x, y: pn.per_example_grad_norms(net, p, state, x, y))}
    for c in chunk_sizes:
        contenders[f"purenet per_example_grad_norms (chunk_size={c})"] = jax.jit(
            lambda p, x, y, c=c: pn.per_example_grad_norms(net, p, state, x, y, chunk_size=c))

    def vmap_grad(p, x, y):
        g = jax.vmap(lambda xi, yi: jax.grad(lambda q: pn.loss(net, q, state, xi[None], yi[None])[0])(p))(x, y)
        return jnp.sqrt(sum(jnp.sum(v.reshape(batch, -1) ** 2, 1) for v in jax.tree_util.tree_leaves(g)))

    contenders["vmap(jax.grad)"] = ref = jax.jit(vmap_grad)
    expected = ref(params, x, y)
    analyses = {}
    for name, fn in contenders.items():  # compiled once: the timed executable is the measured one
        contenders[name] = fn = fn.lower(params, x, y).compile()
        np.testing.assert_allclose(fn(params, x, y), expected, rtol=1e-3, err_msg=name)
        analyses[name] = fn.memory_analysis()
    times = {name: [] for name in contenders}
    for _ in range(repeats):  # interleaved: every contender once per repeat
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn(params, x, y).block_until_ready()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                   "temp_MiB": analyses[name].temp_size_in_bytes / 2**20 if analyses[name] else None}
            for name, t in times.items()}


STEPS = {
    "purenet": purenet_step,
    "jax.grad + purenet adam": autodiff_purenet_opt_step,
    "jax.grad + optax": jax_optax_step,
    "flax nnx + optax": flax_nnx_step,
    "equinox + optax": equinox_step,
    "pytorch eager": torch_step,
    "torch.compile": lambda s, b, seed=0, dtype="float32": torch_step(s, b, seed, dtype, compile=True),
}
