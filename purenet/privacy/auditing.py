"""Empirical privacy audits: a lower bound on epsilon from how well canaries' membership is guessed.

    result = pn.privacy.audit(in_scores, out_scores, delta=1e-5, confidence=0.95)
    result.epsilon, result.epsilon_fdp, result.auroc, result.fpr, result.tpr

An accountant certifies the mechanism it is told about; an audit measures
the mechanism that ran. Insert m canaries, each independently in the
training set with probability 1/2, train once, and score each canary (a
higher score: "more likely in"). Guessing "in" for every canary scoring at
least a threshold t gives `guesses` guesses of which `correct` are right.
If the run is (epsilon, delta)-DP, then (Steinke, Nasr & Jagielski 2023,
"Privacy Auditing with One (1) Training Run", Theorem 3.1 with one-sided
guesses) the chance of `correct` or more right answers is at most

    p(epsilon) = beta + 2 m delta alpha,
    beta  = P[Binomial(guesses, q) >= correct],   q = e^epsilon / (1 + e^epsilon),
    alpha = max_{1 <= i <= correct} (P[Binomial(guesses, q) >= correct - i] - beta) / i.

Every epsilon with p(epsilon) <= 1 - confidence is refuted; the audit's
bound is the largest refuted epsilon over the thresholds, each tested at
(1 - confidence) / (number of thresholds) (Bonferroni):

- thresholds="grid" (the default): guess "in" for the k highest scores, for
  k = m/2, m/2^1.5, m/4, ... 1 (`guess_grid(m)`, about 2 log2 m of them).
  The candidates depend on m alone, so the union bound over them holds
  whatever the memberships: a valid bound.
- thresholds="hull": the vertices of the ROC curve's upper convex hull,
  jax_privacy's `CanaryScoreAuditor(in_scores, out_scores).epsilon_one_run(
  significance=1 - confidence, delta=delta)` (tested equal). Which
  thresholds are vertices depends on the memberships the guesses must not
  see, so dividing by their number undercounts the tests: on an exactly
  epsilon-DP randomized response it exceeds epsilon more often than the
  nominal 1 - confidence (benchmarks/README.md, section "DP-SGD audits: how
  tight, and what they catch"). (Bonferroni over every distinct score is
  valid, but with m of thousands its level falls below Steinke et al.'s
  delta term, 2 m delta alpha, and refutes nothing.)
- guesses=k, fixed before the run: only the k highest scores are guessed
  "in", tested at 1 - confidence (jax_privacy's `Explicit` threshold).

The delta term 2 m delta grows with the number of canaries: m well below
1/delta keeps it small. Written with numpy and scipy, so the `privacy` extra
needs no jax-privacy (which pins jax >= 0.7.1).

`epsilon_fdp` is the f-DP variant (Mahloujifar, Melis & Chaudhuri 2024,
"Auditing f-Differential Privacy in One Run"; jax_privacy's
`epsilon_one_run_fdp`): the same guesses tested against the Gaussian
trade-off curve through (epsilon, delta). It refutes that curve, not
(epsilon, delta)-DP itself: it is a lower bound on epsilon for a mechanism
whose privacy is Gaussian (the Gaussian mechanism; full-batch DP-GD, q = 1),
and only approximately for Poisson-subsampled DP-SGD (its many-step limit,
Dong, Roth & Su 2019); an exactly 1-DP randomized response can score above
1. Much tighter where it applies.

The same bound holds when each "canary" is an independent run of the
mechanism (m runs, each with or without one canary, chosen by a fair coin):
the one-run theorem generalises the many-run audits of Jagielski et al.
(2020) and Nasr et al. (2021).
"""
import functools
import math
from typing import Any, Callable, NamedTuple

import numpy as np

from purenet.privacy.accounting import _count, _real

__all__ = ["AuditResult", "audit", "epsilon_one_run"]


def _scipy() -> Any:
    try:
        import scipy.optimize
        import scipy.special
        import scipy.stats
    except ImportError as e:
        raise ImportError("privacy audits need scipy: pip install 'purenet[privacy]' (or pip install scipy)") from e
    return scipy


