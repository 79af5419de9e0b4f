"""XLA:CPU's paths per operation on purenet's shapes: `python -m benchmarks.xla_levers [--rounds 9] [--repeats 15]`.

    python -m benchmarks.xla_levers --json benchmarks/results_xla_levers_cpu.json
    python -m benchmarks.xla_levers --smoke        # a tiny subset, once: checks that every process runs
    python -m benchmarks.xla_levers --configs default reduce no-conv --no-torch   # some configurations only

XLA reads XLA_FLAGS once, when JAX starts its backend, so every configuration
runs in a FRESH process (this module, `--child KEY`), and the processes of
one round run back to back, the order rotating from round to round; a
PyTorch process (`--torch-child`) takes its turn in each round too.
Configurations (the YNNPACK fusion types of jaxlib 0.10.2's XLA:CPU; its
default is individual_dot,individual_convolution,reduce):

    default                            XLA_FLAGS without any of these flags: jaxlib's default
    -reduce                            --xla_cpu_experimental_ynn_fusion_type=-reduce (the
                                       workaround for jax issue 39103 alone)
    -reduce,-individual_convolution    and convolutions left to XLA's own (Eigen) convolution
    -reduce,-individual_dot            and dots left to XLA's own (Eigen) dot
    -reduce + oneDNN dot               -reduce, --xla_cpu_use_onednn=true and
                                       --xla_cpu_experimental_onednn_fusion_type=dot

Every configuration but the default keeps -reduce: only those can be
recommended. A configuration whose flag the installed jaxlib does not know
(purenet.xla_flags._known), or whose process dies before JAX's backend is
up (XLA aborts on an unknown flag or value), is reported "not available".
The lever flags already in the inherited XLA_FLAGS (the test suite's
`configure()`, say) are removed first; any other flag there is kept.

Operations (float32, each jitted on its own and timed alone: every call waits
for its result, block_until_ready; an op faster than ~5 ms is called several
times per timing and the mean taken, so small ops include JAX's dispatch, see
"dispatch floor"). In each process every op is timed once per repeat, the ops
interleaved, and the process reports each op's median of --repeats; the table
gives the median over rounds of those, and paired ratios: the median over
rounds of (configuration / default) in the same round (below 1: faster than
the default), and against -reduce for the levers.

    LeNet conv1/conv2 fwd, dx, dW    examples/mnist_cnn.py's convolutions at batch 128, through
                                     pn.Conv2D's forward and backward on the real shapes (conv1 has
                                     1 input channel: "auto" runs im2col; conv2: lax.conv)
    AE conv1/conv2/convT/conv3       examples/mnist_autoencoder.py's convolutions and transposed
                                     convolution at batch 128: forward, backward (grads and dx)
    LSTM ...                         examples/shakespeare_lstm.py's products (embed 64, hidden 256,
                                     context 64; batch 32 in --parts 2: 16 rows per program)
    GPT ...                          examples/shakespeare_gpt.py's attention products (128 features,
                                     4 heads, context 64; batch 12 in --parts 2: 6 per program) and
                                     its pn.MultiHeadAttention layer's forward and backward
    MLP value_and_grad               pn.mlp([784, 1024, 1024, 10]) at batch 1024, pn.value_and_grad
    LeNet value_and_grad             the whole LeNet at batch 128, pn.value_and_grad
    conv2 dW ...                     the LeNet's second conv's dW in other formulations (purenet's
                                     own is "LeNet conv2 dW"): jax.vjp of lax.conv_general_dilated
                                     (autodiff's transposed convolution), the im2col patches' P^T dy
                                     (patches formed in the op, or given), and one small matmul per
                                     tap (25 of them, stacked)

The PyTorch column (torch.set_num_threads(--torch-threads), NCHW) runs the
conv ops (aten.convolution_backward with an output mask for dx / dW) and the
LeNet's forward and backward on the same shapes; the stride-2 3x3 SAME convs
pad (1, 1) there instead of XLA's (0, 1): same output shapes and work.

Each process also records its compiled program's paths per op (the HLO after
optimization): library fusions (YNNPACK "ynn", oneDNN "onednn") and the
convolutions and dots left outside them (XLA's own: Eigen).
"""
import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import purenet.xla_flags as xla_flags  # no JAX computation in this (parent) process: children set the flags

