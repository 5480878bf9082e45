"""The steps of finite scalar quantization (FSQ, Mentzer et al., arXiv 2309.15505).

Symbols: N vectors, d = len(levels) channels, L_j the number of levels of channel j.

FSQ has no codebook.  Each channel is squeezed into a bounded interval, rounded to the nearest
integer, and scaled into [-1, 1]; the codebook is implicit, the product grid of the channels'
levels, with ``prod(L_j)`` points.  The paper's appendix A.1 gives the three steps, and
vector-quantize-pytorch computes them as

    bound:   z_b = tanh(z + s) * h - o        h = (L - 1)(1 + eps) / 2,   o = 1/2 if L even else 0,
                                              s = atanh(o / h)                                  (1)
    round:   z_r = round(z_b)                 (straight-through gradient)                       (2)
    scale:   z_q = z_r / w                    w = L // 2                                        (3)

The bound (1) maps the real line onto the open interval (-h - o, h - o).  For odd L that is
symmetric around 0 and holds the L integers -(L-1)/2 .. (L-1)/2.  For even L an integer grid
cannot be symmetric around 0; the offset o moves the interval down by one half so that it holds
the L integers -L/2 .. L/2 - 1, and the shift s keeps ``z = 0`` mapped to ``z_b = 0``
(``tanh(s) h = o``).  The factor ``1 + eps`` (eps = 1e-3) widens the interval slightly, so that
the extreme integers are reached at finite z.  After (3) the grid of channel j is
``{(k - w) / w : k = 0 .. L - 1}``: -1 .. 1 for odd L, -1 .. 1 - 1/w for even L.

Gradients.  (1) and (3) are smooth and have true derivatives (checked against finite
differences).  (2) is piecewise constant, with derivative zero almost everywhere; FSQ trains
through it with the straight-through estimator, a *surrogate* gradient (checked against a torch
autograd reference written with ``.detach()``, never against finite differences).

The index of a grid point is its mixed-radix number: with level indices ``k_j = z_r,j + w_j`` in
``[0, L_j)`` and the basis ``b = cumprod([1, L_0, ..., L_{d-2}])``, ``index = sum_j k_j b_j``
(channel 0 is the least significant digit, as in vector-quantize-pytorch).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from .. import backend as B
from ..backend import Array

__all__ = [
    "BoundCache",
    "RoundSTECache",
    "ScaleCache",
    "bound_constants",
    "bound_forward",
    "bound_backward",
    "round_ste_forward",
    "round_ste_backward",
    "scale_forward",
    "scale_backward",
    "codes_to_indices",
    "indices_to_codes",
    "codebook_size",
    "BOUND_EPS",
]

BOUND_EPS = 1e-3  # vector-quantize-pytorch's default ``eps`` of FSQ.bound


def bound_constants(levels: tuple, eps: float = BOUND_EPS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host float64 ``(half_l, offset, shift)``, each ``(d,)``, of equation (1)."""
    L = np.asarray(levels, dtype=np.float64)  # (d,)
    half_l = (L - 1) * (1 + eps) / 2
    offset = np.where(np.asarray(levels) % 2 == 0, 0.5, 0.0)
    shift = np.arctanh(offset / half_l)
    return half_l, offset, shift


def _const(a: np.ndarray, like: Array) -> Array:
    """A host constant as an array of ``like``'s library, device and dtype (never upcasting)."""
    return B.from_numpy(np.asarray(a), B.get_namespace(like), device=B.get_device(like), dtype=like.dtype)


# ---------------------------------------------------------------- (1) the bound


class BoundCache(NamedTuple):
    t: Array  # (N, d) tanh(z + shift)
    half_l: Array  # (d,) h, in z's dtype


def bound_forward(z: Array, levels: tuple, *, eps: float = BOUND_EPS) -> tuple[Array, BoundCache]:
    """``z_b = tanh(z + s) * h - o``, equation (1), channel by channel.

    Parameters
    ----------
    z : (N, d) float, d = len(levels)
    levels : d ints >= 2
    eps : widening of the interval (vector-quantize-pytorch's 1e-3)

    Returns
    -------
    bounded : (N, d), z's dtype, in (-h - o, h - o)
    cache : BoundCache(t, half_l)

    Notes
    -----
    The constants are computed on the host in float64 and then cast to z's dtype, so a float32
    input stays float32.
    """
    if z.ndim != 2 or z.shape[1] != len(levels):
        raise ValueError(f"bound_forward: z must have shape (N, {len(levels)}), got {tuple(z.shape)}")
    xp = B.get_namespace(z)
    half_l, offset, shift = (_const(c, z) for c in bound_constants(levels, eps))  # (d,) each
    t = xp.tanh(z + shift)  # (N, d)
    bounded = t * half_l - offset  # (N, d)
    return bounded, BoundCache(t, half_l)


