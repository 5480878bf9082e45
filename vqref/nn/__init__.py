"""The tiny neural-network kit of the demo and the training notebook: forward/backward pairs
(:mod:`vqref.nn.functional`), the layers built from them (:mod:`vqref.nn.layers`), the
optimizers that update them (:mod:`vqref.nn.optim`) and the VQ-VAE (:mod:`vqref.nn.vqvae`); for
images, convolutions by im2col (:mod:`vqref.nn.conv`), their layers (:mod:`vqref.nn.conv_layers`)
and the convolutional VQ-VAE with a grid of spatial tokens (:mod:`vqref.nn.conv_vqvae`).
"""

from ..params import NamedArrays
from .conv import (
    col2im,
    conv2d_backward,
    conv2d_forward,
    conv_transpose2d_backward,
    conv_transpose2d_forward,
    im2col,
)
from .conv_layers import Conv2d, ConvNet, ConvTranspose2d
from .conv_vqvae import ConvVQVAE
from .functional import (
    ACTIVATIONS,
    linear_backward,
    linear_forward,
    mse_loss_backward,
    mse_loss_forward,
    relu_backward,
    relu_forward,
    tanh_backward,
    tanh_forward,
)
from .layers import MLP, Linear
from .optim import SGD, Adam, Optimizer
from .vqvae import VQVAE, VQVAELosses

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "Linear",
    "NamedArrays",
    "linear_forward",
    "linear_backward",
    "relu_forward",
    "relu_backward",
    "tanh_forward",
    "tanh_backward",
    "mse_loss_forward",
    "mse_loss_backward",
    "Optimizer",
    "SGD",
    "Adam",
    "VQVAE",
    "VQVAELosses",
    "im2col",
    "col2im",
    "conv2d_forward",
    "conv2d_backward",
    "conv_transpose2d_forward",
    "conv_transpose2d_backward",
    "Conv2d",
    "ConvTranspose2d",
    "ConvNet",
    "ConvVQVAE",
]
