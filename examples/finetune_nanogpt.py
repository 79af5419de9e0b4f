"""Fine-tune a nanoGPT checkpoint in purenet, with the token embedding frozen, and write it back.

    python examples/finetune_nanogpt.py [CKPT] [--iters 300] [--out finetune_nanogpt.png] [--out-dir DIR]

CKPT is the ckpt.pt nanoGPT's train.py writes ({"model": state_dict,
"model_args": {...}, ...}, read with torch.load(weights_only=True), so no
pickled code runs) or a safetensors file of the state_dict (no torch
needed; n_head from --heads or the file's metadata). The model must be a
character-level model of tiny Shakespeare (nanoGPT's shakespeare_char:
vocabulary 65, the same ids as pn.datasets.text). Without CKPT, a small
model is pretrained here for a few steps and written as nanoGPT would
(ckpt.pt when torch is importable, else safetensors), and that file is
read back like any other.

The steps: import with pn.weights.from_nanogpt; the validation loss on
fixed random windows of the validation split; fine-tune with AdamW
(clipped at 1.0), the token embedding frozen; the fine-tuned weights
written back as nanoGPT's checkpoint (DIR/finetuned.pt, torch.save of
{"model", "model_args", "iter_num", "best_val_loss"}; no optimizer state)
and as DIR/finetuned.safetensors (model_args in its metadata), both read
back and checked equal; the loss curves plotted (--out).

Freezing the embedding. nanoGPT ties the token embedding to the output
projection, and pn.GPT holds the tied matrix E as one leaf of its
`TiedEnds` (the lookup and the head), not as a layer of its own:
pn.Frozen wraps a whole layer, so it would freeze the whole GPT or
nothing. pn.optim.masked freezes exactly that leaf: its gradient is zeroed
before clipping and its update after AdamW's weight decay, so E stays bit
for bit what the checkpoint holds (the script checks it), and so does the
tied output head. (Its gradient is still computed; masked cannot skip it.)
"""
import argparse
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import purenet as pn
from _common import FAST, save

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"

try:
    import torch
except ImportError:  # safetensors files only
    torch = None


MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")


def read_checkpoint(path, heads):
    """(net, params, model_args) from a ckpt.pt or a .safetensors state_dict."""
    if str(path).endswith(".safetensors"):
        state_dict = pn.weights.load_safetensors(path)  # {name: numpy array}
        meta = pn.weights.safetensors_metadata(path)
        args = {k: json.loads(v) for k, v in meta.items() if k in MODEL_ARGS}
        net, params = pn.weights.from_nanogpt({"model": state_dict, "model_args": args}, heads=heads)
    else:
        if torch is None:
            raise SystemExit(f"{path}: reading a ckpt.pt needs torch; pass a .safetensors file instead")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        net, params = pn.weights.from_nanogpt(ckpt, heads=heads)
    return net, params, pn.weights.to_nanogpt(net, params, checkpoint=True)["model_args"]


def write_checkpoint(out_dir, stem, net, params, extra):
    """nanoGPT's checkpoint (stem.pt, when torch is importable) and stem.safetensors; returns the paths."""
    ckpt = pn.weights.to_nanogpt(net, params, checkpoint=True)
    paths = []
    if torch is not None:
        model = {k: torch.from_numpy(v) for k, v in ckpt["model"].items()}  # lm_head shares wte's array: tied
        paths.append(out_dir / f"{stem}.pt")
        torch.save({"model": model, "model_args": ckpt["model_args"], **extra}, paths[-1])
    paths.append(out_dir / f"{stem}.safetensors")
    pn.weights.save_safetensors(paths[-1], ckpt["model"],
                                metadata={k: json.dumps(v) for k, v in ckpt["model_args"].items()})
    return paths


def make_step(net, opt, state, train_ids, batch_size, context):
    @jax.jit
    def step(opt_state, key):
        k_data, k_drop = jax.random.split(key)
        x, y = pn.datasets.windows(train_ids, k_data, batch_size, context)
        value, grads, _ = pn.value_and_grad(net, opt_state.params, state, x, y, loss="cross_entropy",
                                            train=True, key=k_drop)
        return opt.step(opt_state, grads), value

    return step


def make_evaluate(net, state, ids, batch_size, context, batches):
    """The mean loss over `batches` random windows of `ids` (the same windows for the same key)."""

    @jax.jit
    def evaluate(params, key):
        def one(_, k):
            x, y = pn.datasets.windows(ids, k, batch_size, context)
            return None, pn.loss(net, params, state, x, y, loss="cross_entropy")[0]

        return jnp.mean(jax.lax.scan(one, None, jax.random.split(key, batches))[1])

    return lambda params, key: float(evaluate(params, key))


