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
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .. import backend as B

__all__ = [
    "MSECache",
    "mse_forward",
    "mse_backward",
    "commitment_loss_forward",
    "commitment_loss_backward",
    "codebook_loss_forward",
    "codebook_loss_backward",
]


class MSECache(NamedTuple):
    """The two arguments themselves (not copies; the backward forms ``a - b``) and M."""

    a: Any  # (N, D)
    b: Any  # (N, D)
    count: int  # M, the number of elements


# Rows per block of the forward's sum are chosen so a block of a - b has about this many elements.
_BLOCK_ELEMENTS = 1 << 20


def mse_forward(a: Any, b: Any) -> tuple[Any, MSECache]:
    """``mse(a, b) = mean((a - b)^2)`` over all elements.

    Parameters
    ----------
    a, b : (N, D) float

    Returns
    -------
    loss : 0-d array, the dtype of ``a``
    cache : MSECache(a, b, M)

    Notes
    -----
    The sum of squares is taken block of rows by block of rows, so the forward never holds an
    (N, D) array of differences (in an eval-mode quantizer that is the largest array after the
    output); the backward, which needs ``a - b`` whole, forms it there.  The arguments are
    cached by reference: they must not be modified in place before the backward.
    """
    xp = B.get_namespace(a, b)
    if a.ndim != 2 or tuple(a.shape) != tuple(b.shape):
        diff = a - b  # any other shapes: broadcast once, whole
        count = B.numel(diff.shape)
        sq = xp.vecdot(diff, diff) if diff.ndim else diff * diff
        # xp.asarray: numpy reductions return numpy scalars; vqref's losses are 0-d arrays
        return xp.asarray(xp.sum(sq) / max(count, 1)), MSECache(a, b, count)
    N, D = a.shape
    count = N * D
    step = B.rows_per_block(a, _BLOCK_ELEMENTS)
    total = xp.zeros((), dtype=a.dtype, device=B.get_device(a))
    for start in range(0, N, step):
        diff = a[start : min(start + step, N), :] - b[start : min(start + step, N), :]  # (n, D)
        total = total + xp.sum(xp.vecdot(diff, diff))  # row sums of squares, then their sum
    return xp.asarray(total / max(count, 1)), MSECache(a, b, count)


def mse_backward(dloss: Any, cache: MSECache) -> tuple[Any, Any]:
    """Gradients of ``dloss * mse(a, b)``: ``da = (2/M) dloss (a - b)``, ``db = -da``."""
    da = _scaled_difference((2.0 / max(cache.count, 1)) * dloss, cache.a, cache.b)  # (N, D)
    return da, -da


def _scaled_difference(factor: Any, a: Any, b: Any) -> Any:
    """``factor * (a - b)`` for (N, D) arrays, written one block of rows at a time.

    The same numbers as the one-line expression; block by block, the difference never exists
    whole (one (N, D) array is allocated instead of two), and each block of it is still in
    cache when it is scaled.
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


def commitment_loss_forward(x: Any, q: Any) -> tuple[Any, MSECache]:
    """Commitment loss ``mse(x, sg[q])``: only the encoder output ``x`` receives a gradient.

    Parameters
    ----------
    x : (N, D) float, encoder outputs
    q : (N, D) float, their selected codes (treated as constants)
    """
    return mse_forward(x, q)


def commitment_loss_backward(dloss: Any, cache: MSECache) -> Any:
    """``dx = (2/M) dloss (x - q)``; ``q`` is behind a stop-gradient and gets nothing."""
    return _scaled_difference((2.0 / max(cache.count, 1)) * dloss, cache.a, cache.b)  # (N, D)


def codebook_loss_forward(x: Any, q: Any) -> tuple[Any, MSECache]:
    """Codebook loss ``mse(sg[x], q)``: only the selected codes ``q`` receive a gradient.

    Parameters
    ----------
    x : (N, D) float, encoder outputs (treated as constants)
    q : (N, D) float, their selected codes
    """
    return mse_forward(x, q)


def codebook_loss_backward(dloss: Any, cache: MSECache) -> Any:
    """``dq = (2/M) dloss (q - x)``; ``x`` is behind a stop-gradient and gets nothing."""
    return _scaled_difference((2.0 / max(cache.count, 1)) * dloss, cache.b, cache.a)  # (N, D)
