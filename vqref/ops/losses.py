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
the forward's sum, :func:`scaled_difference_blocked` for the backwards' ``factor * (a - b)``
(and ``base + factor * (a - b)``, a gradient added to one that already reaches ``a``).
A quantizer's backward needs two compositions of these, each also with a fast path:

    dx + d mse/dx                  :func:`commitment_loss_backward_added`   one (N, D) pass
    dC = E^T d mse/dq,  q = C[k]   :func:`codebook_loss_backward_codes`     no (N, D) array

the second by the identity ``sum_{i : k_i = k} (q_i - x_i) = -sum_{i : k_i = k} (x_i - c_k)``,
a segment sum of deviations from the codes.  Each public function chooses its fast path in one
line (``fast=False`` runs the formula), and the test suite pins each fast path to its formula.
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
    "commitment_loss_backward_added",
    "codebook_loss_backward_codes",
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


def scaled_difference_blocked(factor: Any, a: Array, b: Array, base: Array = None, out: Array = None) -> Array:
    """Fast path of ``factor * (a - b)`` (or ``base + factor * (a - b)``) for (N, D) arrays,
    written one block of rows at a time.

    The same numbers as the one-line expression, bit for bit (the same operations on every
    element); block by block, the difference never exists whole (one (N, D) array is allocated
    instead of two or three), and each block of it is still in cache when it is scaled.  Other
    shapes (and empty arrays) take the one-line expression.  ``base`` (N, D) is only read.
    ``out``: write the result into this (N, D) array instead of a new one (it may be ``base``
    itself: each block is read before it is written); only for a buffer the caller owns.
    """
    xp = B.get_namespace(a, b)
    if (
        a.ndim != 2
        or tuple(a.shape) != tuple(b.shape)
        or a.shape[0] == 0
        or (base is not None and tuple(base.shape) != tuple(a.shape))
    ):
        result = factor * (a - b) if base is None else base + factor * (a - b)
        if out is None:
            return result
        out[...] = result
        return out
    N, D = a.shape
    step = B.rows_per_block(a, _BLOCK_ELEMENTS)
    result = [out]

    def rows(start: int, stop: int) -> None:  # rows start:stop of the result
        block = factor * (a[start:stop, :] - b[start:stop, :])  # (n, D)
        if base is not None:
            block = base[start:stop, :] + block  # (n, D)
        if result[0] is None:  # the first block: its dtype is the result's
            result[0] = xp.empty((N, D), dtype=block.dtype, device=B.get_device(a))
        result[0][start:stop, :] = block

    rows(0, min(step, N))
    if N > step:  # the other blocks, on worker threads with numpy (B.for_row_blocks)
        B.for_row_blocks(a[step:, :], step, lambda i, j: rows(step + i, step + j))
    return result[0]


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


def commitment_loss_backward_added(
    dx: Array, dloss: Any, cache: MSECache, *, fast: bool = True, in_place: bool = False
) -> Array:
    """``dx + commitment_loss_backward(dloss, cache)``: the commitment gradient added to a gradient
    ``dx`` (N, D) that already reaches the encoder output (the estimator's).

    ``fast``: :func:`scaled_difference_blocked` with ``base=dx``, the same numbers bit for bit
    in one (N, D) pass (the formula allocates the commitment gradient, then the sum).
    ``in_place``: write the sum into ``dx`` (a buffer the caller allocated and nobody else sees)
    and return it; otherwise ``dx`` is only read and the result is a new array.
    """
    factor = (2.0 / max(cache.count, 1)) * dloss  # () 2 dloss / M
    if fast:  # the one-line choice
        return scaled_difference_blocked(factor, cache.a, cache.b, base=dx, out=dx if in_place else None)
    total = dx + commitment_loss_backward(dloss, cache, fast=False)  # (N, D)
    if in_place:
        dx[...] = total
        return dx
    return total


def codebook_loss_backward_codes(
    dloss: Any, cache: MSECache, indices: Array, codebook: Array, *, fast: bool = True
) -> Array:
    """The codebook loss's gradient collected per code: ``dC = E^T codebook_loss_backward(dloss)``
    for ``q = C[indices]`` (E the one-hot matrix of the lookup, :mod:`vqref.ops.lookup`).

        dc_k = (2 dloss / M) sum_{i : k_i = k} (q_i - x_i) = -(2 dloss / M) sum_{i : k_i = k} (x_i - c_k)

    Parameters
    ----------
    dloss : upstream gradient of the loss;  cache : MSECache of ``mse(x, q)``
    indices : (N,) int, the codes of q;  codebook : (K, D), the codebook q was looked up in

    Returns
    -------
    dcodebook : (K, D), zero rows for codes that no row selected

    ``fast``: the right-hand form, one segment sum of the deviations ``x_i - c_k``
    (:func:`vqref.backend.segment_sum` with ``offsets``; no (N, D) array), scaled once.  Equal to
    rounding (the scale is applied after the sum instead of before it).
    """
    factor = (2.0 / max(cache.count, 1)) * dloss  # () 2 dloss / M
    K = codebook.shape[0]
    if fast:  # the one-line choice
        return -factor * B.segment_sum(cache.a, indices, K, offsets=codebook)  # (K, D)
    return B.segment_sum(codebook_loss_backward(dloss, cache, fast=False), indices, K)  # (K, D)
