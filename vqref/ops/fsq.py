"""The steps of finite scalar quantization (FSQ, Mentzer et al., arXiv 2309.15505).

Symbols: N vectors, d = len(levels) channels, L_j the number of levels of channel j.

FSQ has no codebook.  Each channel is squeezed into a bounded interval, rounded to an integer,
and scaled into [-1, 1]; the codebook is implicit, the product grid of the channels' levels, with
``prod(L_j)`` points.  Two grids are in use, and each is three op pairs here.

**The paper's grid** (appendix A.1; vector-quantize-pytorch's default):

    bound:   z_b = phi(z + s) * h - o        h = (L - 1)(1 + eps) / 2,   o = 1/2 if L even else 0,
                                             s = phi^-1(o / h)                                  (1)
    round:   z_r = round(z_b)                (straight-through gradient)                       (2)
    scale:   z_q = z_r / w                   w = L // 2                                        (3)

with ``phi = tanh`` (or, with ``hard_clamp``, ``phi = clamp(., -1, 1)``, whose inverse on
(-1, 1) is the identity).  The bound (1) maps the real line into the interval
[-h - o, h - o].  For odd L that interval is symmetric around 0 and holds the L integers
-(L-1)/2 .. (L-1)/2.  For even L an integer grid cannot be symmetric around 0; the offset o
moves the interval down by one half so that it holds the L integers -L/2 .. L/2 - 1, and the
shift s keeps ``z = 0`` mapped to ``z_b = 0`` (``phi(s) h = o``).  Rounding reaches an
extreme integer half a step before the interval's end, so every level is reached at a finite z
with or without the factor ``1 + eps`` (eps = 1e-3); what the factor does is keep ``o / h < 1``,
so that ``s = atanh(o / h)`` is finite for L = 2 (where ``h = o`` without it).  It also widens
the interval by ``(L - 1) eps / 2``, which stays below the half step that would let rounding
pass the extreme integer for L <= 1000 (h - o < w + 1/2).  After (3) the grid of channel j is
``{(k - w) / w : k = 0 .. L - 1}``: -1 .. 1 for odd L, -1 .. 1 - 1/w for even L.

**The symmetric grid** (``preserve_symmetry``; Zhao et al., arXiv 2411.19842, section 3.2):

    bound:   v = (L - 1)(phi(z) + 1) / 2 + 1/2       in [1/2, L - 1/2]                        (4)
    floor:   k = floor(v)                            integers 0 .. L - 1 (straight-through)    (5)
    scale:   z_q = k * 2 / (L - 1) - 1               L points evenly spaced on [-1, 1]         (6)

(4) stretches phi's range [-1, 1] onto [0, L - 1] and adds one half, so that the floor (5)
rounds to the nearest of the L integers.  The grid is symmetric around 0 for every L (it holds
0 only for odd L), and L = 2 gives the two values -1 and 1 -- the binary code that the paper's
grid cannot give.

Gradients.  (1), (3), (4) and (6) are smooth (piecewise linear with the clamp) and have true
derivatives, checked against finite differences.  (2) and (5) are piecewise constant, with
derivative zero almost everywhere; FSQ trains through them with the straight-through estimator,
a *surrogate* gradient (checked against a torch autograd reference written with ``.detach()``,
never against finite differences).  Composed, the gradient of z_q with respect to z is

    paper's grid:     h phi'(z + s) / w        symmetric grid:    phi'(z)

the bound's derivative times the scale.  With the clamp, ``phi'`` is 1 on [-1, 1] (both ends
included, as torch's ``clamp``) and 0 outside.

The index of a grid point is its mixed-radix number: with level indices ``k_j`` in ``[0, L_j)``
(``z_r,j + w_j`` on the paper's grid) and the basis ``b = cumprod([1, L_0, ..., L_{d-2}])``,
``index = sum_j k_j b_j`` (channel 0 is the least significant digit, as in vector-quantize-pytorch).

Noise dropout (arXiv 2411.19842, section 3.2) replaces some code entries by themselves plus
uniform noise, in training, so that the decoder also sees values between grid points; see
:func:`noise_dropout_forward`.  Residual FSQ's soft clamp ``tanh(x / c) c`` is the last pair.
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
    "SymmetricBoundCache",
    "FloorSTECache",
    "SymmetricScaleCache",
    "NoiseDropoutCache",
    "SoftClampCache",
    "bound_constants",
    "bound_forward",
    "bound_backward",
    "round_ste_forward",
    "round_ste_backward",
    "scale_forward",
    "scale_backward",
    "symmetric_bound_forward",
    "symmetric_bound_backward",
    "floor_ste_forward",
    "floor_ste_backward",
    "symmetric_scale_forward",
    "symmetric_scale_backward",
    "noise_dropout_forward",
    "noise_dropout_backward",
    "soft_clamp_forward",
    "soft_clamp_backward",
    "codes_to_level_indices",
    "level_indices_to_indices",
    "codes_to_indices",
    "indices_to_codes",
    "codebook_size",
    "BOUND_EPS",
    "MAX_PAPER_LEVEL",
]

BOUND_EPS = 1e-3  # vector-quantize-pytorch's default ``eps`` of FSQ.bound
# The largest level the paper's grid keeps in range: for L > 1000 the widened bound (1 + eps) h
# passes w + 1/2, and saturated inputs would round to a point beyond the grid.
MAX_PAPER_LEVEL = 1000


def bound_constants(
    levels: tuple, eps: float = BOUND_EPS, *, hard_clamp: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host float64 ``(half_l, offset, shift)``, each ``(d,)``, of equation (1).

    ``shift = atanh(offset / half_l)``, or ``offset / half_l`` with ``hard_clamp`` (the clamp is
    the identity on (-1, 1), so that is its inverse there).
    """
    L = np.asarray(levels, dtype=np.float64)  # (d,)
    half_l = (L - 1) * (1 + eps) / 2
    offset = np.where(np.asarray(levels) % 2 == 0, 0.5, 0.0)
    ratio = offset / half_l
    shift = ratio if hard_clamp else np.arctanh(ratio)
    return half_l, offset, shift


