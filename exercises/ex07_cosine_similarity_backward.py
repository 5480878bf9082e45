"""Exercise 07: the backward of the cosine-similarity lookup.

Symbols: N vectors, D features, K codes.

The forward.  A cosine-similarity codebook (ViT-VQGAN, arXiv 2110.04627) compares directions
only: it normalises the inputs and the codes, and picks for each row the code of largest

    S = x^ C^^T,      x^ = l2(x) (N, D),   C^ = l2(C) (K, D),   S : (N, K)

(``l2`` is exercise 06's normalisation; here every row is longer than eps).

Your task.  Given ``dsim = dL/dS (N, K)``, return ``(dx, dcodebook)``, shapes (N, D) and (K, D).

Hints.
* First the product: what are ``dL/dx^`` and ``dL/dC^``?  Check each shape: N, K and D differ.
* Then each normalisation's backward (exercise 06) turns those into dx and dcodebook.

Check it: ``vqref grade ex07`` from the repository root.
"""

from array_api_compat import array_namespace


def cosine_similarity_forward(x, codebook):
    """``S = l2(x) l2(C)^T``.  x (N, D), codebook (K, D) -> S (N, K).  Given."""
    xp = array_namespace(x, codebook)
    xh = x / xp.linalg.vector_norm(x, axis=-1, keepdims=True)  # (N, D)
    ch = codebook / xp.linalg.vector_norm(codebook, axis=-1, keepdims=True)  # (K, D)
    return xh @ ch.T  # (N, K)


def cosine_similarity_backward(dsim, x, codebook):
    """Gradients of ``<dsim, S>`` for the inputs and the codes.

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
    raise NotImplementedError