ROOT = Path(__file__).resolve().parents[1]
YNN = "--xla_cpu_experimental_ynn_fusion_type"
CONFIGS: dict[str, tuple[str, ...]] = {
    "default": (),
    "-reduce": (f"{YNN}=-reduce",),
    "-reduce,-individual_convolution": (f"{YNN}=-reduce,-individual_convolution",),
    "-reduce,-individual_dot": (f"{YNN}=-reduce,-individual_dot",),
    "-reduce + oneDNN dot": (f"{YNN}=-reduce", "--xla_cpu_use_onednn=true",
                             "--xla_cpu_experimental_onednn_fusion_type=dot"),
}
# the configurations' names on the command line (--configs, --child)
KEYS = dict(zip(("default", "reduce", "no-conv", "no-dot", "onednn"), CONFIGS))
LEVER_NAMES = {xla_flags._name(f) for flags in CONFIGS.values() for f in flags}
BASE, REFERENCE = "default", "-reduce"
TORCH = "pytorch"
STARTED = "XLA_LEVERS_BACKEND_STARTED"  # a child prints it once JAX's backend is up: the flags were accepted
FLAG_ERROR = r"Unknown flag in XLA_FLAGS|Illegal value for --xla|Flag parsing failed"  # XLA's, before it aborts
TARGET_S = 5e-3  # an op faster than this is called ceil(TARGET_S / t) times per timing
KEY_OPS = ("LeNet value_and_grad", "LeNet conv2 dW")  # what a recommendation rests on
# a lever is recommended where its paired ratio to -reduce is below 0.9 on a KEY_OP and it is more than 10%
# faster in at least this share of the rounds (not all: on a shared machine a whole process can be disturbed)
CONSISTENT = 0.8


# ---------------------------------------------------------------- shapes

def shapes(smoke):
    return dict(batch=8 if smoke else 128, lstm_batch=2 if smoke else 16, gpt_batch=1 if smoke else 6,
                mlp_batch=8 if smoke else 1024)


SMOKE_OPS = ("dispatch floor", "LeNet conv2 fwd", "LeNet conv2 dW", "conv2 dW jax.vjp(lax.conv)",
             "conv2 dW im2col (patches formed)", "conv2 dW im2col (patches given)", "conv2 dW per-tap matmuls",
             "LeNet value_and_grad")


# ---------------------------------------------------------------- the JAX child

