"""Solution 06: the backward of the l2 normalisation.

Symbols: N vectors, D features.

For a row with ``n = ||x|| >= eps``, ``y = x / n`` and ``dn/dx = y``, so

    dy/dx = I / n - x y^T / n^2 = (I - y y^T) / n

This Jacobian is symmetric, and its product with dy costs O(D) per row:

    dx = (dy - y (y . dy)) / n

The part of dy along y is removed: a unit vector can turn but not grow, so ``x . dx = 0``.  For a
row shorter than eps the forward is the linear map ``x / eps``, whose backward is ``dy / eps``
(no projection, and finite for the zero row).  Both branches are computed and a mask picks one
per row, which keeps the code free of Python-level branching on data.
"""

from array_api_compat import array_namespace


def l2norm_forward(x, eps=1e-6):
    """``x / max(||x||, eps)`` row by row."""
    xp = array_namespace(x)
    norm = xp.linalg.vector_norm(x, axis=-1, keepdims=True)  # (N, 1)
    return x / xp.clip(norm, min=eps)  # (N, D)


def l2norm_backward(dy, x, eps=1e-6):
    """``dx = (dy - y (y . dy)) / ||x||``, or ``dy / eps`` for rows shorter than eps.

    Parameters
    ----------
    dy, x : (N, D) float
    eps : float

    Returns
    -------
    dx : (N, D)
    """
    xp = array_namespace(dy, x)
    norm = xp.linalg.vector_norm(x, axis=-1, keepdims=True)  # (N, 1)
    scale = xp.clip(norm, min=eps)  # (N, 1) the divisor the forward used
    y = x / scale  # (N, D)
    y_dot_dy = xp.sum(y * dy, axis=-1, keepdims=True)  # (N, 1)
    projected = xp.where(norm >= eps, dy - y * y_dot_dy, dy)  # (N, D)
    return projected / scale  # (N, D)
