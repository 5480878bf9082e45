"""JAX reference for the l2 normalisation behind cosine-similarity codebooks (ViT-VQGAN, arXiv 2110.04627).

Symbols: N vectors, D features (the last axis; leading axes are more rows).

The map, with the clamp of ``torch.nn.functional.normalize`` that vector-quantize-pytorch uses:

    y = x / s(x),        s(x) = ||x||  if ||x|| >= eps,   eps otherwise

Written so that JAX's derivative is the one of this formula everywhere, boundary included:

* the clamp is a ``where`` on ``||x|| >= eps`` (not ``jnp.maximum``, whose derivative at a tie
  splits the gradient in halves): at ``||x|| = eps`` exactly the norm branch applies;
* the norm is ``sqrt`` of a sum of squares that is replaced by 1 on zero rows before the square
  root.  Without that, the derivative of ``sqrt`` at 0 is infinite, and the ``where`` that
  discards the branch still multiplies its zero cotangent by that infinity, giving NaN.  On a
  zero row the map is ``x / eps`` and its derivative ``dy / eps``, as the formula says.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["l2norm"]


def l2norm(x, *, eps: float = 1e-6):
    """``x / max(||x||, eps)`` row by row (the norm branch at equality); JAX in, JAX out.

    Parameters
    ----------
    x : (N, D) or (..., D) float
    eps : the smallest divisor

    Returns
    -------
    y : the shape of ``x``
    """
    sq = jnp.sum(x * x, axis=-1, keepdims=True)  # (N, 1) ||x||^2
    nonzero = sq > 0  # (N, 1)
    norm = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)  # (N, 1) ||x||, NaN-free derivative
    scale = jnp.where(norm >= eps, norm, eps)  # (N, 1) the clamped divisor
    return x / scale  # (N, D)