def _jax_ops(smoke):
    """name -> (group, fn, args); fn is jitted and compiled by the caller."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    import purenet as pn
    from purenet.layers import conv as convs

    s = shapes(smoke)
    rng = np.random.default_rng(0)
    keys = iter(jax.random.split(jax.random.key(0), 64))

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    ops = {"dispatch floor": ("floor", lambda a: a + 1.0, (jnp.zeros((), jnp.float32),))}

    def layer_ops(group, prefix, layer, in_shape, batch, split):
        params, _, out_shape = layer.init(next(keys), in_shape, jnp.float32)
        x, dy = normal(batch, *in_shape), normal(batch, *out_shape)
        _, _, cache = jax.jit(lambda p, x: layer.forward(p, {}, x))(params, x)
        ops[f"{prefix} fwd"] = (group, lambda p, x: layer.forward(p, {}, x)[0], (params, x))
        if split:
            ops[f"{prefix} dx"] = (group, lambda p, c, d: layer.backward(p, c, d)[1], (params, cache, dy))
            ops[f"{prefix} dW"] = (group, lambda p, c, d: layer.backward(p, c, d)[0]["W"], (params, cache, dy))
        else:
            ops[f"{prefix} bwd"] = (group, lambda p, c, d: layer.backward(p, c, d), (params, cache, dy))
        return params, x, dy

    # the LeNet of examples/mnist_cnn.py
    b = s["batch"]
    conv1, conv2 = pn.Conv2D(16, 5), pn.Conv2D(32, 5)
    layer_ops("LeNet convs", "LeNet conv1", conv1, (28, 28, 1), b, True)
    p2, x2, dy2 = layer_ops("LeNet convs", "LeNet conv2", conv2, (14, 14, 16), b, True)

    if not smoke:  # the autoencoder's, the LSTM's and the GPT's ops and the MLP step
        _more_jax_ops(ops, layer_ops, normal, keys, rng, s)
    lenet = pn.Sequential([pn.Conv2D(16, 5), pn.ReLU(), pn.MaxPool2D(2), pn.Conv2D(32, 5), pn.ReLU(), pn.MaxPool2D(2),
                           pn.Flatten(), pn.Dense(128), pn.ReLU(), pn.Dense(10), pn.Softmax()], in_shape=(28, 28, 1))
    lp, ls = pn.init(lenet, next(keys), dtype=jnp.float32)
    ops["LeNet value_and_grad"] = ("steps", lambda p, x, y: pn.value_and_grad(lenet, p, ls, x, y)[:2],
                                   (lp, normal(b, 28, 28, 1), jnp.asarray(rng.integers(0, 10, b), jnp.int32)))

    # the LeNet's conv2 dW, other formulations (purenet's own: "LeNet conv2 dW")
    g = conv2._geometry((14, 14))
    w = p2["W"]
    kh, kw, c, f = w.shape
    outer = (((0,), (0,)), ((), ()))

    def vjp_conv(x, w, dy):
        conv = lambda w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.vjp(conv, w)[1](dy)[0]

    def p_t_dy(p, dy):
        return lax.dot_general(p.reshape(-1, p.shape[-1]), dy.reshape(-1, f), outer).reshape(kh, kw, c, f)

    def per_tap(x, dy):
        d2 = dy.reshape(-1, f)
        taps = convs.tap_slices(convs.pad(x, g), g)
        return jnp.stack([lax.dot_general(t.reshape(-1, c), d2, outer) for t in taps]).reshape(kh, kw, c, f)

    ops["conv2 dW jax.vjp(lax.conv)"] = ("conv2 dW formulations", vjp_conv, (x2, w, dy2))
    ops["conv2 dW im2col (patches formed)"] = ("conv2 dW formulations", lambda x, dy: p_t_dy(convs.patches(x, g), dy),
                                               (x2, dy2))
    given = jax.jit(convs.patches, static_argnums=1)(x2, g)
    ops["conv2 dW im2col (patches given)"] = ("conv2 dW formulations", p_t_dy, (given, dy2))
    ops["conv2 dW per-tap matmuls"] = ("conv2 dW formulations", per_tap, (x2, dy2))
    if smoke:
        ops = {name: ops[name] for name in SMOKE_OPS}
    return ops


def _more_jax_ops(ops, layer_ops, normal, keys, rng, s):
    """The autoencoder's, the LSTM's and the GPT's ops and the MLP step (not in --smoke)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    import purenet as pn

    b = s["batch"]  # the autoencoder of examples/mnist_autoencoder.py (GroupNorm, ReLU, Upsample between them)
    layer_ops("autoencoder convs", "AE conv1 3x3/2 1->16", pn.Conv2D(16, 3, strides=2), (28, 28, 1), b, False)
    layer_ops("autoencoder convs", "AE conv2 3x3/2 16->8", pn.Conv2D(8, 3, strides=2), (14, 14, 16), b, False)
    layer_ops("autoencoder convs", "AE convT 3x3x2 8->16", pn.ConvTranspose2D(16, 3, strides=2), (7, 7, 8), b, False)
    layer_ops("autoencoder convs", "AE conv3 3x3 16->1", pn.Conv2D(1, 3), (28, 28, 16), b, False)

    # the LSTM step's products (purenet/layers/recurrent.py): x Wx over all steps at once (time-major),
    # h Wh per step; backward dz Wh^T per step and the weight gradients over all steps
    n, t, d, h = s["lstm_batch"], 64, 64, 256
    xs, hs, dz = normal(t, n, d), normal(t, n, h), normal(t, n, 4 * h)
    wx, wh = normal(d, 4 * h), normal(h, 4 * h)
    outer = (((0,), (0,)), ((), ()))
    ops["LSTM x Wx (T B, 64)x(64, 1024)"] = ("LSTM", lambda a, w: a @ w, (xs, wx))
    ops["LSTM h Wh (B, 256)x(256, 1024)"] = ("LSTM", lambda a, w: a @ w, (hs[0], wh))
    ops["LSTM dz Wh^T (B, 1024)x(1024, 256)"] = ("LSTM", lambda a, w: a @ w, (dz[0], wh.T))

    def sum_outer(a, g):  # sum over steps and rows of a_t^T g_t: (T B, k)^T (T B, 4h), as recurrent._sum_outer
        return lax.dot_general(a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1]), outer)

    ops["LSTM dWx = x^T dz"] = ("LSTM", sum_outer, (xs, dz))
    ops["LSTM dWh = h^T dz"] = ("LSTM", sum_outer, (hs, dz))

    # the GPT's attention (purenet/layers/attention.py, attention_kernels.py: q (B, K, G, T, dh))
    n, t, d, heads = s["gpt_batch"], 64, 128, 4
    dh, batch_dims = d // heads, ((0, 1), (0, 1))
    x, wqkv, wo = normal(n, t, d), normal(d, 3 * d), normal(d, d)
    q, k, v = normal(n, heads, 1, t, dh), normal(n, heads, t, dh), normal(n, heads, t, dh)
    pr, do = jax.nn.softmax(normal(n, heads, 1, t, t), axis=-1), normal(n, heads, 1, t, dh)
    ops["GPT qkv = x Wqkv"] = ("GPT attention", lambda a, w: a @ w, (x, wqkv))
    ops["GPT S = q k^T"] = ("GPT attention", lambda a, c: lax.dot_general(a, c, (((4,), (3,)), batch_dims)), (q, k))
    ops["GPT o = P v"] = ("GPT attention", lambda a, c: lax.dot_general(a, c, (((4,), (2,)), batch_dims)), (pr, v))
    ops["GPT dv = P^T do"] = ("GPT attention", lambda a, c: lax.dot_general(a, c, (((2, 3), (2, 3)), batch_dims)),
                              (pr, do))
    ops["GPT y = o Wo"] = ("GPT attention", lambda a, w: a @ w, (x, wo))
    layer_ops("GPT attention", "GPT attention layer", pn.MultiHeadAttention(heads, causal=True), (t, d), n, False)

    mlp = pn.mlp([784, 1024, 1024, 10])
    mp, ms = pn.init(mlp, next(keys), dtype=jnp.float32)
    mb = s["mlp_batch"]
    ops["MLP value_and_grad"] = ("steps", lambda p, x, y: pn.value_and_grad(mlp, p, ms, x, y)[:2],
                                 (mp, normal(mb, 784), jnp.asarray(rng.integers(0, 10, mb), jnp.int32)))


