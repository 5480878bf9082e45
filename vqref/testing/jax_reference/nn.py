"""JAX references for :mod:`vqref.nn`: the layers of the tiny encoder/decoder and the small VQ-VAE.

Symbols: N rows, Din/Dout features in and out, P pixels, T tokens per image, d token dim,
E = T * d latent features, Q residual depths; ``sg[.]`` is ``jax.lax.stop_gradient``.

The layers, as functions of their inputs and parameters (``W`` input-major, as vqref stores it):

    linear     y = x W + b
    relu       y = x where x > 0, else 0           (derivative 0 at x = 0, the subgradient torch uses)
    tanh       y = tanh(x)
    mse_loss   (1/M) sum (pred - sg[target])^2      (the target is data: it gets no gradient)

and the VQ-VAE of :class:`vqref.nn.VQVAE` (van den Oord et al., arXiv 1711.00937, eq. 3)::

    z = encoder(x)                 (N, E)          an MLP
    tokens = reshape(z, (N T, d))                  T tokens of d features per image
    zq, L_vq = quantizer(tokens)                   one VQ layer, or residual VQ (L_vq summed over depths)
    recon = decoder(reshape(zq, (N, E)))   (N, P)
    total = mse(recon, sg[x]) + L_vq

The relu is written with ``where``, not ``jnp.maximum(x, 0)``: JAX gives ``maximum`` the
derivative 1/2 at a tie, which is neither side's.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from .orthogonal import orthogonal_loss
from .residual import residual_vq
from .vq import vq_layer

__all__ = ["linear", "relu", "tanh", "mse_loss", "mlp", "vqvae", "autoencoder", "ACTIVATIONS"]

sg = jax.lax.stop_gradient


def linear(x, W, b):
    """``x W + b``: x (N, Din), W (Din, Dout), b (Dout,); returns (N, Dout)."""
    return x @ W + b


def relu(x):
    """``x`` where ``x > 0``, else 0 (elementwise)."""
    return jnp.where(x > 0, x, 0.0)


def tanh(x):
    """``tanh(x)`` (elementwise)."""
    return jnp.tanh(x)


ACTIVATIONS = {"relu": relu, "tanh": tanh}


def mse_loss(pred, target):
    """``(1/M) sum (pred - sg[target])^2``, M = pred.size; a 0-d array."""
    diff = pred - sg(target)  # (N, D)
    return jnp.sum(diff * diff) / diff.size


def mlp(x, params: Sequence, *, activation: str = "relu"):
    """An MLP with parameters ``[W_0, b_0, W_1, b_1, ...]``: the activation after every layer but the last."""
    if len(params) % 2:
        raise ValueError(f"mlp: expected pairs W_0, b_0, W_1, b_1, ..., got {len(params)} arrays")
    act = ACTIVATIONS[activation]
    h, L = x, len(params) // 2
    for i in range(L):
        h = linear(h, params[2 * i], params[2 * i + 1])  # (N, sizes[i + 1])
        if i < L - 1:
            h = act(h)
    return h


def vqvae(
    x,
    encoder: Sequence,
    decoder: Sequence,
    codebooks: Sequence,
    indices,
    *,
    token_dim: int,
    activation: str = "relu",
    residual: bool = False,
    routing: str = "per_depth",
    orthogonal_reg_weight: float = 0.0,
    orthogonal_codebooks: Sequence | None = None,
    **layer_options,
):
    """``(recon (N, P), total ())`` of the VQ-VAE with the codes held at ``indices``.

    Parameters
    ----------
    x : (N, P) the images (data: no gradient through the reconstruction target)
    encoder, decoder : ``[W_0, b_0, ...]`` of the two MLPs
    codebooks : one (K, d) array, or Q of them for residual VQ (one, used at every depth, when shared)
    indices : (N, T) int, or (N, T, Q) with ``residual``
    token_dim : d
    activation : ``"relu"`` or ``"tanh"``
    residual, routing : residual VQ and its gradient routing (:func:`residual_vq`)
    orthogonal_reg_weight : w; every depth adds ``w orth(C_l)``
    orthogonal_codebooks : the codebook values the regulariser is evaluated on (default
        ``codebooks``).  An EMA quantizer evaluates it after its update, on other values than
        the ones it quantized with; the term is then ``w orth(C + sg[C' - C])``: the value and
        the derivative at the held codebook C', the gradient credited to the parameter C.
    layer_options : the rest of :func:`vqref.testing.jax_reference.vq.vq_layer`'s options
    """
    N = x.shape[0]
    z = mlp(x, encoder, activation=activation)  # (N, E)
    tokens = jnp.reshape(z, (-1, token_dim))  # (N T, d)
    if residual:
        idx = jnp.reshape(jnp.asarray(indices), (tokens.shape[0], -1))  # (N T, Q)
        zq, losses = residual_vq(tokens, codebooks, idx, routing=routing, **layer_options)
        Q = idx.shape[1]
    else:
        idx = jnp.reshape(jnp.asarray(indices), (-1,))  # (N T,)
        zq, loss = vq_layer(tokens, codebooks[0], idx, **layer_options)
        losses, Q = loss[None], 1
    vq_total = jnp.sum(losses)
    if orthogonal_reg_weight > 0:
        for level in range(Q):
            C = codebooks[0] if len(codebooks) == 1 else codebooks[level]
            if orthogonal_codebooks is not None:
                held = orthogonal_codebooks[0] if len(orthogonal_codebooks) == 1 else orthogonal_codebooks[level]
                C = C + sg(held - C)  # the value of the held codebook, the gradient to C
            vq_total = vq_total + orthogonal_reg_weight * orthogonal_loss(C)
    recon = mlp(jnp.reshape(zq, (N, -1)), decoder, activation=activation)  # (N, P)
    return recon, mse_loss(recon, x) + vq_total


def autoencoder(x, encoder: Sequence, decoder: Sequence, quantize, *, token_dim: int, activation: str = "relu"):
    """``(recon (N, P), total ())`` of the VQ-VAE around any quantizer (FSQ, LFQ, ...).

    ``quantize(tokens (N T, d)) -> (zq (N T, d), loss)``, loss 0-d or one per depth (summed);
    the rest is :func:`vqvae`'s: ``total = mse(recon, sg[x]) + sum(loss)``.
    """
    N = x.shape[0]
    z = mlp(x, encoder, activation=activation)  # (N, E)
    zq, loss = quantize(jnp.reshape(z, (-1, token_dim)))  # (N T, d)
    recon = mlp(jnp.reshape(zq, (N, -1)), decoder, activation=activation)  # (N, P)
    return recon, mse_loss(recon, x) + jnp.sum(loss)
