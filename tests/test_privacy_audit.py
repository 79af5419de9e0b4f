"""Privacy audits of our own DP-SGD: the one-run estimator against its formula and jax_privacy, canaries
inside real runs, the correct mechanism below every claim, and four broken mechanisms caught.

Every run is seeded, so each audit's number is fixed; the correct and the broken mechanism of each
test run through the same harness, differing only in the defect."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import purenet as pn
from purenet.layers.base import scale_rows
from purenet.privacy import auditing as audit_module
from purenet.training.loop import run_poisson_epoch

DELTA = 1e-5
# one seed in the default run; four more with -m slow (each broken mechanism is caught, and the correct one
# stays below its claim, in every one of them)
SEEDS = [0] + [pytest.param(seed, marks=pytest.mark.slow) for seed in (1, 2, 3, 4)]


# ---------------------------------------------------------------- the estimator


def _synthetic(m, shift, seed, rounding=None):
    rng = np.random.default_rng(seed)
    members = rng.random(m) < 0.5
    s = rng.normal(size=m) + shift * members
    if rounding is not None:
        s = np.round(s, rounding)  # ties between members and non-members
    return s[members], s[~members]


@pytest.mark.parametrize("m,shift,seed,rounding", [(200, 1.0, 0, None), (1000, 2.0, 1, None), (1000, 0.2, 2, 1),
                                                   (50, 5.0, 3, None), (2000, 3.0, 4, 2)])
def test_audit_equals_jax_privacy(m, shift, seed, rounding):
    from jax_privacy.auditing import CanaryScoreAuditor

    s_in, s_out = _synthetic(m, shift, seed, rounding)
    reference = CanaryScoreAuditor(s_in, s_out)
    for confidence in (0.95, 0.99):
        result = pn.privacy.audit(s_in, s_out, DELTA, confidence, thresholds="hull")
        np.testing.assert_allclose(result.epsilon, reference.epsilon_one_run(1 - confidence, DELTA), atol=1e-5)
        np.testing.assert_allclose(result.epsilon_fdp, reference.epsilon_one_run_fdp(1 - confidence, DELTA),
                                   atol=1e-5)
    np.testing.assert_allclose(result.auroc, reference.attack_auroc(), rtol=1e-12)
    assert result.members == s_in.size and result.non_members == s_out.size
    assert result.fpr[0] == result.tpr[0] == 0 and result.fpr[-1] == result.tpr[-1] == 1
    assert np.all(np.diff(result.fpr) >= 0) and np.all(np.diff(result.tpr) >= 0)


def test_p_value_is_the_published_formula():
    """Steinke et al. (2023), Theorem 3.1 with k- = 0: beta + 2 m delta alpha, sums written out."""
    m, guesses, correct, eps, delta = 40, 12, 10, 0.7, 1e-3
    q = math.exp(eps) / (1 + math.exp(eps))

    def tail(k):  # P[Binomial(guesses, q) >= k]
        return sum(math.comb(guesses, j) * q ** j * (1 - q) ** (guesses - j) for j in range(max(k, 0), guesses + 1))

    beta = tail(correct)
    alpha = max((tail(correct - i) - beta) / i for i in range(1, correct + 1))
    np.testing.assert_allclose(audit_module._p_value(m, guesses, correct, eps, delta),
                               min(beta + 2 * m * delta * alpha, 1.0), rtol=1e-12)
    np.testing.assert_allclose(audit_module._p_value(m, guesses, correct, eps, 0.0), beta, rtol=1e-12)


@pytest.mark.parametrize("thresholds", ["grid", "hull"])
def test_perfect_guesses_give_the_closed_form_bound(thresholds):
    """k members scoring above every non-member: with delta ~ 0 the bound solves q^k = level,
    q = e^eps / (1 + e^eps), at the Bonferroni level: over the grid's numbers of guesses (k = m / 2 is
    one), or over the hull's three vertices (no guesses, the k members, everyone)."""
    k = 60
    s_in, s_out = np.arange(k) + 100.0, np.arange(k, dtype=float)
    grid = pn.privacy.guess_grid(2 * k)
    assert k in grid and audit_module._counts(s_in, s_out)[0].size == 3
    q = (0.05 / (grid.size if thresholds == "grid" else 3)) ** (1 / k)
    eps = pn.privacy.epsilon_one_run(s_in, s_out, delta=1e-300, confidence=0.95, thresholds=thresholds)
    np.testing.assert_allclose(eps, math.log(q / (1 - q)), atol=1e-5)
    assert pn.privacy.epsilon_one_run(s_out, s_in, delta=DELTA, thresholds=thresholds) == 0.0  # all wrong