def pretrain(data, args, out_dir):
    """A small nanoGPT-shaped model trained here for a few steps, written as nanoGPT's checkpoint."""
    net = pn.gpt(data.vocab_size, 32 if FAST else 64, 1 if FAST else 2, 2 if FAST else 4, 32 if FAST else 64)
    context = net.layers[0].context
    opt = pn.optim.chain(pn.optim.clip_by_global_norm(1.0), pn.optim.adamw(1e-3, b2=0.99, weight_decay=0.1))
    params, state = pn.init(net, jax.random.key(args.seed))
    step = make_step(net, opt, state, jnp.asarray(data.train), args.batch_size, context)
    opt_state = opt.init(params)
    steps = 20 if FAST else 200
    for i in range(steps):
        opt_state, _ = step(opt_state, jax.random.fold_in(jax.random.key(args.seed), i))
    paths = write_checkpoint(out_dir, "pretrained", net, opt_state.params, {"iter_num": steps})
    print(f"no checkpoint given: pretrained a {net.layers[0].layers}-layer model here for {steps} steps, "
          f"wrote {paths[0]}")
    return paths[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", help="nanoGPT's ckpt.pt or a .safetensors state_dict")
    parser.add_argument("--heads", type=int, help="n_head, for a state_dict file that does not record it")
    parser.add_argument("--data", default=os.environ.get("PURENET_SHAKESPEARE", str(DEFAULT)))
    parser.add_argument("--iters", type=int, default=20 if FAST else 300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--eval-every", type=int, default=10 if FAST else 50)
    parser.add_argument("--eval-batches", type=int, default=2 if FAST else 20)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--out", default="finetune_nanogpt.png", help="the plot ('' for none)")
    parser.add_argument("--out-dir", default=".", help="where finetuned.pt / finetuned.safetensors go")
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    try:
        data = pn.datasets.text(args.data)
    except FileNotFoundError:
        raise SystemExit(f"no corpus at {args.data}: download tiny Shakespeare's input.txt and pass --data FILE")
    path = args.checkpoint or pretrain(data, args, out_dir)
    net, params, model_args = read_checkpoint(path, args.heads)
    model = net.layers[0]
    print(f"read {path}: {model_args}")
    if model.vocab_size != data.vocab_size:
        raise SystemExit(f"the checkpoint's vocabulary has {model.vocab_size} ids, tiny Shakespeare's characters "
                         f"{data.vocab_size}: this example fine-tunes nanoGPT's shakespeare_char models")
    state = pn.weights.empty_state(net)
    context = model.context
    train_ids, val_ids = jnp.asarray(data.train), jnp.asarray(data.val)
    evaluate = make_evaluate(net, state, val_ids, args.batch_size, context, args.eval_batches)
    val_key = jax.random.key(args.seed + 1)  # the same validation windows at every estimate
    before = evaluate(params, val_key)
    print(f"validation loss before fine-tuning: {before:.4f} ({args.eval_batches * args.batch_size} windows "
          f"of {context})")

    trainable = jax.tree_util.tree_map(lambda _: True, params)
    trainable[0]["token"]["E"] = False  # the tied embedding (and so the output head) stays as it is
    opt = pn.optim.masked(pn.optim.chain(pn.optim.clip_by_global_norm(1.0),
                                         pn.optim.adamw(args.lr, b2=0.99, weight_decay=0.1)), trainable)
    step = make_step(net, opt, state, train_ids, args.batch_size, context)
    opt_state = opt.init(params)
    curve, evals, start = [], [(0, before)], time.perf_counter()
    for i in range(args.iters):
        opt_state, value = step(opt_state, jax.random.fold_in(jax.random.key(args.seed), 10**6 + i))
        curve.append(float(value))
        if (i + 1) % args.eval_every == 0 or i + 1 == args.iters:
            evals.append((i + 1, evaluate(opt_state.params, val_key)))
            print(f"iter {i + 1:5d}: train loss {np.mean(curve[-args.eval_every:]):.4f}, "
                  f"validation loss {evals[-1][1]:.4f}")
    tuned, after = opt_state.params, evals[-1][1]
    print(f"{args.iters} iterations in {time.perf_counter() - start:.1f} s; "
          f"validation loss {before:.4f} -> {after:.4f}")
    frozen = np.array_equal(np.asarray(tuned[0]["token"]["E"]), np.asarray(params[0]["token"]["E"]))
    print(f"token embedding unchanged: {frozen}")

    paths = write_checkpoint(out_dir, "finetuned", net, tuned, {"iter_num": args.iters, "best_val_loss": after})
    for p in paths:
        _, back, _ = read_checkpoint(p, args.heads)
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(tuned),
                                                        jax.tree_util.tree_leaves(back)))
        print(f"wrote {p} (read back: {'identical' if same else 'DIFFERENT'})")
        assert same
    if args.out:
        plot(args, curve, evals, model.vocab_size)


def plot(args, curve, evals, vocab_size):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    width = max(1, min(25, len(curve) // 10))
    smooth = np.convolve(curve, np.ones(width) / width, mode="valid")
    ax.plot(np.arange(width, len(curve) + 1), smooth, lw=1, alpha=0.7, label=f"training batches (mean of {width})")
    it, va = zip(*evals)
    ax.plot(it, va, "s-", label="validation (fixed windows)")
    ax.axhline(evals[0][1], color="gray", ls="--", lw=1, label="validation before fine-tuning")
    ax.axhline(np.log(vocab_size), color="gray", ls=":", lw=1, label="uniform guess")
    ax.set(xlabel="fine-tuning iteration", ylabel="cross-entropy (nats per character)",
           title=f"nanoGPT checkpoint fine-tuned in purenet (embedding frozen): "
                 f"{evals[0][1]:.3f} -> {evals[-1][1]:.3f}")
    ax.legend()
    save(fig, args.out)


if __name__ == "__main__":
    main()
