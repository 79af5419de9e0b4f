"""DP-SGD step time and memory: purenet against its own non-private step, and against Opacus.

    python -m benchmarks.dp [--repeats 7] [--smoke] [--json results_dp_cpu.json]
    python -m benchmarks.dp --train [--json results_dp_train_cpu.json]

1. purenet's DP step (per-example clipping, one pass, noise, Adam) over its
   non-private step (value_and_grad, Adam), for the examples' MLP, CNN and
   GPT: paired medians of interleaved repeats, plus the one-pass clipping
   against the two-pass reference, and the compiled temporary memory.
2. The same CNN step (batch 256, clip 1, sigma 1) in Opacus 1.6 (PyTorch
   eager) in its hooks mode ("flat" clipping) and its ghost-clipping mode,
   against purenet's DP step: the time ratio of the medians.

Timings are medians of `repeats` rounds, each running every variant once
(interleaved), each variant's time the mean of `steps` steps.
"""
import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import purenet as pn

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation


def mlp_case(batch):
    net = pn.mlp([784, 256, 256, 10])
    x = jax.random.normal(jax.random.key(1), (batch, 784))
    return net, x, jnp.arange(batch) % 10


def lenet():
    return pn.Sequential([pn.Conv2D(16, 5), pn.ReLU(), pn.MaxPool2D(2), pn.Conv2D(32, 5), pn.ReLU(), pn.MaxPool2D(2),
                          pn.Flatten(), pn.Dense(128), pn.ReLU(), pn.Dense(10), pn.Softmax()], in_shape=(28, 28, 1))


def cnn_case(batch):
    x = jax.random.normal(jax.random.key(1), (batch, 28, 28, 1))
    return lenet(), x, jnp.arange(batch) % 10


def gpt_case(batch):
    net = pn.gpt(vocab_size=65, context=64, layers=4, heads=4, features=128)
    ids = jax.random.randint(jax.random.key(1), (batch, 65), 0, 65)
    return net, ids[:, :-1], ids[:, 1:]


def purenet_steps(case, batch, clip=1.0, sigma=1.0):
    """{name: (step, carry)} for the plain, DP one-pass and DP two-pass steps of one case."""
    net, x, y = case(batch)
    params, state = pn.init(net, jax.random.key(0), in_shape=x.shape[1:])
    opt = pn.optim.adam(1e-3)

    def plain(carry, key):
        o, s = carry
        _, g, s = pn.value_and_grad(net, o.params, s, x, y, train=True, key=key)
        return opt.step(o, g), s

    def dp(one_pass):
        def step(carry, key):
            o, s = carry
            _, g, s = pn.clipped_value_and_grad(net, o.params, s, x, y, clip_norm=clip, noise_multiplier=sigma,
                                                noise_key=key, train=True, key=key, one_pass=one_pass)
            return opt.step(o, g), s
        return step

    carry = (opt.init(params), state)
    fns = {"plain": plain, "dp": dp(True), "dp_two_pass": dp(False)}
    out = {}
    for name, fn in fns.items():  # compiled once: the executable that is timed is the one measured
        compiled = jax.jit(fn).lower(carry, jax.random.key(0)).compile()
        memory = compiled.memory_analysis()
        out[name] = (compiled, memory.temp_size_in_bytes / 2**20 if memory is not None else float("nan"))
    return out, carry


def time_it(fn, carry, steps):
    key = jax.random.key(0)
    carry = jax.block_until_ready(fn(carry, key))
    start = time.perf_counter()
    for i in range(steps):
        carry = fn(carry, jax.random.fold_in(key, i))
    jax.block_until_ready(carry)
    return (time.perf_counter() - start) / steps * 1e3


