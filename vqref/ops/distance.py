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

The nearest code has a definition and a fast path.  :func:`nearest_code_portable` is the
definition, in Array API calls only (numpy, cupy, array_api_strict).  :func:`nearest_code_inplace`
is a numpy-only fast path (reused buffers, the code norms folded into the matrix product): the
one reason this module imports numpy; :func:`vqref.ops.distance_fast.nearest_code_threaded` runs
its blocks on worker threads.  :func:`nearest_code` chooses in one line -- a fast path for
numpy arrays of one float dtype (threaded when numpy's BLAS has several threads and there are
rows enough), the definition otherwise -- and the test suite pins each to the definition,
including the clamp of the scores at 0.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .. import backend as B
from ..backend import Array
from .distance_fast import nearest_code_threaded, use_threads

__all__ = [
    "DistanceCache",
    "squared_distance_forward",
    "squared_distance_backward",
    "nearest_code",
    "nearest_code_portable",
    "nearest_code_inplace",
    "default_chunk_size",
]

# Rows per chunk.  A few thousand rows keep every BLAS thread busy in the product, and the
# (chunk, K) score block small enough to be read back from cache by the argmin; measured on
# 2 cores for K from 256 to 4096, 2048-8192 rows ran 1.1-1.35x the time of one product over
# all N rows, 16k rows and more 1.4-3.5x.  Thin products (small K * D) get more rows, so that
# each call still carries about 2^27 multiply-adds: every call makes the BLAS threads meet,
# and on a busy machine a meeting can cost milliseconds (k-means with D = 64, K = 256 ran 3x
# slower in 2048-row chunks than in 16k-row chunks while other processes held the cores).
# The block is capped at 2^24 elements (64 MiB in float32) for very large codebooks.
_CHUNK_ROWS = 2048
_CALL_WORK = 1 << 27
_BLOCK_ELEMENTS = 1 << 24


