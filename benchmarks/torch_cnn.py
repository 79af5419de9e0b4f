"""The PyTorch eager twins of examples/mnist_cnn.py and examples/mnist_autoencoder.py, for whole-process timing.

    python -m benchmarks.torch_cnn --model lenet        [--epochs 10]   # LeNet, cross-entropy, held-out accuracy
    python -m benchmarks.torch_cnn --model autoencoder  [--epochs 5]    # the conv autoencoder, held-out MSE

The same data (the shared MNIST test set: 8,000 training and 2,000 held-out
images, the same permutation), model, Adam with the same cosine-decayed
learning rate stepped every batch, batch 64, a fresh shuffle each epoch,
in a plain eager loop over tensor slices (no DataLoader): the fastest way
PyTorch eager runs this. It does the work the purenet example does: the
LeNet validates on the held-out set after every epoch (loss and accuracy,
as `pn.fit(validation=...)`, in chunks of 256 rows: PyTorch's fastest, see
`evaluate`) and ends with the confusion matrix; the autoencoder ends with
one held-out pass; each draws the example's figure (`examples/_common.py`,
matplotlib; `--out ''` draws none). `--bare` trains and runs the one
held-out pass only: no per-epoch validation and no figure (the twin before
2026-12-07, less work than the example). It reads the IDX files with numpy
(no JAX import), and prints what the purenet example prints, so
benchmarks/cnn_run.py can time both as whole processes.
"""
import argparse
import gzip
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT.parent / "shared" / "data" / "mnist"
sys.path.insert(0, str(ROOT / "examples"))
from _common import lenet_figure, reconstruction_figure  # noqa: E402  (the examples' figures, no JAX)


def images(folder):
    with gzip.open(Path(folder) / "t10k-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28).astype(np.float32) / 255
    with gzip.open(Path(folder) / "t10k-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return x, y


def lenet():
    return nn.Sequential(nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(7 * 7 * 32, 128), nn.ReLU(), nn.Linear(128, 10))


def autoencoder():
    # padding as purenet's SAME: stride-2 3x3 convs pad (0, 1), i.e. one pixel on the high side
    return nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(1, 16, 3, 2), nn.GroupNorm(4, 16), nn.ReLU(),
                         nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(16, 8, 3, 2), nn.GroupNorm(2, 8), nn.ReLU(),
                         # lax.conv_transpose's SAME (pads (2, 1) of the dilated input): PyTorch's padding 0, the
                         # last row and column cropped (its kernel is ours flipped, which init does not see)
                         nn.ConvTranspose2d(8, 16, 3, 2), nn.ZeroPad2d((0, -1, 0, -1)), nn.GroupNorm(4, 16), nn.ReLU(),
                         nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(16, 1, 3, padding=1), nn.Sigmoid())


def evaluate(model, x, chunk=256):
    """The model's outputs on x in eval mode, chunk rows at a time: on 2 threads 2,000 LeNet images took
    207 ms in chunks of 256, 212 ms in chunks of 128 and 392 ms in one pass (2026-12-07)."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i:i + chunk]) for i in range(0, len(x), chunk)])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["lenet", "autoencoder"], default="lenet")
    parser.add_argument("--data", default=os.environ.get("PURENET_MNIST", str(DEFAULT)))
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--train", type=int, default=8000)
    parser.add_argument("--held-out", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="the figure's file ('' for none; default <model>_torch.png)")
    parser.add_argument("--bare", action="store_true", help="no per-epoch validation and no figure")
    args = parser.parse_args()
    lenet_run = args.model == "lenet"
    n_epochs = args.epochs or (10 if lenet_run else 5)
    torch.manual_seed(args.seed)
    x, y = images(args.data)
    order = np.random.default_rng(args.seed).permutation(len(x))
    tr, te = order[:args.train], order[args.train:args.train + args.held_out]
    xtr, ytr, xte, yte = (torch.from_numpy(a) for a in (x[tr], y[tr], x[te], y[te]))
    model = lenet() if lenet_run else autoencoder()
    steps_per_epoch = len(tr) // args.batch_size
    steps, peak = n_epochs * steps_per_epoch, 2e-3 if lenet_run else 3e-3
    opt = torch.optim.Adam(model.parameters(), lr=peak)
    # optax.cosine_decay_schedule(peak, steps, alpha=0.05), as pn.schedules.cosine_decay
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
    loss_fn = nn.CrossEntropyLoss() if lenet_run else nn.MSELoss()
    history: dict = {"loss": [], "val_loss": [], "val_accuracy": []}
    start = time.perf_counter()
    for _ in range(n_epochs):
        model.train()
        perm = torch.randperm(len(tr))
        total = torch.zeros(())
        for b in range(steps_per_epoch):
            idx = perm[b * args.batch_size:(b + 1) * args.batch_size]
            xb = xtr[idx]
            loss = loss_fn(model(xb), ytr[idx] if lenet_run else xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach()
        history["loss"].append(total.item() / steps_per_epoch)
        if lenet_run and not args.bare:  # as pn.fit(validation=...): the held-out loss and accuracy after every epoch
            logits = evaluate(model, xte)
            history["val_loss"].append(loss_fn(logits, yte).item())
            history["val_accuracy"].append((logits.argmax(1) == yte).float().mean().item())
    seconds = time.perf_counter() - start
    print(f"{n_epochs} epochs in {seconds:.1f} s")
    out = evaluate(model, xte)
    figure = "" if args.bare else f"{args.model}_torch.png" if args.out is None else args.out
    if lenet_run:
        confusion = np.bincount(10 * yte.numpy() + out.argmax(1).numpy(), minlength=100).reshape(10, 10)
        accuracy = np.trace(confusion) / confusion.sum()
        print(f"held-out accuracy: {accuracy:.4f}")
        if figure:
            filters = model[0].weight.detach().numpy()[:, 0].transpose(1, 2, 0)  # (16, 1, 5, 5) -> (5, 5, 16)
            lenet_figure({k: np.array(v) for k, v in history.items()}, confusion, filters, accuracy, figure,
                         framework="PyTorch")
    else:
        mse = ((out - xte) ** 2).mean().item()
        print(f"held-out reconstruction error (MSE per pixel): {mse:.5f}")
        if figure:
            to_nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)  # noqa: E731
            reconstruction_figure(to_nhwc(xte), to_nhwc(out), mse, figure, framework="PyTorch")

if __name__ == "__main__":
    main()
