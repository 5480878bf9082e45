"""Solution 08: the gradient of the orthogonal regulariser.

Symbols: K codes, D features.

``L = sum G_ij^2 / K^2 - 1/K`` with ``G = C^ C^^T``:

    dL/dG  = 2 G / K^2                                   (K, K)
    dL/dC^ = dL/dG C^ + (dL/dG)^T C^ = 4 G C^ / K^2       (K, D), G symmetric, C^ used twice

and the normalisation's backward (exercise 06) for each code, with ``P = dloss dL/dC^``:

    dc_k = (p_k - c^_k (c^_k . p_k)) / ||c_k||

The projection removes the diagonal's contribution (``G_ii = 1`` whatever the length), which is
why ``||G - I||^2 / K^2`` gives the same gradient.
"""

from array_api_compat import array_namespace


def orthogonal_loss_forward(codebook):
    """``sum(G^2) / K^2 - 1/K`` with ``G = l2(C) l2(C)^T``."""
    xp = array_namespace(codebook)
    K = codebook.shape[0]
    ch = codebook / xp.linalg.vector_norm(codebook, axis=-1, keepdims=True)  # (K, D)
    gram = ch @ ch.T  # (K, K)
    return xp.sum(gram * gram) / K**2 - 1.0 / K


def orthogonal_loss_backward(dloss, codebook):
    """``dC = l2norm_backward(4 dloss G C^ / K^2)``.

    Parameters
    ----------
    dloss : float
    codebook : (K, D) float

    Returns
    -------
    dcodebook : (K, D)
    """
    xp = array_namespace(codebook)
    K = codebook.shape[0]
    norm = xp.linalg.vector_norm(codebook, axis=-1, keepdims=True)  # (K, 1)
    ch = codebook / norm  # (K, D)
    gram = ch @ ch.T  # (K, K)
    dch = (4.0 * dloss / K**2) * (gram @ ch)  # (K, D) dL/dC^
    return (dch - ch * xp.sum(ch * dch, axis=-1, keepdims=True)) / norm  # (K, D)
