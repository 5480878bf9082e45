"""Solution 09: the rotation trick's gradient in O(D) per row.

Symbols: N vectors, D features.

With ``R = I - 2 r r^T + 2 q^ e^^T`` the transpose is ``R^T = I - 2 r r^T + 2 e^ q^^T`` (the first
two terms are symmetric; the last outer product turns around).  Applied to g without the matrix:

    R^T g = g - 2 r (r . g) + 2 e^ (q^ . g)          three dot products per row
    de    = lambda R^T g,       lambda = ||q|| / ||e||

Time and memory O(N D).  Rotations keep lengths, so ``||de|| = lambda ||g||``; and
``e . de = lambda (R e) . g = lambda ||e|| q^ . g = q . g``.  (This Householder form divides by
``||e^ + q^||``, which vanishes when q points opposite to e; vqref's library version uses a
plane form that is stable there.)
"""

from array_api_compat import array_namespace


def rotation_trick_forward(e, q):
    """The value of ``sg[lambda R] e``: q itself."""
    xp = array_namespace(e, q)
    return xp.asarray(q, copy=True)


def rotation_trick_backward(g, e, q):
    """``de = lambda (g - 2 r (r . g) + 2 e^ (q^ . g))``.

    Parameters
    ----------
    g, e, q : (N, D) float

    Returns
    -------
    de : (N, D)
    """
    xp = array_namespace(g, e, q)
    e_norm = xp.linalg.vector_norm(e, axis=-1, keepdims=True)  # (N, 1)
    q_norm = xp.linalg.vector_norm(q, axis=-1, keepdims=True)  # (N, 1)
    eh, qh = e / e_norm, q / q_norm  # (N, D) each
    r = eh + qh  # (N, D)
    r = r / xp.linalg.vector_norm(r, axis=-1, keepdims=True)  # (N, D) the bisector
    r_g = xp.sum(r * g, axis=-1, keepdims=True)  # (N, 1)
    qh_g = xp.sum(qh * g, axis=-1, keepdims=True)  # (N, 1)
    return (q_norm / e_norm) * (g - 2.0 * r * r_g + 2.0 * eh * qh_g)  # (N, D)