def _const(a: Any, like: Array) -> Array:
    """A host constant as an array of ``like``'s library, device and dtype (never upcasting)."""
    return B.from_numpy(np.asarray(a), B.get_namespace(like), device=B.get_device(like), dtype=like.dtype)


def _squash(u: Array, hard_clamp: bool) -> tuple[Array, Array]:
    """``(phi(u), phi'(u))``: tanh with ``1 - tanh^2``, or the clamp to [-1, 1] with its 0/1 slope.

    The clamp's slope is 1 on the closed interval [-1, 1], as torch's ``clamp`` backward counts it
    (at the two kinks any value in [0, 1] is a subgradient).
    """
    xp = B.get_namespace(u)
    if hard_clamp:
        inside = (u >= -1) & (u <= 1)  # (N, d) bool
        return xp.clip(u, -1.0, 1.0), xp.astype(inside, u.dtype)
    t = xp.tanh(u)  # (N, d)
    return t, 1 - t * t


# ---------------------------------------------------------------- (1) the bound


class BoundCache(NamedTuple):
    dphi: Array  # (N, d) phi'(z + s): 1 - tanh^2, or the clamp's 0/1 slope
    half_l: Array  # (d,) h, in z's dtype


def bound_forward(
    z: Array, levels: tuple, *, eps: float = BOUND_EPS, hard_clamp: bool = False
) -> tuple[Array, BoundCache]:
    """``z_b = phi(z + s) * h - o``, equation (1), channel by channel.

    Parameters
    ----------
    z : (N, d) float, d = len(levels)
    levels : d ints >= 2
    eps : widening of the interval (vector-quantize-pytorch's 1e-3)
    hard_clamp : phi is ``clamp(., -1, 1)`` instead of tanh (vector-quantize-pytorch's
        ``bound_hard_clamp``, for inputs that are already in range)

    Returns
    -------
    bounded : (N, d), z's dtype, in [-h - o, h - o]
    cache : BoundCache(dphi, half_l)

    Notes
    -----
    The constants are computed on the host in float64 and then cast to z's dtype, so a float32
    input stays float32.
    """
    if z.ndim != 2 or z.shape[1] != len(levels):
        raise ValueError(f"bound_forward: z must have shape (N, {len(levels)}), got {tuple(z.shape)}")
    half_l, offset, shift = (_const(c, z) for c in bound_constants(levels, eps, hard_clamp=hard_clamp))  # (d,)
    phi, dphi = _squash(z + shift, hard_clamp)  # (N, d) each
    bounded = phi * half_l - offset  # (N, d)
    return bounded, BoundCache(dphi, half_l)


