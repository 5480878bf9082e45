"""Solution 03: the codebook and commitment losses with stop-gradients.

Symbols: N vectors, D features; M = N * D.

``L = mse(sg[x], q) + beta * mse(x, sg[q])``.  Term by term:

* the codebook loss ``mse(sg[x], q)`` holds x constant: it gives ``dq = (2/M)(q - x)``, nothing to x;
* the commitment loss ``beta * mse(x, sg[q])`` holds q constant: it gives
  ``dx = beta (2/M)(x - q)``, nothing to q.

With the upstream scalar:

    dx = dloss * beta * (2/M) (x - q)          dq = dloss * (2/M) (q - x)

Without the stop-gradients both sides would receive ``(1 + beta)`` times their share: the codes
and the encoder would pull towards each other equally, which is what the two weights avoid.
"""

from array_api_compat import array_namespace


def vq_loss_forward(x, q, beta):
    """The value of ``mse(sg[x], q) + beta * mse(x, sg[q])``, i.e. ``(1 + beta) mse(x, q)``."""
    xp = array_namespace(x, q)
    return (1.0 + beta) * xp.mean((x - q) ** 2)


def codebook_loss_backward(dloss, x, q, beta):
    """``dx = dloss beta (2/M)(x - q)``, ``dq = dloss (2/M)(q - x)``.

    Parameters
    ----------
    dloss : float
    x, q : (N, D) float
    beta : float

    Returns
    -------
    dx, dq : (N, D) each
    """
    factor = 2.0 * dloss / (x.shape[0] * x.shape[1])  # 2 dloss / M
    dx = (beta * factor) * (x - q)  # (N, D) the commitment term only: sg[q] blocks q
    dq = factor * (q - x)  # (N, D) the codebook term only: sg[x] blocks x
    return dx, dq
