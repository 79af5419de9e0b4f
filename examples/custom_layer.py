"""Writing your own layer: three methods, and every feature of purenet works for it.

A low-rank dense layer, y = (x U) V + c, is written here with only init,
forward and backward (no base class, no fast paths). The script

  1. checks its backward against jax.grad in float64 (pn.check_grads),
  2. shows the roles purenet infers for its parameters (U, V: rank 2, so
     weights that l2 regularises; c: rank 1, "other" unless declared),
  3. trains it on scikit-learn's digits with DP-SGD (per-example clipping
     needs per-example gradient norms: they come from the layer's own
     backward, vmapped over the examples), and plainly with l2,
  4. records gradient-flow diagnostics, which report the new layer too,
  5. plots the per-example gradient norms and the training curves.

    python examples/custom_layer.py [--epochs 30] [--out custom_layer.png]
"""
import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import purenet as pn
from _common import epochs, save

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation


@dataclasses.dataclass(frozen=True)
class LowRankDense:
    """y = (x U) V + c with U (in, rank), V (rank, features), c (features,).

    Backward, for dy = dL/dy and z = x U:
        dL/dV = z^T dy,   dL/dz = dy V^T,   dL/dU = x^T dL/dz,   dL/dc = sum dy,   dL/dx = dL/dz U^T
    """

    features: int
    rank: int

    roles = {"c": "bias"}  # optional: U and V are found to be weights by their rank

    def init(self, key, in_shape, dtype=None):
        d = in_shape[-1] if isinstance(in_shape, tuple) else in_shape
        ku, kv = jax.random.split(key)
        dtype = dtype or jnp.float32
        params = {"U": jax.random.normal(ku, (d, self.rank), dtype) * np.sqrt(2.0 / d),
                  "V": jax.random.normal(kv, (self.rank, self.features), dtype) * np.sqrt(1.0 / self.rank),
                  "c": jnp.zeros((self.features,), dtype)}
        return params, {}, (self.features,)

    def forward(self, params, state, x, train=False, key=None):
        z = x @ params["U"]
        return z @ params["V"] + params["c"], state, (x, z)

    def backward(self, params, cache, dy):
        x, z = cache
        dz = dy @ params["V"].T
        grads = {"U": x.T @ dz, "V": z.T @ dy, "c": jnp.sum(dy, axis=0)}
        return grads, dz @ params["U"].T


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=epochs(30))
    parser.add_argument("--out", default="custom_layer.png")
    args = parser.parse_args()

    net = pn.Sequential([LowRankDense(64, rank=8), pn.ReLU(), pn.Dense(10), pn.Softmax()], in_dim=64)

    report = pn.check_grads(net, jax.random.normal(jax.random.key(0), (6, 64)), jnp.arange(6) % 10,
                            loss="cross_entropy", l2=1e-3)  # float64, raises on a mismatch
    print("backward vs jax.grad (float64, l2 included):")
    print(report)

    data = pn.datasets.digits()
    params, state = pn.init(net, jax.random.key(0))
    roles = pn.roles(net, params)
    print("roles purenet reads:", {k: v for k, v in roles[0].items()}, "| Dense:", roles[2])

    x, y = data.x_train, data.y_train
    norms = pn.per_example_grad_norms(net, params, state, x[:256], y[:256])
    print(f"per-example gradient norms at init (generic path, own backward vmapped): median "
          f"{float(jnp.median(norms)):.3f}, max {float(jnp.max(norms)):.3f}")

    runs = {}
    common = dict(key=jax.random.key(1), epochs=args.epochs, batch_size=64, validation=(data.x_test, data.y_test))
    runs["adam, l2 1e-3"] = pn.fit(net, pn.optim.adam(3e-3), (x, y), l2=1e-3,
                                    diagnostics=(x[:128], y[:128]), **common)
    runs["DP-SGD (clip 1, noise 0.5)"] = pn.fit(net, pn.optim.adam(3e-3), (x, y),
                                                 dp=pn.DPSGD(clip_norm=1.0, noise_multiplier=0.5), **common)
    for name, result in runs.items():
        print(f"{name:>28}: test accuracy {float(result.history['val_accuracy'][-1]):.4f}")
    flow = runs["adam, l2 1e-3"].history
    names = pn.diagnostics.layer_names(net, params)
    print("diagnostics report", names, "; last gradient norms",
          np.array2string(flow["grad_norm"][-1], precision=4))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.hist(np.asarray(norms), bins=40)
    ax1.axvline(1.0, color="k", ls="--", lw=1, label="DP-SGD clip norm")
    ax1.set_xlabel("per-example gradient norm at init"), ax1.set_ylabel("examples"), ax1.legend()
    for name, result in runs.items():
        ax2.plot(result.history["val_accuracy"], label=name)
    ax2.set_xlabel("epoch"), ax2.set_ylabel("test accuracy"), ax2.set_ylim(0.5, 1.0), ax2.legend()
    fig.suptitle("a layer written outside purenet (init, forward, backward) with every feature")
    save(fig, args.out)


if __name__ == "__main__":
    main()
