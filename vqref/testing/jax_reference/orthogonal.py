"""JAX reference for the orthogonal codebook regulariser (Shin et al., arXiv 2112.00384, eq. 2).

Symbols: K codes, D features, H codebooks (heads), n codes taking part.

With the normalised codes of the subset, ``C^ = l2(C[ids])`` (H, n, D), and their cosine
similarities ``G = C^ C^T`` (H, n, n), vector-quantize-pytorch's loss is

    L = sum_{h,i,j} G_hij^2 / (H n^2) - 1/n.

The subset is a gather along the code axis (repeats allowed), so JAX's derivative scatter-adds
each selected row's gradient back into its code and leaves every other code at zero -- the
adjoint that vqref writes as a segment sum.
"""

from __future__ import annotations

import jax.numpy as jnp

from .cosine import l2norm

__all__ = ["orthogonal_loss"]


def orthogonal_loss(codebook, *, code_ids=None, eps: float = 1e-6):
    """``sum(G^2) / (H n^2) - 1/n`` for the codes ``code_ids`` (default all); a 0-d array.

    Parameters
    ----------
    codebook : (K, D), or (H, K, D) for H codebooks
    code_ids : optional (n,) int, the codes taking part (held fixed)
    eps : the normalisation clamp

    Returns
    -------
    loss : 0-d
    """
    C = codebook[None] if codebook.ndim == 2 else codebook  # (H, K, D)
    if code_ids is not None:
        C = jnp.take(C, jnp.asarray(code_ids), axis=1)  # (H, n, D)
    H, n = C.shape[0], C.shape[1]
    Chat = l2norm(C, eps=eps)  # (H, n, D)
    G = jnp.einsum("hid,hjd->hij", Chat, Chat)  # (H, n, n)
    return jnp.sum(G * G) / (H * n * n) - 1.0 / n
