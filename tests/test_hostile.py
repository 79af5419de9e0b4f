"""The hostile-input suite: bad input gets a clear error that names the
problem, or an exact finite value; never a silent NaN.

Here: input width, label range (>= k, -1), float labels, target shapes
(mse (N,1) vs (N,) and others), empty batch, integer input, unknown loss,
params of another architecture, NaN rows, +-1e4 and +inf logits, sigmoid
at +-1000, binary cross-entropy at logit 100, and the gradient checker
catching wrong backward passes. Elsewhere, by topic: batch norm with one
training example and a constant feature, dropout rates and missing keys
(test_regularizers); invalid optimizer hyperparameters, float16 Adam /
RMSProp with zero gradients, grads that do not match the optimizer state,
the NaN/inf gradient policy (test_optim); truncated, flipped-byte,
other-architecture and missing/extra-leaf checkpoints (test_checkpoint).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import purenet as pn

NET = pn.mlp([4, 5, 3])


@pytest.fixture(scope="module")
def model():
    return pn.init(NET, jax.random.key(0))


X = jnp.ones((6, 4))
LABELS = jnp.array([0, 1, 2, 0, 1, 2])


def test_input_width_mismatch_names_the_layer_and_both_shapes(model):
    with pytest.raises(ValueError, match=r"layer 0 \(Dense\): Dense\(features=5.*expects inputs of width 4 "
                                         r"\(W has shape \(4, 5\)\), got x of shape \(6, 7\)"):
        pn.forward(NET, *model, jnp.ones((6, 7)))


@pytest.mark.parametrize("labels,message", [
    (jnp.array([0, 1, 3, 0, 1, 2]), "label 3 is out of range for 3 classes"),
    (jnp.array([0, -1, 2, 0, 1, 2]), "label -1 is out of range for 3 classes"),
])
def test_labels_out_of_range(model, labels, message):
    for fn in (pn.loss, pn.value_and_grad):
        with pytest.raises(ValueError, match=message):
            fn(NET, *model, X, labels)


def test_float_labels_for_integer_cross_entropy(model):
    with pytest.raises(TypeError, match=r"labels of shape \(6,\) must be integer class indices, got dtype float"):
        pn.value_and_grad(NET, *model, X, LABELS.astype(jnp.float32))


@pytest.mark.parametrize("loss,target", [
    ("mse", jnp.ones((6,))),
    ("mse", jnp.ones((6, 1))),
    ("cross_entropy", jnp.ones((6, 4)) / 4),
    ("binary_cross_entropy", jnp.ones((5, 3))),
])
def test_target_shape_mismatch(model, loss, target):
    with pytest.raises(ValueError, match=r"target shape .* does not match the network output shape \(6, 3\)"):
        pn.value_and_grad(NET, *model, X, target, loss=loss)


def test_labels_of_the_wrong_batch(model):
    with pytest.raises(ValueError, match=r"labels of shape \(5,\) do not match the batch"):
        pn.value_and_grad(NET, *model, X, LABELS[:5])


def test_empty_batch(model):
    with pytest.raises(ValueError, match=r"x is an empty batch \(shape \(0, 4\)\)"):
        pn.value_and_grad(NET, *model, jnp.ones((0, 4)), jnp.zeros((0,), jnp.int32))


def test_integer_input(model):
    with pytest.raises(TypeError, match="x must be a floating-point array, got dtype int32"):
        pn.forward(NET, *model, jnp.ones((6, 4), jnp.int32))


def test_unknown_loss(model):
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        pn.loss(NET, *model, X, LABELS, loss="hinge")


def test_params_of_another_architecture(model):
    other, state = pn.init(pn.mlp([4, 5, 5, 3]), jax.random.key(0))
    with pytest.raises(ValueError, match="Sequential with 4 layers needs params as a tuple of 4 entries, got 6"):
        pn.forward(NET, other, model[1], X)


def test_init_without_in_dim():
    with pytest.raises(ValueError, match="needs in_dim"):
        pn.init(pn.Sequential([pn.Dense(3)]), jax.random.key(0))


def test_nan_in_the_inputs_names_the_first_bad_row(model):
    x = np.ones((6, 4))
    x[4, 1], x[5, 0] = np.nan, np.inf
    with pytest.raises(ValueError, match=r"non-finite value \(NaN or inf\) in row 4 \(2 bad rows of 6\)"):
        pn.fit(NET, pn.optim.sgd(0.1), (x, LABELS), key=jax.random.key(0), epochs=1)
    with pytest.raises(ValueError, match="row 4"):
        pn.check_finite_rows(x)


def test_logits_of_plus_minus_1e4_are_finite_and_exact():
    net = pn.Sequential([pn.Identity(), pn.Softmax()])
    empty = ({}, {})
    value, _, _ = pn.value_and_grad(net, empty, empty, jnp.array([[1e4, 0.0, -1e4]]), jnp.array([2]))
    assert float(value) == 2e4
    dz = pn.losses.softmax_cross_entropy_backward(jnp.array([[1e4, 0.0, -1e4]]), jnp.array([2]))
    np.testing.assert_array_equal(dz, [[1.0, 0.0, -1.0]])


def test_an_infinite_logit_is_certainty_not_nan():
    z = jnp.array([[jnp.inf, 0.0, -jnp.inf]])
    assert float(pn.losses.softmax_cross_entropy(z, jnp.array([0]))) == 0.0
    wrong = pn.losses.softmax_cross_entropy(z, jnp.array([1]))
    assert bool(jnp.isfinite(wrong)) and float(wrong) > 1e300
    np.testing.assert_array_equal(pn.losses.softmax_cross_entropy_backward(z, jnp.array([1])), [[1.0, -1.0, 0.0]])
    probs, _ = pn.forward(pn.Sequential([pn.Identity(), pn.Softmax()]), ({}, {}), ({}, {}), z)
    np.testing.assert_array_equal(probs, [[1.0, 0.0, 0.0]])
    assert float(pn.losses.sigmoid_binary_cross_entropy(jnp.array([[jnp.inf]]), jnp.array([[1.0]]))) == 0.0
    # NaN is not hidden: it stays NaN
    assert bool(jnp.isnan(pn.losses.softmax_cross_entropy(jnp.array([[jnp.nan, 0.0]]), jnp.array([0]))))


def test_sigmoid_at_plus_minus_1000_and_binary_cross_entropy_at_logit_100():
    y, _, cache = pn.Sigmoid().forward({}, {}, jnp.array([[-1000.0, 1000.0]]))
    np.testing.assert_array_equal(y, [[0.0, 1.0]])
    np.testing.assert_array_equal(pn.Sigmoid().backward({}, cache, jnp.ones((1, 2)))[1], [[0.0, 0.0]])
    z, t = jnp.array([[100.0]]), jnp.array([[0.0]])
    assert float(pn.losses.sigmoid_binary_cross_entropy(z, t)) == 100.0
    assert float(pn.losses.sigmoid_binary_cross_entropy_backward(z, t)[0, 0]) == 1.0


def test_errors_are_raised_at_trace_time_under_jit(model):
    with pytest.raises(ValueError, match="expects inputs of width 4"):
        jax.jit(lambda x: pn.forward(NET, *model, x))(jnp.ones((2, 3)))


# ------------------------------------------------------------------ the gradient checker catches mistakes


@dataclasses.dataclass(frozen=True)
class WrongSwish(pn.Elementwise):
    """A deliberately wrong backward: forgets the a s (1 - s) term."""

    def apply(self, a):
        s = jax.nn.sigmoid(a)
        return a * s, s

    def grad(self, s, dy):
        return dy * s


class ScaledDense(pn.Dense):
    """A Dense whose bias gradient is off by a factor of two."""

    def backward(self, params, x, dy):
        grads, dx = super().backward(params, x, dy)
        return {**grads, "b": 2 * grads["b"]}, dx


def test_check_grads_reports_a_wrong_layer_backward():
    with pytest.raises(AssertionError, match=r"\['x'\] .* FAIL"):
        pn.check_grads(WrongSwish(), jax.random.normal(jax.random.key(0), (4, 3)))
    report = pn.check_grads(WrongSwish(), jax.random.normal(jax.random.key(0), (4, 3)), raise_on_failure=False)
    assert not report.ok and set(report.failures()) == {"['x']"}


def test_check_grads_names_the_failing_leaf_of_a_network():
    net = pn.Sequential([pn.Dense(4), pn.Tanh(), ScaledDense(3), pn.Softmax()])
    x = jax.random.normal(jax.random.key(0), (5, 2))
    report = pn.check_grads(net, x, jnp.arange(5) % 3, loss="cross_entropy", raise_on_failure=False)
    assert set(report.failures()) == {"['params'][2]['b']"}
    assert report.errors["['params'][2]['b']"] == pytest.approx(1.0)
    assert "['params'][2]['b']" in str(report) and "FAIL" in str(report)