def bound_backward(dbounded: Array, cache: BoundCache) -> Array:
    """``dz = dz_b * h * (1 - t^2)``, the true derivative of (1).

    With ``t = tanh(z + s)``, ``d z_b / dz = h * tanh'(z + s) = h (1 - t^2)``; the offset and
    the shift are constants.  The Jacobian is diagonal (each entry depends only on its own input),
    so the vector-Jacobian product is an elementwise product.  Recomputed from the cached t.
    """
    t, half_l = cache
    return dbounded * (half_l * (1 - t * t))  # (N, d)


# ---------------------------------------------------------------- (2) rounding, straight through


class RoundSTECache(NamedTuple):
    pass  # the surrogate gradient is the identity: nothing to remember


def round_ste_forward(z: Array) -> tuple[Array, RoundSTECache]:
    """``round(z)``, to the nearest integer, ties to even (as ``torch.round``), equation (2).

    Parameters
    ----------
    z : (N, d) float

    Returns
    -------
    rounded : (N, d), z's dtype, integer values
    cache : RoundSTECache()
    """
    return B.get_namespace(z).round(z), RoundSTECache()


def round_ste_backward(drounded: Array, cache: RoundSTECache) -> Array:
    """``dz = drounded``: the straight-through estimator.

    A *surrogate*, not the derivative of the forward: rounding is piecewise constant, its true
    derivative is zero almost everywhere.  vector-quantize-pytorch writes it as
    ``z + (round(z) - z).detach()``, whose Jacobian is the identity.
    """
    return drounded


# ---------------------------------------------------------------- (3) scaling to [-1, 1]


class ScaleCache(NamedTuple):
    half_width: Array  # (d,) w = L // 2, in the input's dtype


def scale_forward(zr: Array, levels: tuple) -> tuple[Array, ScaleCache]:
    """``z_q = z_r / w`` with ``w = L // 2``, equation (3).

    Parameters
    ----------
    zr : (N, d) float, the rounded values (integers in [-w, L - 1 - w])
    levels : d ints >= 2

    Returns
    -------
    codes : (N, d), zr's dtype, in [-1, 1]
    cache : ScaleCache(half_width)
    """
    half_width = _const(np.asarray(levels) // 2, zr)  # (d,)
    return zr / half_width, ScaleCache(half_width)


def scale_backward(dcodes: Array, cache: ScaleCache) -> Array:
    """``dz_r = dz_q / w``: the derivative of a division by a constant."""
    return dcodes / cache.half_width


# ---------------------------------------------------------------- indices of the implicit codebook


def _int_const(a: Any, xp: Any, device: Any) -> Array:
    return B.from_numpy(np.asarray(a, dtype=np.int64), xp, device=device, dtype=xp.int64)


def _basis(levels: tuple) -> np.ndarray:
    """``cumprod([1, L_0, ..., L_{d-2}])``, host int64 ``(d,)``: the mixed-radix place values."""
    return np.cumprod([1] + list(levels[:-1]), dtype=np.int64)


def codes_to_indices(codes: Array, levels: tuple) -> Array:
    """The index of each code in the implicit codebook.

    ``k_j = round(z_q,j * w_j + w_j)`` (the level index in [0, L_j)), then ``sum_j k_j b_j``.

    Parameters
    ----------
    codes : (..., d) float, grid points
    levels : d ints

    Returns
    -------
    indices : (...) int64 in [0, prod(levels))
    """
    xp = B.get_namespace(codes)
    dev = B.get_device(codes)
    w = _const(np.asarray(levels) // 2, codes)  # (d,)
    k = xp.astype(xp.round(codes * w + w), xp.int64)  # (..., d)
    return xp.sum(k * _int_const(_basis(levels), xp, dev), axis=-1)  # (...)


def indices_to_codes(indices: Array, levels: tuple, *, dtype: Any = None) -> Array:
    """The code of each index: the inverse of :func:`codes_to_indices`.

    ``k_j = (index // b_j) % L_j``, then ``z_q,j = (k_j - w_j) / w_j``.

    Parameters
    ----------
    indices : (...) integer, in [0, prod(levels))
    levels : d ints
    dtype : the float dtype of the codes (default float64 of indices' library)

    Returns
    -------
    codes : (..., d) float
    """
    xp = B.get_namespace(indices)
    dev = B.get_device(indices)
    dtype = xp.float64 if dtype is None else dtype
    idx = xp.astype(indices, xp.int64)[..., None]  # (..., 1)
    k = (idx // _int_const(_basis(levels), xp, dev)) % _int_const(levels, xp, dev)  # (..., d)
    w = xp.astype(_int_const(np.asarray(levels) // 2, xp, dev), dtype)  # (d,)
    return (xp.astype(k, dtype) - w) / w


def codebook_size(levels: tuple) -> int:
    """``prod(levels)``, the number of grid points."""
    return math.prod(int(level) for level in levels)
