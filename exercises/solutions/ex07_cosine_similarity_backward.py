"""Solution 07: the backward of the cosine-similarity lookup.

Symbols: N vectors, D features, K codes.

``S = x^ C^^T`` is a matrix product, so

    dx^ = dS C^        (N, K) @ (K, D) = (N, D)
    dC^ = dS^T x^      (K, N) @ (N, D) = (K, D)

(the shapes leave no other choice when N, K and D differ).  Each normalisation then contributes
its backward (exercise 06): ``dx = (dx^ - x^ (x^ . dx^)) / ||x||``, and the same for the codes.
"""

from array_api_compat import array_namespace


def cosine_similarity_forward(x, codebook):
    """``S = l2(x) l2(C)^T``."""
    xp = array_namespace(x, codebook)
    xh = x / xp.linalg.vector_norm(x, axis=-1, keepdims=True)  # (N, D)
    ch = codebook / xp.linalg.vector_norm(codebook, axis=-1, keepdims=True)  # (K, D)
    return xh @ ch.T  # (N, K)


def _normalize_backward(dyhat, y, norm, xp):
    """Exercise 06 for rows longer than eps: ``(dy^ - y^ (y^ . dy^)) / ||y||``."""
    return (dyhat - y * xp.sum(y * dyhat, axis=-1, keepdims=True)) / norm


def cosine_similarity_backward(dsim, x, codebook):
    """``dx`` and ``dcodebook`` through the product and the two normalisations.

    Parameters
    ----------
    dsim : (N, K) float
    x : (N, D) float
    codebook : (K, D) float

    Returns
    -------
    dx : (N, D)
    dcodebook : (K, D)
    """
    xp = array_namespace(dsim, x, codebook)
    x_norm = xp.linalg.vector_norm(x, axis=-1, keepdims=True)  # (N, 1)
    c_norm = xp.linalg.vector_norm(codebook, axis=-1, keepdims=True)  # (K, 1)
    xh, ch = x / x_norm, codebook / c_norm  # (N, D), (K, D)
    dxh = dsim @ ch  # (N, D)
    dch = dsim.T @ xh  # (K, D)
    return _normalize_backward(dxh, xh, x_norm, xp), _normalize_backward(dch, ch, c_norm, xp)
