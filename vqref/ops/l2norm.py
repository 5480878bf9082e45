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
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .. import backend as B
from ..backend import Array

__all__ = ["L2NormCache", "l2norm_forward", "l2norm_backward", "l2norm"]


class L2NormCache(NamedTuple):
    y: Array  # (N, D) the normalised rows
    scale: Any  # (N, 1) max(||x||, eps), the divisor actually used
    above: Any  # (N, 1) bool, ||x|| >= eps: the projection branch of the backward applies


def l2norm_forward(x: Array, *, eps: float = 1e-6) -> tuple[Array, L2NormCache]:
    """Divide every row by its Euclidean norm, clamped below at ``eps``.

    ``y_i = x_i / max(||x_i||, eps)`` (ViT-VQGAN, arXiv 2110.04627, sec. 3.2; the clamp is the
    convention of ``torch.nn.functional.normalize``).

    Parameters
    ----------
    x : (N, D) float, or (..., D): every leading index is a row
    eps : smallest divisor; rows shorter than this are scaled by ``1/eps`` instead

    Returns
    -------
    y : (N, D), the dtype of ``x``; unit rows, except rows shorter than ``eps`` (zero rows stay 0)
    cache : L2NormCache(y, scale, above)

    Notes
    -----
    The norm is computed in the input's dtype; in float32 a row whose squared entries underflow
    (entries below about 1e-19) counts as shorter than eps, which is what happens anyway.
    """
    xp = B.get_namespace(x)
    norm = xp.linalg.vector_norm(x, axis=-1, keepdims=True)  # (N, 1)
    # The squares overflow for entries above ~1e19 (float32) although the norm is representable:
    # those rows (only those, so every other row keeps its rounding) get the norm of x / max|x_j|
    # scaled back, as rotation._unit computes it.
    big = xp.max(xp.abs(x), axis=-1, keepdims=True)  # (N, 1)
    safe = xp.where(big > 0, big, 1.0)  # (N, 1)
    norm = xp.where(xp.isfinite(norm), norm, safe * xp.linalg.vector_norm(x / safe, axis=-1, keepdims=True))
    scale = xp.clip(norm, min=eps)  # (N, 1)
    y = x / scale  # (N, D)
    # torch's clamp lets the gradient through where norm >= eps; the same boundary is kept here
    # so that the two agree even for a row of length exactly eps.
    return y, L2NormCache(y, scale, norm >= eps)


def l2norm_backward(dy: Array, cache: L2NormCache) -> Array:
    """Vector-Jacobian product of :func:`l2norm_forward`, equation (2).

    ``dx = (dy - y (y . dy)) / ||x||`` for rows with ``||x|| >= eps``, and ``dx = dy / eps`` for
    shorter rows, where the forward is the linear map ``x / eps``.

    Parameters
    ----------
    dy : (N, D) float, gradient of the loss with respect to ``y``
    cache : L2NormCache from the forward

    Returns
    -------
    dx : (N, D), the dtype of ``dy``
    """
    xp = B.get_namespace(dy)
    y, scale, above = cache
    ydy = xp.sum(y * dy, axis=-1, keepdims=True)  # (N, 1)
    # Both branches are evaluated and the mask picks per row: no host-side branching.
    projected = xp.where(above, dy - y * ydy, dy)  # (N, D)
    return projected / scale  # (N, D)


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