def test_the_guess_grid_is_fixed_by_m_alone():
    np.testing.assert_array_equal(pn.privacy.guess_grid(16), [1, 2, 3, 4, 6, 8])
    assert pn.privacy.guess_grid(1).tolist() == [1]
    grid = pn.privacy.guess_grid(2000)
    assert grid[0] == 1 and grid[-1] == 1000 and np.all(np.diff(grid) > 0) and grid.size <= 2 * math.log2(2000) + 1


@pytest.mark.slow
def test_the_grid_audit_of_an_exactly_dp_mechanism_holds_its_confidence():
    """Randomized response that is exactly 0.1-DP (a canary's score lands in the upper half with
    probability e^0.1 / (1 + e^0.1) when it is in), audited 1,000 times at 95%: the grid's bound exceeds
    0.1 in at most 5% of the audits (plus three standard errors)."""
    eps, m, trials = 0.1, 30_000, 1000
    p = math.exp(eps) / (1 + math.exp(eps))
    rng = np.random.default_rng(0)
    over = 0
    for _ in range(trials):
        members = rng.random(m) < 0.5
        s = np.where(rng.random(m) < p, members, ~members) + rng.random(m)
        over += pn.privacy.epsilon_one_run(s[members], s[~members], 1e-12) > eps + 1e-3
    assert over <= trials * 0.05 + 3 * math.sqrt(trials * 0.05 * 0.95)


def test_audit_refuses_bad_input():
    good = np.arange(5.0)
    for bad, match in [(np.zeros(0), "non-empty 1-D"), (np.zeros((2, 2)), "non-empty 1-D"),
                       (np.array([1.0, np.nan]), "finite")]:
        with pytest.raises(ValueError, match=match):
            pn.privacy.audit(bad, good, DELTA)
        with pytest.raises(ValueError, match=match):
            pn.privacy.audit(good, bad, DELTA)
    for delta in (0.0, 1.5, "x"):
        with pytest.raises(ValueError, match="delta"):
            pn.privacy.audit(good, good, delta)
    for confidence in (0.0, 1.0, True):
        with pytest.raises(ValueError, match="confidence"):
            pn.privacy.audit(good, good, DELTA, confidence)
    with pytest.raises(ValueError, match="delta"):
        pn.privacy.audit(good, good, True)
    with pytest.raises(ValueError, match="thresholds"):
        pn.privacy.audit(good, good, DELTA, thresholds="best")


# ---------------------------------------------------------------- canaries


