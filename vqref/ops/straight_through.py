"""The straight-through estimator (STE) of VQ-VAE (arXiv 1711.00937, section 3.1).

Symbols: N vectors, D features.

The quantizer's output is ``z_q = z + sg[q - z]``: its value is the selected code q, and its
Jacobian with respect to z is the identity.  So the decoder's gradient is copied to the encoder
output unchanged, as if quantization were the identity map:

    dz = dz_q          and the codebook receives nothing through this path.

This is a *surrogate* gradient, not the derivative of the forward (the true derivative of a
piecewise-constant lookup is zero almost everywhere).  Check it against an autograd
implementation written with ``.detach()``, never against finite differences.

The forward returns q itself rather than computing ``z + (q - z)``: that expression is not
bit-exactly q in floating point, and vqref promises that quantized rows *are* codebook rows.
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import Array

__all__ = ["STECache", "straight_through_forward", "straight_through_backward"]


class STECache(NamedTuple):
    pass  # the gradient is the identity: nothing to remember


def straight_through_forward(z: Array, q: Array) -> tuple[Array, STECache]:
    """Value ``q``, gradient routed to ``z``.

    Parameters
    ----------
    z : (N, D) float, encoder outputs (where the gradient goes)
    q : (N, D) float, selected codes (the value)

    Returns
    -------
    z_q : (N, D), equal to ``q`` bit for bit
    cache : STECache()
    """
    if tuple(z.shape) != tuple(q.shape):
        raise ValueError(f"straight_through_forward: shapes differ, {tuple(z.shape)} vs {tuple(q.shape)}")
    return q, STECache()


def straight_through_backward(dz_q: Array, cache: STECache) -> Array:
    """``dz = dz_q`` (identity Jacobian); a surrogate gradient."""
    return dz_q