class AuditResult(NamedTuple):
    """What `audit` returns.

    Attributes:
        epsilon: the one-run lower bound on epsilon (Steinke et al. 2023) at `confidence`.
        epsilon_fdp: the f-DP one-run bound (Mahloujifar et al. 2024) at `confidence`: a lower
            bound on epsilon when the mechanism's trade-off curve is Gaussian (see the module
            docstring).
        auroc: the area under the attack's ROC curve (its upper convex hull, as jax_privacy's
            `attack_auroc`: classifiers may randomise between two thresholds).
        fpr: the ROC curve's false-positive rates, one per threshold (increasing from 0 to 1):
            the share of non-members scoring at least the threshold.
        tpr: the ROC curve's true-positive rates at the same thresholds (increasing from 0 to
            1): the share of members scoring at least the threshold.
        delta: the audit's delta.
        confidence: the audit's confidence.
        members: how many canaries were in the training set.
        non_members: how many canaries were out.
    """

    epsilon: float
    epsilon_fdp: float
    auroc: float
    fpr: np.ndarray
    tpr: np.ndarray
    delta: float
    confidence: float
    members: int
    non_members: int


def _scores(name: str, scores: Any) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of canary scores, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        i = int(np.argmax(~np.isfinite(s)))
        raise ValueError(f"{name} must be finite, got {s[i]} at index {i}")
    return s


def _check_level(delta: Any, confidence: Any) -> tuple[float, float]:
    return (_real("delta", delta, 0.0, 1.0, True, False),
            _real("confidence", confidence, 0.0, 1.0, True, True))


def _hull(points: np.ndarray) -> np.ndarray:
    """Indices of the vertices of the upper convex hull of (x, y) points sorted by x: repeatedly drop
    every point on or below the segment joining its neighbours."""
    keep = np.arange(len(points))
    while len(keep) > 2:
        d = np.diff(points[keep], axis=0)
        below = d[:-1, 1] * d[1:, 0] - d[1:, 1] * d[:-1, 0] <= 0
        if not below.any():
            break
        keep = keep[np.r_[True, ~below, True]]
    return keep


def _counts(in_scores: np.ndarray, out_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false negatives, true negatives) at each vertex of the ROC's upper convex hull, among the
    thresholds t = every distinct score and +inf (a canary scoring >= t is guessed in)."""
    thresholds = np.concatenate([np.union1d(in_scores, out_scores), [np.inf]])
    fn = np.searchsorted(np.sort(in_scores), thresholds, side="left")
    tn = np.searchsorted(np.sort(out_scores), thresholds, side="left")
    keep = _hull(np.stack([fn, tn], axis=1).astype(np.float64))
    return fn[keep], tn[keep]


def _p_value(m: int, guesses: int, correct: int, eps: float, delta: float) -> float:
    """Steinke et al.'s bound on P[correct or more of `guesses` right] under (eps, delta)-DP."""
    st = _scipy().stats
    q = _scipy().special.expit(eps)
    beta = st.binom.sf(correct - 1, guesses, q)
    if delta == 0:
        return float(beta)
    i = np.arange(1, correct + 1)
    alpha = np.max((st.binom.sf(correct - i - 1, guesses, q) - beta) / i, initial=0.0)
    return float(min(beta + 2 * m * delta * alpha, 1.0))


@functools.lru_cache(maxsize=1024)
def _gaussian_sigma(eps: float, delta: float) -> float:
    from purenet.privacy.accounting import _accounting
    return float(_accounting().get_sigma_gaussian(eps, delta))


def _fdp_excess(m: int, guesses: int, correct: int, eps: float, delta: float, significance: float) -> float:
    """Positive when the guesses refute the Gaussian trade-off curve of (eps, delta)-DP: Mahloujifar et al.'s
    recursion on the largest (correct, wrong) rates a Gaussian mechanism allows, capped as published."""
    norm = _scipy().stats.norm
    sigma = _gaussian_sigma(eps, delta)

    def inverse_blow_up(x: float) -> float:
        return float(x == 1.0) if sigma == 0 else float(norm.cdf(norm.ppf(x) - 1 / sigma))

    r, h = significance * correct / m, significance * (guesses - correct) / m
    for i in range(correct - 1, -1, -1):
        h_new = max(h, inverse_blow_up(r))
        if h_new == h:
            break
        r, h = min(r + i / (guesses - i) * (h_new - h), 1.0), h_new
    return r + h - guesses / m


def _largest_refuted(excess: Callable[[float], float], low: float) -> float:
    """The largest eps >= low with excess(eps) > 0 (excess decreasing in eps), or `low` when none."""
    if excess(low) <= 0:
        return low
    high = max(1.0, 2 * low)
    while excess(high) > 0:
        low, high = high, 2 * high
    return float(_scipy().optimize.brentq(excess, low, high, xtol=1e-6))