def _digits(n=1024):
    """sklearn's digits in [0, 1], with 64 more inputs that are zero in every example: their first-layer
    weights get no gradient from the data, so Dirac canaries there see only themselves and the noise."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data[:n] / 16.0).astype(np.float32)
    return jnp.asarray(np.concatenate([x, np.zeros_like(x)], axis=1)), jnp.asarray(d.target[:n].astype(np.int32))


def _mlp(first=None):
    return pn.Sequential([first or pn.Dense(128), pn.ReLU(), pn.Dense(10), pn.Softmax()])


def _quiet(params):
    """The first-layer weights of the always-zero inputs."""
    where = jax.tree_util.tree_map(lambda p: np.zeros(p.shape, bool), params)
    where[0]["W"][64:] = True
    return where


def test_canaries_are_placed_projected_and_inserted_exactly():
    net = _mlp()
    params, state = pn.init(net, jax.random.key(0), (128,))
    c = pn.privacy.gradient_canaries(params, 300, jax.random.key(1), sample_rate=0.5, net=net, where=_quiet(params))
    assert c.count == 300 and set(np.unique(c.leaf)) == {0} and np.all(c.entry >= 64 * 128)  # rows 64..127 of W
    assert len({(int(a), int(b)) for a, b in zip(c.leaf, c.entry)}) == 300  # distinct entries
    assert 100 < c.members.sum() < 200
    marks = jnp.asarray((np.random.default_rng(0).random(300) < 0.5) & c.members, jnp.float32)
    g = c.gradient(marks, 2.0, params)
    np.testing.assert_array_equal(np.asarray(c.project(g)), 2.0 * np.asarray(marks))
    assert float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree_util.tree_leaves(g))) == pytest.approx(2.0 * marks.sum())
    # only members ever join, each at the sample rate
    joined = np.stack([np.asarray(c.marks(jax.random.key(i))) for i in range(200)])
    assert joined[:, ~c.members].sum() == 0
    np.testing.assert_allclose(joined[:, c.members].mean(), 0.5, atol=0.02)
    # inside DP-SGD's gradient (no noise): the clipped mean plus C marks / B at the canaries' entries
    x, y = _digits(64)
    weight = jnp.ones(64)
    kw = dict(clip_norm=1.0, weight=weight, expected_batch_size=32.0)
    _, plain, _ = pn.clipped_value_and_grad(net, params, state, x, y, **kw)
    _, with_canaries, _ = pn.clipped_value_and_grad(net, params, state, x, y, canaries=c, canary_marks=marks, **kw)
    np.testing.assert_allclose(np.asarray(c.project(with_canaries) - c.project(plain)), np.asarray(marks) / 32.0,
                               atol=1e-6)


def test_canaries_refuse_what_would_audit_another_mechanism():
    net = _mlp()
    params, _ = pn.init(net, jax.random.key(0), (128,))
    x, y = _digits(128)
    with pytest.raises(ValueError, match="allowed trainable parameter entries"):
        pn.privacy.gradient_canaries(params, 10_000, jax.random.key(1), 0.5, where=_quiet(params))
    with pytest.raises(ValueError, match="bool arrays"):
        pn.privacy.gradient_canaries(params, 10, jax.random.key(1), 0.5, where=[np.ones(3, bool)])
    with pytest.raises(ValueError, match="bool arrays"):  # a float mask is not read as "nonzero = allowed"
        pn.privacy.gradient_canaries(params, 10, jax.random.key(1), 0.5,
                                     where=jax.tree_util.tree_map(lambda p: np.full(p.shape, 0.5), params))
    c = pn.privacy.gradient_canaries(params, 10, jax.random.key(1), 0.25)
    with pytest.raises(ValueError, match="sampling='poisson'"):
        pn.DPSGD(1.0, 1.0, sampling="shuffle", canaries=c)
    with pytest.raises(TypeError, match="gradient_canaries"):
        pn.DPSGD(1.0, 1.0, canaries=object())
    with pytest.raises(ValueError, match=r"q = batch_size / n = 64 / 128 = 0.5"):
        pn.fit(net, pn.optim.chain(c.observe(), pn.optim.sgd(0.1)), (x, y), key=jax.random.key(2), epochs=1, batch_size=64,
               dp=pn.DPSGD(1.0, 1.0, canaries=c))
    with pytest.raises(ValueError, match="no canary observations"):
        c.scores(pn.optim.sgd(0.1).init(params))
    with pytest.raises(ValueError, match="leaf shapes"):
        c.project({"W": jnp.zeros(3)})
    with pytest.raises(ValueError, match="statistic"):
        c.scores(pn.optim.chain(c.observe(), pn.optim.sgd(0.1)).init(params), "median")
    other = pn.privacy.gradient_canaries(params, 10, jax.random.key(9), 0.25)
    with pytest.raises(ValueError, match="other canaries"):
        c.scores(pn.optim.chain(other.observe(), pn.optim.sgd(0.1)).init(params))
    with pytest.warns(UserWarning, match="no observer"):  # a run whose canaries nobody records
        pn.fit(net, pn.optim.sgd(0.1), (x, y), key=jax.random.key(2), epochs=1, batch_size=32,
               dp=pn.DPSGD(1.0, 1.0, canaries=c))
    state = pn.init(net, jax.random.key(0), (128,))[1]
    kw = dict(clip_norm=1.0, weight=jnp.ones(128), expected_batch_size=32.0, canaries=c)
    bad = np.zeros(10, np.float32)
    bad[np.flatnonzero(~c.members)[0]] = 1.0
    with pytest.raises(ValueError, match="non-member"):
        pn.clipped_value_and_grad(net, params, state, x, y, canary_marks=jnp.asarray(bad), **kw)
    with pytest.raises(ValueError, match="0/1"):
        pn.clipped_value_and_grad(net, params, state, x, y, canary_marks=jnp.full(10, 0.5), **kw)
    frozen = pn.Sequential([pn.Frozen(pn.Dense(128)), pn.ReLU(), pn.Dense(10), pn.Softmax()])
    with pytest.raises(ValueError, match="frozen parameters"):  # no noise there: the canary would be released bare
        on_frozen = pn.privacy.gradient_canaries(params, 10, jax.random.key(1), 0.25,
                                                 where=_quiet(params))  # no net=: the first layer's weights
        pn.clipped_value_and_grad(frozen, params, state, x, y, canaries=on_frozen,
                                  canary_marks=on_frozen.marks(jax.random.key(0)), clip_norm=1.0,
                                  weight=jnp.ones(128), expected_batch_size=32.0)


def _white_box_fit(sigma, seed, m=2000, steps=20):
    """One full-batch DP-SGD run through `fit` with m Dirac canaries; the audit of the sum statistic."""
    x, y = _digits()
    net = _mlp()
    params, state = pn.init(net, jax.random.key(0), (128,))
    c = pn.privacy.gradient_canaries(params, m, jax.random.key(seed), sample_rate=1.0, net=net, where=_quiet(params))
    opt = pn.optim.chain(c.observe(), pn.optim.sgd(0.5))
    run = pn.fit(net, opt, (x, y), key=jax.random.key(100 + seed), epochs=steps, batch_size=x.shape[0],
                 params=params, state=state, dp=pn.DPSGD(1.0, sigma, canaries=c))
    scores = c.scores(run.opt_state)
    return pn.privacy.audit(*scores, DELTA), run, scores


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("claimed", [1, 2, 4, 8])
def test_the_correct_mechanism_audits_below_every_claim(claimed, seed):
    """Full-batch DP-SGD (q = 1, 20 steps) is the Gaussian mechanism composed: its trade-off curve is
    Gaussian, so both bounds apply, and neither may exceed the accountant's epsilon."""
    sigma = pn.privacy.noise_multiplier_for(claimed, DELTA, 1.0, 20)
    result, run, (s_in, s_out) = _white_box_fit(sigma, 10 * claimed + seed)
    assert run.history["epsilon"][-1] <= claimed * 1.001
    assert result.epsilon < claimed and result.epsilon_fdp < claimed
    # the canaries are in at the scale the accountant assumes: a member's score is 20 steps of C / B more
    # than a non-member's (B = 1024), to four standard errors of the two means (noise sigma C / B a step)
    spread = math.sqrt(20) * sigma / 1024 * math.sqrt(1 / s_in.size + 1 / s_out.size)
    assert abs(s_in.mean() - s_out.mean() - 20 / 1024) < 4 * spread


