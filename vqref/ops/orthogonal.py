"""Orthogonal regularisation of a codebook: push the codes' directions apart.

Symbols: K codes, D features, H codebooks (heads), n codes taking part (n = K, or a subset).

Shin et al. (arXiv 2112.00384, "Exploration into Translation-Equivariant Image Quantization",
eq. 2) penalise the cosine similarity between every pair of codes.  With the row-normalised
codes ``C^ = l2(C)`` and their Gram matrix of cosine similarities ``G = C^ C^T`` (n x n),
vector-quantize-pytorch computes, for H codebooks of n codes each,

    L = sum_{h,i,j} G_hij^2 / (H n^2) - 1/n.                                     (1)

For unit rows ``G_ii = 1``, so (1) equals ``||G - I||_F^2 / n^2`` (averaged over heads): the mean
squared cosine similarity between distinct codes.  It is 0 exactly when the codes are mutually
orthogonal, which is only possible for n <= D; for n > D it cannot go below ``1/D - 1/n``
(``||C^ C^T||_F = ||C^T C^||_F >= tr(C^T C^) / sqrt(D) = n / sqrt(D)``), a bound that tight frames
reach.

Backward.  ``dL/dG = 2 G / (H n^2)``; G is symmetric and uses C^ twice, so ``dL/dC^ = (4/(H n^2)) G C^``.
The chain through the normalisation (:mod:`vqref.ops.l2norm`) projects each row onto the
tangent space of its code,

    dc_i = (p_i - c^_i (c^_i . p_i)) / ||c_i||,      P = (4/(H n^2)) G C^            (2)

Projection removes the ``G_ii`` term, so using ``A = G - I`` instead of G (the ``||G - I||^2`` form
of the TE-VQGAN code) gives the same gradient.  The loss depends on each code only through its
direction, so the gradient rows are orthogonal to the codes and plain SGD never shrinks them.

Subsets.  The Gram matrix costs O(n^2 D) time and O(n^2) memory (8192 codes: 268 MB per head in
float32), so vector-quantize-pytorch can restrict the loss to the codes used in the batch
(``orthogonal_reg_active_codes_only``) and/or to a random subset (``orthogonal_reg_max_codes``).
:func:`select_codes` picks the subset on the host; the forward gathers those rows and the
backward scatters their gradients back, leaving zeros for every other code.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .. import backend as B
from ..backend import Array
from .l2norm import L2NormCache, l2norm_backward, l2norm_forward

__all__ = [
    "OrthogonalLossCache",
    "select_codes",
    "orthogonal_loss_forward",
    "orthogonal_loss_backward",
]


class OrthogonalLossCache(NamedTuple):
    norm_cache: L2NormCache  # of the (H, n, D) subset: C^ = norm_cache.y
    gram: Any  # (H, n, n) G = C^ C^T
    code_ids: Any  # (n,) int64 ids of the subset in the codebook's namespace, or None for all codes
    num_codes: int  # K, the length of the codebook axis of the gradient
    squeeze: bool  # the codebook was (K, D): drop the head axis again in the backward


def select_codes(
    num_codes: int,
    *,
    used_indices: Any = None,
    max_codes: int | None = None,
    rng: Any = None,
) -> np.ndarray:
    """The codes the orthogonal loss should see, as vector-quantize-pytorch chooses them.

    First, if ``used_indices`` is given, keep only the codes that occur in it
    (``orthogonal_reg_active_codes_only``).  Then, if more than ``max_codes`` remain, keep a
    uniformly random subset of ``max_codes`` of them, drawn without replacement from ``rng``
    (``orthogonal_reg_max_codes``).

    Parameters
    ----------
    num_codes : K
    used_indices : (N,) int in ``[0, K)``, any namespace, optional; the batch's code indices
    max_codes : optional upper bound on the subset size
    rng : ``numpy.random.Generator`` or seed; needed only when a random subset is drawn

    Returns
    -------
    code_ids : (n,) int64 host (numpy) array, sorted and without repeats

    Notes
    -----
    This is a driver-side helper: it brings ``used_indices`` to the host (a device sync) and
    samples there, so every backend gets the same subset from the same generator.  The loss is
    invariant to the order of the codes, so sorting the ids changes nothing but readability.
    """
    K = int(num_codes)
    if used_indices is None:
        ids = np.arange(K, dtype=np.int64)
    else:
        ids = np.unique(np.asarray(B.to_numpy(used_indices), dtype=np.int64).reshape(-1))
        if ids.size and (ids[0] < 0 or ids[-1] >= K):
            raise ValueError(f"used_indices must lie in [0, {K}), got values from {ids[0]} to {ids[-1]}")
    if max_codes is not None and ids.size > int(max_codes):
        if rng is None:
            raise ValueError("select_codes: drawing a random subset needs rng (a numpy Generator or a seed)")
        pick = B.as_generator(rng).choice(ids.size, size=int(max_codes), replace=False)
        ids = np.sort(ids[pick])
    return ids


def orthogonal_loss_forward(
    codebook: Array, *, code_ids: Any = None, eps: float = 1e-6
) -> tuple[Array, OrthogonalLossCache]:
    """Orthogonal regulariser (1), vector-quantize-pytorch's ``orthogonal_loss_fn``.

    ``L = sum_{h,i,j} (c^_hi . c^_hj)^2 / (H n^2) - 1/n`` with ``c^ = c / max(||c||, eps)``
    (Shin et al., arXiv 2112.00384, eq. 2).

    Parameters
    ----------
    codebook : (K, D) float, or (H, K, D) for H codebooks (the loss is the mean over heads)
    code_ids : optional (n,) int ids of the codes taking part, a host (numpy) array such as
        :func:`select_codes` returns, or an array of the codebook's namespace; default all K
    eps : normalisation floor, as in :func:`vqref.ops.l2norm.l2norm_forward`

    Returns
    -------
    loss : 0-d array, the dtype of ``codebook``
    cache : OrthogonalLossCache(norm_cache, gram, code_ids, K, squeeze)

    Notes
    -----
    The ``- 1/n`` assumes unit rows.  A code shorter than eps (a zero row) has ``G_ii < 1`` and
    pulls the value below the ``||G - I||^2 / n^2`` form, possibly below zero; the two forms agree
    whenever every code is longer than eps.  Near the minimum the subtraction cancels: in float32
    the value carries an absolute error of about ``1e-7 / n``.
    """
    xp = B.get_namespace(codebook)
    squeeze = codebook.ndim == 2
    C = codebook[None, ...] if squeeze else codebook  # (H, K, D)
    H, K, _ = C.shape
    if code_ids is not None:
        if B.library_name(code_ids) != B.library_name(codebook):
            # host ids (numpy array, list) for a codebook that lives elsewhere: move them over
            code_ids = B.from_numpy(np.asarray(code_ids, dtype=np.int64), xp, device=B.get_device(codebook))
        C = xp.take(C, code_ids, axis=1)  # (H, n, D)
    n = C.shape[1]
    if n == 0:
        raise ValueError("orthogonal_loss_forward: no codes selected (n = 0)")
    Chat, norm_cache = l2norm_forward(C, eps=eps)  # (H, n, D)
    G = Chat @ Chat.mT  # (H, n, n) cosine similarities
    # xp.asarray: numpy reductions return a numpy scalar (a Python float subclass); keep an array
    loss = xp.asarray(xp.sum(G * G) / (H * n * n) - 1.0 / n)  # 0-d
    return loss, OrthogonalLossCache(norm_cache, G, code_ids, K, squeeze)


def orthogonal_loss_backward(dloss: Array, cache: OrthogonalLossCache) -> Array:
    """Gradient of ``dloss * L`` with respect to the codebook, equation (2).

    Parameters
    ----------
    dloss : Python float or 0-d array of the codebook's namespace (e.g. the regulariser weight)
    cache : OrthogonalLossCache from the forward

    Returns
    -------
    dcodebook : (K, D) or (H, K, D), the codebook's shape and dtype; rows of codes outside
        ``code_ids`` are exactly zero, and a code listed twice collects both contributions
    """
    xp = B.get_namespace(cache.gram)
    norm_cache, G, code_ids, K, squeeze = cache
    H, n, _ = G.shape
    Chat = norm_cache.y  # (H, n, D), recovered from the normalisation's cache
    dChat = (4.0 / (H * n * n)) * dloss * (G @ Chat)  # (H, n, D) = dL/dG = 2G/(Hn^2), used twice
    dC = l2norm_backward(dChat, norm_cache)  # (H, n, D) projected onto each code's tangent space
    if code_ids is not None:
        # Adjoint of the gather: sum the subset's rows into their codes.  The heads ride along as
        # extra columns so one segment sum serves them all.
        D = dC.shape[2]
        rows = xp.reshape(xp.permute_dims(dC, (1, 0, 2)), (n, H * D))  # (n, H*D)
        full = B.segment_sum(rows, code_ids, K)  # (K, H*D)
        dC = xp.permute_dims(xp.reshape(full, (K, H, D)), (1, 0, 2))  # (H, K, D)
    return dC[0, ...] if squeeze else dC
