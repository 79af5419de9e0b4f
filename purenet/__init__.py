"""purenet: neural networks as pure JAX functions with handwritten, verified gradients."""
from purenet import initializers, losses
from purenet.layers import (
    BatchNorm, Dense, Dropout, Elementwise, Identity, LeakyReLU, ReLU,
    Sequential, Sigmoid, Softmax, Tanh, mlp,
)
from purenet.network import forward, init, loss, value_and_grad
from purenet.testing import check_grads

__version__ = "0.1.0"
from purenet import optim
from purenet.optim import schedules
