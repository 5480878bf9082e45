"""JAX references for the convolutions of :mod:`vqref.nn.conv`, the stack of them and the
convolutional VQ-VAE.

Symbols: N images, Hi x Wi input pixels with C (or Cin) channels, F (or Cout) output channels,
a kernel of kh x kw taps, stride s, padding p, output_padding a; channels last, ``(N, H, W, C)``;
d token dim, T tokens per image; ``sg[.]`` is ``jax.lax.stop_gradient``.

    conv2d            y[n, u, v, f] = b[f] + sum_{i,j,c} W[i, j, c, f] xpad[n, us + i, vs + j, c]
                      W (kh, kw, C, F): XLA's "HWIO" kernel layout, run by ``lax.conv_general_dilated``
    conv_transpose2d  the adjoint of conv2d in its input (Dumoulin & Visin, arXiv 1603.07285, section 4):
                      a convolution of the input dilated by s (s - 1 zeros between pixels), padded by
                      kh - 1 - p (plus a at the bottom and right), with the kernel flipped in space
                      and its channel axes swapped, ``K[i, j, ci, co] = W[ci, kh-1-i, kw-1-j, co]``

vqref computes both by im2col / col2im (a patch matrix and its adjoint); these are XLA's
convolutions, a different program for the same sums.  The VQ-VAE (van den Oord et al.,
arXiv 1711.00937, section 4.1, without residual blocks)::

    encoder   conv 4x4 /2 p1, relu, conv 4x4 /2 p1, relu, conv 1x1
    tokens    (N, H/4, W/4, d) as (N T, d)      quantizer with the codes held fixed
    decoder   conv 1x1, relu, convT 4x4 x2 p1, relu, convT 4x4 x2 p1
    total     mse(recon, sg[x]) + sum of the quantizer's losses
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from jax import lax

from .nn import mse_loss, relu
from .residual import residual_vq
from .vq import vq_layer

__all__ = ["conv2d", "conv_transpose2d", "convnet", "conv_vqvae", "ENCODER", "DECODER"]

_LAYOUT = ("NHWC", "HWIO", "NHWC")

# (kind, stride, padding) of the VQ-VAE's layers
ENCODER = (("conv", 2, 1), ("conv", 2, 1), ("conv", 1, 0))
DECODER = (("conv", 1, 0), ("transpose", 2, 1), ("transpose", 2, 1))


def conv2d(x, W, b=None, *, stride: int = 1, padding: int = 0):
    """``(N, Hi, Wi, C) -> (N, Ho, Wo, F)`` with ``W (kh, kw, C, F)`` and ``b (F,)`` or None."""
    y = lax.conv_general_dilated(
        x, W, window_strides=(stride, stride), padding=[(padding, padding)] * 2, dimension_numbers=_LAYOUT
    )
    return y if b is None else y + b


def conv_transpose2d(x, W, b=None, *, stride: int = 1, padding: int = 0, output_padding: int = 0):
    """``(N, Hi, Wi, Cin) -> (N, Ho, Wo, Cout)``, ``Ho = (Hi - 1)s - 2p + kh + a``, ``W (Cin, kh, kw, Cout)``."""
    _, kh, kw, _ = W.shape
    K = jnp.transpose(W[:, ::-1, ::-1, :], (1, 2, 0, 3))  # (kh, kw, Cin, Cout) flipped in space
    pads = [
        (kh - 1 - padding, kh - 1 - padding + output_padding),
        (kw - 1 - padding, kw - 1 - padding + output_padding),
    ]
    y = lax.conv_general_dilated(
        x, K, window_strides=(1, 1), padding=pads, lhs_dilation=(stride, stride), dimension_numbers=_LAYOUT
    )
    return y if b is None else y + b


def convnet(x, params: Sequence, layers: Sequence):
    """Convolutions with a ReLU after each but the last.

    ``params = [W_0, b_0, W_1, b_1, ...]``; ``layers[i] = (kind, stride, padding)`` or
    ``(kind, stride, padding, output_padding)`` with kind ``"conv"`` or ``"transpose"``.
    """
    h = x
    for i, spec in enumerate(layers):
        kind, s, p = spec[:3]
        W, b = params[2 * i], params[2 * i + 1]
        if kind == "conv":
            h = conv2d(h, W, b, stride=s, padding=p)
        else:
            h = conv_transpose2d(h, W, b, stride=s, padding=p, output_padding=spec[3] if len(spec) > 3 else 0)
        if i < len(layers) - 1:
            h = relu(h)
    return h


def conv_vqvae(x, encoder: Sequence, decoder: Sequence, codebooks: Sequence, indices, *, residual=False, **options):
    """``(recon (N, H, W, C), total ())`` of the convolutional VQ-VAE with the codes held fixed.

    Parameters
    ----------
    x : (N, H, W, C) images (data: no gradient through the reconstruction target)
    encoder, decoder : ``[W_0, b_0, W_1, b_1, W_2, b_2]`` of the two stacks (:data:`ENCODER`,
        :data:`DECODER`)
    codebooks : one (K, d) array, or Q of them with ``residual`` (one for a shared codebook)
    indices : (N, H', W') int, or (N, H', W', Q) with ``residual``
    options : the quantizer's options (:func:`vqref.testing.jax_reference.vq.vq_layer`;
        ``routing`` too with ``residual``)
    """
    z = convnet(x, encoder, ENCODER)  # (N, H', W', d)
    N, Hg, Wg, d = z.shape
    tokens = jnp.reshape(z, (N * Hg * Wg, d))  # (N T, d), row-major over the grid
    if residual:
        zq, losses = residual_vq(tokens, codebooks, jnp.reshape(jnp.asarray(indices), (N * Hg * Wg, -1)), **options)
        vq_total = jnp.sum(losses)
    else:
        zq, vq_total = vq_layer(tokens, codebooks[0], jnp.reshape(jnp.asarray(indices), (-1,)), **options)
    recon = convnet(jnp.reshape(zq, (N, Hg, Wg, d)), decoder, DECODER)  # (N, H, W, C)
    return recon, mse_loss(recon, x) + vq_total
