"""Layers: frozen configs with pure init / forward / backward."""
from purenet.layers.activations import Identity, LeakyReLU, ReLU, Sigmoid, Tanh
from purenet.layers.base import Elementwise
from purenet.layers.batchnorm import BatchNorm
from purenet.layers.dense import Dense
from purenet.layers.dropout import Dropout
from purenet.layers.sequential import Sequential, mlp
from purenet.layers.softmax import Softmax

__all__ = [
    "BatchNorm", "Dense", "Dropout", "Elementwise", "Identity", "LeakyReLU",
    "ReLU", "Sequential", "Sigmoid", "Softmax", "Tanh", "mlp",
]