def _refuted(m: int, g: int, c: int, delta: float, level: float, fdp: bool, low: float) -> float:
    """The largest eps >= low that `c` right of `g` guesses (of m canaries) refute at `level`, or `low`."""
    if g == 0 or c / g <= _scipy().special.expit(low):
        return low  # precision at most e^low / (1 + e^low): no eps above low is refuted
    if fdp:
        return _largest_refuted(lambda eps: _fdp_excess(m, g, c, eps, delta, level), low)
    if _p_value(m, g, c, low, 0.0) > level:  # not refuted even without delta's term
        return low
    return _largest_refuted(lambda eps: level - _p_value(m, g, c, eps, delta), low)


def _top(in_scores: np.ndarray, out_scores: np.ndarray, k: int) -> tuple[int, int]:
    """(guesses, right) when the k highest scores (and every score tied with the k-th) are guessed in."""
    t = np.partition(np.concatenate([in_scores, out_scores]), -k)[-k]
    right, wrong = int(np.sum(in_scores >= t)), int(np.sum(out_scores >= t))
    return right + wrong, right


def guess_grid(m: int) -> np.ndarray:
    """The numbers of guesses `thresholds="grid"` tests: m / 2^(j/2) for j = 2, 3, ... down to 1, rounded
    and distinct (a factor sqrt(2) apart: about 2 log2(m) of them, fixed by m alone).

    Args:
        m: the number of canaries (members and non-members together).

    Returns:
        The distinct guess counts k, int64, increasing from 1 to about m / 2.
    """
    k = np.round(m * 2.0 ** (-np.arange(2, 2 * math.log2(max(m, 2)) + 2) / 2)).astype(np.int64)
    return np.unique(np.concatenate([[1], k[k >= 1]]))


