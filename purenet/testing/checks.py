"""Gradient checking against autodiff: every handwritten backward against jax.grad.

This is the one library module that uses `jax.grad`: autodiff is the
reference that every handwritten backward is checked against.

    report = pn.check_grads(layer, x)                 # a layer: backward vs jax.grad, random cotangent
    report = pn.check_grads(net, x, y, loss="mse")    # a network: value_and_grad vs jax.grad(pn.loss)

Checks run in float64 and compare per leaf with the relative error
max|handwritten - autodiff| / max(max|autodiff leaf|, rms(autodiff tree)),
the whole gradient's root-mean-square entry standing in for a leaf whose true
gradient is zero or tiny (see `check_grads`); a failure names the leaf path.
"""
import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from purenet import _trees

if TYPE_CHECKING:
    from purenet.layers.base import LayerLike
    from purenet.losses import Loss

__all__ = ["GradCheckReport", "check_grads", "check_per_example", "compare_trees", "relative_error", "rms"]


@dataclasses.dataclass
class GradCheckReport:
    """Relative error per gradient leaf (key path -> error) and the tolerance used."""

    errors: dict
    rtol: float
    value_error: float = 0.0

    @property
    def max_error(self) -> float:
        return max([self.value_error, *self.errors.values()], default=0.0)

    @property
    def ok(self) -> bool:
        return self.max_error <= self.rtol

    def failures(self) -> dict[str, float]:
        return {path: e for path, e in self.errors.items() if not e <= self.rtol}

    def __str__(self) -> str:
        width = max([len(p) for p in self.errors] + [4])
        lines = [f"{'leaf':<{width}}  relative error (rtol {self.rtol:g})"]
        for path, err in self.errors.items():
            mark = "ok" if err <= self.rtol else "FAIL"
            lines.append(f"{path:<{width}}  {err:.3e}  {mark}")
        return "\n".join(lines)