def opacus_steps(batch, clip=1.0, sigma=1.0):
    """Opacus's DP step on the same LeNet, in hooks ("flat") and ghost-clipping modes."""
    import torch
    from opacus import PrivacyEngine
    from torch import nn

    torch.manual_seed(0)
    x = torch.randn(batch, 1, 28, 28)
    y = torch.arange(batch) % 10
    data = torch.utils.data.TensorDataset(x, y)
    steps = {}
    for mode in ("hooks", "ghost"):
        model = nn.Sequential(nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                              nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        loader = torch.utils.data.DataLoader(data, batch_size=batch)
        engine = PrivacyEngine()
        kwargs = dict(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
                      max_grad_norm=clip, poisson_sampling=False)
        if mode == "ghost":
            criterion = nn.CrossEntropyLoss()
            model, optimizer, criterion, _ = engine.make_private(criterion=criterion, grad_sample_mode="ghost",
                                                                 **kwargs)
        else:
            criterion = nn.CrossEntropyLoss()
            model, optimizer, _ = engine.make_private(grad_sample_mode="hooks", **kwargs)

        def step(model=model, optimizer=optimizer, criterion=criterion):
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()

        steps[f"opacus_{mode}"] = step
    return steps


def time_torch(step, steps):
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1e3


def train_runs(epochs=15, n_train=8000, n_test=2000, batch=256, clip=1.0, target=3.0, delta=1e-5, lr=4e-3,
               seed=0):
    """examples/dp_mnist.py's run in purenet and the same model, data, sigma, C, q and epochs in Opacus
    (ghost clipping, Poisson sampling, Adam): held-out accuracy, epsilon and wall time of each."""
    import sys
    from pathlib import Path

    import torch
    from opacus import PrivacyEngine
    from torch import nn

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from dp_mnist import DEFAULT, cnn

    x, y = pn.datasets.mnist(str(DEFAULT), part="test", shape="image")
    order = np.random.default_rng(seed).permutation(len(x))
    train, test = order[:n_train], order[n_train:n_train + n_test]
    q, steps = batch / n_train, epochs * (n_train // batch)
    sigma = pn.privacy.noise_multiplier_for(target, delta, q, steps)
    out = {"sigma": sigma, "q": q, "steps": steps}

    start = time.perf_counter()
    result = pn.fit(cnn(), pn.optim.adam(lr), (x[train], y[train]), key=jax.random.key(seed), epochs=epochs,
                    batch_size=batch, dp=pn.DPSGD(clip, sigma, delta=delta), validation=(x[test], y[test]))
    out["purenet"] = {"seconds": time.perf_counter() - start, "accuracy": float(result.history["val_accuracy"][-1]),
                      "epsilon_pld": float(result.history["epsilon"][-1]),
                      "epsilon_rdp": pn.privacy.epsilon(sigma, q, steps, delta, "rdp")}

    torch.manual_seed(seed)
    xt = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous()
    yt = torch.tensor(np.asarray(y), dtype=torch.long)
    model = nn.Sequential(nn.Conv2d(1, 16, 8, stride=2, padding=3), nn.Tanh(), nn.MaxPool2d(2, 1),
                          nn.Conv2d(16, 32, 4, stride=2), nn.Tanh(), nn.MaxPool2d(2, 1), nn.Flatten(),
                          nn.Linear(32 * 4 * 4, 32), nn.Tanh(), nn.Linear(32, 10))
    data = torch.utils.data.TensorDataset(xt[train], yt[train])
    loader = torch.utils.data.DataLoader(data, batch_size=batch)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    engine = PrivacyEngine(accountant="rdp")
    start = time.perf_counter()
    model, optimizer, criterion, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, criterion=criterion, noise_multiplier=sigma,
        max_grad_norm=clip, poisson_sampling=True, grad_sample_mode="ghost")
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = criterion(model(xb), yb)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = float((model(xt[test]).argmax(1) == yt[test]).float().mean())
    out["opacus_ghost"] = {"seconds": time.perf_counter() - start, "accuracy": accuracy,
                           "epsilon_rdp": float(engine.get_epsilon(delta))}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny batches, one repeat: checks the code runs")
    parser.add_argument("--json", default=None)
    parser.add_argument("--train", action="store_true",
                        help="instead: the dp_mnist run in purenet and in Opacus (accuracy, epsilon, wall time)")
    args = parser.parse_args()
    if args.train:
        out = train_runs(epochs=1 if args.smoke else 15, n_train=1024 if args.smoke else 8000)
        print(json.dumps(out, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return
    repeats, steps = (1, 2) if args.smoke else (args.repeats, args.steps)
    cases = {"mlp": (mlp_case, 8 if args.smoke else 256), "cnn": (cnn_case, 8 if args.smoke else 256),
             "gpt": (gpt_case, 2 if args.smoke else 12)}
    results = {}
    built = {name: purenet_steps(case, batch) for name, (case, batch) in cases.items()}
    torch_steps = opacus_steps(cases["cnn"][1])
    times = {f"{c}/{v}": [] for c in built for v in built[c][0]} | {k: [] for k in torch_steps}
    for _ in range(repeats):
        for c, (fns, carry) in built.items():
            for v, (fn, _) in fns.items():
                times[f"{c}/{v}"].append(time_it(fn, carry, steps))
        for k, step in torch_steps.items():
            times[k].append(time_torch(step, steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'case':>6} {'plain ms':>9} {'dp ms':>8} {'dp/plain':>9} {'two-pass/one-pass':>18} "
          f"{'temp MiB plain / dp / two-pass':>32}")
    for c, (fns, _) in built.items():
        ratio = statistics.median([d / p for d, p in zip(times[f"{c}/dp"], times[f"{c}/plain"])])
        two = statistics.median([t / d for t, d in zip(times[f"{c}/dp_two_pass"], times[f"{c}/dp"])])
        mem = " / ".join(f"{fns[v][1]:.1f}" for v in ("plain", "dp", "dp_two_pass"))
        print(f"{c:>6} {med[c + '/plain']:9.2f} {med[c + '/dp']:8.2f} {ratio:9.2f} {two:18.2f} {mem:>32}")
        results[c] = {"plain_ms": med[c + "/plain"], "dp_ms": med[c + "/dp"], "dp_over_plain": ratio,
                      "two_pass_over_one_pass": two, "temp_mib": {v: fns[v][1] for v in fns}}
    for k in torch_steps:
        ratio = statistics.median([o / d for o, d in zip(times[k], times["cnn/dp"])])
        print(f"{k}: {med[k]:.2f} ms a step, {ratio:.2f}x purenet's DP step on the same CNN")
        results[k] = {"ms": med[k], "over_purenet_dp": ratio}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