def default_chunk_size(num_codes: int, dim: int = 256) -> int:
    """Rows per chunk for ``num_codes`` codes of ``dim`` features (see the notes above)."""
    K, D = max(int(num_codes), 1), max(int(dim), 1)
    rows = max(_CHUNK_ROWS, _CALL_WORK // (K * D))
    return max(64, min(rows, _BLOCK_ELEMENTS // K))


class DistanceCache(NamedTuple):
    xc: Any  # (N, D) centred inputs
    cc: Any  # (K, D) centred codes


def squared_distance_forward(x: Array, codebook: Array) -> tuple[Array, DistanceCache]:
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


def squared_distance_backward(ddist: Array, cache: DistanceCache, *, codebook: bool = True) -> tuple[Array, Any]:
    """Gradients of the squared distances for inputs and codes.

    With ``d_ik = ||x_i - c_k||^2``:  ``dx_i = 2 sum_k ddist_ik (x_i - c_k)`` and
    ``dc_k = 2 sum_i ddist_ik (c_k - x_i)``; in matrix form (centring cancels in the differences)

        dx = 2 (rowsum(ddist) * xc - ddist @ cc)          (N, D)
        dc = 2 (colsum(ddist) * cc - ddist^T @ xc)        (K, D)

    The centre m = mean(C) moves with C, but every term depends on ``x - c`` only, so the
    derivative through m is zero.  ``codebook=False`` skips dc (None): a (K x N)(N x D) product.
    """
    xp = B.get_namespace(ddist)
    xc, cc = cache
    dx = 2 * (xp.sum(ddist, axis=1, keepdims=True) * xc - ddist @ cc)  # (N, D)
    if not codebook:
        return dx, None
    dcodebook = 2 * (xp.sum(ddist, axis=0)[:, None] * cc - ddist.mT @ xc)  # (K, D)
    return dx, dcodebook


def nearest_code(
    x: Array,
    codebook: Array,
    *,
    metric: str = "euclidean",
    chunk_size: int | None = None,
    return_score: bool = False,
    return_codes: bool = False,
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
    return_codes : also return the chosen codes ``codebook[indices]`` (the lookup that follows
        a search; the threaded fast path gathers them while each block of rows is in cache)

    Returns
    -------
    indices : (N,) int64
    score : (N,) float, only if ``return_score``
    codes : (N, D), bit-exact copies of the chosen rows of ``codebook``, only if ``return_codes``

    Notes
    -----
    There is no backward: the argmin is piecewise constant, and its derivative is zero wherever
    it exists.  Gradients of the quantizers treat the indices as constants.

    :func:`nearest_code_portable` is the definition.  On numpy the same scores come from
    :func:`nearest_code_inplace`, which writes every chunk into buffers allocated once and
    adds the code norms inside the matrix product, instead of allocating four arrays per
    chunk and making three more passes over them (allocation, first touch of fresh pages and
    those passes cost a third of the product itself).  The indices agree except between codes
    that tie to within rounding.  With numpy's BLAS on more than one thread and enough rows,
    :func:`vqref.ops.distance_fast.nearest_code_threaded` runs the same blocks on worker
    threads instead (the argmin no longer leaves a core idle); its indices are those of
    :func:`nearest_code_inplace`.
    """
    xp = B.get_namespace(x, codebook)
    if metric not in ("euclidean", "dot"):
        raise ValueError(f"metric must be 'euclidean' or 'dot', got {metric!r}")
    numpy = B.is_numpy(xp) and x.dtype == codebook.dtype and xp.isdtype(x.dtype, "real floating")
    if numpy and use_threads(x.shape[0], codebook.shape[0], chunk_size):  # the one-line choice
        return nearest_code_threaded(x, codebook, metric=metric, chunk_size=chunk_size, return_score=return_score,
                                     return_codes=return_codes)  # fmt: skip
    search = nearest_code_inplace if numpy else nearest_code_portable
    found = search(x, codebook, metric=metric, chunk_size=chunk_size, return_score=return_score)
    if not return_codes:
        return found
    indices = found[0] if return_score else found
    codes = xp.take(codebook, indices, axis=0)  # (N, D) the lookup
    return (*found, codes) if return_score else (indices, codes)


def nearest_code_portable(
    x: Array,
    codebook: Array,
    *,
    metric: str = "euclidean",
    chunk_size: int | None = None,
    return_score: bool = False,
):
    """:func:`nearest_code` written with Array API calls only (every backend); same signature."""
    xp = B.get_namespace(x, codebook)
    N = x.shape[0]
    K = codebook.shape[0]
    step = int(chunk_size) if chunk_size else default_chunk_size(K, x.shape[1])
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
                d = best + xp.vecdot(xc, xc)  # (n,)
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


def nearest_code_inplace(
    x: Array,
    codebook: Array,
    *,
    metric: str = "euclidean",
    chunk_size: int | None = None,
    return_score: bool = False,
):
    """numpy fast path of :func:`nearest_code`: one matrix product per chunk, in reused buffers.

    The Euclidean scores ``||c_k||^2 - 2 xc . c_k`` come out of a single product with one more
    column, ``[xc, 1] @ [[-2 cc^T], [c2]]``, so after the product only the argmin reads the
    (chunk, K) block; the centred rows are written into the first D columns of a buffer whose
    last column holds ones.  Nothing of size (chunk, K) or (chunk, D) is allocated per chunk.

    The scores are those of :func:`nearest_code_portable` up to the order of the additions
    inside the product (the norm is added in the matrix product rather than after it), so the
    indices agree except where two codes tie to within rounding.  x and codebook: numpy arrays
    of one float dtype.
    """
    N, D = x.shape
    K = codebook.shape[0]
    dtype = x.dtype
    step = max(1, min(int(chunk_size) if chunk_size else default_chunk_size(K, x.shape[1]), max(N, 1)))
    indices = np.empty((N,), dtype=np.int64)
    score = np.empty((N,), dtype=dtype) if return_score else None
    buf = np.empty((step, K), dtype=dtype)  # (chunk, K) scores
    row_offsets = np.arange(0, step * K, K) if return_score else None  # (chunk,) flat index of each row
    euclid = metric == "euclidean"
    if euclid:
        m = np.mean(codebook, axis=0)  # (D,)
        cc = codebook - m  # (K, D) centred codes
        ct = np.empty((D + 1, K), dtype=dtype)  # (D + 1, K) = [[-2 cc^T], [||cc||^2]]
        np.multiply(cc.T, -2, out=ct[:D])
        ct[D] = np.vecdot(cc, cc)
        xc_buf = np.ones((step, D + 1), dtype=dtype)  # (chunk, D + 1) = [xc, 1]
    else:
        ct = codebook.T  # (D, K)
    for start in range(0, N, step):
        stop = min(start + step, N)
        n = stop - start
        s = buf[:n]  # (n, K)
        idx = indices[start:stop]  # (n,) written in place
        if euclid:
            xc1 = xc_buf[:n]  # (n, D + 1)
            np.subtract(x[start:stop], m, out=xc1[:, :D])  # centred rows; column D stays 1
            np.matmul(xc1, ct, out=s)  # ||c||^2 - 2 xc . c: the distance less ||xc||^2
            np.argmin(s, axis=1, out=idx)
            if return_score:
                xc = xc1[:, :D]  # (n, D)
                best = np.take(s.reshape(-1), idx + row_offsets[:n])  # (n,) s[i, idx[i]]
                np.maximum(best + np.vecdot(xc, xc), 0, out=score[start:stop])
        else:
            np.matmul(x[start:stop], ct, out=s)  # x . c
            np.argmax(s, axis=1, out=idx)
            if return_score:
                np.take(s.reshape(-1), idx + row_offsets[:n], out=score[start:stop])
    return (indices, score) if return_score else indices
