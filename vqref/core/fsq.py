"""Finite scalar quantization (FSQ, arXiv 2309.15505) as pure forward/backward pairs.

Symbols: N vectors, d = len(levels) channels per codebook, C codebooks, dim the input width
(``C * d`` unless projections map between them), M = N * C rows of d channels.

:func:`fsq_forward` quantizes rows of d channels with the steps of :mod:`vqref.ops.fsq`:

    paper's grid (default)                          symmetric grid (preserve_symmetry)
    1. z_b = bound(z)        eq. (1)                 v = symmetric_bound(z)    eq. (4)
    2. z_r = round(z_b)      eq. (2), STE            k = floor(v)              eq. (5), STE
    3. z_q = z_r / w         eq. (3)                 z_q = k 2/(L-1) - 1       eq. (6)
    4. index = sum_j k_j b_j                         (mixed radix, no gradient)
    5. [training, noise dropout: z_q <- clamp(z_q + mask * noise, -1, 1)]

and its backward runs the chain rule through 5, 3, 2, 1 in reverse:

    dz = h phi'(z + s) * (dz_q / w)          or          dz = (L-1)/2 phi'(z) * (dz_q 2/(L-1))

the bound's derivative times the scale, through the straight-through surrogate of the rounding.

:func:`fsq_layer_forward` is the whole layer of vector-quantize-pytorch's ``FSQ`` on ``(N, dim)``
rows: an optional affine projection in (``dim -> C d``), the C codebooks' d channels as M rows,
an optional orthogonal rotation of each row before the quantizer and back after it, and an
optional projection out (``C d -> dim``).  Its backward gives ``dx`` and the projections'
parameter gradients.  Pure functions: nothing is mutated, random noise comes from the caller.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .. import backend as B
from ..backend import Array
from ..ops.fsq import (
    BoundCache,
    FloorSTECache,
    NoiseDropoutCache,
    RoundSTECache,
    ScaleCache,
    SymmetricBoundCache,
    SymmetricScaleCache,
    bound_backward,
    bound_forward,
    floor_ste_backward,
    floor_ste_forward,
    level_indices_to_indices,
    noise_dropout_backward,
    noise_dropout_forward,
    round_ste_backward,
    round_ste_forward,
    scale_backward,
    scale_forward,
    symmetric_bound_backward,
    symmetric_bound_forward,
    symmetric_scale_backward,
    symmetric_scale_forward,
)
from ..ops.linear import LinearCache, linear_backward, linear_forward
from ..ops.linear_fast import affine_backward_blocked, affine_forward_blocked

__all__ = [
    "FSQOutput",
    "FSQCache",
    "fsq_forward",
    "fsq_backward",
    "Projection",
    "FSQLayerOutput",
    "FSQLayerCache",
    "fsq_layer_forward",
    "fsq_layer_backward",
]


class FSQOutput(NamedTuple):
    quantized: Array  # (M, d) grid points in [-1, 1] (moved off the grid where noise was added), z's dtype
    indices: Array  # (M,) int64 in [0, prod(levels)), of the grid points before any noise


class FSQCache(NamedTuple):
    bound: BoundCache | SymmetricBoundCache  # step 1
    round: RoundSTECache | FloorSTECache  # step 2 (the STE needs nothing: an empty tuple)
    scale: ScaleCache | SymmetricScaleCache  # step 3
    noise: NoiseDropoutCache | None  # step 5, or None
    preserve_symmetry: bool


def fsq_forward(
    z: Array,
    levels: tuple,
    *,
    preserve_symmetry: bool = False,
    hard_clamp: bool = False,
    noise: tuple | None = None,
) -> tuple[FSQOutput, FSQCache]:
    """Quantize each channel of ``z`` to its grid of ``levels[j]`` values.

    Parameters
    ----------
    z : (M, d) float, d = len(levels)
    levels : d ints >= 2
    preserve_symmetry : the symmetric grid (4)-(6) instead of the paper's (1)-(3)
    hard_clamp : phi = clamp(., -1, 1) instead of tanh in the bound
    noise : ``(mask (M, d) bool, noise (M, d) float)`` for noise dropout, or None

    Returns
    -------
    out : FSQOutput(quantized (M, d), indices (M,))
    cache : FSQCache, what :func:`fsq_backward` needs
    """
    if preserve_symmetry:
        v, bound_cache = symmetric_bound_forward(z, levels, hard_clamp=hard_clamp)  # 1. (M, d) in [1/2, L - 1/2]
        k, round_cache = floor_ste_forward(v)  # 2. (M, d) level indices 0 .. L - 1
        quantized, scale_cache = symmetric_scale_forward(k, levels)  # 3. (M, d) in [-1, 1]
    else:
        bounded, bound_cache = bound_forward(z, levels, hard_clamp=hard_clamp)  # 1. (M, d)
        rounded, round_cache = round_ste_forward(bounded)  # 2. (M, d) integers -w .. L - 1 - w
        quantized, scale_cache = scale_forward(rounded, levels)  # 3. (M, d) in [-1, 1]
        k = rounded + scale_cache.half_width  # level indices 0 .. L - 1
    xp = B.get_namespace(z)
    indices = level_indices_to_indices(xp.astype(k, xp.int64), levels)  # 4. (M,) no gradient
    noise_cache = None
    if noise is not None:
        quantized, noise_cache = noise_dropout_forward(quantized, *noise)  # 5. (M, d)
    return FSQOutput(quantized, indices), FSQCache(
        bound_cache, round_cache, scale_cache, noise_cache, preserve_symmetry
    )


def fsq_backward(dquantized: Array, cache: FSQCache) -> Array:
    """``dz`` for the upstream gradient ``dquantized`` (M, d); a surrogate (the rounding's STE).

    Returns
    -------
    dz : (M, d), dquantized's dtype
    """
    if cache.noise is not None:
        dquantized = noise_dropout_backward(dquantized, cache.noise)  # 5. zero where the clamp cut
    if cache.preserve_symmetry:
        dk = symmetric_scale_backward(dquantized, cache.scale)  # 3. dk = dz_q 2/(L-1)
        dv = floor_ste_backward(dk, cache.round)  # 2. straight through
        return symmetric_bound_backward(dv, cache.bound)  # 1. dz = dv (L-1)/2 phi'(z)
    drounded = scale_backward(dquantized, cache.scale)  # 3. dz_r = dz_q / w
    dbounded = round_ste_backward(drounded, cache.round)  # 2. straight through
    return bound_backward(dbounded, cache.bound)  # 1. dz = dz_b h phi'(z + s)


# ---------------------------------------------------------------- the layer: projections, codebooks, rotation


class Projection(NamedTuple):
    W: Array  # (Din, Dout) input-major, as vqref.ops.linear
    b: Array | None  # (Dout,) or None (projection_has_bias=False)


class FSQLayerOutput(NamedTuple):
    quantized: Array  # (N, dim), z's dtype
    indices: Array  # (N, C) int64
    codes: Array  # (N, C d) the codes before the projection out (grid points unless rotated or noisy)
    projected: Array  # (N, C d) the quantizer's input: x after the projection in


class FSQLayerCache(NamedTuple):
    project_in: LinearCache | None
    rotation: Array | None  # (d, d) R, the orthogonal rotation, or None
    fsq: FSQCache  # on the (M, d) rows
    project_out: LinearCache | None
    num_codebooks: int
    has_bias: bool  # the projections have a bias (vector-quantize-pytorch's projection_has_bias)


def fsq_layer_forward(
    x: Array,
    levels: tuple,
    *,
    num_codebooks: int = 1,
    project_in: Projection | None = None,
    project_out: Projection | None = None,
    rotation: Array | None = None,
    fast: bool = True,
    **fsq_options: Any,
) -> tuple[FSQLayerOutput, FSQLayerCache]:
    """vector-quantize-pytorch's ``FSQ`` layer on rows: project, quantize C codebooks, project back.

    Parameters
    ----------
    x : (N, dim) float
    levels : d ints
    num_codebooks : C
    project_in : ``Projection(W (dim, C d), b)`` or None (then dim = C d)
    project_out : ``Projection(W (C d, dim), b)`` or None
    rotation : (d, d) orthogonal R, applied as ``z R`` before the quantizer and ``z_q R^T`` after it
        (vector-quantize-pytorch's ``orthogonal_rotation``), or None
    fast : numpy: the projections of :mod:`vqref.ops.linear_fast` (blocks of rows on worker threads);
        False, or any other library: :mod:`vqref.ops.linear`, the definition
    **fsq_options : preserve_symmetry, hard_clamp, noise (on the (N C, d) rows) for :func:`fsq_forward`

    Returns
    -------
    out : FSQLayerOutput(quantized (N, dim), indices (N, C), codes (N, C d), projected (N, C d))
    cache : FSQLayerCache
    """
    xp = B.get_namespace(x)
    affine = affine_forward_blocked if fast and B.is_numpy(xp) else linear_forward  # the one-line choice
    N, C, d = x.shape[0], num_codebooks, len(levels)
    in_cache = out_cache = None
    projected = x  # (N, dim)
    if project_in is not None:
        projected, in_cache = affine(x, project_in.W, project_in.b)  # (N, C d)
    z = xp.reshape(projected, (N * C, d))  # (M, d): each codebook's channels are one row
    if rotation is not None:
        z = z @ rotation  # (M, d) turned into the rotated frame
    q, fsq_cache = fsq_forward(z, levels, **fsq_options)
    codes = q.quantized  # (M, d)
    if rotation is not None:
        codes = codes @ rotation.mT  # (M, d) back to the input's frame
    codes = xp.reshape(codes, (N, C * d))  # (N, C d)
    quantized = codes
    if project_out is not None:
        quantized, out_cache = affine(codes, project_out.W, project_out.b)  # (N, dim)
    indices = xp.reshape(q.indices, (N, C))  # (N, C)
    has_bias = any(p is not None and p.b is not None for p in (project_in, project_out))
    cache = FSQLayerCache(in_cache, rotation, fsq_cache, out_cache, C, has_bias)
    return FSQLayerOutput(quantized, indices, codes, projected), cache


def fsq_layer_backward(dquantized: Array, cache: FSQLayerCache, *, fast: bool = True) -> tuple[Array, dict]:
    """``dx`` and the projections' parameter gradients for the upstream gradient ``dquantized``.

    Each step of the forward in reverse; the rotation is a constant (a buffer, not a parameter),
    so its step only turns the gradient: ``z R`` has the VJP ``dz R^T`` and ``z_q R^T`` has
    ``dz_q R``.

    Parameters
    ----------
    dquantized : (N, dim)
    cache : FSQLayerCache
    fast : numpy: the projections' backward of :mod:`vqref.ops.linear_fast`; False: the definition

    Returns
    -------
    dx : (N, dim)
    grads : ``{"project_in.W", "project_in.b", "project_out.W", "project_out.b"}`` for the
        projections present (the ``b`` entries only where there is a bias)
    """
    xp = B.get_namespace(dquantized)
    affine_backward = affine_backward_blocked if fast and B.is_numpy(xp) else linear_backward  # the one-line choice
    N = dquantized.shape[0]
    grads = {}
    dcodes = dquantized  # (N, C d)
    if cache.project_out is not None:
        dcodes, grads["project_out.W"], grads["project_out.b"] = affine_backward(dquantized, cache.project_out)
    C = cache.num_codebooks
    d = dcodes.shape[1] // C
    dq = xp.reshape(dcodes, (N * C, d))  # (M, d)
    if cache.rotation is not None:
        dq = dq @ cache.rotation  # (M, d) the VJP of z_q R^T
    dz = fsq_backward(dq, cache.fsq)  # (M, d)
    if cache.rotation is not None:
        dz = dz @ cache.rotation.mT  # (M, d) the VJP of z R
    dz = xp.reshape(dz, (N, C * d))  # (N, C d)
    if cache.project_in is None:
        return dz, grads
    dx, grads["project_in.W"], grads["project_in.b"] = affine_backward(dz, cache.project_in)
    if not cache.has_bias:
        grads.pop("project_in.b")
        grads.pop("project_out.b", None)
    return dx, grads