def hlo_paths(text):
    """Counts in an optimized HLO module: YNNPACK and oneDNN fusions, and the convolutions and dots outside
    them (XLA's own emitters: Eigen)."""
    computations, current = {}, None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head and not line.startswith(" "):
            current = computations.setdefault(head.group(1), [])
        elif current is not None and line.startswith(" "):
            current.append(line)
    library, counts = set(), {"ynn": 0, "onednn": 0, "conv": 0, "dot": 0}
    for lines in computations.values():
        for line in lines:
            kind = re.search(r'"kind":"__(ynn|onednn)_fusion"', line)
            if kind and " fusion(" in line:
                counts[kind.group(1)] += 1
                library.update(re.findall(r"calls=%?([\w.\-]+)", line))
    for name, lines in computations.items():
        if name in library:
            continue
        for line in lines:
            rhs = line.split("=", 1)[-1]
            counts["conv"] += bool(re.search(r"\bconvolution\(", rhs))
            counts["dot"] += bool(re.search(r"\bdot\(", rhs))
    return counts


def _timer(call, sync, inner):
    start = time.perf_counter()
    for _ in range(inner):
        sync(call())
    return (time.perf_counter() - start) / inner


def _interleaved(calls, sync, repeats):
    """calls: name -> zero-argument callable. Calibrates each op's calls per timing, then times every op once
    per repeat, the ops interleaved; returns name -> (median_s, min_s, max_s, inner)."""
    inner = {}
    for name, call in calls.items():
        _timer(call, sync, 2)  # warm
        one = _timer(call, sync, 1)
        inner[name] = max(1, min(1000, math.ceil(TARGET_S / max(one, 1e-7))))
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(_timer(call, sync, inner[name]))
    return {name: dict(median_s=statistics.median(t), min_s=min(t), max_s=max(t), inner=inner[name])
            for name, t in times.items()}


