"""Privacy accounting for DP-SGD: the epsilon of a run, and the noise multiplier for a target epsilon.

    eps = pn.privacy.epsilon(noise_multiplier=1.1, sample_rate=256 / 60000, steps=14062, delta=1e-5)
    sigma = pn.privacy.noise_multiplier_for(epsilon=3.0, delta=1e-5, sample_rate=256 / 60000, steps=14062)

DP-SGD with Poisson sampling (each example joins each step's batch
independently with probability q), Gaussian noise of std sigma C on the
clipped sum, and T steps is the T-fold composition of the Poisson-subsampled
Gaussian mechanism. Its (epsilon, delta) comes from Google's `dp-accounting`
(the accountant jax_privacy uses; an optional extra: `pip install
'purenet[privacy]'`):

- accountant="pld" (the default): privacy loss distributions (Meiser &
  Mohammadi, 2018; Koskela et al., 2020), numerically tight;
- accountant="rdp": Renyi DP (Mironov, 2017; Mironov, Talwar & Zhang, 2019),
  an upper bound, as Opacus' and TF-Privacy's RDP accountants compute it.

Both use the add-or-remove-one neighbouring relation. On TF-Privacy's MNIST
setting (q = 256/60000, sigma 1.12, 14,062 steps, delta 1e-5) PLD gives 2.31
and RDP 2.52. Only Poisson sampling has this accounting: shuffled
fixed-size batches (`DPSGD(sampling="shuffle")`) have none
(`purenet.privacy.sampling` draws the Poisson batches).
"""
import functools
import math
from typing import Any, Sequence

import jax
import numpy as np

__all__ = ["ACCOUNTANTS", "epsilon", "epsilon_of", "noise_multiplier_for"]

ACCOUNTANTS = ("pld", "rdp")


def _accounting() -> Any:
    try:
        import dp_accounting
    except ImportError as e:
        raise ImportError("privacy accounting needs Google's dp-accounting: pip install 'purenet[privacy]' "
                          "(or pip install dp-accounting)") from e
    return dp_accounting


def _real(name: str, value: Any, low: float, high: float, low_open: bool, high_open: bool) -> float:
    """`value` as a float, when it is a real scalar (Python, numpy or a concrete 0-d jax array; not a bool)
    in the interval; else a ValueError that names it and the interval."""
    ok = (isinstance(value, (int, float, np.number, np.ndarray, jax.Array))
          and not isinstance(value, (bool, np.bool_)) and np.ndim(value) == 0)
    try:
        v = float(value) if ok else math.nan
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
        v = math.nan
    inside = (low < v if low_open else low <= v) and (v < high if high_open else v <= high)
    if not inside:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return v


def _count(name: str, value: Any, low: int) -> int:
    """`value` as an int >= low (Python or numpy integers; not a bool or a float)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _check(noise_multiplier: Any, sample_rate: Any, steps: Any, delta: Any,
           accountant: str) -> tuple[float, float, int, float]:
    """The accountant's arguments checked and as Python numbers: a finite noise multiplier >= 0 (inf is
    no mechanism dp-accounting can analyse), q in (0, 1], steps >= 0, delta in (0, 1)."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    return (_real("noise_multiplier", noise_multiplier, 0.0, math.inf, False, True),
            _real("sample_rate", sample_rate, 0.0, 1.0, True, False),
            _count("steps", steps, 0), _real("delta", delta, 0.0, 1.0, True, True))


def _event(noise_multiplier: float, sample_rate: float, steps: int) -> Any:
    dp = _accounting()
    step = dp.PoissonSampledDpEvent(sample_rate, dp.GaussianDpEvent(noise_multiplier))
    return dp.SelfComposedDpEvent(step, steps)


_PLD_INTERVAL = 1e-4  # dp_accounting's PLDAccountant default: the grid of privacy-loss values


@functools.lru_cache(maxsize=16)
def _one_step_pld(noise_multiplier: float, sample_rate: float) -> Any:
    """The privacy loss distribution of one Poisson-sampled Gaussian step, as PLDAccountant builds it.
    Building it is the accountant's slow part (loops in Python); composing it `steps` times is an FFT, so
    `fit`'s epsilon after every epoch builds it once."""
    pld = _accounting().pld.privacy_loss_distribution
    return pld.from_gaussian_mechanism(standard_deviation=noise_multiplier, sampling_prob=sample_rate,
                                       value_discretization_interval=_PLD_INTERVAL)


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "pld") -> float:
    """The epsilon of `steps` DP-SGD steps with Poisson sampling rate q and noise multiplier sigma, at delta.

    sigma = 0 (no noise) is infinitely non-private (inf); no steps cost nothing (0).

    Args:
        noise_multiplier: sigma, the noise's std over the clip norm (finite, >= 0).
        sample_rate: q, each example's probability of joining a step's batch, in (0, 1].
        steps: the number of steps T (an int >= 0).
        delta: the delta of the (epsilon, delta) guarantee, in (0, 1).
        accountant: "pld" (privacy loss distributions, numerically tight; the default) or
            "rdp" (Renyi DP, an upper bound).

    Returns:
        epsilon (a float; inf for sigma = 0 with steps > 0, 0.0 for no steps).

    Raises:
        ValueError: if an argument is out of its range or not a real scalar (steps not an int),
            or `accountant` is not "pld" or "rdp".
        ImportError: if Google's dp-accounting is not installed (`pip install 'purenet[privacy]'`).
    """
    return epsilon_of([(noise_multiplier, sample_rate, steps)], delta, accountant)


