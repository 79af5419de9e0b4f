"""Layers: frozen configs with pure init / forward / backward."""
from purenet.layers.attention import MultiHeadAttention
from purenet.layers.activations import ACTIVATIONS, ELU, GELU, Identity, LeakyReLU, ReLU, SiLU, Sigmoid, Softplus, Tanh
from purenet.layers.base import Elementwise, Layer, ParameterFree
from purenet.layers.batchnorm import BatchNorm
from purenet.layers.compose import Flatten, Frozen, Parallel, Remat, Residual
from purenet.layers.conv import AvgPool2D, Conv1D, Conv2D, GlobalAvgPool2D, MaxPool2D
from purenet.layers.dense import Dense
from purenet.layers.dropout import Dropout
from purenet.layers.embedding import Embedding, PositionalEmbedding
from purenet.layers.norm import GroupNorm, LayerNorm, RMSNorm
from purenet.layers.recurrent import GRU, LSTM
from purenet.layers.sequential import Sequential, mlp
from purenet.layers.softmax import Softmax
from purenet.layers.swiglu import SwiGLU
from purenet.layers.transposed import ConvTranspose2D, Upsample2D

__all__ = [
    "GRU", "LSTM",
    "ACTIVATIONS", "AvgPool2D", "BatchNorm", "Conv2D", "Dense", "Dropout", "ELU", "Elementwise", "Embedding",
    "Flatten", "Frozen", "GELU", "GPT", "LLaMA", "GlobalAvgPool2D", "Identity", "Layer", "LayerNorm", "LeakyReLU", "MaxPool2D",
    "MultiHeadAttention", "ParameterFree", "Parallel", "PositionalEmbedding", "RMSNorm", "ReLU", "Remat", "Residual",
    "Sequential", "SiLU", "Sigmoid", "Softmax", "Softplus", "SwiGLU", "Tanh", "gpt", "llama", "mlp",
    "Conv1D", "ConvTranspose2D", "GroupNorm", "Upsample2D",
]


_MODELS = ("GPT", "LLaMA", "gpt", "llama")


def __getattr__(name: str):
    """The models live in purenet.models (they are built from these layers); their names stay here too."""
    if name in _MODELS:
        from purenet import models
        return getattr(models, name)
    raise AttributeError(f"module 'purenet.layers' has no attribute {name!r}")
