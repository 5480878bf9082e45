"""The VQ-VAE losses: mean squared error with explicit stop-gradients.

Symbols: N vectors, D features; M = N * D, the number of elements averaged over.

van den Oord et al. (arXiv 1711.00937, eq. 3) train with

    L = L_rec + || sg[z_e] - e ||^2 + beta || z_e - sg[e] ||^2

The second term (the *codebook loss*) moves the codes toward the encoder outputs; the third (the
*commitment loss*) keeps the encoder outputs near their codes.  Both have the same value,
``mse(z_e, e)``; they differ only in where the gradient goes, which ``sg[.]`` (stop-gradient:
identity forward, zero Jacobian backward) decides.  Here every loss is a mean over all M
elements, as ``torch.nn.functional.mse_loss`` and vector-quantize-pytorch compute it.

    mse(a, b) = (1/M) sum (a - b)^2,     d mse / d a = (2/M)(a - b) = - d mse / d b

Each public function below is that formula.  Two fast paths do the same arithmetic block of rows
by block of rows, so that no (N, D) temporary of differences is ever whole (on the CPU the
blocks stay in cache; on a GPU the block is the whole array): :func:`mse_forward_blocked` for
the forward's sum, :func:`scaled_difference_blocked` for the backwards' ``factor * (a - b)``.
Each public function chooses its fast path in one line (``fast=False`` runs the formula), and
the test suite pins each fast path to its formula.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .. import backend as B
from ..backend import Array

__all__ = [
    "MSECache",
    "mse_forward",
    "mse_backward",
    "mse_forward_blocked",
    "scaled_difference_blocked",
    "commitment_loss_forward",
    "commitment_loss_backward",
    "codebook_loss_forward",
    "codebook_loss_backward",
]


class MSECache(NamedTuple):
    """The two arguments themselves (not copies; the backward forms ``a - b``) and M."""

    a: Array  # (N, D)
    b: Array  # (N, D)
    count: int  # M, the number of elements


# Rows per block of the forward's sum are chosen so a block of a - b has about this many elements.
_BLOCK_ELEMENTS = 1 << 20


def mse_forward(a: Array, b: Array, *, fast: bool = True) -> tuple[Array, MSECache]:
    """``mse(a, b) = mean((a - b)^2)`` over all elements.

    Parameters
    ----------
    a, b : (N, D) float (other shapes that broadcast are accepted too)
    fast : for two (N, D) arrays of one shape, take the sum with :func:`mse_forward_blocked`
        (the same sum, block of rows by block of rows; equal to rounding, and bit for bit when
        the array fits in one block).  ``False`` runs the formula written below.

    Returns
    -------
    loss : 0-d array, the dtype of ``a``
    cache : MSECache(a, b, M)

    Notes
    -----
    The arguments are cached by reference (the backward forms ``a - b`` itself): they must not
    be modified in place before the backward.  An empty input gives 0, not NaN.
    """
    if fast and a.ndim == 2 and tuple(a.shape) == tuple(b.shape):  # the one-line choice
        return mse_forward_blocked(a, b)
    xp = B.get_namespace(a, b)
    diff = a - b  # (N, D), or the shape a and b broadcast to
    count = B.numel(diff.shape)  # M
    sq = xp.vecdot(diff, diff) if diff.ndim else diff * diff  # (N,) row sums of squares
    # xp.asarray: numpy reductions return numpy scalars; vqref's losses are 0-d arrays
    return xp.asarray(xp.sum(sq) / max(count, 1)), MSECache(a, b, count)


def mse_forward_blocked(a: Array, b: Array) -> tuple[Array, MSECache]:
    """Fast path of :func:`mse_forward` for two (N, D) arrays of one shape.

    The row sums of squares are taken block of rows by block of rows and added up, so the forward
    never holds an (N, D) array of differences (in an eval-mode quantizer that would be the
    largest array after the output).  With one block (``N <= _BLOCK_ELEMENTS // D`` rows, or
    any size on cupy) the additions are those of :func:`mse_forward` and so is the result, bit
    for bit; with several, the partial sums are added in another order (equal to rounding).
    """
    xp = B.get_namespace(a, b)
    N, D = a.shape
    count = N * D
    step = B.rows_per_block(a, _BLOCK_ELEMENTS)
    total = xp.zeros((), dtype=a.dtype, device=B.get_device(a))
    for start in range(0, N, step):
        diff = a[start : min(start + step, N), :] - b[start : min(start + step, N), :]  # (n, D)
        total = total + xp.sum(xp.vecdot(diff, diff))  # row sums of squares, then their sum
    return xp.asarray(total / max(count, 1)), MSECache(a, b, count)


def mse_backward(dloss: Array, cache: MSECache, *, fast: bool = True) -> tuple[Array, Array]:
    """Gradients of ``dloss * mse(a, b)``: ``da = (2/M) dloss (a - b)``, ``db = -da``.

    ``fast`` forms ``da`` with :func:`scaled_difference_blocked` (the same numbers, bit for bit).
    """
    factor = (2.0 / max(cache.count, 1)) * dloss  # () 2 dloss / M
    da = scaled_difference_blocked(factor, cache.a, cache.b) if fast else factor * (cache.a - cache.b)  # (N, D)
    return da, -da


def scaled_difference_blocked(factor: Any, a: Array, b: Array) -> Array:
    """Fast path of ``factor * (a - b)`` for (N, D) arrays, written one block of rows at a time.

    The same numbers as the one-line expression, bit for bit (the same two operations on every
    element); block by block, the difference never exists whole (one (N, D) array is allocated
    instead of two), and each block of it is still in cache when it is scaled.  Other shapes
    (and empty arrays) take the one-line expression.
    """
    xp = B.get_namespace(a, b)
    if a.ndim != 2 or tuple(a.shape) != tuple(b.shape) or a.shape[0] == 0:
        return factor * (a - b)
    N, D = a.shape
    step = B.rows_per_block(a, _BLOCK_ELEMENTS)
    out = None
    for start in range(0, N, step):
        stop = min(start + step, N)
        block = factor * (a[start:stop, :] - b[start:stop, :])  # (n, D)
        if out is None:
            out = xp.empty((N, D), dtype=block.dtype, device=B.get_device(a))
        out[start:stop, :] = block
    return out


def commitment_loss_forward(x: Array, q: Array) -> tuple[Array, MSECache]:
    """Commitment loss ``mse(x, sg[q])``: only the encoder output ``x`` receives a gradient.

    Parameters
    ----------
    x : (N, D) float, encoder outputs
    q : (N, D) float, their selected codes (treated as constants)
    """
    return mse_forward(x, q)


def commitment_loss_backward(dloss: Array, cache: MSECache, *, fast: bool = True) -> Array:
    """``dx = (2/M) dloss (x - q)``; ``q`` is behind a stop-gradient and gets nothing.

    ``fast``: :func:`scaled_difference_blocked`, the same numbers.
    """
    factor = (2.0 / max(cache.count, 1)) * dloss  # () 2 dloss / M
    return scaled_difference_blocked(factor, cache.a, cache.b) if fast else factor * (cache.a - cache.b)  # (N, D)


def codebook_loss_forward(x: Array, q: Array) -> tuple[Array, MSECache]:
    """Codebook loss ``mse(sg[x], q)``: only the selected codes ``q`` receive a gradient.

    Parameters
    ----------
    x : (N, D) float, encoder outputs (treated as constants)
    q : (N, D) float, their selected codes
    """
    return mse_forward(x, q)


def codebook_loss_backward(dloss: Array, cache: MSECache, *, fast: bool = True) -> Array:
    """``dq = (2/M) dloss (q - x)``; ``x`` is behind a stop-gradient and gets nothing.

    ``fast``: :func:`scaled_difference_blocked`, the same numbers.
    """
    factor = (2.0 / max(cache.count, 1)) * dloss  # () 2 dloss / M
    return scaled_difference_blocked(factor, cache.b, cache.a) if fast else factor * (cache.b - cache.a)  # (N, D)
