"""Examples run in their fast mode so they cannot rot."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name, *args, tmp_path=None):
    env = dict(os.environ, PURENET_FAST="1", MPLBACKEND="Agg")
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True, text=True, env=env, cwd=tmp_path or ROOT, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_backprop_walkthrough_prints_the_true_numbers():
    out = run_example("backprop_walkthrough.py")
    assert "a1 = W1 x        = [2.9, 1.4, 2.1, 2.3]" in out
    assert "L = sum (y_hat - y)^2 = 0.105491" in out
    assert "dL/dw131 = +0.00315936" in out
    assert "sum over 4 paths" in out
    out = run_example("backprop_walkthrough.py", "--weight", "w212")
    assert "dL/dw212 = -0.13037671" in out


def test_backprop_walkthrough_rejects_unknown_weights():
    with pytest.raises(AssertionError, match="no weight w155"):
        run_example("backprop_walkthrough.py", "--weight", "w155")


def slow(*case):
    """A whole script in a subprocess: out of the default run, in `pytest -m slow`."""
    return pytest.param(*case, marks=pytest.mark.slow)


@pytest.mark.parametrize("script,png,expect", [
    ("train_digits.py", "digits_curves.png", "test accuracy:"),  # the README's main job: in every run
    slow("sweep_lr_seed.py", "sweep_lr_seed.png", "best learning rate"),
    slow("regularization_study.py", "regularization_study.png", "batch norm"),
    slow("compare_optimizers.py", "optimizers.png", "Nesterov"),
    slow("init_activation_study.py", "init_activation.png", "leaky_relu"),
    slow("vanishing_gradients.py", "vanishing_gradients.png", "first/last layer gradient norm"),
    slow("deep_residual.py", "deep_residual.png", "residual relu"),
    slow("adversarial_digits.py", "adversarial_digits.png", "input_grad vs autodiff through pn.as_function"),
    slow("hessian_spectrum.py", "hessian_spectrum.png", "sharpness at the end"),
    slow("data_attribution.py", "data_attribution.png", "EK-FAC against identity: top-3 overlap"),
    slow("custom_layer.py", "custom_layer.png", "diagnostics report ['0: LowRankDense', '1: Dense']"),
])
def test_example_runs_in_fast_mode_and_writes_its_plot(tmp_path, script, png, expect):
    cache = ["--cache", str(tmp_path / "xla")] if script == "train_digits.py" else []  # the main job's option
    out = run_example(script, "--out", str(tmp_path / png), *cache, tmp_path=tmp_path)
    assert expect in out
    assert (tmp_path / png).stat().st_size > 10_000
    if cache:
        assert any(name.startswith("jit_") for name in os.listdir(tmp_path / "xla"))


MNIST = ROOT.parent / "shared" / "data" / "mnist"
IMAGES = MNIST / "t10k-images-idx3-ubyte.gz"


SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


@pytest.mark.parametrize("script,data,expect", [
    ("mnist_mlp.py", IMAGES, ["held-out accuracy"]),  # reads the shared data: in every run
    slow("mnist_cnn.py", IMAGES, ["images of shape (28, 28, 1)", "held-out accuracy"]),
    slow("mnist_autoencoder.py", IMAGES, ["held-out reconstruction error"]),
    slow("noise_scale.py", IMAGES, ["B_simple", "x the minimum steps"]),
    slow("dp_mnist.py", IMAGES, ["noise multiplier for epsilon 3.0", "final: epsilon"]),
    slow("dp_audit.py", IMAGES, ["white box (every step)", "black box (final model)", "claimed: epsilon"]),
    slow("kfac_mnist.py", IMAGES, ["held-out accuracy per epoch", "K-FAC step / Adam step"]),
    slow("influence_mnist.py", IMAGES, ["AUC for finding flipped labels", "EK-FAC scores"]),
    slow("attribution_mnist.py", IMAGES, ["integrated gradients' completeness", "deletion test", "Grad-CAM"]),
    slow("learning_rules_mnist.py", IMAGES, ["| rule | MLP error % (gap to BP)", "CNN: from best to worst",
                                             "biotorch, MNIST LeNet"]),
    slow("shakespeare_gpt.py", SHAKESPEARE, ["vocabulary 65", "validation loss", "sample (temperature 0.8)"]),
    slow("shakespeare_lstm.py", SHAKESPEARE, ["vocabulary 65", "validation loss", "sample (temperature 0.8)"]),
    slow("long_context.py", SHAKESPEARE, ["compiled temporary memory", "Training at context 128, blockwise",
                                          "validation loss at context 128", "key/value cache"]),
])
def test_example_on_shared_data_in_fast_mode(tmp_path, script, data, expect):
    if not data.exists():
        pytest.skip(f"the shared data file {data} is not there")
    folder = data if data.suffix == ".txt" else data.parent
    out = run_example(script, "--data", str(folder), "--out", str(tmp_path / "plot.png"), tmp_path=tmp_path)
    assert all(line in out for line in expect), out
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def test_mnist_example_says_how_to_point_it_at_data(tmp_path):
    with pytest.raises(AssertionError, match="pass --data FOLDER"):
        run_example("mnist_mlp.py", "--data", str(tmp_path), tmp_path=tmp_path)


@pytest.mark.slow
def test_data_parallel_example_on_8_fake_devices_and_as_a_multihost_dry_run(tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    out = run_example("data_parallel.py", tmp_path=tmp_path)
    assert "mesh: 8 devices" in out and "8 rows per device" in out and "params replicated: True" in out
    monkeypatch.delenv("XLA_FLAGS")
    out = run_example("data_parallel.py", "--multihost-dry-run", tmp_path=tmp_path)
    assert "process 0 of 1" in out


def _shakespeare_module(monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "examples"))  # for its `_common`
    spec = importlib.util.spec_from_file_location("shakespeare_gpt", ROOT / "examples" / "shakespeare_gpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_shakespeare_steps_in_parts_equal_whole_batches_and_estimates_average_their_batches(monkeypatch):
    """The example's side-by-side halves give the whole batch's training run; its estimates are
    the mean loss over exactly the windows they draw."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import purenet as pn

    ex = _shakespeare_module(monkeypatch)
    net = pn.gpt(vocab_size=7, context=8, layers=1, heads=2, features=16)
    ids = jax.random.randint(jax.random.key(0), (300,), 0, 7)
    opt = ex.optimizer(net, 6)
    opt_state, state = ex.make_setup(net, opt)(jax.random.key(1))
    runs = [ex.make_steps(net, opt, state, ids, 4, 8, parts)(jax.tree_util.tree_map(jnp.copy, opt_state),
                                                               jax.random.key(2), 3) for parts in (1, 2, 4)]
    for other in runs[1:]:
        np.testing.assert_allclose(other[1], runs[0][1], rtol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(other[0].params), jax.tree_util.tree_leaves(runs[0][0].params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="--parts 3 must divide --batch-size 4"):
        ex.make_steps(net, opt, state, ids, 4, 8, 3)

    params, key = runs[0][0].params, jax.random.key(3)
    estimate = ex.make_estimate(net, state, ids, ids[::-1], 4, 8, block=2)
    estimate.compile_ahead(params, key).join()
    train, val = estimate(params, key, 4)
    for split, ids_ in ((train, ids), (val, ids[::-1])):
        batches = [pn.datasets.windows(ids_, k, 4, 8) for i in range(2)
                   for k in jax.random.split(jax.random.fold_in(key, i), 2)]
        losses = [pn.loss(net, params, state, x, y, loss="cross_entropy")[0] for x, y in batches]
        assert split == pytest.approx(float(np.mean(losses)), rel=1e-5)
    with pytest.raises(ValueError, match="not a multiple of the estimate's block of 2"):
        estimate(params, key, 3)