def jax_child(repeats, smoke):
    import jax
    import numpy as np

    jax.devices()
    print(STARTED, flush=True)
    ops = _jax_ops(smoke)
    compiled, result = {}, {}
    for name, (group, fn, args) in ops.items():
        start = time.perf_counter()
        exe = jax.jit(fn).lower(*args).compile()
        jax.block_until_ready(exe(*args))
        result[name] = dict(group=group, compile_s=time.perf_counter() - start, paths=hlo_paths(exe.as_text()))
        compiled[name] = lambda exe=exe, args=args: exe(*args)
    reference = np.asarray(compiled["LeNet conv2 dW"]())
    for name in ops:
        if name.startswith("conv2 dW"):  # every formulation computes the same dW
            diff = np.max(np.abs(np.asarray(compiled[name]()) - reference)) / np.max(np.abs(reference))
            result[name]["max_rel_diff_vs_purenet"] = float(diff)
    for name, timing in _interleaved(compiled, jax.block_until_ready, repeats).items():
        result[name].update(timing)
    return dict(XLA_FLAGS=os.environ.get("XLA_FLAGS", ""), jax=jax.__version__, ops=result)


# ---------------------------------------------------------------- the PyTorch child

def torch_child(repeats, smoke, threads):
    import torch
    from torch.nn import functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    b = shapes(smoke)["batch"]
    backward = torch.ops.aten.convolution_backward
    ops = {}

    def conv_ops(prefix, x_shape, w_shape, stride, padding, split, transposed=False, output_padding=0):
        x, w = torch.randn(x_shape), torch.randn(w_shape)
        bias = torch.zeros(w_shape[1] if transposed else w_shape[0])
        if transposed:
            fwd = lambda: F.conv_transpose2d(x, w, bias, stride, padding, output_padding)
        else:
            fwd = lambda: F.conv2d(x, w, bias, stride, padding)
        dy = torch.randn(fwd().shape)
        args = (dy, x, w, [bias.shape[0]], [stride] * 2, [padding] * 2, [1, 1], transposed, [output_padding] * 2, 1)
        ops[f"{prefix} fwd"] = fwd
        if split:
            ops[f"{prefix} dx"] = lambda: backward(*args, [True, False, False])
            ops[f"{prefix} dW"] = lambda: backward(*args, [False, True, False])
        else:
            ops[f"{prefix} bwd"] = lambda: backward(*args, [True, True, True])

    conv_ops("LeNet conv1", (b, 1, 28, 28), (16, 1, 5, 5), 1, 2, True)
    conv_ops("LeNet conv2", (b, 16, 14, 14), (32, 16, 5, 5), 1, 2, True)
    conv_ops("AE conv1 3x3/2 1->16", (b, 1, 28, 28), (16, 1, 3, 3), 2, 1, False)
    conv_ops("AE conv2 3x3/2 16->8", (b, 16, 14, 14), (8, 16, 3, 3), 2, 1, False)
    conv_ops("AE convT 3x3x2 8->16", (b, 8, 7, 7), (8, 16, 3, 3), 2, 1, False, transposed=True, output_padding=1)
    conv_ops("AE conv3 3x3 16->1", (b, 16, 28, 28), (1, 16, 3, 3), 1, 1, False)
    nn = torch.nn
    lenet = nn.Sequential(nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(7 * 7 * 32, 128), nn.ReLU(), nn.Linear(128, 10))
    x, y = torch.randn(b, 1, 28, 28), torch.randint(0, 10, (b,))

    def value_and_grad():
        lenet.zero_grad(set_to_none=True)
        loss = F.cross_entropy(lenet(x), y)
        loss.backward()
        return loss

    ops["LeNet value_and_grad"] = value_and_grad
    if smoke:
        ops = {name: ops[name] for name in SMOKE_OPS if name in ops}
    print(STARTED, flush=True)
    calls = {name: (fn if name == "LeNet value_and_grad" else _no_grad(torch, fn)) for name, fn in ops.items()}
    timings = _interleaved(calls, lambda r: r, repeats)  # torch's CPU ops return when done
    result = {name: dict(group="pytorch", **timing) for name, timing in timings.items()}
    return dict(torch=torch.__version__, threads=torch.get_num_threads(), ops=result)


def _no_grad(torch, fn):
    def call():
        with torch.no_grad():
            return fn()
    return call


# ---------------------------------------------------------------- the parent: rounds of fresh processes

def child_env(flags):
    """This process's environment with the lever flags taken out of XLA_FLAGS and `flags` added."""
    env = dict(os.environ)
    kept = [f for f in env.get("XLA_FLAGS", "").split() if xla_flags._name(f) not in LEVER_NAMES]
    env["XLA_FLAGS"] = " ".join(kept)
    return xla_flags.environ(env, flags=flags)


