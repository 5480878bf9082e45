"""Squared Euclidean distances between vectors and codes, and the nearest code.

Symbols: N vectors, D features, K codes.

The distance matrix ``d_ik = ||x_i - c_k||^2`` is computed by the expanded form

    d_ik = ||x_i||^2 - 2 x_i . c_k + ||c_k||^2                                  (1)

which costs one (N x D)(D x K) matrix product instead of N*K*D differences.  Its rounding
error is about ``u (||x||^2 + ||c||^2)`` whatever the true distance, so when the data sit far
from the origin compared with their spread (a common offset, or late in training when codes sit
on the data) float32 ranks the codes wrongly: with an offset of 1e3 and a spread of 1e-2,
nearly every code comes out wrong.  Distances are translation invariant, so both x and the codes
are first centred by a common vector (the codebook mean) -- that restores the ranking.

For the argmin alone ``||x_i||^2`` is the same for every code and is dropped; rows are processed
in chunks so that memory stays O(chunk * K), never O(N * K).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .. import backend as B

__all__ = [
    "DistanceCache",
    "squared_distance_forward",
    "squared_distance_backward",
    "nearest_code",
    "default_chunk_size",
]

# Rows per chunk are chosen so one (chunk, K) score block has about this many elements
# (4M elements = 16 MiB in float32): large enough for an efficient matmul, small enough for cache.
_BLOCK_ELEMENTS = 1 << 22


def default_chunk_size(num_codes: int) -> int:
    """Rows per chunk for a codebook of ``num_codes`` codes (at least 64)."""
    return max(64, _BLOCK_ELEMENTS // max(int(num_codes), 1))


class DistanceCache(NamedTuple):
    xc: Any  # (N, D) centred inputs
    cc: Any  # (K, D) centred codes


def squared_distance_forward(x: Any, codebook: Any) -> tuple[Any, DistanceCache]:
    """All squared distances, centred expanded form (1).  Materialises (N, K): small inputs only.

    Parameters
    ----------
    x : (N, D) float
    codebook : (K, D) float

    Returns
    -------
    dist : (N, K), ``||x_i - c_k||^2`` (clamped at 0: rounding can make the expansion negative)
    cache : DistanceCache(xc, cc), the centred inputs and codes

    Notes
    -----
    This is the differentiable distance (useful for soft assignments and for learning);
    :func:`nearest_code` is the chunked argmin used by the quantizers.
    """
    xp = B.get_namespace(x, codebook)
    m = xp.mean(codebook, axis=0)  # (D,) common centre
    xc = x - m  # (N, D)
    cc = codebook - m  # (K, D)
    x2 = xp.sum(xc * xc, axis=1, keepdims=True)  # (N, 1)
    c2 = xp.sum(cc * cc, axis=1)  # (K,)
    dist = x2 - 2 * (xc @ cc.mT) + c2  # (N, K)
    # The clamp is for the value only; the backward below is that of the unclamped expansion,
    # which is the exact derivative wherever the distance is positive.
    return xp.maximum(dist, xp.zeros_like(dist)), DistanceCache(xc, cc)


def squared_distance_backward(ddist: Any, cache: DistanceCache) -> tuple[Any, Any]:
    """Gradients of the squared distances for inputs and codes.

    With ``d_ik = ||x_i - c_k||^2``:  ``dx_i = 2 sum_k ddist_ik (x_i - c_k)`` and
    ``dc_k = 2 sum_i ddist_ik (c_k - x_i)``; in matrix form (centring cancels in the differences)

        dx = 2 (rowsum(ddist) * xc - ddist @ cc)          (N, D)
        dc = 2 (colsum(ddist) * cc - ddist^T @ xc)        (K, D)

    The centre m = mean(C) moves with C, but every term depends on ``x - c`` only, so the
    derivative through m is zero.
    """
    xp = B.get_namespace(ddist)
    xc, cc = cache
    dx = 2 * (xp.sum(ddist, axis=1, keepdims=True) * xc - ddist @ cc)  # (N, D)
    dcodebook = 2 * (xp.sum(ddist, axis=0)[:, None] * cc - ddist.mT @ xc)  # (K, D)
    return dx, dcodebook


def nearest_code(
    x: Any,
    codebook: Any,
    *,
    metric: str = "euclidean",
    chunk_size: int | None = None,
    return_score: bool = False,
):
    """Index of the nearest code for every row; ties go to the first (lowest) index.

    Parameters
    ----------
    x : (N, D) float
    codebook : (K, D) float
    metric : ``"euclidean"`` (argmin of the squared distance, centred expanded form) or ``"dot"``
        (argmax of ``x . c``; for unit-norm codes this is the cosine-similarity codebook)
    chunk_size : rows per chunk (default: :func:`default_chunk_size`)
    return_score : also return, per row, the squared distance to the chosen code (euclidean,
        clamped at 0) or its dot product (dot)

    Returns
    -------
    indices : (N,) int64
    score : (N,) float, only if ``return_score``

    Notes
    -----
    There is no backward: the argmin is piecewise constant, and its derivative is zero wherever
    it exists.  Gradients of the quantizers treat the indices as constants.
    """
    xp = B.get_namespace(x, codebook)
    if metric not in ("euclidean", "dot"):
        raise ValueError(f"metric must be 'euclidean' or 'dot', got {metric!r}")
    N = x.shape[0]
    K = codebook.shape[0]
    step = int(chunk_size) if chunk_size else default_chunk_size(K)
    if metric == "euclidean":
        m = xp.mean(codebook, axis=0)  # (D,)
        cc = codebook - m  # (K, D) centred codes
        c2 = xp.sum(cc * cc, axis=1)  # (K,)
        ct = cc.mT  # (D, K)
    else:
        ct = codebook.mT  # (D, K)
    idx_parts, score_parts = [], []
    for start in range(0, N, step):
        rows = x[start : min(start + step, N), :]  # (n, D)
        if metric == "euclidean":
            xc = rows - m  # (n, D)
            partial = c2 - 2 * (xc @ ct)  # (n, K): distance less ||xc||^2
            idx = xp.argmin(partial, axis=1)  # (n,)
            if return_score:
                best = xp.take_along_axis(partial, idx[:, None], axis=1)[:, 0]
                d = best + xp.sum(xc * xc, axis=1)
                score_parts.append(xp.maximum(d, xp.zeros_like(d)))
        else:
            sim = rows @ ct  # (n, K)
            idx = xp.argmax(sim, axis=1)
            if return_score:
                score_parts.append(xp.take_along_axis(sim, idx[:, None], axis=1)[:, 0])
        idx_parts.append(xp.astype(idx, xp.int64))
    if N == 0:
        indices = xp.zeros((0,), dtype=xp.int64, device=B.get_device(x))
        score = xp.zeros((0,), dtype=x.dtype, device=B.get_device(x))
    else:
        indices = idx_parts[0] if len(idx_parts) == 1 else xp.concat(idx_parts)
        if return_score:
            score = score_parts[0] if len(score_parts) == 1 else xp.concat(score_parts)
    return (indices, score) if return_score else indices
