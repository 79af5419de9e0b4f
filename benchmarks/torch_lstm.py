"""examples/shakespeare_lstm.py's run in PyTorch eager: the same model, optimizer, schedule and protocol.

    python -m benchmarks.torch_lstm [--data ../shared/data/tinyshakespeare/input.txt] [--threads 1]
        [--json benchmarks/results_torch_lstm.json]

nn.Embedding(vocab, 64) -> nn.LSTM(64, 256, batch_first=True) -> nn.Linear(256, vocab),
starting from the example's initial parameters (copied from pn.init with its seed), cross-entropy over every position, batch 32 random windows of 64 (drawn with
NumPy: the same distribution as pn.datasets.windows, not the same draws),
Adam (beta2 0.99, eps 1e-8) with gradients clipped at 1.0, learning rate warmed
up linearly over 100 steps to 3e-3 and cosine-decayed to 3e-4 (the example's
pn.schedules.warmup_cosine_decay), loss estimates every 250 iterations on 10
batches of each split and a final one on 75 (2,400 windows), as the example.
The wall time counts the same things as the example's: the training loop and
its loss estimates.
"""
import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np

import purenet as pn

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def lr_at(step, iters, lr, min_lr, warmup):
    """pn.schedules.warmup_cosine_decay(0, lr, warmup, iters, min_lr) at `step`."""
    if step < warmup:
        return lr * step / warmup
    frac = min(1.0, (step - warmup) / max(1, iters - warmup))
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * frac))


def copy_initial_params(emb, lstm, head, vocab_size, args):
    """The example's initial parameters (its model and key), in PyTorch's layouts: the same start.
    PyTorch's two LSTM biases start as (b, 0); each then gets b's gradient, so Adam moves their sum
    up to twice as fast as purenet's one b (the one difference of the models)."""
    import jax
    import torch

    net = pn.Sequential([pn.Embedding(vocab_size, args.embed), pn.LSTM(args.hidden), pn.Dense(vocab_size),
                         pn.Softmax()])
    params, _ = pn.init(net, jax.random.fold_in(jax.random.key(args.seed), 0), (args.context,))
    t = lambda a: torch.from_numpy(np.array(a, np.float32))  # noqa: E731
    with torch.no_grad():
        emb.weight.copy_(t(params[0]["E"]))
        lstm.weight_ih_l0.copy_(t(params[1]["Wx"].T))
        lstm.weight_hh_l0.copy_(t(params[1]["Wh"].T))
        lstm.bias_ih_l0.copy_(t(params[1]["b"]))
        lstm.bias_hh_l0.zero_()
        head.weight.copy_(t(params[2]["W"].T))
        head.bias.copy_(t(params[2]["b"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("PURENET_SHAKESPEARE", str(DEFAULT)))
    parser.add_argument("--iters", type=int, default=1500)
    parser.add_argument("--embed", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-batches", type=int, default=10)
    parser.add_argument("--final-eval-batches", type=int, default=75)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    import torch
    from torch.nn import functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = pn.datasets.text(args.data)
    emb = torch.nn.Embedding(data.vocab_size, args.embed)
    lstm = torch.nn.LSTM(args.embed, args.hidden, batch_first=True)
    head = torch.nn.Linear(args.hidden, data.vocab_size)
    copy_initial_params(emb, lstm, head, data.vocab_size, args)
    params = [*emb.parameters(), *lstm.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.99), eps=1e-8)
    rng = np.random.default_rng(args.seed)
    train, val = (torch.from_numpy(a.astype(np.int64)) for a in (data.train, data.val))

    def batch(ids):
        starts = torch.from_numpy(rng.integers(0, len(ids) - args.context, args.batch_size))
        idx = starts[:, None] + torch.arange(args.context + 1)[None]
        w = ids[idx]
        return w[:, :-1], w[:, 1:]

    def loss_of(x, y):
        out, _ = lstm(emb(x))
        return F.cross_entropy(head(out).reshape(-1, data.vocab_size), y.reshape(-1))

    @torch.no_grad()
    def estimate(n):
        return tuple(float(np.mean([loss_of(*batch(ids)).item() for _ in range(n)])) for ids in (train, val))

    warmup = min(100, args.iters // 2)
    curve, evals, start = [], [], time.perf_counter()
    for it in range(args.iters):
        for g in opt.param_groups:
            g["lr"] = lr_at(it, args.iters, args.lr, args.lr / 10, warmup)
        loss = loss_of(*batch(train))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        curve.append(loss.item())
        if (it + 1) % args.eval_every == 0 or it + 1 == args.iters:
            tr, va = estimate(args.eval_batches)
            evals.append((it + 1, tr, va))
            print(f"iter {it + 1:5d}: train loss {tr:.4f}, val loss {va:.4f}", flush=True)
    train_s = time.perf_counter() - start
    train_loss, val_loss = estimate(args.final_eval_batches)
    print(f"{args.iters} iterations in {train_s:.1f} s ({1000 * train_s / args.iters:.1f} ms/iteration, "
          f"loss estimates included), torch {torch.__version__}, {args.threads} thread(s)")
    print(f"final train loss {train_loss:.4f}, validation loss {val_loss:.4f} "
          f"(each on {args.final_eval_batches * args.batch_size} random windows of {args.context})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"iters": args.iters, "train_s": train_s, "train_loss": train_loss, "val_loss": val_loss,
                       "threads": args.threads, "evals": evals, "curve": curve}, f)


if __name__ == "__main__":
    main()
