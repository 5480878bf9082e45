"""JAX references for finite scalar quantization: the two grids, the FSQ layer, residual FSQ.

Symbols: N vectors (rows), d = len(levels) channels, ``L_j`` the levels of channel j, C codebooks,
dim the input width, Q residual depths; ``sg[.]`` is ``jax.lax.stop_gradient``.

**The paper's grid** (Mentzer et al., arXiv 2309.15505, appendix A.1), with the constants of
vector-quantize-pytorch's FSQ (eps = 1e-3)::

    bound   z_b = phi(z + s) h - o,   h = (L - 1)(1 + eps)/2,  o = 1/2 (L even) or 0,
                                      s = phi^-1(o / h)
    round   z_r = z_b + sg[round(z_b) - z_b]       value round(z_b), identity Jacobian (a surrogate)
    scale   z_q = z_r / w,                          w = floor(L/2)

**The symmetric grid** (Zhao et al., arXiv 2411.19842, section 3.2)::

    bound   v = (L - 1)(phi(z) + 1)/2 + 1/2         phi's range onto [1/2, L - 1/2]
    floor   k = v + sg[floor(v) - v]                the straight-through floor (a surrogate)
    scale   z_q = (2k - (L - 1)) / (L - 1)          the L points evenly spaced on [-1, 1]

``phi`` is tanh, or with ``hard_clamp`` the clamp to [-1, 1], written as a ``where`` whose
inner branch covers both ends (slope 1 at u = +-1, as torch's ``clamp`` counts it); its inverse
on (-1, 1) is the identity, so the shift is ``s = o / h`` there.

**Noise dropout** (arXiv 2411.19842): ``y = clamp(z_q + m * n, -1, 1)`` with the mask m and the
noise n constants.  **The soft clamp** of residual FSQ: ``tanh(x / c) c``.

**The layer** (vector-quantize-pytorch's ``FSQ``): ``x W_in + b_in``, each codebook's d channels
a row, the fixed rotation ``z R`` before the quantizer and ``z_q R^T`` after it, ``W_out``, ``b_out``.

**Residual FSQ**: depth l quantizes the residual on the symmetric grid shrunk by ``s_l = L^-l``,

    r_0 = softclamp(x W_in + b_in),   o_l = s_l FSQ(r_l / s_l),   r_{l+1} = r_l - sg[o_l],
    quantized = (sum_l o_l) W_out + b_out.

The constants are host float64.  JAX functions in, JAX arrays out.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "bound",
    "round_ste",
    "scale",
    "symmetric_bound",
    "floor_ste",
    "symmetric_scale",
    "noise_dropout",
    "soft_clamp",
    "fsq",
    "fsq_layer",
    "residual_fsq",
]

sg = jax.lax.stop_gradient
EPS = 1e-3


def _phi(u, hard_clamp: bool):
    """tanh, or the clamp to [-1, 1] as a ``where`` (derivative 1 on the closed interval)."""
    if not hard_clamp:
        return jnp.tanh(u)
    return jnp.where(u < -1.0, -1.0, jnp.where(u > 1.0, 1.0, u))


def bound(z, levels, *, eps: float = EPS, hard_clamp: bool = False):
    """``phi(z + s) h - o`` channel by channel; ``z`` (N, d) with d = len(levels); returns (N, d)."""
    L = np.asarray(levels, dtype=np.float64)  # (d,)
    h = (L - 1.0) * (1.0 + eps) / 2.0  # (d,) half the width of the interval
    o = np.where(np.asarray(levels) % 2 == 0, 0.5, 0.0)  # (d,) even levels: the grid moves down by 1/2
    s = o / h if hard_clamp else np.arctanh(o / h)  # (d,) so that z = 0 maps to 0
    return _phi(z + s, hard_clamp) * h - o  # (N, d)


def round_ste(z):
    """``z + sg[round(z) - z]``: rounded values, the gradient passed straight through; (N, d)."""
    return z + sg(jnp.round(z) - z)


def scale(zr, levels):
    """``z_r / floor(L/2)``: integers onto the grid in [-1, 1]; (N, d)."""
    return zr / (np.asarray(levels) // 2).astype(np.float64)


def symmetric_bound(z, levels, *, hard_clamp: bool = False):
    """``(L - 1)(phi(z) + 1)/2 + 1/2``: (N, d) -> (N, d) in [1/2, L - 1/2]."""
    L = np.asarray(levels, dtype=np.float64)  # (d,)
    return (L - 1.0) * (_phi(z, hard_clamp) + 1.0) / 2.0 + 0.5


def floor_ste(v):
    """``v + sg[floor(v) - v]``: the level indices, the gradient passed straight through; (N, d)."""
    return v + sg(jnp.floor(v) - v)


def symmetric_scale(k, levels):
    """``(2k - (L - 1)) / (L - 1)``: level indices 0 .. L - 1 onto L points of [-1, 1]; (N, d)."""
    span = np.asarray(levels, dtype=np.float64) - 1.0  # (d,)
    return (2.0 * k - span) / span


def noise_dropout(codes, mask, noise):
    """``clamp(codes + mask * noise, -1, 1)`` with the mask (N, d) bool and the noise (N, d) constants."""
    moved = jnp.where(jnp.asarray(mask), codes + jnp.asarray(noise), codes)  # (N, d)
    return _phi(moved, True)


def soft_clamp(x, c):
    """``tanh(x / c) c``: (N, d) squeezed smoothly into (-c, c), c (d,) a constant."""
    c = jnp.asarray(c)
    return jnp.tanh(x / c) * c


def fsq(z, levels, *, preserve_symmetry: bool = False, hard_clamp: bool = False, noise=None):
    """One FSQ quantizer on rows ``z`` (N, d): the grid's three steps, then noise dropout.

    ``noise`` is ``(mask, noise)`` (each (N, d)) or None.  Returns the codes (N, d).
    """
    if preserve_symmetry:
        q = symmetric_scale(floor_ste(symmetric_bound(z, levels, hard_clamp=hard_clamp)), levels)
    else:
        q = scale(round_ste(bound(z, levels, hard_clamp=hard_clamp)), levels)
    return q if noise is None else noise_dropout(q, *noise)


def _affine(x, params):
    """``x W (+ b)`` for ``params = (W,)`` or ``(W, b)``; ``x`` itself for None."""
    if params is None:
        return x
    y = x @ params[0]
    return y + params[1] if len(params) > 1 and params[1] is not None else y


def fsq_layer(
    x,
    levels,
    *,
    num_codebooks: int = 1,
    project_in: Sequence | None = None,
    project_out: Sequence | None = None,
    rotation=None,
    **fsq_options,
):
    """vector-quantize-pytorch's FSQ layer on rows: ``(N, dim) -> (N, dim)``.

    Parameters
    ----------
    x : (N, dim)
    levels : d ints
    num_codebooks : C
    project_in : ``(W (dim, C d),)`` or ``(W, b)``, or None (then dim = C d)
    project_out : ``(W (C d, dim),)`` or ``(W, b)``, or None
    rotation : (d, d) orthogonal R (a constant), or None
    fsq_options : preserve_symmetry, hard_clamp, noise (on the (N C, d) rows), as :func:`fsq`
    """
    d = len(levels)
    h = _affine(x, project_in)  # (N, C d)
    rows = jnp.reshape(h, (-1, d))  # (N C, d): codebook c of token n is row n C + c
    R = None if rotation is None else jnp.asarray(rotation)
    if R is not None:
        rows = rows @ R  # (N C, d)
    q = fsq(rows, levels, **fsq_options)  # (N C, d)
    if R is not None:
        q = q @ R.T  # (N C, d) back to the input's frame
    codes = jnp.reshape(q, (x.shape[0], num_codebooks * d))  # (N, C d)
    return _affine(codes, project_out)


def residual_fsq(
    x,
    levels,
    *,
    num_quantizers: int,
    num_active: int | None = None,
    project_in: Sequence | None = None,
    project_out: Sequence | None = None,
    soft_clamp_value=None,
    hard_clamp: bool = True,
    noise: Sequence | None = None,
):
    """Residual FSQ on rows: ``(N, dim) -> (N, dim)``, the recursion of the module docstring.

    Parameters
    ----------
    x : (N, dim)
    levels : d ints (the same at every depth)
    num_quantizers : Q; depth l has the scale ``s_l = L^-l`` (per channel)
    num_active : the depths that run (the first ``num_active``; default Q)
    project_in, project_out : ``(W, b)`` or None, as :func:`fsq_layer`
    soft_clamp_value : (d,) c of the soft clamp on the input, or None
    hard_clamp : the bound's phi is the clamp (vector-quantize-pytorch's ``bound_hard_clamp``)
    noise : one ``(mask, noise)`` pair per active depth, or None
    """
    L = np.asarray(levels, dtype=np.float64)  # (d,)
    r = _affine(x, project_in)  # (N, d)
    if soft_clamp_value is not None:
        r = soft_clamp(r, soft_clamp_value)
    total = 0.0
    for level in range(num_quantizers if num_active is None else num_active):
        s = L ** (-level)  # (d,) this depth's grid is shrunk by L^-l
        depth_noise = None if noise is None else noise[level]
        o = s * fsq(r / s, levels, preserve_symmetry=True, hard_clamp=hard_clamp, noise=depth_noise)  # (N, d)
        r = r - sg(o)  # the next residual sees the code as a constant
        total = total + o
    return _affine(total, project_out)