def bound_backward(dbounded: Array, cache: BoundCache) -> Array:
    """``dz = dz_b * h * phi'(z + s)``, the true derivative of (1).

    ``d z_b / dz = h * phi'(z + s)``; the offset and the shift are constants.  The Jacobian is
    diagonal (each entry depends only on its own input), so the vector-Jacobian product is an
    elementwise product.  With tanh, ``phi' = 1 - tanh^2(z + s)``.
    """
    dphi, half_l = cache
    return dbounded * (half_l * dphi)  # (N, d)


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


# ---------------------------------------------------------------- (4)-(6) the symmetric grid


class SymmetricBoundCache(NamedTuple):
    dphi: Array  # (N, d) phi'(z)
    half_span: Array  # (d,) (L - 1) / 2, in z's dtype


def symmetric_bound_forward(z: Array, levels: tuple, *, hard_clamp: bool = False) -> tuple[Array, SymmetricBoundCache]:
    """``v = (L - 1)(phi(z) + 1) / 2 + 1/2``, equation (4): phi's range onto [1/2, L - 1/2].

    Parameters
    ----------
    z : (N, d) float
    levels : d ints >= 2
    hard_clamp : phi is ``clamp(., -1, 1)`` instead of tanh

    Returns
    -------
    v : (N, d), z's dtype
    cache : SymmetricBoundCache(dphi, half_span)
    """
    if z.ndim != 2 or z.shape[1] != len(levels):
        raise ValueError(f"symmetric_bound_forward: z must have shape (N, {len(levels)}), got {tuple(z.shape)}")
    half_span = _const((np.asarray(levels, dtype=np.float64) - 1) / 2, z)  # (d,)
    phi, dphi = _squash(z, hard_clamp)  # (N, d) each
    v = half_span * (phi + 1) + 0.5  # (N, d)
    return v, SymmetricBoundCache(dphi, half_span)


def symmetric_bound_backward(dv: Array, cache: SymmetricBoundCache) -> Array:
    """``dz = dv * (L - 1)/2 * phi'(z)``, the true derivative of (4)."""
    dphi, half_span = cache
    return dv * (half_span * dphi)  # (N, d)


class FloorSTECache(NamedTuple):
    pass  # the surrogate gradient is the identity


def floor_ste_forward(v: Array) -> tuple[Array, FloorSTECache]:
    """``floor(v)``, equation (5); with the half added in (4) it rounds ties upwards.

    Returns
    -------
    k : (N, d), v's dtype, integer values
    cache : FloorSTECache()
    """
    return B.get_namespace(v).floor(v), FloorSTECache()


def floor_ste_backward(dk: Array, cache: FloorSTECache) -> Array:
    """``dv = dk``: the straight-through estimator of the floor (a surrogate, like (2))."""
    return dk


class SymmetricScaleCache(NamedTuple):
    step: Array  # (d,) 2 / (L - 1), the spacing of the grid, in the input's dtype


