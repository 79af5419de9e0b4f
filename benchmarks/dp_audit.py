"""How tight `pn.privacy.audit` can be: the idealized one-run audit of the Gaussian mechanism.

    python -m benchmarks.dp_audit [--seeds 5] [--smoke] [--json results_dp_audit_cpu.json]

m canaries, each in with probability 1/2; a canary's score is N(1, sigma^2) when it is in and
N(0, sigma^2) when it is out: m independent Gaussian mechanisms of sensitivity 1, whose true epsilon
at delta is the Gaussian mechanism's (dp-accounting). This is the setting of Mahloujifar, Melis &
Chaudhuri (2024, Table 1: sigma 0.5, 1, 2 with m = 10^5, sigma 4 with m = 10^6); their numbers are
printed beside ours. Both bounds at 95% confidence, delta 1e-5, the median over seeds, three ways:
`audit`'s default (the k highest scores guessed "in" for every k of `guess_grid(m)`, Bonferroni over
them), jax_privacy's (every vertex of the ROC hull, Bonferroni over them: the vertices depend on the
memberships), and one k fixed before the run, as those papers do (here: the best k of a grid on a
separate simulation, seed 1000).
"""
import argparse
import json
import statistics
import time

import numpy as np

import purenet as pn

DELTA = 1e-5
# Mahloujifar et al. (2024), Table 1: sigma -> (m, theoretical epsilon, Steinke et al.'s bound, theirs)
PUBLISHED = {0.5: (10**5, 9.99, 4.99, 8.16), 1.0: (10**5, 4.37, 2.61, 3.61), 2.0: (10**5, 1.99, 1.33, 1.59),
             4.0: (10**6, 0.92, 0.61, 0.82)}


def gaussian_epsilon(sigma: float) -> float:
    """The epsilon at DELTA of the Gaussian mechanism with sensitivity 1 and noise sigma."""
    return pn.privacy.epsilon(sigma, 1.0, 1, DELTA)


def idealized(sigma: float, m: int, seed: int, guesses: int | None = None,
              thresholds: str = "grid") -> pn.privacy.AuditResult:
    rng = np.random.default_rng(seed)
    members = rng.random(m) < 0.5
    scores = members + sigma * rng.normal(size=m)
    return pn.privacy.audit(scores[members], scores[~members], DELTA, guesses=guesses, thresholds=thresholds)


def preregistered_guesses(sigma: float, m: int) -> int:
    """The k of a grid whose f-DP bound is largest on a simulation no reported seed uses."""
    grid = [k for k in (10, 30, 100, 300, 1000, 3000, 10_000, 30_000) if k <= m // 2]
    return max(grid, key=lambda k: idealized(sigma, m, 1000, k).epsilon_fdp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="m / 100, one seed: checks the code runs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    seeds = 1 if args.smoke else args.seeds
    rows = {}
    print(f"{'sigma':>5} {'m':>8} {'true eps':>8} | grid: {'one-run':>7} {'f-DP':>6} | hull: {'one-run':>7} "
          f"{'f-DP':>6} | k fixed: {'k':>6} {'one-run':>7} {'f-DP':>6} | published: {'Steinke':>7} {'f-DP':>6}")
    for sigma, (m, eps_true, steinke, fdp) in PUBLISHED.items():
        for size in sorted({1000, 5000, m // 100 if args.smoke else m}):
            start = time.perf_counter()
            results = [idealized(sigma, size, seed) for seed in range(seeds)]
            seconds = (time.perf_counter() - start) / seeds
            hull = [idealized(sigma, size, seed, thresholds="hull") for seed in range(seeds)]
            k = preregistered_guesses(sigma, size)
            fixed = [idealized(sigma, size, seed, k) for seed in range(seeds)]
            row = {"m": size, "epsilon_true": gaussian_epsilon(sigma), "seeds": seeds,
                   "epsilon_one_run": statistics.median(r.epsilon for r in results),
                   "epsilon_fdp": statistics.median(r.epsilon_fdp for r in results),
                   "epsilon_hull": statistics.median(r.epsilon for r in hull),
                   "epsilon_fdp_hull": statistics.median(r.epsilon_fdp for r in hull), "guesses": k,
                   "epsilon_one_run_k": statistics.median(r.epsilon for r in fixed),
                   "epsilon_fdp_k": statistics.median(r.epsilon_fdp for r in fixed), "seconds_per_audit": seconds}
            if size == m:
                row["published"] = {"epsilon_true": eps_true, "steinke": steinke, "fdp": fdp}
            rows[f"sigma {sigma}, m {size}"] = row
            published = f"{steinke:>7.2f} {fdp:>6.2f}" if size == m else f"{'':>7} {'':>6}"
            print(f"{sigma:>5} {size:>8} {row['epsilon_true']:>8.2f} | grid: {row['epsilon_one_run']:>7.2f} "
                  f"{row['epsilon_fdp']:>6.2f} | hull: {row['epsilon_hull']:>7.2f} {row['epsilon_fdp_hull']:>6.2f} | k fixed: {k:>6} {row['epsilon_one_run_k']:>7.2f} "
                  f"{row['epsilon_fdp_k']:>6.2f} | published: {published}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"idealized_gaussian": rows}, f, indent=1)


if __name__ == "__main__":
    main()
