"""Gradient checking against autodiff, and hypothesis strategies for property tests.

    checks.py       check_grads, check_per_example, compare_trees: handwritten against jax.grad
    strategies.py   net_cases, transformer_cases: random networks and their data (hypothesis)

This is the one library package that uses `jax.grad`: autodiff is the
reference that every handwritten backward is checked against.

    report = pn.check_grads(layer, x)                 # a layer: backward vs jax.grad, random cotangent
    report = pn.check_grads(net, x, y, loss="mse")    # a network: value_and_grad vs jax.grad(pn.loss)
"""
from purenet.testing.checks import (GradCheckReport, check_grads, check_per_example, compare_trees, relative_error,
                                    rms)
from purenet.testing.strategies import (ACTIVATIONS, OUTPUT_LOSSES, NetCase, TransformerCase, net_cases,
                                        transformer_block, transformer_cases)

__all__ = [
    "ACTIVATIONS", "GradCheckReport", "NetCase", "OUTPUT_LOSSES", "TransformerCase", "check_grads", "check_per_example",
    "compare_trees", "net_cases", "relative_error", "rms", "transformer_block", "transformer_cases",
]
