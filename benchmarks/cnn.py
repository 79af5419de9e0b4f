"""CNN benchmarks: `python -m benchmarks.cnn [--smoke] [--gpu] [--repeats 7] [--json cnn_results.json]`.

Cases, every contender interleaved repeat by repeat in this one process
(medians, min-max, and paired ratios against purenet's step):

- train step (forward, backward, Adam) of the LeNet of examples/mnist_cnn.py at
  batch 64 and 128, and of a small ResNet with BatchNorm on 32x32x3 images at
  batch 64: purenet with Conv2D's auto choice and each formulation, the same
  loss through jax.grad (both formulations), flax nnx, equinox (LeNet), PyTorch
  eager and torch.compile; --gpu instead runs the LeNet at batch 512 and the
  ResNet at batch 256, each in float32 and bfloat16 (params and compute), with
  PyTorch on CUDA (TF32 dots in float32, as JAX's default GPU precision);
- compiled temporary memory of the purenet step against jax.grad's, per formulation;
- one epoch of 8,000 images at batch 64: purenet's jitted scan against PyTorch's loop;
- per-example conv gradient norms at batch 256 against vmap(jax.grad): time and memory.
"""
import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import purenet as pn
from benchmarks import steps as S

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation

LR = 1e-3
LENET = dict(c1=16, c2=32, hidden=128)


def _split(impl):
    """"first+rest" (the image layer's formulation, then every other convolution's), or one for all."""
    first, _, rest = impl.partition("+")
    return first, rest or first


def lenet(impl="auto", c1=16, c2=32, hidden=128, size=28, channels=1):
    first, rest = _split(impl)
    return pn.Sequential([pn.Conv2D(c1, 5, implementation=first), pn.ReLU(), pn.MaxPool2D(2),
                          pn.Conv2D(c2, 5, implementation=rest), pn.ReLU(), pn.MaxPool2D(2),
                          pn.Flatten(), pn.Dense(hidden), pn.ReLU(), pn.Dense(10), pn.Softmax()],
                         in_shape=(size, size, channels))


def resnet(impl="auto", width=16, size=32):
    first, rest = _split(impl)

    def conv(c, k=3, impl=rest):
        return pn.Conv2D(c, k, use_bias=False, implementation=impl)

    def block(c):
        return pn.Residual(pn.Sequential([conv(c), pn.BatchNorm(), pn.ReLU(), conv(c), pn.BatchNorm()]))

    return pn.Sequential([conv(width, impl=first), pn.BatchNorm(), pn.ReLU(), block(width), pn.ReLU(), pn.MaxPool2D(2),
                          conv(2 * width), pn.BatchNorm(), pn.ReLU(), block(2 * width), pn.ReLU(),
                          pn.GlobalAvgPool2D(), pn.Dense(10), pn.Softmax()], in_shape=(size, size, 3))


def _images(batch, size, channels, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((batch, size, size, channels)), jnp.float32),
            jnp.asarray(rng.integers(0, 10, batch), jnp.int32))


def purenet_step(net, batch, gradients, dtype="float32"):
    params, state = pn.init(net, jax.random.key(0), dtype=jnp.dtype(dtype))
    opt = pn.optim.adam(LR)

    @jax.jit
    def step(carry, data):
        opt_state, model_state = carry
        grads, model_state = gradients(net, opt_state.params, model_state, *data)
        return opt.step(opt_state, grads), model_state

    x, y = _images(batch, *net.in_shape[1:])
    return step, (opt.init(params), state), (x.astype(dtype), y)


def handwritten(net, p, s, x, y):
    _, grads, s = pn.value_and_grad(net, p, s, x, y, train=True)
    return grads, s


def autodiff(net, p, s, x, y):
    grads, s = jax.grad(lambda q: pn.loss(net, q, s, x, y, train=True), has_aux=True)(p)
    return grads, s


