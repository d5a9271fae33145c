"""xpconv: the convolutional-network stack of *Deep Learning from Scratch* over any
array namespace (NumPy, CuPy, array-api-strict, PyTorch).

    >>> from xpconv.models import SimpleConvNet
    >>> net = SimpleConvNet(xp="numpy", seed=0)          # or xp="cupy" on a GPU
"""

from . import backend, layers, ops, optim, specs  # specs registers the "spec" model checkpoints rebuild
from ._version import __version__
from .backend import get_namespace, namespace_of, resolve_device
from .layers import (
    Affine,
    AvgPooling,
    BatchNormalization,
    Convolution,
    Dropout,
    Pooling,
    Relu,
    Sigmoid,
    SoftmaxWithLoss,
)
from .models import DeepConvNet, Sequential, SimpleConvNet, TwoLayerNet
from .ops import col2im, im2col

__all__ = [
    "__version__",
    "Affine",
    "AvgPooling",
    "BatchNormalization",
    "Convolution",
    "DeepConvNet",
    "Dropout",
    "Pooling",
    "Relu",
    "Sequential",
    "Sigmoid",
    "SimpleConvNet",
    "SoftmaxWithLoss",
    "TwoLayerNet",
    "backend",
    "col2im",
    "get_namespace",
    "im2col",
    "layers",
    "namespace_of",
    "ops",
    "optim",
    "resolve_device",
    "specs",
]