def _candidates(in_scores: np.ndarray, out_scores: np.ndarray, thresholds: str,
                guesses: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(guesses, right guesses) at each threshold tested: one k fixed before the run, the grid's, or
    the ROC hull's vertices."""
    if guesses is not None:
        pairs = np.array([_top(in_scores, out_scores, guesses)])
    elif thresholds == "grid":  # the same candidates whatever the memberships: Bonferroni over them is valid
        pairs = np.array([_top(in_scores, out_scores, int(k)) for k in guess_grid(in_scores.size + out_scores.size)])
    else:  # the ROC hull's vertices, as jax_privacy
        fn, tn = _counts(in_scores, out_scores)
        tp = in_scores.size - fn
        return tp + out_scores.size - tn, tp
    return pairs[:, 0], pairs[:, 1]


def _one_run(m: int, total: np.ndarray, tp: np.ndarray, delta: float, significance: float, fdp: bool) -> float:
    """The largest epsilon refuted at any of the candidates (total[j] guesses, tp[j] right), each at
    significance / their number (Bonferroni)."""
    level = significance / total.size
    fp = total - tp
    # thresholds in order of decreasing precision (Clopper-Pearson lower bound): once a bound eps is found, a
    # threshold whose raw precision is at most e^eps / (1 + e^eps) cannot refute a larger one
    with np.errstate(divide="ignore", invalid="ignore"):
        precision_low = np.where(fp < total, _scipy().stats.beta.ppf(level, tp, fp + 1), 0.0)
    best = 0.0
    for j in np.argsort(-np.nan_to_num(precision_low), kind="stable"):
        best = _refuted(m, int(total[j]), int(tp[j]), delta, level, fdp, best)
    return best


THRESHOLDS = ("grid", "hull")


def _check_thresholds(thresholds: Any) -> str:
    if thresholds not in THRESHOLDS:
        raise ValueError(f"thresholds must be one of {THRESHOLDS}, got {thresholds!r}")
    return thresholds


def _check_guesses(guesses: Any, m: int) -> int | None:
    if guesses is None:
        return None
    k = _count("guesses", guesses, 1)
    if k > m:
        raise ValueError(f"guesses must be None or an int in [1, {m}] (the number of canaries), got {guesses!r}")
    return k


def epsilon_one_run(in_scores: Any, out_scores: Any, delta: float, confidence: float = 0.95,
                    fdp: bool = False, thresholds: str = "grid", guesses: int | None = None) -> float:
    """The one-run lower bound on epsilon from canary scores (see the module docstring).

    Args:
        in_scores: (members,) scores of the canaries that were in the training set (as for
            `audit`).
        out_scores: (non_members,) scores of the canaries that were not.
        delta: the delta of the (epsilon, delta) claim under audit, in (0, 1].
        confidence: the probability the bound holds, in (0, 1).
        fdp: False for Steinke et al.'s bound, True for Mahloujifar et al.'s f-DP bound.
        thresholds: "grid" or "hull" (as for `audit`).
        guesses: None, or k fixed before the run (as for `audit`).

    Returns:
        The largest epsilon the guesses refute at `confidence` (0.0 when they refute none).

    Raises:
        ValueError: empty, non-1-D or non-finite scores; delta, confidence, thresholds or guesses
            out of range.
        ImportError: if scipy is not installed (`pip install 'purenet[privacy]'`); with
            fdp=True, also Google's dp-accounting.
    """
    delta, confidence = _check_level(delta, confidence)
    s_in, s_out = _scores("in_scores", in_scores), _scores("out_scores", out_scores)
    m = s_in.size + s_out.size
    total, tp = _candidates(s_in, s_out, _check_thresholds(thresholds), _check_guesses(guesses, m))
    return _one_run(m, total, tp, delta, 1 - confidence, fdp)


def audit(in_scores: Any, out_scores: Any, delta: float, confidence: float = 0.95, thresholds: str = "grid",
          guesses: int | None = None) -> AuditResult:
    """Audit a run from its canaries' scores: the one-run and f-DP lower bounds on epsilon, and the ROC.

    Args:
        in_scores: (members,) scores of the canaries that were in the training set; higher means
            "more likely in" (negate a loss).
        out_scores: (non_members,) scores of the canaries that were not.
        delta: the delta of the (epsilon, delta) claim under audit, in (0, 1].
        confidence: the probability the bound holds, in (0, 1); 0.95 by default.
        thresholds: "grid" (guess "in" for the k highest scores, k = m / 2^(j/2) down to 1, each
            at (1 - confidence) / their number: candidates fixed by m alone, a valid bound) or
            "hull" (the vertices of the ROC's upper convex hull, at (1 - confidence) / their
            number: jax_privacy's estimator; which thresholds are vertices depends on the
            memberships, so its confidence is not guaranteed).
        guesses: None (the thresholds above), or k: guess "in" for the k highest scores (and
            every score tied with the k-th) only, at 1 - confidence; k must be fixed before the
            run (from a simulation, say): it avoids Bonferroni's price, which grows with the
            number of canaries.

    Returns:
        An `AuditResult`. `epsilon` above the claimed epsilon means the run is not
            (epsilon, delta)-DP, with probability `confidence`; `epsilon_fdp` above it means the
            run's privacy is not the Gaussian trade-off curve through (epsilon, delta) (see the
            module docstring); a bound below the claim says nothing either way.

    Raises:
        ValueError: empty, non-1-D or non-finite scores; delta, confidence, thresholds or guesses
            out of range.
        ImportError: if scipy or Google's dp-accounting is not installed
            (`pip install 'purenet[privacy]'`).
    """
    delta, confidence = _check_level(delta, confidence)
    s_in, s_out = _scores("in_scores", in_scores), _scores("out_scores", out_scores)
    m = s_in.size + s_out.size
    total, tp = _candidates(s_in, s_out, _check_thresholds(thresholds), _check_guesses(guesses, m))
    cuts = np.concatenate([[np.inf], np.union1d(s_in, s_out)[::-1]])
    fpr = 1 - np.searchsorted(np.sort(s_out), cuts, side="left") / s_out.size  # share scoring >= t
    tpr = 1 - np.searchsorted(np.sort(s_in), cuts, side="left") / s_in.size
    fn, tn = _counts(s_in, s_out)
    tnr, fnr = tn / s_out.size, fn / s_in.size
    auroc = float(0.5 * np.dot(tnr[:-1] + tnr[1:], fnr[1:] - fnr[:-1]))
    return AuditResult(
        epsilon=_one_run(m, total, tp, delta, 1 - confidence, False),
        epsilon_fdp=_one_run(m, total, tp, delta, 1 - confidence, True),
        auroc=auroc, fpr=fpr, tpr=tpr, delta=delta, confidence=confidence,
        members=int(s_in.size), non_members=int(s_out.size))