def symmetric_scale_forward(k: Array, levels: tuple) -> tuple[Array, SymmetricScaleCache]:
    """``z_q = k * 2/(L - 1) - 1``, equation (6): level indices 0 .. L - 1 onto [-1, 1].

    Returns
    -------
    codes : (N, d), k's dtype
    cache : SymmetricScaleCache(step)
    """
    step = _const(2.0 / (np.asarray(levels, dtype=np.float64) - 1), k)  # (d,)
    return k * step - 1, SymmetricScaleCache(step)


def symmetric_scale_backward(dcodes: Array, cache: SymmetricScaleCache) -> Array:
    """``dk = dz_q * 2/(L - 1)``."""
    return dcodes * cache.step


# ---------------------------------------------------------------- noise dropout


class NoiseDropoutCache(NamedTuple):
    inside: Array  # (N, d) 1 where the noisy value was within [-1, 1] (the clamp's slope), else 0


def noise_dropout_forward(codes: Array, mask: Array, noise: Array) -> tuple[Array, NoiseDropoutCache]:
    """``y = clamp(codes + mask * noise, -1, 1)``: some entries moved off the grid.

    Zhao et al. (arXiv 2411.19842, section 3.2) train the decoder on a mix of quantized values
    and values with the rounding error's size of noise added, which approximates quantization by
    noise for a fraction of the entries.  vector-quantize-pytorch draws ``mask`` as Bernoulli with
    probability ``noise_dropout`` and ``noise`` uniform on [-1/2, 1/2) (in code units: with
    [-1, 1] codes that is up to a quarter of the range), and clamps to [-1, 1].

    Parameters
    ----------
    codes : (N, d) float, in [-1, 1]
    mask : (N, d) bool, where noise is added
    noise : (N, d) float, codes' dtype

    Returns
    -------
    y : (N, d), codes' dtype
    cache : NoiseDropoutCache(inside)

    Notes
    -----
    ``dy/dcodes`` is 1 where ``codes + noise`` stays in [-1, 1] and 0 where the clamp cuts it (the
    noise and the mask are constants), so the backward is a true derivative away from the clamp's
    two kinks.
    """
    xp = B.get_namespace(codes)
    moved = xp.where(mask, codes + noise, codes)  # (N, d)
    inside = (moved >= -1) & (moved <= 1)  # (N, d) bool
    return xp.clip(moved, -1.0, 1.0), NoiseDropoutCache(xp.astype(inside, codes.dtype))


def noise_dropout_backward(dy: Array, cache: NoiseDropoutCache) -> Array:
    """``dcodes = dy * [codes + noise within [-1, 1]]``."""
    return dy * cache.inside


# ---------------------------------------------------------------- residual FSQ's soft clamp


class SoftClampCache(NamedTuple):
    dydx: Array  # (N, d) 1 - tanh(x / c)^2, the local derivative


def soft_clamp_forward(x: Array, c: Array) -> tuple[Array, SoftClampCache]:
    """``y = tanh(x / c) * c``: a smooth clamp of each channel to (-c, c).

    Near 0 it is the identity (``tanh(u) ~ u``), and it saturates smoothly at +-c.  Residual FSQ
    applies it to its input so that the first depth, whose bound is a hard clamp to [-1, 1] with
    ``c = 1 + 1/(L - 1)`` (half a grid step beyond 1), sees values in range.

    Parameters
    ----------
    x : (N, d) float
    c : (d,) float > 0, x's dtype

    Returns
    -------
    y : (N, d) in (-c, c)
    cache : SoftClampCache(dydx)

    Notes
    -----
    ``dy/dx = c * tanh'(x / c) / c = 1 - tanh(x / c)^2``, computed by the forward from the
    output it already has.
    """
    xp = B.get_namespace(x)
    t = xp.tanh(x / c)  # (N, d)
    return t * c, SoftClampCache(1 - t * t)


def soft_clamp_backward(dy: Array, cache: SoftClampCache) -> Array:
    """``dx = dy * (1 - tanh(x / c)^2)``, the true derivative of the soft clamp."""
    return dy * cache.dydx  # (N, d)


