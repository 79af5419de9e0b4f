"""Guards against an XLA:CPU miscompile that silently corrupts per-example results (jax issue 39103).

jaxlib 0.10.2's XLA:CPU hands reductions to YNNPACK ("__ynn_fusion"); a fusion of
a dot whose output keeps the batch as its minor axis with a reduce, as
`jax.vmap(lambda r: jnp.sum((M @ r) ** 2))`, computes the wrong rows once the
batch exceeds 16,384 rows in float64 (32,768 in float32): row 16,384 + j comes
back as row 16,320 + j's value (16,384**2 reads 16,320**2 = 266,342,400). With
no error. The workaround is to leave reductions out of YNNPACK's fusions:

    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-reduce

in the environment before jax creates its CPU backend: `pn.xla_flags.configure()`
does it (the test suite's conftest, the examples and the benchmarks call it;
subprocesses get it from `pn.xla_flags.environ`). jaxlib 0.10.1 is reported correct.

What in purenet has the shape (checked at 20,000 examples in float64 against
each example's autodiff gradient, `jax.vmap(jax.grad(pn.loss))`, computed in
chunks of 10,000):

- `pn.stats.gradient_gram(net, ..., small_batch, large_batch)` (the large batch
  second, so that the (n1, n2) matrix keeps it as its minor axis) for every
  layer whose per-example gradient sums over positions: Dense, LayerNorm, a
  user layer (init/forward/backward only) on sequences, Conv1D, Conv2D. The
  columns from 16,384 on are wrong. MultiHeadAttention with biases (so GPT)
  also gets NaN columns at scattered places well below the threshold (from
  4,096 examples for one head, 1,536 for a tiny GPT); the same flag fixes it.
- Not affected (exact to rounding at 20,000, three sets of layer sizes): the
  per-example norms and one-pass / two-pass clipping, Fisher diagonal, gradient
  noise scale, gradient_gram with the large batch first, the GGN diagonal and
  (where supported) the Hessian diagonal (means and per-example, against the
  same call in two chunks of 10,000), for Dense on rows and sequences, Conv1D, Conv2D, attention,
  Embedding, GPT, LSTM, GRU, LayerNorm, a user layer.
  `test_hot_path_is_exact_above_16384_examples` keeps the first four so.

Without the flag, on jaxlib 0.10.2, the first test fails (by design: it is not
xfailed); the message says what to set. `pn.stats.gradient_gram` walks the
larger batch first, which dodges the miscompile: its tests pass without the
flag too (checked in a subprocess under jaxlib's default fusion types).
"""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import purenet as pn

jax.config.update("jax_enable_x64", True)

N = 20_000            # examples: above 2**14 = 16,384, the float64 threshold
CHUNK = N // 2        # the reference runs 10,000 examples at a time, below it
SMALL = 3             # the gram's other batch
FLAG = "--xla_cpu_experimental_ynn_fusion_type=-reduce"


def _advice() -> str:
    import jaxlib
    flags = os.environ.get("XLA_FLAGS", "")
    return (f"jax {jax.__version__} / jaxlib {jaxlib.__version__} on {jax.default_backend()}, XLA_FLAGS={flags!r}. "
            f"This is XLA:CPU's YNNPACK reduce fusion miscomputing (jax issue 39103). Fix: call "
            f"pn.xla_flags.configure() before the first JAX computation (tests/conftest.py does; a subprocess "
            f"takes env=pn.xla_flags.environ(...)), or set XLA_FLAGS='{FLAG}' in the environment, or install "
            f"a jaxlib without the bug (0.10.1 is reported correct; this test tells).")


def test_installed_xla_computes_a_vmapped_squared_norm_above_16384_rows():
    """jax issue 39103's pattern under this process's configuration: row i = (i, 0, 0), M = I,
    so row i's sum((M r)**2) is exactly i**2."""
    i = jnp.arange(N, dtype=jnp.float64)
    x = jnp.stack((i, jnp.zeros_like(i), jnp.zeros_like(i)), axis=1)
    M = jnp.eye(3, dtype=jnp.float64)
    out = np.asarray(jax.jit(jax.vmap(lambda r: jnp.sum((M @ r) ** 2)))(x))
    want = np.arange(N, dtype=np.float64) ** 2
    bad = np.flatnonzero(out != want)
    assert bad.size == 0, (
        f"jax.jit(jax.vmap(lambda r: jnp.sum((M @ r) ** 2))) is wrong on {bad.size} of {N} float64 rows, "
        f"from row {bad[0]}: row {bad[0]} gives {out[bad[0]]:.0f}, not {want[bad[0]]:.0f}; row {N - 1} gives "
        f"{out[-1]:.0f}, not {want[-1]:.0f}. Per-example results above 16,384 examples are then silently wrong. "
        + _advice())


# ---------------------------------------------------------------- networks


