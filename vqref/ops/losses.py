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
    diff: Any  # (N, D), a - b
    count: int  # M, the number of elements


def mse_forward(a: Any, b: Any) -> tuple[Any, MSECache]:
    """``mse(a, b) = mean((a - b)^2)`` over all elements.

    Parameters
    ----------
    a, b : (N, D) float

    Returns
    -------
    loss : 0-d array, the dtype of ``a``
    cache : MSECache(a - b, M)
    """
    xp = B.get_namespace(a, b)
    diff = a - b  # (N, D)
    count = B.numel(diff.shape)
    # xp.asarray: numpy reductions return numpy scalars; vqref's losses are 0-d arrays
    return xp.asarray(xp.sum(diff * diff) / max(count, 1)), MSECache(diff, count)


def mse_backward(dloss: Any, cache: MSECache) -> tuple[Any, Any]:
    """Gradients of ``dloss * mse(a, b)``: ``da = (2/M) dloss (a - b)``, ``db = -da``."""
    da = (2.0 / max(cache.count, 1)) * dloss * cache.diff  # (N, D)
    return da, -da


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
    dx, _ = mse_backward(dloss, cache)
    return dx


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
    _, dq = mse_backward(dloss, cache)
    return dq
