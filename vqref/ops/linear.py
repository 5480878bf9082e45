"""The affine map ``y = x W + b`` as a forward/backward pair.

Symbols: N rows (a batch of vectors), Din input features, Dout output features.

The one linear layer of vqref: the encoder and decoder of :mod:`vqref.nn` are built from it, and
so are the projections in and out of the scalar quantizers (FSQ's ``project_in``/``project_out``).
``W`` is stored input-major, ``(Din, Dout)``, as in cs231n, so the forward is a plain ``x @ W``;
torch's ``nn.Linear`` stores the transpose ``(Dout, Din)``.

The cache holds copies of ``x`` and ``W``, never a reference to an argument: changing either in
place between the forward and the backward changes no gradient.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .. import backend as B
from ..backend import Array

__all__ = ["LinearCache", "linear_forward", "linear_backward"]


class LinearCache(NamedTuple):
    x: Array  # (N, Din) a copy of the layer input
    W: Array  # (Din, Dout) a copy of the weights used by the forward


def linear_forward(x: Array, W: Array, b: Array | None) -> tuple[Array, LinearCache]:
    """Affine map ``y = x W + b``, one row per input vector.

    Parameters
    ----------
    x : (N, Din) float
    W : (Din, Dout) float
        Stored input-major (as in cs231n), so the forward is a plain ``x @ W``; torch's
        ``nn.Linear`` stores the transpose ``(Dout, Din)``.
    b : (Dout,) float, or None for a map without bias (``y = x W``)

    Returns
    -------
    y : (N, Dout)
    cache : LinearCache(x, W), copies of both: changing ``x`` or ``W`` in place after the
        forward cannot change the gradients (a copy of W costs Din * Dout, a fraction of the
        N * Din * Dout of the product)
    """
    xp = B.get_namespace(x, W)
    y = x @ W  # (N, Dout)
    if b is not None:
        y = y + b  # (N, Dout) the bias broadcast over rows
    return y, LinearCache(xp.asarray(x, copy=True), xp.asarray(W, copy=True))


def linear_backward(dy: Array, cache: LinearCache) -> tuple[Any, Any, Any]:
    """Gradients of the affine map.

    From ``y_nj = sum_i x_ni W_ij + b_j``:

        dx = dy W^T            (N, Din)
        dW = x^T dy            (Din, Dout)   a sum of one outer product per row
        db = sum_n dy_n        (Dout,)       b is broadcast over rows, so its gradient sums them

    Parameters
    ----------
    dy : (N, Dout) float
    cache : LinearCache from :func:`linear_forward`

    Returns
    -------
    dx : (N, Din), dW : (Din, Dout), db : (Dout,) (the bias gradient; a caller whose map has no
        bias ignores it)
    """
    xp = B.get_namespace(dy)
    x, W = cache
    dx = dy @ W.mT  # (N, Din)
    dW = x.mT @ dy  # (Din, Dout)
    db = xp.sum(dy, axis=0)  # (Dout,)
    return dx, dW, db