@dataclasses.dataclass(frozen=True)
class UserAffine:
    """A layer written outside purenet, with only init, forward and backward: y = x K + s."""

    features: int

    def init(self, key, in_shape, dtype=None):
        d = in_shape[-1]
        K = jax.random.normal(key, (d, self.features), dtype or jnp.float64) / np.sqrt(d)
        return {"kernel": K, "shift": 0.1 * jnp.ones((self.features,), K.dtype)}, {}, (*in_shape[:-1], self.features)

    def forward(self, params, state, x, train=False, key=None):
        return x @ params["kernel"] + params["shift"], state, x

    def backward(self, params, x, dy):
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        return {"kernel": x2.T @ dy2, "shift": dy2.sum(0)}, dy @ params["kernel"].T


def _net(name):
    """(net, in_shape, labels per example): tiny, so that 20,000 examples take well under a second."""
    seq = (3, 2)  # T = 3 positions of 2 features
    return {
        "dense_on_sequences": (pn.Sequential([pn.Dense(3), pn.Softmax()]), seq, 3),
        "layernorm_on_sequences": (pn.Sequential([pn.LayerNorm(), pn.Flatten(), pn.Dense(3), pn.Softmax()]), seq, None),
        "user_layer_on_sequences": (pn.Sequential([UserAffine(3), pn.Softmax()]), seq, 3),
        "conv1d": (pn.Sequential([pn.Conv1D(3, 2), pn.Softmax()]), seq, 3),  # padding "SAME": 3 positions
        "conv2d": (pn.Sequential([pn.Conv2D(2, 3), pn.ReLU(), pn.Flatten(), pn.Dense(3), pn.Softmax()]), (4, 4, 1),
                   None),
        "attention": (pn.Sequential([pn.MultiHeadAttention(1), pn.Softmax()]), (3, 3), 3),
        # the hot-path guard's network: every sequence family in one chain
        "sequence_mix": (pn.Sequential([pn.Conv1D(3, 2, padding="SAME"), pn.LSTM(3), pn.LayerNorm(),
                                        pn.MultiHeadAttention(1), UserAffine(3), pn.GRU(3), pn.Dense(3),
                                        pn.Softmax()]), seq, 3),
    }[name]


def _case(name):
    net, in_shape, labels = _net(name)
    params, state = pn.init(net, jax.random.key(0), in_shape=in_shape)
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (N, *in_shape), jnp.float64)
    y = jax.random.randint(ky, (N, labels) if labels else (N,), 0, 3)
    return net, params, state, x, y


def _reference_grads(net, params, state, x, y):
    """Each example's gradient by autodiff of pn.loss, flattened, (N, params): 10,000 at a time."""
    @jax.jit
    def chunk(x, y):
        def one(xi, yi):
            return jax.grad(lambda p: pn.loss(net, p, state, xi[None], yi[None])[0])(params)
        g = jax.vmap(one)(x, y)
        return jnp.concatenate([leaf.reshape(x.shape[0], -1) for leaf in jax.tree_util.tree_leaves(g)], axis=1)

    return np.concatenate([np.asarray(chunk(x[i:i + CHUNK], y[i:i + CHUNK])) for i in range(0, N, CHUNK)])


def _flat(tree):
    return np.concatenate([np.asarray(leaf).reshape(-1) for leaf in jax.tree_util.tree_leaves(tree)])


def _rel(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / max(float(np.max(np.abs(ref))), 1e-300))


# ---------------------------------------------------------------- the affected quantity


GRAM_NETS = ["dense_on_sequences", "layernorm_on_sequences", "user_layer_on_sequences", "conv1d", "conv2d",
             "attention"]


@pytest.mark.parametrize("name", GRAM_NETS)
def test_gradient_gram_with_the_large_batch_second(name):
    """pn.stats.gradient_gram((3 examples), (20,000 examples)): a (3, 20,000) matrix, against
    G_small @ G^T from autodiff per-example gradients. Wrong from column 16,384 on (NaN columns
    for attention) when XLA:CPU's YNNPACK reduce fusion is on, on jaxlib 0.10.2."""
    net, params, state, x, y = _case(name)
    G = _reference_grads(net, params, state, x, y)
    gram = np.asarray(jax.jit(lambda x, y: pn.stats.gradient_gram(net, params, state, (x[:SMALL], y[:SMALL]),
                                                                  (x, y)))(x, y))
    ref = G[:SMALL] @ G.T
    scale = float(np.max(np.abs(ref)))
    bad = np.flatnonzero(~(np.abs(gram - ref) <= 1e-9 * scale).all(axis=0))  # NaN counts as bad
    assert bad.size == 0, (
        f"pn.stats.gradient_gram(small batch, {N} examples) on {name}: {bad.size} of {N} columns wrong "
        f"({int(np.isnan(gram).any(axis=0).sum())} of them NaN), the first at column {bad[0]}; the largest "
        f"error of a finite entry is {float(np.nanmax(np.abs(gram - ref))) / scale:.2e} of max |<g_i, g_j>|. "
        + _advice())


# ---------------------------------------------------------------- the hot path, unaffected today


