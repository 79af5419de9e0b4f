"""Differential privacy: the accountant, Poisson sampling, and audits of the mechanism that ran.

    pn.privacy.epsilon(...), pn.privacy.noise_multiplier_for(...)    accounting.py
    pn.privacy.poisson_batch_bound(...), pn.privacy.poisson_batch(...) sampling.py
    pn.privacy.audit(in_scores, out_scores, delta)                   auditing.py
    pn.privacy.gradient_canaries(...), pn.privacy.insert_canaries(...) canaries.py

    pn.DPSGD, pn.clipped_value_and_grad                              clipping.py
    pn.noise.add_gaussian(...)                                        noise.py
"""
from purenet.privacy.accounting import ACCOUNTANTS, epsilon, epsilon_of, noise_multiplier_for
from purenet.privacy.auditing import THRESHOLDS, AuditResult, audit, epsilon_one_run, guess_grid
from purenet.privacy.canaries import (CanaryObservations, GradientCanaries, gradient_canaries, insert_canaries,
                                      loss_scores)
from purenet.privacy.sampling import OVERFLOW_PROBABILITY, PoissonBatch, poisson_batch, poisson_batch_bound

__all__ = [
    "ACCOUNTANTS", "AuditResult", "CanaryObservations", "GradientCanaries", "OVERFLOW_PROBABILITY", "PoissonBatch",
    "THRESHOLDS", "audit", "epsilon", "epsilon_of", "epsilon_one_run", "gradient_canaries", "guess_grid", "insert_canaries", "loss_scores",
    "noise_multiplier_for", "poisson_batch", "poisson_batch_bound",
]
