"""The fast path of FSQ's projections: the affine maps ``y = x W + b`` of :mod:`vqref.ops.linear`
with fewer passes over the (N, dim) arrays.

Symbols: N rows, Din input features, Dout output features (for FSQ one side is ``dim``, wide,
and the other ``C d``, a handful of channels).

An FSQ layer with projections spends almost all its time streaming (N, dim) arrays through
memory: the quantizer itself works on N rows of ``C d`` channels, a few per row.  The
definition (:func:`vqref.ops.linear.linear_forward` and ``linear_backward``) writes the product
and then adds the bias into a second new (N, Dout) array, and in the backward sums the upstream
gradient's rows for ``db`` in a pass of its own.  The two functions here do the same arithmetic
with two passes fewer:

* :func:`affine_forward_inplace` adds the bias into the product it has just written (a new
  (N, dim) array costs its page faults too: about as much as the pass itself);
* :func:`affine_backward_stacked` computes ``dW`` and ``db`` with one product when the input is
  thin: ``[x, 1]^T dy`` is ``x^T dy`` stacked on ``1^T dy = sum_n dy_n``, so the upstream
  gradient is read once for both.

Sums are taken in another order (the product's instead of numpy's pairwise sum), so the results
agree with the definition to float rounding; the tests pin both functions to it.
"""

from __future__ import annotations

import numpy as np

from .linear import LinearCache

__all__ = ["THIN", "affine_forward_inplace", "affine_backward_stacked"]

THIN = 64  # inputs at most this wide get the stacked product (FSQ's C d side)


def affine_forward_inplace(x: np.ndarray, W: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, LinearCache]:
    """``y = x W + b`` with the bias added in place; the cache of :func:`vqref.ops.linear.linear_forward`.

    Parameters
    ----------
    x : (N, Din) numpy float
    W : (Din, Dout), x's dtype
    b : (Dout,) or None

    Returns
    -------
    y : (N, Dout); cache : LinearCache(x, W), copies of both
    """
    y = np.matmul(x, W)  # (N, Dout) a new array
    if b is not None:
        y += b  # (N, Dout) into the product: no second array
    return y, LinearCache(x.copy(), W.copy())


def affine_backward_stacked(dy: np.ndarray, cache: LinearCache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(dx, dW, db)`` of :func:`vqref.ops.linear.linear_backward`, with ``[x, 1]^T dy`` for thin x.

    Returns
    -------
    dx : (N, Din), dW : (Din, Dout), db : (Dout,)
    """
    x, W = cache
    N, Din = x.shape
    dx = dy @ W.T  # (N, Din)
    if Din > THIN:
        return dx, x.T @ dy, np.sum(dy, axis=0)  # as the definition
    stacked = np.empty((N, Din + 1), dtype=x.dtype)  # (N, Din + 1) [x, 1]
    stacked[:, :Din] = x
    stacked[:, Din] = 1
    both = stacked.T @ dy  # (Din + 1, Dout): x^T dy over 1^T dy
    return dx, both[:Din].copy(), both[Din].copy()
