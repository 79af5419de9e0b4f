"""Digits to a target test accuracy, as a user's whole script would do it.

    python -m benchmarks.to97 purenet [--cache DIR] [--target 0.97]
    python -m benchmarks.to97 pytorch

Both train 64-128-64-10 (ReLU, Adam 1e-3, batch 32) epoch by epoch and stop
at the first epoch whose test accuracy reaches the target, on a GPU when
there is one (JAX's default device; PyTorch's CUDA). purenet runs each
epoch and its test accuracy as one jitted program; with --cache it switches
on purenet's persistent compilation cache first. The last line printed is a
JSON record; the runner times the whole process from outside, so imports,
data loading and (re)compilation all count.
"""
import argparse
import importlib.util
import json
import os
import time

SIZES, BATCH, LR = [64, 128, 64, 10], 32, 1e-3


def purenet_run(target, max_epochs, cache=None):
    start = time.perf_counter()
    import jax
    import jax.numpy as jnp

    import purenet as pn

    if cache:
        pn.enable_compilation_cache(cache)
    data = pn.datasets.digits()
    x, y, xt, yt = (jnp.asarray(a) for a in data)
    net, opt = pn.mlp(SIZES), pn.optim.adam(LR)
    params, state = pn.init(net, jax.random.key(0))
    ts = pn.TrainState(opt.init(params), state, jnp.zeros((), jnp.int32))

    def epoch_and_accuracy(ts):
        ts, _ = pn.train_epoch(net, opt, ts, x, y, jax.random.key(1), batch_size=BATCH)
        return ts, pn.metrics.accuracy(net, ts.opt_state.params, ts.model_state, xt, yt)

    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    run = jax.jit(epoch_and_accuracy).lower(ts).compile()
    compile_s = time.perf_counter() - start
    start, reached, epochs = time.perf_counter(), 0.0, 0
    while reached < target and epochs < max_epochs:
        ts, acc = run(ts)
        reached, epochs = float(acc), epochs + 1
    return {"train_s": time.perf_counter() - start, "compile_s": compile_s, "setup_s": setup_s,
            "epochs": epochs, "accuracy": reached}


def _datasets_without_jax():
    """purenet/data/datasets.py (numpy only) loaded on its own: the same digits split without importing JAX."""
    folder = importlib.util.find_spec("purenet").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("purenet_datasets", os.path.join(folder, "data", "datasets.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torch_run(target, max_epochs):
    start = time.perf_counter()
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where JAX runs too
    data = _datasets_without_jax().digits()
    layers = []
    for i, o in zip(SIZES[:-2], SIZES[1:-1]):
        layers += [torch.nn.Linear(i, o), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(SIZES[-2], SIZES[-1])).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    tx, ty, txt, tyt = (torch.from_numpy(a).to(device) for a in data)
    ty, tyt = ty.long(), tyt.long()
    gen = torch.Generator().manual_seed(0)
    setup_s = time.perf_counter() - start
    start, reached, epochs = time.perf_counter(), 0.0, 0
    while reached < target and epochs < max_epochs:
        perm = torch.randperm(len(tx), generator=gen).to(device)
        for i in range(len(tx) // BATCH):
            idx = perm[i * BATCH:(i + 1) * BATCH]
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(tx[idx]), ty[idx]).backward()
            opt.step()
        with torch.no_grad():
            reached = float((model(txt).argmax(1) == tyt).float().mean())
        epochs += 1
    return {"train_s": time.perf_counter() - start, "setup_s": setup_s, "epochs": epochs, "accuracy": reached}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("framework", choices=["purenet", "pytorch"])
    parser.add_argument("--cache", help="purenet: persistent compilation cache directory")
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--max-epochs", type=int, default=60)
    args = parser.parse_args()
    if args.framework == "purenet":
        result = purenet_run(args.target, args.max_epochs, args.cache)
    else:
        result = torch_run(args.target, args.max_epochs)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
