"""The analyses: visitors of the traversal that read the same caches and output gradients as the
handwritten backward.

    pn.per_example_grads, pn.per_example_grad_norms   per_example.py: each example's gradient or its norm
    pn.stats                                          stats.py: diagonals (Fisher, GGN), K-FAC factors,
                                                      gradient Gram, noise scale
    pn.analysis.curvature                             curvature.py: per-column walks for exact curvature
    pn.diagnostics                                    diagnostics.py: per-layer norms while training
    pn.as_function, pn.hvp, pn.ggn_vp                 interop.py: the backward inside jax.grad (the one
                                                      module allowed custom_vjp and jvp)
    pn.capture, pn.hooked                             capture.py: every layer's input, output and gradients
                                                      from one pass; hooks that change the backward
    pn.learning_rules                                 learning_rules.py: feedback alignment, sign symmetry,
                                                      direct feedback alignment (feedback other than W^T)
    pn.influence                                      influence.py: influence functions (identity, diagonal,
                                                      K-FAC, EK-FAC), kronfluence's conventions
    pn.attribution                                    attribution.py: saliency, integrated gradients,
                                                      Grad-CAM, attention heads (Captum's conventions)
"""
from purenet.analysis import curvature, per_example, stats, diagnostics, interop  # noqa: I001 (dependency order)
from purenet.analysis import influence  # after curvature and kfac, which it reads
from purenet.analysis import capture
from purenet.analysis import attribution  # on capture
from purenet.analysis import learning_rules  # after capture, whose taps it sees through

__all__ = ["attribution", "capture", "curvature", "diagnostics", "influence", "interop", "learning_rules",
           "per_example", "stats"]