def relative_error(actual: Any, expected: Any, floor: float = 0.0) -> float:
    """max|actual - expected| / max(max|expected|, floor) (0 when they are equal, inf when that scale is 0)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        return float("inf")
    diff = np.max(np.abs(actual - expected), initial=0.0)
    scale = max(float(np.max(np.abs(expected), initial=0.0)), floor)
    if diff == 0:
        return 0.0
    return float(diff / scale) if scale > 0 else float("inf")


def rms(tree: Any) -> float:
    """The root-mean-square entry of every leaf of `tree` together (0 for no entries)."""
    leaves = [np.asarray(v, np.float64).ravel() for v in jax.tree_util.tree_leaves(tree)]
    size = sum(v.size for v in leaves)
    return float(np.sqrt(sum(float(np.sum(v * v)) for v in leaves) / size)) if size else 0.0


def compare_trees(actual: Any, expected: Any, tree_scale: bool = False) -> dict[str, float]:
    """Per-leaf relative errors (`relative_error`), keyed by path; raises naming structure mismatches.

    tree_scale: divide each leaf's largest error by max(the leaf's largest
    expected entry, `rms(expected)`) instead of the leaf's own scale alone,
    so a leaf whose expected values are zero is judged against the gradient's
    typical entry rather than against zero (`check_grads` does this).
    """
    a, e = _trees.by_path(actual), _trees.by_path(expected)
    m = _trees.first_mismatch(a, e, shape=False)
    if m is not None:
        raise AssertionError(f"gradient structure differs from params: missing {m.missing}, extra {m.extra}")
    floor = rms(expected) if tree_scale else 0.0
    return {path: relative_error(v, e[path], floor) for path, v in a.items()}


def _to_f64(tree):
    return jax.tree_util.tree_map(
        lambda v: jnp.asarray(v, jnp.float64) if jnp.issubdtype(jnp.result_type(v), jnp.floating) else v,
        tree,
    )


def check_grads(model: "LayerLike", x: Any, y: Any = None, *, loss: "str | Loss | None" = None, params: Any = None,
                state: Any = None, key: jax.Array | None = None, l2: float = 0.0, train: bool = False,
                rtol: float = 1e-10, raise_on_failure: bool = True) -> GradCheckReport:
    """Check a handwritten backward against `jax.grad` in float64.

    Without `loss`: `model` is a layer; its backward with a random cotangent c
    is compared with jax.grad of sum(forward(params, x) * c) for the params and x.
    With `loss` (and targets `y`): `model` is a network; pn.value_and_grad is
    compared with jax.value_and_grad(pn.loss).

    params/state default to a fresh init from `key` (default key 0). The same
    `key` drives dropout masks. Returns a GradCheckReport; raises
    AssertionError naming the failing leaves when raise_on_failure.

    The criterion, per leaf (a path of the params, or the input "x"):

        max|handwritten - autodiff| / max(max|autodiff leaf|, rms(autodiff, all leaves)) <= rtol

    The leaf's own largest entry sets the scale, so a leaf off by a relative
    1e-6 fails; but it is never smaller than the root-mean-square entry of the
    whole true gradient, because rounding errs in units of the terms that are
    summed, not of their result. A leaf whose true gradient is exactly zero
    (attention's key bias bk: softmax ignores a shift of a row's scores)
    computes as ~1e-17 and passes; nonzero garbage there fails.

    Args:
        model: a layer (without `loss`) or a network (with `loss`).
        x: inputs, shape `(batch, *in_shape)` (cast to float64 when floating point; integer
            ids for an Embedding stay integers).
        y: targets for `loss` (networks only; None for a layer).
        loss: None to check a layer's backward; a registered loss name or a `pn.Loss` to check
            a network's `pn.value_and_grad`.
        params: the parameters to check at (cast to float64), or None for a fresh init from
            `key`.
        state: the state (cast to float64), or None for the fresh init's (or {}).
        key: PRNG key for the init, the dropout masks and the layer's random cotangent; None
            for `jax.random.key(0)`.
        l2: weight decay coefficient on the parameters whose role is "weight" (networks only).
        train: training mode (dropout, batch statistics); a Python bool.
        rtol: the tolerance on each leaf's relative error (the criterion above).
        raise_on_failure: raise when a leaf fails, rather than only report it.

    Returns:
        A `GradCheckReport`: each leaf's relative error (and, for a network, the loss value's),
            with `ok` and `failures()`.

    Raises:
        AssertionError: if raise_on_failure and a leaf's error exceeds rtol (naming the
            leaves); if the gradient's tree structure differs from params'; if a layer with
            integer inputs returns an input gradient.
    """
    from purenet import network  # late: network imports nothing from here

    key = jax.random.key(0) if key is None else key
    init_key, fwd_key, cot_key = jax.random.split(key, 3)
    with jax.enable_x64(True):
        x = _to_f64(jnp.asarray(x))
        if params is None:
            params, init_state, _ = model.init(init_key, x.shape[1:], dtype=jnp.float64)
            state = init_state if state is None else state
        params, state = _to_f64(params), _to_f64(state if state is not None else {})
        if loss is None:
            report = _check_layer(model, params, state, x, train, fwd_key, cot_key, rtol)
        else:
            report = _check_network(network, model, params, state, x, y, loss, l2, train, fwd_key, rtol)
    if raise_on_failure and not report.ok:
        raise AssertionError(f"handwritten gradient differs from jax.grad:\n{report}")
    return report


def _check_layer(layer, params, state, x, train, fwd_key, cot_key, rtol):
    # one layer runs op by op (few operations: faster than compiling); networks are compiled below
    y, _, cache = layer.forward(params, state, x, train=train, key=fwd_key)
    cot = jax.random.normal(cot_key, jnp.shape(y), jnp.float64)
    dparams, dx = layer.backward(params, cache, cot)

    def probe(p, xx):
        return jnp.sum(layer.forward(p, state, xx, train=train, key=fwd_key)[0] * cot)

    if not jnp.issubdtype(x.dtype, jnp.floating):  # integer ids (an Embedding): no input gradient
        if dx is not None:
            raise AssertionError(f"{layer} takes integer inputs, so its dx must be None, got {type(dx)}")
        errors = compare_trees({"params": dparams}, {"params": jax.grad(probe)(params, x)}, tree_scale=True)
        return GradCheckReport(errors, rtol)
    ref_params, ref_x = jax.grad(probe, argnums=(0, 1))(params, x)
    errors = compare_trees({"params": dparams, "x": dx}, {"params": ref_params, "x": ref_x}, tree_scale=True)
    return GradCheckReport(errors, rtol)


def _check_network(network, net, params, state, x, y, loss, l2, train, fwd_key, rtol):
    # Both sides compiled, the data closed over (so input checks such as label ranges still see
    # concrete values): a CNN's check is faster than op by op (measured in benchmarks/README.md,
    # "Measurements behind choices in the source").
    value, grads, _ = jax.jit(lambda p: network.value_and_grad(net, p, state, x, y, loss=loss, l2=l2,
                                                               train=train, key=fwd_key))(params)

    def reference(p):
        return network.loss(net, p, state, x, y, loss=loss, l2=l2, train=train, key=fwd_key)[0]

    ref_value, ref_grads = jax.jit(jax.value_and_grad(reference))(params)
    errors = compare_trees({"params": grads}, {"params": ref_grads}, tree_scale=True)
    return GradCheckReport(errors, rtol, relative_error(value, ref_value))


def check_per_example(net: "LayerLike", x: jax.Array, y: Any, *, loss: "str | Loss", params: Any, state: Any,
                      l2: float = 0.0, rtol: float = 1e-10) -> dict[str, float]:
    """Per-example gradients and their norms against `jax.vmap(jax.grad)` of each example's loss.

    Raises AssertionError naming the leaf when `pn.per_example_grads` differs
    by more than rtol (relative, per leaf), or when `pn.per_example_grad_norms`
    differs from the norms of the reference gradients by more than 1e-8.
    """
    from purenet import network
    from purenet.analysis import per_example

    def one(xi, yi):
        return jax.grad(lambda p: network.loss(net, p, state, xi[None], yi[None], loss=loss, l2=l2)[0])(params)

    reference = jax.vmap(one)(x, y)
    _, grads = per_example.per_example_grads(net, params, state, x, y, loss=loss, l2=l2)
    errors = compare_trees(grads, reference)
    bad = {path: e for path, e in errors.items() if not e <= rtol}
    if bad:
        raise AssertionError(f"per-example gradients differ from vmap of jax.grad: {bad}")
    norms = per_example.per_example_grad_norms(net, params, state, x, y, loss=loss, l2=l2)
    explicit = jnp.sqrt(sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, 1) for g in jax.tree_util.tree_leaves(reference)))
    np.testing.assert_allclose(norms, explicit, rtol=1e-8, atol=1e-12, err_msg="per-example gradient norms")
    return errors