@pytest.mark.parametrize("seed", SEEDS)
def test_noise_a_third_of_what_the_accountant_was_told_is_caught(seed):
    claimed = 4.0
    sigma = pn.privacy.noise_multiplier_for(claimed, DELTA, 1.0, 20)
    correct = _white_box_fit(sigma, seed)[0]
    broken = _white_box_fit(sigma / 3, seed)[0]
    assert correct.epsilon_fdp < claimed < broken.epsilon_fdp


def _poisson_run(net, grad_fn, opt, x, y, params, state, epochs, batch, key):
    step = pn.make_step(grad_fn, opt)
    epoch = jax.jit(lambda ts, k: run_poisson_epoch(step, ts, x, y, k, batch)[0])
    ts = pn.training.init_run(net, opt, x, key, params, state)
    for _ in range(epochs):
        ts = epoch(ts, key)
    return ts.opt_state


@pytest.mark.parametrize("seed", SEEDS)
def test_a_noise_key_reused_across_steps_is_caught(seed):
    """The same noise every step cancels out of the differences between steps: the variance of a canary's
    entry over the steps is then its sampling alone, zero for non-members."""
    claimed, q, steps = 2.0, 0.5, 20
    x, y = _digits()
    net = _mlp()
    params, state = pn.init(net, jax.random.key(0), (128,))
    batch = int(q * x.shape[0])
    sigma = pn.privacy.noise_multiplier_for(claimed, DELTA, q, steps)
    c = pn.privacy.gradient_canaries(params, 2000, jax.random.key(seed), sample_rate=q, net=net, where=_quiet(params))
    dp = pn.DPSGD(1.0, sigma, canaries=c)
    fixed = jax.random.key(1000 + seed)

    def reused_key(params, state, x, y, key, weight=None):
        k_forward, _, k_canary = jax.random.split(key, 3)
        return pn.clipped_value_and_grad(net, params, state, x, y, clip_norm=1.0, noise_multiplier=sigma,
                                         noise_key=fixed, train=True, key=k_forward, weight=weight,
                                         expected_batch_size=batch, canaries=c, canary_marks=c.marks(k_canary))

    found = {}
    for name, fn in [("correct", pn.training.dp_sgd(net, dp, expected_batch_size=batch)),
                     ("reused", pn.training.GradFn(reused_key, takes={"weight"}))]:
        opt = pn.optim.chain(c.observe(), pn.optim.sgd(0.5))
        state_out = _poisson_run(net, fn, opt, x, y, params, state, steps * batch // x.shape[0], batch,
                                 jax.random.key(100 + seed))
        found[name] = pn.privacy.audit(*c.scores(state_out, "variance"), DELTA)
    assert found["correct"].epsilon < claimed < found["reused"].epsilon