def flax_lenet(batch, c1, c2, hidden):
    import optax
    from flax import nnx

    class LeNet(nnx.Module):
        def __init__(self, rngs):
            self.c1 = nnx.Conv(1, c1, (5, 5), padding="SAME", rngs=rngs)
            self.c2 = nnx.Conv(c1, c2, (5, 5), padding="SAME", rngs=rngs)
            self.d1 = nnx.Linear(7 * 7 * c2, hidden, rngs=rngs)
            self.d2 = nnx.Linear(hidden, 10, rngs=rngs)

        def __call__(self, x):
            x = nnx.max_pool(nnx.relu(self.c1(x)), (2, 2), (2, 2))
            x = nnx.max_pool(nnx.relu(self.c2(x)), (2, 2), (2, 2))
            return self.d2(nnx.relu(self.d1(x.reshape(x.shape[0], -1))))

    model = LeNet(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(LR), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        grads = nnx.grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(model)
        optimizer.update(model, grads)

    def step(carry, data):
        train_step(*carry, *data)
        return carry

    return step, (model, optimizer), _images(batch, 28, 1)


def equinox_lenet(batch, c1, c2, hidden):
    import equinox as eqx
    import optax

    k = jax.random.split(jax.random.key(0), 4)
    layers = [eqx.nn.Conv2d(1, c1, 5, padding="SAME", key=k[0]), eqx.nn.Conv2d(c1, c2, 5, padding="SAME", key=k[1]),
              eqx.nn.Linear(7 * 7 * c2, hidden, key=k[2]), eqx.nn.Linear(hidden, 10, key=k[3])]
    pool = eqx.nn.MaxPool2d(2, 2)

    def forward(model, x):  # one CHW image
        x = pool(jax.nn.relu(model[0](x)))
        x = pool(jax.nn.relu(model[1](x)))
        return model[3](jax.nn.relu(model[2](x.reshape(-1))))

    tx = optax.adam(LR)

    def loss(model, x, y):
        logits = jax.vmap(forward, (None, 0))(model, jnp.transpose(x, (0, 3, 1, 2)))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return S.equinox_step_of(loss, tx), (layers, tx.init(eqx.filter(layers, eqx.is_array))), _images(batch, 28, 1)


def torch_model(kind, c1=16, c2=32, hidden=128, width=16):
    from torch import nn

    if kind == "lenet":
        return nn.Sequential(nn.Conv2d(1, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(7 * 7 * c2, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c, momentum=0.1),
                                      nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

        def forward(self, x):
            return x + self.body(x)

    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         Block(width), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
                         Block(2 * width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10))


def torch_step(kind, batch, size, channels, compile=False, dtype="float32", **sizes):
    import torch

    torch.set_num_threads(os.cpu_count())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    x, y = (np.asarray(v) for v in _images(batch, size, channels))
    tdtype = getattr(torch, dtype)
    return S.torch_adam_step(torch_model(kind, **sizes).to(device, tdtype),
                             torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(device, tdtype),
                             torch.from_numpy(y.astype(np.int64)).to(device), compile)


def contenders(case, batch, smoke, dtype="float32"):
    """name -> builder of (step, state, data); the first, purenet (auto), is what paired ratios divide by."""
    sizes = dict(c1=4, c2=8, hidden=16) if smoke else LENET
    # "taps+xla": the image layer's taps, as "auto" picks on the CPU; "im2col+xla": its pick before taps
    impls = ("auto", "xla", "im2col", "taps+xla", "im2col+xla")
    if case == "lenet":
        made = {f"purenet ({impl})": lambda impl=impl: purenet_step(lenet(impl, **sizes), batch, handwritten, dtype)
                for impl in impls}
        made.update({f"jax.grad ({impl})": lambda impl=impl: purenet_step(lenet(impl, **sizes), batch, autodiff, dtype)
                     for impl in impls[1:4]})
        made["flax nnx + optax"] = lambda: flax_lenet(batch, **sizes)
        made["equinox + optax"] = lambda: equinox_lenet(batch, **sizes)
        made["pytorch eager"] = lambda: torch_step("lenet", batch, 28, 1, dtype=dtype, **sizes)
        made["torch.compile"] = lambda: torch_step("lenet", batch, 28, 1, compile=True, dtype=dtype, **sizes)
    else:
        width, size = (4, 8) if smoke else (16, 32)
        made = {f"purenet ({impl})": lambda impl=impl: purenet_step(resnet(impl, width, size), batch, handwritten,
                                                                    dtype)
                for impl in impls}
        made["jax.grad (xla)"] = lambda: purenet_step(resnet("xla", width, size), batch, autodiff, dtype)
        made["pytorch eager"] = lambda: torch_step("resnet", batch, size, 3, dtype=dtype, width=width)
        made["torch.compile"] = lambda: torch_step("resnet", batch, size, 3, compile=True, dtype=dtype, width=width)
    if dtype != "float32":  # the flax and equinox models are float32 only
        made = {k: v for k, v in made.items() if not k.startswith(("flax", "equinox"))}
    if smoke:
        made.pop("torch.compile")
    return made


def train_steps(made, repeats, n):
    """Interleaved timing of every contender; paired ratios against the first one."""
    built, compile_s = {}, {}
    for name, build in made.items():
        try:
            step, state, data = build()
            start = time.perf_counter()
            state = S.sync(step(state, data))
            compile_s[name] = time.perf_counter() - start
            built[name] = [step, state, data]
        except Exception as e:  # a missing peer
            print(f"  {name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
    times = {name: [] for name in built}
    for _ in range(repeats):
        for name, entry in built.items():
            step, _, data = entry
            entry[1] = S.sync(step(entry[1], data))
            start = time.perf_counter()
            for _ in range(n):
                entry[1] = step(entry[1], data)
            S.sync(entry[1])
            times[name].append((time.perf_counter() - start) / n)
    base = times[next(iter(times))]
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "compile_s": compile_s[name],
                   "paired_vs_first": statistics.median(a / b for a, b in zip(t, base))} for name, t in times.items()}


def temp_memory(smoke):
    sizes = dict(c1=4, c2=8, hidden=16) if smoke else LENET
    result = {}
    for impl in ("xla", "im2col", "taps+xla"):
        net = lenet(impl, **sizes)
        params, state = pn.init(net, jax.random.key(0), dtype=jnp.float32)
        x, y = _images(64, 28, 1)
        for name, fn in (("purenet", lambda p: handwritten(net, p, state, x, y)[0]),
                         ("jax.grad", lambda p: autodiff(net, p, state, x, y)[0])):
            analysis = jax.jit(fn).lower(params).compile().memory_analysis()
            result[f"{name} ({impl})"] = analysis.temp_size_in_bytes / 2**20 if analysis else None
    return result


def epoch(repeats, smoke):
    """One epoch of n images at batch 64: pn.train_epoch (one scan) against PyTorch's Python loop and
    against the same scan of jax.grad steps through lax.conv_general_dilated (timed twice: ~30 s each)."""
    import torch

    n, sizes = (256, dict(c1=4, c2=8, hidden=16)) if smoke else (8000, LENET)
    x, y = _images(n, 28, 1)
    net, opt = lenet(**sizes), pn.optim.adam(LR)
    params, state = pn.init(net, jax.random.key(0), dtype=jnp.float32)
    ts = pn.TrainState(opt.init(params), state, jnp.zeros((), jnp.int32))
    run = jax.jit(lambda ts, key: pn.train_epoch(net, opt, ts, x, y, key, batch_size=64)[0])
    jax.block_until_ready(run(ts, jax.random.key(1)))
    step, carry, _ = torch_step("lenet", 64, 28, 1, **sizes)
    xt, yt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()), torch.from_numpy(np.asarray(y, np.int64))

    def torch_epoch():
        order = torch.randperm(n)
        for i in range(n // 64):
            index = order[i * 64:(i + 1) * 64]
            step(carry, (xt[index], yt[index]))

    torch_epoch()
    xla_net = lenet("xla", **sizes)
    batches = (x[:n // 64 * 64].reshape(n // 64, 64, *x.shape[1:]), y[:n // 64 * 64].reshape(n // 64, 64))

    @jax.jit
    def autodiff_epoch(opt_state, batches):
        def step(opt_state, batch):
            grads, _ = autodiff(xla_net, opt_state.params, state, *batch)
            return opt.step(opt_state, grads), None

        return jax.lax.scan(step, opt_state, batches)[0]

    jax.block_until_ready(autodiff_epoch(ts.opt_state, batches))
    times = {"purenet scan": [], "pytorch eager loop": [], "jax.grad (xla) scan": []}
    for r in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(ts, jax.random.key(r)))
        times["purenet scan"].append(time.perf_counter() - start)
        start = time.perf_counter()
        torch_epoch()
        times["pytorch eager loop"].append(time.perf_counter() - start)
        if r < 2:
            start = time.perf_counter()
            jax.block_until_ready(autodiff_epoch(ts.opt_state, batches))
            times["jax.grad (xla) scan"].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t)} for name, t in times.items()}


