"""ConvTranspose2D's formulations on the CPU: `python -m benchmarks.transposed [--json FILE]`.

For each shape (batch 64, 3x3 or 4x4 kernel, stride 2, SAME), the step time
(forward and backward, W and x gradients) on its own and per step inside a
20-step lax.scan (fit's epochs are scans), medians of 7:

    handwritten (xla)            purenet's: lax.conv_transpose's convolution, dx a strided
                                 convolution of dy, dW a correlation, all in NHWC / HWIO
    jax.grad lax.conv_transpose  the same forward, differentiated by autodiff
    jax.grad col2im              a col2im forward (one matmul x W2, each tap's piece added in
                                 place into the output), differentiated by autodiff

and purenet's per-example gradient norms (the generic default: each
example's own backward, vmapped) against vmap(jax.grad).
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import purenet as pn
from purenet.layers.transposed import transpose_pads

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation

SHAPES = [(64, 7, 32, 16, 3), (64, 14, 16, 1, 3), (64, 14, 16, 8, 4)]  # batch, H, in, out, kernel; stride 2


def lax_transpose(x, W, s):
    return lax.conv_transpose(x, W, (s, s), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def col2im(x, W, s):
    k, (n, h, _, _), f = W.shape[0], x.shape, W.shape[-1]
    (lo, hi), _ = transpose_pads((k, k), (s, s), "SAME")
    out = (h - 1) * s + 1 + lo + hi - k + 1
    z = jnp.einsum("nhwc,ijcf->nhwijf", x, W)
    size = (h - 1) * s + k
    total = jnp.zeros((n, size, size, f), x.dtype)
    for i in range(k):
        for j in range(k):
            piece = lax.pad(z[:, :, :, i, j], jnp.zeros((), x.dtype), ((0, 0, 0), (0, 0, s - 1), (0, 0, s - 1), (0, 0, 0)))
            at = (0, k - 1 - i, k - 1 - j, 0)
            total = lax.dynamic_update_slice(total, lax.dynamic_slice(total, at, piece.shape) + piece, at)
    crop = lo - (k - 1)
    return lax.pad(total, jnp.zeros((), x.dtype), ((0, 0, 0), (crop, out - size - crop, 0), (crop, out - size - crop, 0),
                                                   (0, 0, 0)))


def median_ms(fn, *args, inner=1, reps=7):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t) / inner)
    return 1e3 * float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    results = []
    for n, h, c, f, k in SHAPES[:1] if args.smoke else SHAPES:
        s = 2
        x = jnp.asarray(np.random.default_rng(0).standard_normal((n, h, h, c)), jnp.float32)
        layer = pn.ConvTranspose2D(f, k, s, use_bias=False)
        W = layer.init(jax.random.key(0), x.shape[1:])[0]["W"]

        def handwritten(W, x):
            y, _, cache = layer.forward({"W": W}, {}, x)
            g, dx = layer.backward({"W": W}, cache, 2 * y)
            return g["W"], dx

        def autodiff(fwd):
            return jax.grad(lambda W, x: jnp.sum(fwd(x, W, s) ** 2), argnums=(0, 1))

        row = {"shape": dict(batch=n, hw=h, cin=c, cout=f, kernel=k, stride=s)}
        for name, fn in [("handwritten (xla)", handwritten), ("jax.grad lax.conv_transpose", autodiff(lax_transpose)),
                         ("jax.grad col2im", autodiff(col2im))]:
            def scanned(W, x, fn=fn):
                return lax.scan(lambda W, _: (W - 1e-6 * fn(W, x)[0], None), W, None, length=20)[0]
            row[name] = dict(step_ms=median_ms(jax.jit(fn), W, x), scan_step_ms=median_ms(jax.jit(scanned), W, x,
                                                                                          inner=20))
            print(row["shape"], name, row[name], flush=True)
        net = pn.Sequential([layer, pn.Flatten()], in_shape=x.shape[1:])
        params, state = pn.init(net, jax.random.key(0))
        y = jnp.zeros((n, (h * s) ** 2 * f))

        def reference(p):
            g = jax.vmap(lambda xi, yi: jax.grad(lambda q: pn.loss(net, q, state, xi[None], yi[None], loss="mse")[0])(p))(
                x, y)
            return jnp.sqrt(sum(jnp.sum(v.reshape(n, -1) ** 2, 1) for v in jax.tree_util.tree_leaves(g)))

        row["per_example_norms_ms"] = dict(
            purenet=median_ms(jax.jit(lambda p: pn.per_example_grad_norms(net, p, state, x, y, loss="mse")), params),
            vmap_jax_grad=median_ms(jax.jit(reference), params))
        print(row["shape"], row["per_example_norms_ms"], flush=True)
        results.append(row)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(benchmark="transposed", backend=jax.default_backend(), results=results), fh, indent=1)


if __name__ == "__main__":
    main()