class _UnclippedDense(pn.Dense):
    """A Dense whose one-pass clipping fast path forgets the clip factor (it keeps the Poisson marks):
    its gradient enters the sum unclipped, and its norm is not counted."""

    def sq_norms_and_weighted_sum(self, params, x, dy):
        sq, dx, _ = pn.layers.base.sq_norms_and_weighted_sum(pn.Dense(self.features), params, x, dy)
        marked = lambda w: self.backward(params, x, scale_rows((w > 0).astype(dy.dtype), dy))[0]  # noqa: E731
        return jnp.zeros_like(sq), dx, marked


@pytest.mark.parametrize("seed", SEEDS)
def test_clipping_skipped_on_one_layer_is_caught_by_black_box_canaries(seed):
    """1,000 out-of-distribution canaries (large inputs on the always-zero features, random labels), each
    in the training set with probability 1/2, scored by their loss under the final model."""
    claimed, steps, m = 1.0, 20, 1000
    x, y = _digits()
    rng = np.random.default_rng(seed)
    canary_x = np.zeros((m, 128), np.float32)
    canary_x[:, 64:] = 100 * rng.normal(size=(m, 64)) / 8
    canary_y = rng.integers(0, 10, m).astype(np.int32)
    xt, yt, members = pn.privacy.insert_canaries(x, y, canary_x, canary_y, jax.random.key(seed))
    assert xt.shape[0] == x.shape[0] + members.sum()
    sigma = pn.privacy.noise_multiplier_for(claimed, DELTA, 1.0, steps)
    found = {}
    for name, first in [("correct", pn.Dense(128)), ("unclipped", _UnclippedDense(128))]:
        net = _mlp(first)
        params, state = pn.init(net, jax.random.key(0), (128,))
        run = pn.fit(net, pn.optim.sgd(0.5), (xt, yt), key=jax.random.key(100 + seed), epochs=steps, batch_size=xt.shape[0],
                     params=params, state=state, dp=pn.DPSGD(1.0, sigma))
        found[name] = pn.privacy.audit(*pn.privacy.loss_scores(net, run.params, run.state, canary_x, canary_y,
                                                               members), DELTA)
    assert found["correct"].epsilon < claimed < found["unclipped"].epsilon


@pytest.mark.parametrize("seed", SEEDS)
def test_a_batch_normalised_by_its_realised_size_is_caught(seed):
    """Nasr et al. (2021)'s worst case, run 20,000 times (a fair coin each run for the canary): one example
    whose clipped gradient is +C and a canary whose clipped gradient is -C, full-batch Poisson (q = 1) with
    expected batch size 2. Divided by 2, the canary shifts the release by C/2 under noise sigma C/2 (what
    the accountant analyses). Divided by the realised size, a run without it releases N(C, (sigma C)^2) and
    one with it N(0, (sigma C / 2)^2): far-out releases betray its absence. DP's add-or-remove relation is
    symmetric, so guessing "out" is audited as guessing "in" is."""
    claimed, runs = 1.0, 20_000
    sigma = pn.privacy.noise_multiplier_for(claimed, DELTA, 1.0, 1)
    net = pn.Dense(1, use_bias=False)
    params, state = pn.init(net, jax.random.key(0), (1,))
    params = jax.tree_util.tree_map(jnp.zeros_like, params)
    x, y = jnp.ones((2, 1)), jnp.array([[-10.0], [10.0]])  # gradients +20 and -20, clipped to +C and -C

    def release(key, member, realised):
        weight = jnp.stack([jnp.ones(()), member])
        _, g, _ = pn.clipped_value_and_grad(net, params, state, x, y, clip_norm=1.0, noise_multiplier=sigma,
                                            noise_key=key, loss="mse", weight=weight,
                                            expected_batch_size=jnp.sum(weight) if realised else 2.0)
        return g["W"][0, 0]

    members = np.random.default_rng(seed).random(runs) < 0.5
    keys = jax.random.split(jax.random.key(100 + seed), runs)
    found = {}
    for realised in (False, True):
        g = np.asarray(jax.jit(jax.vmap(lambda k, b: release(k, b, realised)))(keys, jnp.asarray(members, float)))
        s = np.abs(g)  # a release far from 0: guess the canary was out
        found[realised] = pn.privacy.audit(s[~members], s[members], DELTA)
    assert found[False].epsilon < claimed < found[True].epsilon
    assert found[False].epsilon_fdp < claimed < found[True].epsilon_fdp



