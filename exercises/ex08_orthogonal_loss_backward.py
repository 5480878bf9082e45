"""Exercise 08: the gradient of the orthogonal regulariser.

Symbols: K codes, D features.

The forward.  Shin et al. (arXiv 2112.00384, eq. 2) push the codes' directions apart by
penalising their cosine similarities.  With the normalised codes ``C^ = l2(C) (K, D)`` and their
Gram matrix ``G = C^ C^^T (K, K)``, vector-quantize-pytorch computes

    L = sum_{i,j} G_ij^2 / K^2 - 1/K                  a scalar

(for unit rows ``G_ii = 1``, so this is the mean squared similarity between distinct codes).

Your task.  Given the upstream scalar ``dloss``, return ``dcodebook = dloss * dL/dC (K, D)``.

Hints.
* First ``dL/dG``, then ``dL/dC^``: G contains C^ twice (``C^ C^^T``), and G is symmetric.
* Then the normalisation's backward (exercise 06) for every code.
* Would using ``||G - I||^2`` instead change the gradient?  (Try it after you pass.)

Check it: ``vqref grade ex08`` from the repository root.
"""

from array_api_compat import array_namespace


def orthogonal_loss_forward(codebook):
    """``sum(G^2) / K^2 - 1/K`` with ``G = l2(C) l2(C)^T``.  codebook (K, D) -> 0-d.  Given."""
    xp = array_namespace(codebook)
    K = codebook.shape[0]
    ch = codebook / xp.linalg.vector_norm(codebook, axis=-1, keepdims=True)  # (K, D)
    gram = ch @ ch.T  # (K, K)
    return xp.sum(gram * gram) / K**2 - 1.0 / K


def orthogonal_loss_backward(dloss, codebook):
    """The gradient of ``dloss * L`` with respect to the codebook.

    Parameters
    ----------
    dloss : float
    codebook : (K, D) float, rows longer than eps

    Returns
    -------
    dcodebook : (K, D)
    """
    raise NotImplementedError
