"""The fast path of the scalar quantizers' projections: the affine maps ``y = x W + b`` of
:mod:`vqref.ops.linear`, block of rows by block of rows on worker threads.

Symbols: N rows, Din input features, Dout output features (for FSQ one side is ``dim``, wide,
and the other ``C d``, a handful of channels), n the rows of one block.

An FSQ layer with projections spends almost all its time streaming (N, dim) arrays through
memory: the quantizer itself works on N rows of ``C d`` channels, a few per row.  The
definition (:func:`vqref.ops.linear.linear_forward` and ``linear_backward``) makes one pass over
memory per step -- the copy of x for the cache, the product, the bias added into a second new
array; in the backward ``dy W^T``, ``x^T dy`` and the sum of dy's rows each read dy again.  The
two functions here do the same arithmetic on blocks of about 2^18 numbers (1 MiB in float32),
each block's steps one after the other while the block is in cache, the blocks split between
the worker threads of :mod:`vqref.threads` (a single-threaded BLAS in each):

* :func:`affine_forward_blocked`: per block, the cache's copy of x's rows, their product with W
  written into its rows of y, the bias added in place.  dy and x are each read once;
* :func:`affine_backward_blocked`: per block, the rows of ``dx = dy W^T``, and the block's
  ``x_n^T dy_n`` and ``sum dy_n`` while dy's rows are in cache.  ``dW`` and ``db`` are the sums
  of the blocks' partial sums, added in block order: the same numbers for any number of workers.

``dW`` and ``db`` are summed in another order than numpy's (per block, then across blocks), so
they agree with the definition to float rounding; ``y`` and ``dx`` are row by row the same
products.  The tests pin both functions to the definition.
"""

from __future__ import annotations

import numpy as np

from .. import threads
from .linear import LinearCache

__all__ = ["BLOCK_ELEMENTS", "affine_rows", "affine_forward_blocked", "affine_backward_blocked"]

BLOCK_ELEMENTS = 1 << 18  # numbers of the wider side in one block of rows


def affine_rows(Din: int, Dout: int) -> int:
    """Rows per block: about :data:`BLOCK_ELEMENTS` numbers of the wider of x and y, at least 64."""
    return max(64, BLOCK_ELEMENTS // max(Din, Dout, 1))


def affine_forward_blocked(x: np.ndarray, W: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, LinearCache]:
    """``y = x W + b`` and the cache of :func:`vqref.ops.linear.linear_forward`, block by block.

    Parameters
    ----------
    x : (N, Din) numpy float
    W : (Din, Dout), x's dtype
    b : (Dout,) or None

    Returns
    -------
    y : (N, Dout); cache : LinearCache(x, W), copies of both
    """
    N, Din = x.shape
    Dout = W.shape[1]
    y = np.empty((N, Dout), dtype=np.result_type(x, W))  # (N, Dout)
    kept = np.empty_like(x)  # (N, Din) the cache's copy

    def block(i: int, j: int) -> None:
        kept[i:j] = x[i:j]  # (n, Din) copied while it is read for the product
        np.matmul(kept[i:j], W, out=y[i:j])  # (n, Dout)
        if b is not None:
            y[i:j] += b

    threads.for_blocks(N, affine_rows(Din, Dout), block, blas=True)
    return y, LinearCache(kept, W.copy())


def affine_backward_blocked(dy: np.ndarray, cache: LinearCache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(dx, dW, db)`` of :func:`vqref.ops.linear.linear_backward`, block by block.

    Returns
    -------
    dx : (N, Din), dW : (Din, Dout), db : (Dout,)
    """
    x, W = cache
    N, Din = x.shape
    Dout = dy.shape[1]
    step = affine_rows(Din, Dout)
    dtype = np.result_type(dy, W)
    dx = np.empty((N, Din), dtype=dtype)  # (N, Din)
    partial = [None] * (-(-N // step))  # one (dW, db) per block, in block order

    def block(i: int, j: int) -> None:
        rows = dy[i:j]  # (n, Dout)
        np.matmul(rows, W.T, out=dx[i:j])  # (n, Din)
        partial[i // step] = (x[i:j].T @ rows, np.sum(rows, axis=0))  # (Din, Dout), (Dout,)

    threads.for_blocks(N, step, block, blas=True)
    dW = np.zeros((Din, Dout), dtype=np.result_type(x, dy))
    db = np.zeros(Dout, dtype=dy.dtype)
    for w_part, b_part in partial:  # in block order: the same sums for any number of workers
        dW += w_part
        db += b_part
    return dx, dW, db
