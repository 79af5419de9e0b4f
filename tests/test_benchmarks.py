"""The benchmarks' smoke modes: every case runs (speed is not asserted here). Each is a whole benchmark
process, so all but the shortest are marked slow: `python -m pytest -m slow` runs them."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]



def _smoke_results(module, tmp_path):
    """Run `python -m module --smoke --json FILE` from the repository root; its results, once it exits 0."""
    path = tmp_path / "results.json"
    out = subprocess.run([sys.executable, "-m", module, "--smoke", "--json", str(path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(path.read_text())

@pytest.mark.slow
def test_benchmark_smoke_mode_runs_every_case(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--json", str(tmp_path / "r.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "r.json").read_text())
    step = results["train_step"]["8-16-16-4 @ batch 8"]
    for name in ("purenet", "jax.grad + purenet adam", "jax.grad + optax"):
        assert step[name]["median_s"] > 0
    for section in ("epoch_scan_vs_loop", "vmapped_models", "time_to_97", "per_example_norms"):
        assert results[section]
    assert results["whole_run_wall"]["purenet, second run with cache"]["median_s"] > 0
    assert results["matmul_peak_gflops"]["float32"]["jax"] > 0
    assert 0 < step["purenet"]["fraction_of_own_peak"]


@pytest.mark.slow
def test_gpu_mode_runs_its_bfloat16_steps_on_the_cpu(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--gpu", "--steps-only", "--frameworks",
                          "purenet", "jax.grad + purenet adam", "jax.grad + optax", "--json", str(tmp_path / "g.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "g.json").read_text())
    assert set(results["matmul_peak_gflops"]) == {"float32", "bfloat16"}
    for key in ("8-16-16-4 @ batch 8", "8-16-16-4 @ batch 8 bfloat16"):
        assert set(results["train_step"][key]) == {"purenet", "jax.grad + purenet adam", "jax.grad + optax"}
        assert results["train_step"][key]["purenet"]["paired_speedup"] == 1.0
    assert "epoch_scan_vs_loop" not in results  # --steps-only


@pytest.mark.slow
def test_gpt_benchmark_smoke_mode_runs_every_contender(tmp_path):
    results = _smoke_results("benchmarks.gpt", tmp_path)["results"]
    assert results["purenet"]["paired_time_over_purenet"] == 1.0
    for name in ("purenet", "jax.grad"):
        assert results[name]["median_s"] > 0 and results[name]["temp_bytes"] > 0


@pytest.mark.slow
def test_recurrent_benchmark_smoke_mode_runs_every_contender(tmp_path):
    results = _smoke_results("benchmarks.recurrent", tmp_path)
    step = results["train_step"]
    assert step["purenet"]["paired_time_over_purenet"] == 1.0
    assert {"purenet", "purenet unroll=2", "purenet 2 parts", "jax.grad", "pytorch eager (1 thread)"} <= set(step)
    for name in ("purenet", "jax.grad"):
        assert step[name]["median_s"] > 0 and step[name]["temp_bytes"] > 0
    assert set(results["per_example_norms"]) == {"purenet per_example_grad_norms", "vmap(jax.grad)"}


@pytest.mark.slow
def test_cnn_benchmark_smoke_mode_runs_every_case(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.cnn", "--smoke", "--gpu", "--json",
                          str(tmp_path / "c.json")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "c.json").read_text())
    for key in ("lenet @ batch 8", "lenet @ batch 8 bfloat16"):  # --gpu adds bfloat16; on the CPU here
        step = results["train_step"][key]
        for name in ("purenet (auto)", "purenet (xla)", "purenet (im2col)", "purenet (taps+xla)", "jax.grad (xla)",
                     "jax.grad (im2col)", "jax.grad (taps+xla)", "pytorch eager"):
            assert step[name]["median_s"] > 0, (key, name)
        assert step["purenet (auto)"]["paired_vs_first"] == 1.0
    if importlib.util.find_spec("flax"):  # an optional peer (not in the test extras): float32 rows only
        assert "flax nnx + optax" in results["train_step"]["lenet @ batch 8"]
        assert "flax nnx + optax" not in results["train_step"]["lenet @ batch 8 bfloat16"]
    assert set(results["temp_memory_MiB"]) == {f"{name} ({impl})" for name in ("purenet", "jax.grad")
                                               for impl in ("xla", "im2col", "taps+xla")}
    assert results["epoch"]["purenet scan"]["median_s"] > 0
    assert results["per_example_norms"]["vmap(jax.grad)"]["temp_MiB"] > 0


def test_stats_benchmark_smoke_mode_runs_every_statistic(tmp_path):
    results = _smoke_results("benchmarks.stats", tmp_path)
    assert set(results["cases"]) == {"Fisher diagonal", "gradient noise scale", "gradient Gram matrix", "K-FAC factors"}
    for row in results["cases"].values():
        assert row["max_relative_difference"] <= 1e-4
        assert row["purenet"]["median_s"] > 0 and row["vmap(jax.grad)"]["median_s"] > 0


@pytest.mark.slow
def test_influence_benchmark_smoke_mode_runs_every_contender_and_they_agree(tmp_path):
    """Three fresh processes (purenet EK-FAC, kronfluence EK-FAC, purenet identity): ~40 s on 2 quiet cores,
    2 min loaded, much of it kronfluence's float64 eigendecomposition of the 1569-wide dense factor. Random
    images where the shared MNIST is absent."""
    pytest.importorskip("kronfluence")
    results = _smoke_results("benchmarks.influence", tmp_path)
    assert set(results["contenders"]) == {"purenet ekfac", "kronfluence ekfac", "purenet identity"}
    for row in results["contenders"].values():
        assert row["scores_s"]["median"] > 0 and row["peak_rss_MiB"]["median"] > 0
    assert results["agreement_ekfac"]["pearson"] > 0.9999
    assert results["agreement_ekfac"]["max_abs_diff_over_max_abs"] < 1e-3


@pytest.mark.slow
def test_capture_benchmark_smoke_mode_runs_every_contender(tmp_path):
    results = _smoke_results("benchmarks.capture", tmp_path)
    for model in ("MLP", "GPT"):
        assert {"purenet value_and_grad", "purenet capture (every layer)", "purenet capture (one layer)"} <= \
            set(results[model])
        every, one = results[model]["purenet capture (every layer)"], results[model]["purenet capture (one layer)"]
        assert every["output_MiB"] > one["output_MiB"] > results[model]["purenet value_and_grad"]["output_MiB"]


@pytest.mark.slow
def test_compile_time_benchmark_counts_the_programs_an_example_compiles(tmp_path):
    path = tmp_path / "results.json"
    out = subprocess.run([sys.executable, "-m", "benchmarks.compile_time", "train_digits", "--fast", "--json", str(path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    row = json.loads(path.read_text())["train_digits"]
    assert row["programs"] == sum(n for _, n, _ in row["by_program"]) > 0
    assert 0 < row["compile_s"] < row["wall_s"]


@pytest.mark.slow
def test_first_step_benchmark_smoke_mode_times_every_installed_contender(tmp_path):
    results = _smoke_results("benchmarks.first_step", tmp_path)
    assert {"purenet", "PyTorch eager"} <= set(results["contenders"])
    for row in results["contenders"].values():
        assert row["first_step_s"]["median"] > 0 and row["process_s"]["median"] > row["build_s"]["median"]


SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


@pytest.mark.slow
def test_gpt_whole_run_benchmark_smoke_mode_runs_both_processes(tmp_path):
    if not SHAKESPEARE.exists():
        pytest.skip(f"the shared data file {SHAKESPEARE} is not there")
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpt_run", "--smoke", "--data", str(SHAKESPEARE),
                          "--json", str(tmp_path / "r.json")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "r.json").read_text())
    kinds = ["purenet"] + (["pytorch"] if importlib.util.find_spec("torch") else [])
    for kind in kinds:
        (run,) = results["runs"][kind]
        assert run["wall_s"] > run["train_s"] > 0 and 3.0 < run["val_loss"] < 4.5, run  # ~log 65 after 4 steps
    purenet = results["runs"]["purenet"][0]
    assert "run" in purenet["compile_by_program"]  # on the main thread
    assert "evaluate" in purenet["background_by_program"]  # the example compiles it ahead, on a thread
    if "pytorch" in kinds:
        assert results["summary"]["paired_wall_s_purenet_over_pytorch"] > 0


def test_gpt_whole_run_pytorch_learning_rate_is_the_examples_schedule():
    import numpy as np

    import purenet as pn
    from benchmarks.gpt_run import learning_rate

    for iters in (4, 2000):
        schedule = pn.schedules.warmup_cosine_decay(0.0, 1e-3, min(100, iters // 2), iters, end_value=1e-4)
        steps = range(iters + 2)
        np.testing.assert_allclose([learning_rate(i, iters) for i in steps], [float(schedule(i)) for i in steps],
                                   rtol=1e-5)  # the schedule is float32


@pytest.mark.slow
def test_dp_benchmark_smoke_mode_runs_every_case(tmp_path):
    results = _smoke_results("benchmarks.dp", tmp_path)
    for case in ("mlp", "cnn", "gpt"):
        assert results[case]["dp_ms"] > 0 and results[case]["plain_ms"] > 0
    for mode in ("opacus_hooks", "opacus_ghost"):
        assert results[mode]["over_purenet_dp"] > 0


@pytest.mark.slow
def test_attention_benchmark_smoke_mode_runs_every_case(tmp_path):
    results = _smoke_results("benchmarks.attention", tmp_path)
    main = results["kernel"]["main"]
    assert main["blockwise"]["paired_over_blockwise"] == 1.0
    for name in ("blockwise", "jax.vjp dense", "purenet dense"):
        assert main[name]["median_s"] > 0 and main[name]["temp_bytes"] > 0
        assert main[name]["max_abs_diff_vs_vjp_dense"] < 1e-4
    assert results["kernel"]["block_sweep"] and results["kernel"]["memory_over_t"] and results["kernel"]["threshold"]
    gen = results["generate"]
    assert gen["same_tokens"] and gen["cache=True"]["median_s"] > 0 and gen["cache=False"]["median_s"] > 0


def test_attention_benchmark_gpu_mode_says_it_needs_a_gpu():
    import jax

    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is here: the mode would run")
    out = subprocess.run([sys.executable, "-m", "benchmarks.attention", "gpu"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode != 0 and "needs a GPU" in out.stderr


@pytest.mark.slow
def test_xla_levers_benchmark_smoke_mode_runs_every_configuration_in_its_own_process(tmp_path):
    results = _smoke_results("benchmarks.xla_levers", tmp_path)
    configs = results["configurations"]
    assert configs["default"]["available"]
    assert "ynn_fusion_type" not in configs["default"]["XLA_FLAGS"]  # the suite's own -reduce is taken out
    available = [name for name, c in configs.items() if c["available"]]
    for name in available[1:]:  # every other configuration keeps the -reduce workaround (jax issue 39103)
        assert "--xla_cpu_experimental_ynn_fusion_type=-reduce" in configs[name]["XLA_FLAGS"], name
    for name, c in configs.items():
        assert c["available"] or c["reason"], name
    ops = results["ops"]
    for name in available:
        assert ops["LeNet value_and_grad"][name]["median_s"] > 0 and ops["LeNet conv2 dW"][name]["median_s"] > 0
    assert ops["LeNet conv2 dW"]["default"]["paired_vs_default"]["median"] == 1.0
    for op in ("conv2 dW jax.vjp(lax.conv)", "conv2 dW im2col (patches formed)", "conv2 dW per-tap matmuls"):
        assert ops[op]["default"]["max_rel_diff_vs_purenet"] < 1e-4, op
    if "-reduce,-individual_convolution" in available:  # the lever takes the convolution out of YNNPACK
        paths = ops["LeNet conv2 dW"]["-reduce,-individual_convolution"]["paths"]
        assert paths["conv"] >= 1 and paths["ynn"] == 0, paths
    if importlib.util.find_spec("torch"):
        assert ops["LeNet value_and_grad"]["pytorch"]["median_s"] > 0
    assert set(results["verdict_vs_reduce"]) == set(available) - {"default", "-reduce"}


def test_dp_audit_benchmark_smoke_mode_never_refutes_the_gaussian_mechanism(tmp_path):
    rows = _smoke_results("benchmarks.dp_audit", tmp_path)["idealized_gaussian"]
    assert len(rows) >= 8
    for row in rows.values():  # the mechanism is exactly the Gaussian one: no bound may exceed its epsilon
        for name in ("epsilon_one_run", "epsilon_fdp", "epsilon_hull", "epsilon_fdp_hull", "epsilon_one_run_k",
                     "epsilon_fdp_k"):
            assert 0 <= row[name] < row["epsilon_true"], name


@pytest.mark.slow
def test_ab_benchmark_smoke_mode_finds_a_tree_runs_the_same_programs_as_itself(tmp_path):
    path = tmp_path / "ab.json"
    out = subprocess.run([sys.executable, "-m", "benchmarks.ab", str(ROOT), str(ROOT), "--smoke", "--json", str(path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    summary = json.loads(path.read_text())["summary"]
    assert {"mlp plain step", "mlp dp step", "mlp fisher_diagonal", "mlp gradient_gram", "mlp kfac_factors"} == set(summary)
    assert all(case["same_program"] and case["new_ms"] > 0 for case in summary.values())
