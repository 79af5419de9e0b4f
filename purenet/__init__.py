"""purenet: neural networks as pure JAX functions with handwritten, verified gradients."""
from purenet import distributed, initializers, losses, metrics, optim, xla_flags
from purenet.analysis import (attribution, curvature, diagnostics, influence, interop, learning_rules, per_example,
                              stats)
from purenet.data import augment, datasets, shuffle
from purenet.io import checkpoint, compile_cache
from purenet.io.checkpoint import CheckpointError, load, save
from purenet.io.compile_cache import enable_compilation_cache
from purenet.layers import (
    ELU, GELU, AvgPool2D, BatchNorm, Conv2D, Dense, Frozen, GlobalAvgPool2D, MaxPool2D, Dropout, Elementwise, Flatten,
    Identity, LayerNorm, LeakyReLU, Parallel, ReLU, Remat, Residual, RMSNorm, Sequential, SiLU, Sigmoid, Softmax,
    Softplus, Tanh, mlp, Embedding, MultiHeadAttention, PositionalEmbedding, SwiGLU,
)
from purenet.layers import GRU, LSTM
from purenet.layers import Conv1D, ConvTranspose2D, GroupNorm, Upsample2D
from purenet.layers.base import Container, Layer, Static, Wrapper
from purenet.layers.roles import decay_mask, roles
from purenet.losses import Loss
from purenet._checks import check_finite_rows
from purenet import analysis, data, io, models
from purenet.models import GPT, LLaMA, generate, gpt, llama
from purenet.analysis.interop import as_function, ggn_vp, hvp
from purenet.analysis.capture import BackwardRule, Record, capture, hooked, layer_paths
from purenet.network import forward, init, input_grad, loss, value_and_grad
from purenet.optim import schedules
from purenet.analysis.per_example import per_example_grad_norms, per_example_grads
from purenet.privacy.clipping import DPSGD, clipped_value_and_grad
from purenet.testing import check_grads
from purenet import training
from purenet import privacy
from purenet.io import weights
from purenet.privacy import noise
from purenet.io.weights import WeightsError
from purenet.training import (EarlyStopping, FitResult, Precision, SweepResult, TrainState, accumulate, fit, grad_fn,
                              make_step, sweep, train, train_epoch)

__version__ = "0.1.0"

__all__ = [
    # layers and containers
    "GRU", "LSTM",
    "AvgPool2D", "BatchNorm", "Container", "Conv2D", "Dense", "Dropout", "ELU", "Elementwise", "Embedding", "Flatten",
    "Frozen", "GELU", "GPT", "GlobalAvgPool2D", "LLaMA", "Identity", "Layer", "LayerNorm", "LeakyReLU", "MaxPool2D",
    "MultiHeadAttention", "Parallel", "PositionalEmbedding", "RMSNorm", "ReLU", "Remat", "Residual", "Sequential",
    "SiLU", "Sigmoid", "Softmax", "Softplus", "Static", "SwiGLU", "Tanh", "Wrapper", "gpt", "llama", "mlp",
    "Conv1D", "ConvTranspose2D", "GroupNorm", "Upsample2D",
    # network functions, roles, per-example and interop
    "Loss", "as_function", "check_finite_rows", "check_grads", "clipped_value_and_grad", "decay_mask", "forward",
    "generate", "ggn_vp", "hvp", "init", "input_grad", "loss", "per_example_grad_norms", "per_example_grads", "roles",
    "value_and_grad", "DPSGD",
    # every layer's activations and gradients, hooks on the backward
    "BackwardRule", "Record", "capture", "hooked", "layer_paths",
    # training
    "EarlyStopping", "FitResult", "Precision", "SweepResult", "TrainState", "accumulate", "fit", "grad_fn",
    "make_step", "sweep", "train", "train_epoch",
    # modules and checkpoints
    "CheckpointError", "attribution", "augment", "checkpoint", "compile_cache", "datasets", "diagnostics", "distributed",
    "enable_compilation_cache", "influence", "initializers", "interop", "learning_rules", "load", "losses", "metrics",
    "optim", "save",
    "schedules", "shuffle", "stats", "training", "xla_flags",
    # the packages behind them: the traversal's analyses, data, weights and runs in and out, models
    "analysis", "data", "io", "models",
    # weights in and out (safetensors, nanoGPT, PyTorch state_dicts)
    "WeightsError", "weights",
    # differential privacy's accounting and its noise
    "noise", "privacy",
]