def per_example_norms(repeats, smoke):
    sizes, batch = (dict(c1=4, c2=8, hidden=16), 16) if smoke else (LENET, 256)
    net = lenet(**sizes)
    params, state = pn.init(net, jax.random.key(0), dtype=jnp.float32)
    x, y = _images(batch, 28, 1)
    return S.per_example_norms_against_vmap(net, params, state, x, y, repeats, chunk_sizes=(4,) if smoke else (16, 32))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="every case tiny and once (CI)")
    parser.add_argument("--gpu", action="store_true", help="bigger batches, float32 and bfloat16 (for an accelerator)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20, help="train steps timed per repeat")
    parser.add_argument("--json", default="cnn_results.json")
    args = parser.parse_args()
    repeats, n = (1, 2) if args.smoke else (args.repeats, args.steps)
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "devices": [str(d) for d in jax.devices()], "jax": jax.__version__},
               "command": " ".join(["python -m benchmarks.cnn", *sys.argv[1:]]), "train_step": {}}
    cases = ([("lenet", 8)] if args.smoke else [("lenet", 512), ("resnet", 256)] if args.gpu
             else [("lenet", 64), ("lenet", 128), ("resnet", 64)])
    for (case, batch), dtype in itertools.product(cases, ["float32", "bfloat16"] if args.gpu else ["float32"]):
        key = f"{case} @ batch {batch}" + ("" if dtype == "float32" else f" {dtype}")
        print(f"train step {key}", flush=True)
        res = results["train_step"][key] = train_steps(contenders(case, batch, args.smoke, dtype), repeats, n)
        for name, r in res.items():
            print(f"  {name:<20} {r['median_s'] * 1e3:8.2f} ms  ({r['min_s'] * 1e3:.2f}-{r['max_s'] * 1e3:.2f})  "
                  f"paired {r['paired_vs_first']:.2f}x purenet (auto)  compile {r['compile_s']:.1f} s")
        _save(results, args.json)
    sections = [("temp_memory_MiB", lambda: temp_memory(args.smoke)), ("epoch", lambda: epoch(repeats, args.smoke)),
                ("per_example_norms", lambda: per_example_norms(repeats, args.smoke))]
    for name, run in sections:
        results[name] = run()
        print(f"{name}: {json.dumps(results[name], indent=1)}", flush=True)
        _save(results, args.json)


def _save(results, path):
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
