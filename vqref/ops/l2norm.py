"""Row-wise l2 normalisation ``y = x / ||x||``, the step behind cosine-similarity codebooks.

Symbols: N vectors, D features (the last axis; any leading axes are treated as more rows).

ViT-VQGAN (Yu et al., arXiv 2110.04627, section 3.2) normalises both the encoder outputs and the
codes, so that on the unit sphere ``||x^ - c^||^2 = 2 - 2 x^.c^`` and the nearest code is the one
with the largest cosine similarity.  The same normalisation feeds the orthogonal regulariser
(:mod:`vqref.ops.orthogonal`).

Derivative.  With ``n = ||x||`` and ``y = x / n``, the Jacobian is

    J = dy/dx = (I - y y^T) / n                                                  (1)

It is symmetric (y is the gradient of ``||x||``, so J is that function's Hessian), hence the
vector-Jacobian product and the Jacobian-vector product are the same formula,

    dx = J^T dy = (dy - y (y . dy)) / n.                                         (2)

The row's own direction is projected out: ``x . dx = 0``, so the gradient can turn x but never
change its length.

Near zero.  ``1/n`` is unbounded, so the forward divides by ``max(n, eps)``, as
``torch.nn.functional.normalize`` does (vector-quantize-pytorch uses eps = 1e-6).  Below eps the
map is linear, ``y = x / eps``, and its derivative is ``dy / eps``; a zero row gives ``y = 0``
and a finite gradient, never NaN.

Fast paths.  :func:`l2norm_forward` and :func:`l2norm_backward` are the definitions, written
with whole-array operations; each chooses a fast path in one line (``fast=False`` runs the
definition).  :func:`l2norm_forward_fast` takes every norm as one ``sqrt(x . x)`` and computes
the overflow-safe norm only for the rows whose squares overflowed (none, in practice), where the
definition computes both for every row; :func:`l2norm_backward_fast` applies (2) as
``(dy - y c) / n`` with the row coefficient ``c = y . dy`` (0 on the rows below eps), one block
of rows at a time, so that one (N, D) array is written instead of five.  Both agree with the
definitions to rounding (the row sums are taken in another order), and take the same branch on
every row; the test suite pins each to its definition, at the eps boundary and on overflowing
rows.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .. import backend as B
from ..backend import Array

__all__ = ["L2NormCache", "l2norm_forward", "l2norm_backward", "l2norm", "l2norm_forward_fast", "l2norm_backward_fast"]


class L2NormCache(NamedTuple):
    y: Array  # (N, D) the normalised rows
    scale: Any  # (N, 1) max(||x||, eps), the divisor actually used
    above: Any  # (N, 1) bool, ||x|| >= eps: the projection branch of the backward applies


def l2norm_forward(x: Array, *, eps: float = 1e-6, fast: bool = True) -> tuple[Array, L2NormCache]:
    """Divide every row by its Euclidean norm, clamped below at ``eps``.

    ``y_i = x_i / max(||x_i||, eps)`` (ViT-VQGAN, arXiv 2110.04627, sec. 3.2; the clamp is the
    convention of ``torch.nn.functional.normalize``).

    Parameters
    ----------
    x : (N, D) float, or (..., D): every leading index is a row
    eps : smallest divisor; rows shorter than this are scaled by ``1/eps`` instead
    fast : use :func:`l2norm_forward_fast` (the same to rounding); ``False`` runs the code below

    Returns
    -------
    y : (N, D), the dtype of ``x``; unit rows, except rows shorter than ``eps`` (zero rows stay 0)
    cache : L2NormCache(y, scale, above)

    Notes
    -----
    The norm is computed in the input's dtype; in float32 a row whose squared entries underflow
    (entries below about 1e-19) counts as shorter than eps, which is what happens anyway.
    """
    if fast:  # the one-line choice
        return l2norm_forward_fast(x, eps=eps)
    xp = B.get_namespace(x)
    norm = xp.linalg.vector_norm(x, axis=-1, keepdims=True)  # (N, 1)
    # The squares overflow for entries above ~1e19 (float32) although the norm is representable:
    # those rows (only those, so every other row keeps its rounding) get the norm of x / max|x_j|
    # scaled back, as rotation._unit computes it.
    norm = xp.where(xp.isfinite(norm), norm, _careful_norm(x))  # (N, 1)
    scale = xp.clip(norm, min=eps)  # (N, 1)
    y = x / scale  # (N, D)
    # torch's clamp lets the gradient through where norm >= eps; the same boundary is kept here
    # so that the two agree even for a row of length exactly eps.
    return y, L2NormCache(y, scale, norm >= eps)


def l2norm_backward(dy: Array, cache: L2NormCache, *, fast: bool = True, in_place: bool = False) -> Array:
    """Vector-Jacobian product of :func:`l2norm_forward`, equation (2).

    ``dx = (dy - y (y . dy)) / ||x||`` for rows with ``||x|| >= eps``, and ``dx = dy / eps`` for
    shorter rows, where the forward is the linear map ``x / eps``.

    Parameters
    ----------
    dy : (N, D) float, gradient of the loss with respect to ``y``
    cache : L2NormCache from the forward
    fast : use :func:`l2norm_backward_fast` (the same to rounding); ``False`` runs the code below
    in_place : write dx into ``dy`` (a buffer the caller allocated and nobody else sees) and
        return it; otherwise ``dy`` is only read

    Returns
    -------
    dx : (N, D), the dtype of ``dy``
    """
    if fast:  # the one-line choice
        return l2norm_backward_fast(dy, cache, in_place=in_place)
    xp = B.get_namespace(dy)
    y, scale, above = cache
    ydy = xp.sum(y * dy, axis=-1, keepdims=True)  # (N, 1)
    # Both branches are evaluated and the mask picks per row: no host-side branching.
    projected = xp.where(above, dy - y * ydy, dy)  # (N, D)
    if in_place:
        dy[...] = projected / scale
        return dy
    return projected / scale  # (N, D)


def _careful_norm(x: Array) -> Array:
    """``||x||`` row by row without overflowing squares: ``m ||x / m||`` with ``m = max_j |x_j|`` (N, 1)."""
    xp = B.get_namespace(x)
    big = xp.max(xp.abs(x), axis=-1, keepdims=True)  # (N, 1)
    safe = xp.where(big > 0, big, 1.0)  # (N, 1)
    return safe * xp.linalg.vector_norm(x / safe, axis=-1, keepdims=True)  # (N, 1)


def l2norm_forward_fast(x: Array, *, eps: float = 1e-6) -> tuple[Array, L2NormCache]:
    """Fast path of :func:`l2norm_forward`: ``n = sqrt(x . x)`` per row (no (N, D) temporary), the
    overflow-safe norm only on the rows where that is not finite
    (:func:`vqref.backend.where_rows`), then one division.  The same cache and branches."""
    xp = B.get_namespace(x)
    if x.ndim != 2:  # other shapes: the definition
        return l2norm_forward(x, eps=eps, fast=False)
    norm = xp.reshape(xp.sqrt(xp.vecdot(x, x)), (x.shape[0], 1))  # (N, 1)
    norm = B.where_rows(~xp.isfinite(norm), _careful_norm, (x,), norm)  # (N, 1) overflowed rows recomputed
    scale = xp.clip(norm, min=eps)  # (N, 1)
    y = B.quotient(x, scale)  # (N, D) x / scale
    return y, L2NormCache(y, scale, norm >= eps)


def l2norm_backward_fast(dy: Array, cache: L2NormCache, *, in_place: bool = False) -> Array:
    """Fast path of :func:`l2norm_backward`: ``dx = (dy - y c) / n`` with the row coefficient
    ``c = where(||x|| >= eps, y . dy, 0)`` (N, 1), written one block of rows at a time (one (N, D)
    array allocated, none ``in_place``; the definition allocates five).  On a row below eps,
    ``dy - y 0 = dy`` exactly, the definition's other branch."""
    xp = B.get_namespace(dy)
    y, scale, above = cache
    if dy.ndim != 2 or tuple(dy.shape) != tuple(y.shape) or dy.shape[0] == 0:
        return l2norm_backward(dy, cache, fast=False, in_place=in_place)
    N, D = dy.shape
    ydy = xp.reshape(xp.vecdot(y, dy), (N, 1))  # (N, 1), before any block of dy is overwritten
    coef = xp.where(above, ydy, xp.zeros_like(ydy))  # (N, 1)
    out = dy if in_place else xp.empty((N, D), dtype=dy.dtype, device=B.get_device(dy))

    def rows(start: int, stop: int) -> None:  # blocks on worker threads with numpy (B.for_row_blocks)
        r = slice(start, stop)
        out[r, :] = (dy[r, :] - y[r, :] * coef[r, :]) / scale[r, :]  # (n, D)

    B.for_row_blocks(dy, B.rows_per_block(dy, _BLOCK_ELEMENTS), rows)
    return out


# rows per block of the fast backward: about this many elements (a few MiB, cache-sized)
_BLOCK_ELEMENTS = 1 << 18


def l2norm(x: Array, *, eps: float = 1e-6) -> Array:
    """``x / max(||x||, eps)`` row by row, without a cache: :func:`l2norm_forward`'s ``y``.

    The one l2 normalisation of vqref, for every place that needs unit rows and no gradient
    (k-means on the sphere, cosine codebooks rebuilt from EMA statistics, restarted codes).

    Parameters
    ----------
    x : (N, D) float, or (..., D)
    eps : smallest divisor, as in :func:`l2norm_forward`

    Returns
    -------
    y : the shape and dtype of ``x``; zero rows stay zero
    """
    return l2norm_forward(x, eps=eps)[0]