# ---------------------------------------------------------------- indices of the implicit codebook


def _int_const(a: Any, xp: Any, device: Any) -> Array:
    return B.from_numpy(np.asarray(a, dtype=np.int64), xp, device=device, dtype=xp.int64)


def _basis(levels: tuple) -> np.ndarray:
    """``cumprod([1, L_0, ..., L_{d-2}])``, host int64 ``(d,)``: the mixed-radix place values."""
    return np.cumprod([1] + list(levels[:-1]), dtype=np.int64)


def codes_to_level_indices(codes: Array, levels: tuple, *, preserve_symmetry: bool = False) -> Array:
    """The level index ``k_j`` in ``[0, L_j)`` of each entry of grid-point codes.

    Paper's grid: ``k = round(z_q * w + w)``; symmetric grid: ``k = round((z_q + 1)(L - 1)/2)``.
    Rounding removes the rounding error of the scale, so the result is exact for grid points.

    Parameters
    ----------
    codes : (..., d) float, grid points

    Returns
    -------
    k : (..., d) int64
    """
    xp = B.get_namespace(codes)
    if preserve_symmetry:
        half_span = _const((np.asarray(levels, dtype=np.float64) - 1) / 2, codes)  # (d,)
        k = xp.round((codes + 1) * half_span)  # (..., d)
    else:
        w = _const(np.asarray(levels) // 2, codes)  # (d,)
        k = xp.round(codes * w + w)  # (..., d)
    return xp.astype(k, xp.int64)


def level_indices_to_indices(k: Array, levels: tuple) -> Array:
    """``index = sum_j k_j b_j``: level indices ``(..., d)`` to mixed-radix indices ``(...)`` (int64)."""
    xp = B.get_namespace(k)
    return xp.sum(k * _int_const(_basis(levels), xp, B.get_device(k)), axis=-1)  # (...)


def codes_to_indices(codes: Array, levels: tuple, *, preserve_symmetry: bool = False) -> Array:
    """The index of each code in the implicit codebook.

    Parameters
    ----------
    codes : (..., d) float, grid points
    levels : d ints
    preserve_symmetry : the codes are on the symmetric grid (6) instead of the paper's (3)

    Returns
    -------
    indices : (...) int64 in [0, prod(levels))
    """
    k = codes_to_level_indices(codes, levels, preserve_symmetry=preserve_symmetry)  # (..., d)
    return level_indices_to_indices(k, levels)


def indices_to_codes(indices: Array, levels: tuple, *, dtype: Any = None, preserve_symmetry: bool = False) -> Array:
    """The code of each index: the inverse of :func:`codes_to_indices`.

    ``k_j = (index // b_j) % L_j``, then ``z_q,j = (k_j - w_j) / w_j`` (paper's grid) or
    ``k_j * 2/(L_j - 1) - 1`` (symmetric grid), the same arithmetic as the forward's scale.

    Parameters
    ----------
    indices : (...) integer, in [0, prod(levels))
    levels : d ints
    dtype : the float dtype of the codes (default float64 of indices' library)
    preserve_symmetry : decode onto the symmetric grid

    Returns
    -------
    codes : (..., d) float
    """
    xp = B.get_namespace(indices)
    dev = B.get_device(indices)
    dtype = xp.float64 if dtype is None else dtype
    idx = xp.astype(indices, xp.int64)[..., None]  # (..., 1)
    k = (idx // _int_const(_basis(levels), xp, dev)) % _int_const(levels, xp, dev)  # (..., d)
    kf = xp.astype(k, dtype)  # (..., d)
    if preserve_symmetry:
        return symmetric_scale_forward(kf, levels)[0]
    w = xp.astype(_int_const(np.asarray(levels) // 2, xp, dev), dtype)  # (d,)
    return scale_forward(kf - w, levels)[0]


def codebook_size(levels: tuple) -> int:
    """``prod(levels)``, the number of grid points."""
    return math.prod(int(level) for level in levels)