def run_child(name, args):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "child.json"
        mode = ["--torch-child"] if name == TORCH else ["--child", next(k for k, n in KEYS.items() if n == name)]
        command = [sys.executable, "-m", "benchmarks.xla_levers", *mode, "--out", str(out), "--repeats",
                   str(args.repeats), "--torch-threads", str(args.torch_threads)] + ["--smoke"] * args.smoke
        env = child_env(CONFIGS.get(name, ()))
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode == 0:
            return json.loads(out.read_text()), None
        refusal = [line.strip() for line in proc.stderr.splitlines() if re.search(FLAG_ERROR, line)]
        if STARTED not in proc.stdout and refusal:  # XLA refused the flags while JAX started its backend
            return None, f"XLA aborted the process (rc {proc.returncode}) at start-up: " + " | ".join(refusal[:2])
        raise RuntimeError(f"{name}: the process failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


def summarize(per_round, names):
    """per_round[name]: a child's result per round (None where it did not run). Medians over rounds and paired
    ratios against the default and -reduce."""
    ops = {}
    op_names = list(dict.fromkeys(op for name in names for run in per_round[name] for op in run["ops"]))
    for op in op_names:
        row = {}
        for name in names:
            runs = [run["ops"][op] for run in per_round[name] if op in run["ops"]]
            if not runs:
                continue
            seconds = [r["median_s"] for r in runs]
            entry = dict(group=runs[0]["group"], median_s=statistics.median(seconds), min_s=min(seconds),
                         max_s=max(seconds), per_round_s=seconds, calls_per_timing=runs[0]["inner"])
            if "paths" in runs[0]:
                entry["paths"] = runs[0]["paths"]
                entry["compile_s"] = statistics.median(r["compile_s"] for r in runs)
            if "max_rel_diff_vs_purenet" in runs[0]:
                entry["max_rel_diff_vs_purenet"] = max(r["max_rel_diff_vs_purenet"] for r in runs)
            row[name] = entry
        for base, key in ((BASE, "paired_vs_default"), (REFERENCE, "paired_vs_reduce")):
            if base not in row:
                continue
            for name, entry in row.items():
                ratios = [a / b for a, b in zip(entry["per_round_s"], row[base]["per_round_s"])]
                entry[key] = dict(median=statistics.median(ratios), min=min(ratios), max=max(ratios),
                                  rounds_10pct_faster=sum(r < 0.9 for r in ratios), rounds=len(ratios))
        ops[op] = row
    return ops


def verdict(ops, available):
    """Per lever (every available configuration with -reduce, besides -reduce itself): whether it beats -reduce
    alone on the LeNet step or the conv dW: paired ratio below 0.9, more than 10% faster in CONSISTENT of the rounds."""
    out = {}
    for name in available if REFERENCE in available else ():
        if name in (BASE, REFERENCE):
            continue
        rows = {op: ops[op][name]["paired_vs_reduce"] for op in KEY_OPS if name in ops.get(op, {})}
        out[name] = dict(rows, recommend=any(r["rounds_10pct_faster"] >= CONSISTENT * r["rounds"] and r["median"] < 0.9
                                             for r in rows.values()))
    return out


def _t(s):
    return f"{s * 1e6:.1f} us" if s < 1e-4 else f"{s * 1e6:.0f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


SHORT = {"default": "default", "-reduce": "-reduce", "-reduce,-individual_convolution": "-reduce -conv",
         "-reduce,-individual_dot": "-reduce -dot", "-reduce + oneDNN dot": "-reduce +oneDNN", TORCH: "PyTorch"}


def table(ops, names):
    lines = ["| operation | " + " | ".join(SHORT.get(n, n) for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for op, row in ops.items():
        cells = []
        for name in names:
            if name not in row:
                cells.append("")
                continue
            e = row[name]
            ratio = e.get("paired_vs_default", {}).get("median")
            cells.append(_t(e["median_s"]) + ("" if name == BASE or ratio is None else f" ({ratio:.2f})"))
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lever_table(ops, levers):
    lines = ["| operation | " + " | ".join(SHORT.get(n, n) for n in levers) + " |", "|---|" + "---|" * len(levers)]
    for op, row in ops.items():
        if REFERENCE not in row:
            continue
        cells = []
        for name in levers:
            r = row.get(name, {}).get("paired_vs_reduce")
            cells.append("" if r is None else f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f}) "
                                              f"{r['rounds_10pct_faster']}/{r['rounds']}")
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paths_table(ops, names):
    def cell(p):
        parts = [f"{k}{v}" for k, v in p.items() if v]
        return " ".join(parts) or "-"

    lines = ["| operation | " + " | ".join(SHORT.get(n, n) for n in names) + " |", "|---|" + "---|" * len(names)]
    for op, row in ops.items():
        if any("paths" in row.get(n, {}) for n in names):
            lines.append(f"| {op} | " + " | ".join(cell(row[n]["paths"]) if n in row else "" for n in names) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9, help="fresh processes per configuration, interleaved")
    parser.add_argument("--repeats", type=int, default=15, help="timings of every op in each process")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1,
                        help="PyTorch's threads (XLA:CPU uses every core)")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="a tiny subset, 1 round of 1 repeat")
    parser.add_argument("--json", default="xla_levers_results.json")
    parser.add_argument("--configs", nargs="+", choices=list(KEYS), default=list(KEYS),
                        help="the configurations to run: " + ", ".join(f"{k} ({n})" for k, n in KEYS.items()))
    parser.add_argument("--child", choices=list(KEYS), help=argparse.SUPPRESS)
    parser.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.repeats = 1, 1
    if args.child or args.torch_child:
        result = (torch_child(args.repeats, args.smoke, args.torch_threads) if args.torch_child
                  else jax_child(args.repeats, args.smoke))
        Path(args.out).write_text(json.dumps(result))
        return

    configs = {}
    for name in (n for k, n in KEYS.items() if k in args.configs):
        flags = CONFIGS[name]
        unknown = [f for f in flags if not xla_flags._known(xla_flags._name(f))]
        configs[name] = dict(flags=list(flags), available=not unknown,
                             reason=f"unknown to this jaxlib: {unknown}" if unknown else None)
    import importlib.util
    names = [n for n, c in configs.items() if c["available"]]
    if not args.no_torch and importlib.util.find_spec("torch"):
        names.append(TORCH)
    per_round = {name: [] for name in names}
    start = time.perf_counter()
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if name != TORCH and not configs[name]["available"]:
                continue
            t0 = time.perf_counter()
            result, refused = run_child(name, args)
            if refused:
                if r or name == TORCH:
                    raise RuntimeError(f"{name}: ran in an earlier round, refused now: {refused}")
                configs[name].update(available=False, reason=refused)
                print(f"  {name}: not available ({refused})", flush=True)
                continue
            per_round[name].append(result)
            print(f"round {r + 1}/{args.rounds}: {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    names = [n for n in names if per_round[n]]
    available = [n for n in names if n != TORCH]
    ops = summarize(per_round, names)
    results = {
        "machine": {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count()},
        "command": " ".join(["python -m benchmarks.xla_levers", *(argv if argv is not None else sys.argv[1:])]),
        "rounds": args.rounds, "repeats": args.repeats, "wall_s": time.perf_counter() - start,
        "jax": per_round[available[0]][0]["jax"] if available else None,
        "configurations": {n: dict(c, XLA_FLAGS=per_round[n][0]["XLA_FLAGS"] if per_round.get(n) else None)
                           for n, c in configs.items()},
        "pytorch": ({k: per_round[TORCH][0][k] for k in ("torch", "threads")} if TORCH in names else None),
        "ops": ops,
        "verdict_vs_reduce": verdict(ops, available),
    }
    print(f"\nXLA:CPU levers, {args.rounds} rounds x {args.repeats} repeats, medians over rounds; "
          f"(paired ratio to the default)")
    print(table(ops, names))
    levers = [n for n in available if n not in (BASE, REFERENCE)]
    if REFERENCE in available and levers:
        print("\npaired ratio to -reduce: median (min-max over rounds), rounds more than 10% faster")
        print(lever_table(ops, levers))
    print("\npaths in the compiled programs (library fusions; conv / dot outside them: XLA's own)")
    print(paths_table(ops, available))
    for name, c in configs.items():
        if not c["available"]:
            print(f"{name}: not available ({c['reason']})")
    print(f"verdict (paired ratio to -reduce < 0.9 and more than 10% faster in {CONSISTENT:.0%} of the rounds, on "
          + " or ".join(KEY_OPS) + "): " +
          json.dumps({n: v["recommend"] for n, v in results["verdict_vs_reduce"].items()}))
    Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
