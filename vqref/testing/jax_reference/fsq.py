"""JAX reference for finite scalar quantization (FSQ, Mentzer et al., arXiv 2309.15505, appendix A.1).

Symbols: N vectors, d channels, ``L_j`` the levels of channel j.

The three steps, with the constants of vector-quantize-pytorch's FSQ (eps = 1e-3):

    bound   z_b = tanh(z + s) h - o,   h = (L - 1)(1 + eps)/2,  o = 1/2 (L even) or 0,  s = atanh(o/h)
    round   z_r = z_b + sg[round(z_b) - z_b]       value round(z_b), identity Jacobian (a surrogate)
    scale   z_q = z_r / w,                          w = floor(L/2)

The bound and the scale are smooth, so their JAX derivatives are true derivatives; the rounding
is differentiated through the straight-through expression.  The constants are host float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["bound", "round_ste", "scale", "fsq"]

sg = jax.lax.stop_gradient
EPS = 1e-3


def bound(z, levels, *, eps: float = EPS):
    """``tanh(z + s) h - o`` channel by channel; ``z`` (N, d) with d = len(levels); returns (N, d)."""
    L = np.asarray(levels, dtype=np.float64)  # (d,)
    h = (L - 1.0) * (1.0 + eps) / 2.0  # (d,) half the width of the interval
    o = np.where(np.asarray(levels) % 2 == 0, 0.5, 0.0)  # (d,) even levels: the grid moves down by 1/2
    s = np.arctanh(o / h)  # (d,) so that z = 0 maps to 0
    return jnp.tanh(z + s) * h - o  # (N, d)


def round_ste(z):
    """``z + sg[round(z) - z]``: rounded values, the gradient passed straight through; (N, d)."""
    return z + sg(jnp.round(z) - z)


def scale(zr, levels):
    """``z_r / floor(L/2)``: integers onto the grid in [-1, 1]; (N, d)."""
    return zr / (np.asarray(levels) // 2).astype(np.float64)


def fsq(z, levels):
    """The composition ``scale(round_ste(bound(z)))``: quantized ``(N, d)``."""
    return scale(round_ste(bound(z, levels)), levels)