def epsilon_of(phases: Sequence[tuple[float, float, int]], delta: float, accountant: str = "pld") -> float:
    """The epsilon of DP-SGD run in phases, each (noise multiplier sigma, sample rate q, steps): the
    composition of every phase's `steps`-fold Poisson-subsampled Gaussian mechanism, at delta.

    A run resumed with another noise multiplier or batch size is such a run: its epsilon covers the
    steps taken under each setting (`fit` records one phase per epoch). Consecutive phases with the
    same (sigma, q) compose as one; any phase with sigma = 0 and steps > 0 makes the run infinitely
    non-private (inf).

    Args:
        phases: the run's phases in order, each a tuple (noise multiplier sigma, sample rate q,
            steps), checked as `epsilon`'s arguments.
        delta: the delta of the (epsilon, delta) guarantee, in (0, 1).
        accountant: "pld" (privacy loss distributions, numerically tight; the default) or
            "rdp" (Renyi DP, an upper bound).

    Returns:
        epsilon of the whole run (a float; 0.0 when no phase has steps).

    Raises:
        ValueError: if a phase's value is out of its range or not a real scalar, `delta` is not
            in (0, 1), or `accountant` is not "pld" or "rdp".
        ImportError: if Google's dp-accounting is not installed (`pip install 'purenet[privacy]'`).
    """
    delta = _real("delta", delta, 0.0, 1.0, True, True)
    if accountant not in ACCOUNTANTS:  # checked here too: no phases must not hide a misspelt accountant
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    merged: list[list] = []
    for phase in phases:
        sigma, rate, steps, delta = _check(*phase, delta, accountant)
        if merged and merged[-1][:2] == [sigma, rate]:
            merged[-1][2] += steps
        elif steps:
            merged.append([sigma, rate, steps])
    if not merged:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in merged):
        return math.inf
    if accountant == "pld":  # what PLDAccountant().compose(event).get_epsilon(delta) computes, each step cached
        composed = _accounting().pld.privacy_loss_distribution.identity(value_discretization_interval=_PLD_INTERVAL)
        for sigma, rate, steps in merged:
            composed = composed.compose(_one_step_pld(sigma, rate).self_compose(steps))
        return float(composed.get_epsilon_for_delta(delta))
    acc = _accounting().rdp.RdpAccountant()
    for sigma, rate, steps in merged:
        acc.compose(_event(sigma, rate, steps))
    return float(acc.get_epsilon(delta))


def noise_multiplier_for(epsilon: float, delta: float, sample_rate: float, steps: int,
                         accountant: str = "pld") -> float:
    """The smallest noise multiplier sigma whose `epsilon(sigma, sample_rate, steps, delta)` is <= epsilon.

    Found by bisection in log sigma on the accountant itself, to 0.1%. The search starts at
    sigma = 1 and halves it while the target still holds, but never below 0.25 (there the
    subsampled Gaussian is all but non-private and PLD's grid explodes): when sigma = 0.25
    already reaches the target (a loose epsilon, few steps), 0.25 is returned.

    Args:
        epsilon: the target epsilon (> 0, finite).
        delta: the delta of the (epsilon, delta) guarantee, in (0, 1).
        sample_rate: q, each example's probability of joining a step's batch, in (0, 1].
        steps: the number of steps T (an int >= 0).
        accountant: "pld" (privacy loss distributions, numerically tight; the default) or
            "rdp" (Renyi DP, an upper bound).

    Returns:
        sigma (a float; 0.0 when steps is 0).

    Raises:
        ValueError: if an argument is out of its range or not a real scalar (steps not an int),
            `accountant` is not "pld" or "rdp", or no sigma up to 1e4 reaches `epsilon`.
        ImportError: if Google's dp-accounting is not installed (`pip install 'purenet[privacy]'`).
    """
    epsilon = _real("epsilon", epsilon, 0.0, math.inf, True, True)
    _, sample_rate, steps, delta = _check(1.0, sample_rate, steps, delta, accountant)
    if steps == 0:
        return 0.0

    def eps(sigma: float) -> float:
        return epsilon_of([(sigma, sample_rate, steps)], delta, accountant)

    # bracket [low, high] with eps(high) <= target < eps(low), then bisect in log sigma to 0.1%
    high = 1.0
    while eps(high) > epsilon:
        high *= 2
        if high > 1e4:
            raise ValueError(f"no noise multiplier up to 1e4 reaches epsilon={epsilon} at delta={delta}")
    low = max(high / 2, _SIGMA_FLOOR)
    while eps(low) <= epsilon:
        if low == _SIGMA_FLOOR:  # the floor itself reaches the target: sigma is never taken below it
            return low
        high, low = low, max(low / 2, _SIGMA_FLOOR)
    while high / low > 1.001:
        mid = math.sqrt(low * high)
        low, high = (low, mid) if eps(mid) <= epsilon else (mid, high)
    return high


_SIGMA_FLOOR = 0.25  # below this the subsampled Gaussian is all but non-private (and PLD's grid explodes)