@pytest.mark.parametrize("k", [1, 37, 250])
def test_guesses_fixed_before_the_run_equal_jax_privacys_explicit_threshold(k):
    from jax_privacy.auditing import CanaryScoreAuditor, Explicit

    s_in, s_out = _synthetic(1000, 1.5, 5)
    t = np.sort(np.concatenate([s_in, s_out]))[::-1][k - 1]
    reference = CanaryScoreAuditor(s_in, s_out)
    result = pn.privacy.audit(s_in, s_out, DELTA, guesses=k)
    np.testing.assert_allclose(result.epsilon, reference.epsilon_one_run(0.05, DELTA, threshold_strategy=Explicit(t)),
                               atol=1e-5)
    np.testing.assert_allclose(result.epsilon_fdp, reference.epsilon_one_run_fdp(
        0.05, DELTA, threshold_strategy=Explicit(t)), atol=1e-5)
    for bad in (0, 1001, 2.0, True):
        with pytest.raises(ValueError, match="guesses"):
            pn.privacy.audit(s_in, s_out, DELTA, guesses=bad)


def test_guesses_count_every_score_tied_with_the_kth():
    s_in, s_out = np.array([3.0, 2.0, 2.0, 1.0]), np.array([2.0, 0.0])
    assert audit_module._top(s_in, s_out, 2) == (4, 3)  # the 2nd highest is 2.0: four canaries score >= 2
    assert audit_module._top(s_in, s_out, 1) == (1, 1)


def test_micro_batches_and_chunks_insert_the_canaries_once():
    """DP-SGD run as k micro-batches (or in chunks) clips them one after another and adds the canaries and
    the noise once, to the whole batch's sum: the same gradient as one pass."""
    net = _mlp()
    params, state = pn.init(net, jax.random.key(0), (128,))
    x, y = _digits(64)
    c = pn.privacy.gradient_canaries(params, 200, jax.random.key(1), sample_rate=0.5, net=net, where=_quiet(params))
    dp = pn.DPSGD(1.0, 0.7, canaries=c)
    whole = pn.training.dp_sgd(net, dp, expected_batch_size=32)
    args = (params, state, x, y, jax.random.key(3))
    _, reference, _ = whole(*args, weight=jnp.ones(64))
    for fn in (pn.accumulate(whole, 4), pn.training.dp_sgd(net, pn.DPSGD(1.0, 0.7, chunk_size=16, canaries=c),
                                                           expected_batch_size=32)):
        _, grads, _ = fn(*args, weight=jnp.ones(64))
        np.testing.assert_allclose(np.asarray(c.project(grads)), np.asarray(c.project(reference)), atol=1e-6)


def test_a_resumed_run_observes_its_canaries_as_the_uninterrupted_run(tmp_path):
    """The observer's slot is optimizer state: a fit checkpoint keeps it, and a resumed run's scores are
    the uninterrupted run's."""
    x, y = _digits(256)
    net = _mlp()
    params, state = pn.init(net, jax.random.key(0), (128,))
    c = pn.privacy.gradient_canaries(params, 50, jax.random.key(1), sample_rate=64 / 256, net=net)
    opt = pn.optim.chain(c.observe(), pn.optim.sgd(0.1))
    kw = dict(key=jax.random.key(2), batch_size=64, params=params, state=state, dp=pn.DPSGD(1.0, 1.0, canaries=c))
    whole = pn.fit(net, opt, (x, y), epochs=2, **kw)
    path = str(tmp_path / "run.ckpt")
    pn.fit(net, opt, (x, y), epochs=1, checkpoint=path, **kw)
    resumed = pn.fit(net, opt, (x, y), epochs=2, checkpoint=path, resume=True, **kw)
    for a, b in zip(c.scores(whole.opt_state), c.scores(resumed.opt_state)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert int(pn.optim.find_slot(resumed.opt_state, pn.privacy.CanaryObservations).steps) == 2 * 256 // 64