@pytest.mark.parametrize("name", ["sequence_mix", "conv2d"])
def test_hot_path_is_exact_above_16384_examples(name):
    """Per-example norms, one-pass clipping, Fisher diagonal and noise scale at 20,000 examples
    against autodiff per-example gradients: exact on jaxlib 0.10.2 even with YNNPACK's reduce
    fusion on (at these and other small sizes; so were the GGN and Hessian diagonals, left out
    here for time): a guard for other jaxlibs and other code paths."""
    net, params, state, x, y = _case(name)
    G = _reference_grads(net, params, state, x, y)
    norms_ref = np.linalg.norm(G, axis=1)
    clip = float(np.median(norms_ref))

    @jax.jit
    def ours(x, y):
        _, clipped, _ = pn.clipped_value_and_grad(net, params, state, x, y, clip_norm=clip)
        return {"norms": pn.per_example_grad_norms(net, params, state, x, y),
                "clipped": clipped,
                "fisher": pn.stats.fisher_diagonal(net, params, state, x, y),
                "noise": pn.stats.gradient_noise(net, params, state, x, y)}

    got = ours(x, y)
    mean = G.mean(axis=0)
    g2, mean_sq = float(mean @ mean), float(np.mean(np.sum(G * G, axis=1)))
    errors = {
        "per_example_grad_norms": _rel(got["norms"], norms_ref),
        "clipped_value_and_grad": _rel(_flat(got["clipped"]),
                                       (np.minimum(1.0, clip / np.maximum(norms_ref, 1e-300))[:, None] * G).mean(0)),
        "fisher_diagonal": _rel(_flat(got["fisher"]), (G * G).mean(axis=0)),
        "gradient_noise.mean_sq_norm": _rel(got["noise"].mean_sq_norm, mean_sq),
        "gradient_noise.trace_cov": _rel(got["noise"].trace_cov, N / (N - 1) * (mean_sq - g2)),
    }
    wrong = {k: v for k, v in errors.items() if not v <= 1e-9}
    assert not wrong, f"on {name} at {N} examples, relative errors {wrong}. " + _advice()


# ---------------------------------------------------------------- pn.xla_flags itself


RECOMMENDED = "--xla_cpu_experimental_ynn_fusion_type=-reduce,-individual_convolution"


def test_the_suite_runs_with_every_recommended_flag_the_installed_jaxlib_knows():
    """The recommendation keeps the workaround (-reduce) whatever else it adds for speed."""
    assert pn.xla_flags.recommended() == (RECOMMENDED,)  # jaxlib 0.10.2 knows the flag
    assert "-reduce" in RECOMMENDED.split("=", 1)[1].split(",")
    flags = os.environ.get("XLA_FLAGS", "").split()
    assert all(flag in flags for flag in pn.xla_flags.recommended()), flags


def test_flags_merge_keeping_the_users_values_and_subprocesses_get_them():
    assert pn.xla_flags.merged("", (FLAG,)) == FLAG
    assert pn.xla_flags.merged("--a=1", (FLAG, "--b=2")) == f"--a=1 {FLAG} --b=2"
    mine = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
    assert pn.xla_flags.merged(f"--a=1 {mine}", (FLAG,)) == f"--a=1 {mine}"  # the user's value wins
    env = pn.xla_flags.environ({"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "X": "y"})
    assert env == {"XLA_FLAGS": f"--xla_force_host_platform_device_count=4 {RECOMMENDED}", "X": "y"}


def test_configure_is_an_error_once_the_backend_has_started_and_works_before():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    late = "import jax; jax.numpy.ones(1).block_until_ready(); import purenet as pn; pn.xla_flags.configure()"
    out = subprocess.run([sys.executable, "-c", late], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "configure() comes too late" in out.stderr, out.stderr[-2000:]
    early = ("import os, purenet as pn; print(pn.xla_flags.configure()); import jax; jax.numpy.ones(1); "
             "print(os.environ['XLA_FLAGS'])")
    out = subprocess.run([sys.executable, "-c", early], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split("\n")[:2] == [RECOMMENDED] * 2, out.stdout + out.stderr[-2000:]


def test_gradient_gram_is_right_under_jaxlibs_default_flags_too():
    """The Gram's own formulation (the larger batch first) does not rely on the flag: under jaxlib's
    default fusion types, where the bare pattern is miscomputed, the Gram tests still pass."""
    import subprocess
    import sys

    default = "--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution,reduce"
    env = dict(os.environ, XLA_FLAGS=default)  # a value the user gave: configure() keeps it

    def run(selection):
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                               __file__, "-k", selection], env=env, capture_output=True, text=True, timeout=600)

    bare = run("installed_xla_computes")
    assert bare.returncode != 0 and "is wrong on" in bare.stdout, bare.stdout[-3000:]  # the flags are buggy there
    gram = run("gram_with_the_large_batch_second and (dense_on_sequences or attention)")
    assert gram.returncode == 0 and "2 passed" in gram.stdout, gram.stdout[-3000:]
