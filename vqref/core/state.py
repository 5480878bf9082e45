"""Codebook state transitions of a training step: k-means initialisation, EMA, restarts.

Symbols: N vectors, D features, K codes.

These are the non-differentiable updates a quantizer makes in training mode, as pure functions
``new_state = f(state, batch, ...)`` over :class:`vqref.core.ema.EMAState`.  The modules call
them visibly after the forward; they never run in eval mode.

Order within a training step (as in vector-quantize-pytorch):

1. on the first batch, k-means initialisation (if enabled), *before* the assignment;
2. the assignment and outputs use the codebook from before this step's update;
3. the EMA step from this batch's statistics;
4. dead-code restarts.
"""

from __future__ import annotations

from typing import Any

from .. import backend as B
from .ema import (
    EMAState,
    accumulate_statistics,
    batch_statistics,
    codebook_from_state,
    expire_dead_codes,
    recompute_codebook,
)

__all__ = ["kmeans_init_state", "training_update"]


def kmeans_init_state(
    x: Any,
    num_codes: int,
    *,
    iters: int,
    rng: Any,
    eps: float,
    use_cosine_sim: bool = False,
    dtype: Any = None,
) -> EMAState:
    """Initial EMA state from k-means on one batch (SoundStream, arXiv 2107.03312).

    The EMA statistics are seeded consistently with the centroids: ``N_k = n_k`` (the cluster
    sizes) and ``m_k = mu_k n_k``, so that ``c_k = m_k / N~_k`` holds (MATH.md section 3.2) and
    one EMA step on the same batch leaves the codes at the centroids.

    Parameters
    ----------
    x : (N, D) float, the batch (already l2-normalised for cosine codebooks)
    num_codes : K
    iters : Lloyd iterations
    rng : numpy Generator (initial means are sampled on the host)
    eps : Laplace smoothing constant
    use_cosine_sim : spherical k-means and unit-norm codes
    dtype : dtype of the state (default: x's)

    Returns
    -------
    EMAState(codebook (K, D), cluster_size (K,), embed_avg (K, D))

    Notes
    -----
    vector-quantize-pytorch lets a code whose cluster came out empty become ``0 / N~_k = 0``, the
    zero vector.  vqref keeps that code at its k-means mean (a sampled batch row) instead, with a
    zero count, so it is still a sensible code; see docs/deviations.md.
    """
    from .kmeans import kmeans

    xp = B.get_namespace(x)
    dtype = x.dtype if dtype is None else dtype
    res = kmeans(x, num_codes, iters, rng=rng, use_cosine_sim=use_cosine_sim)
    means = xp.astype(res.means, dtype)  # (K, D)
    counts = xp.astype(res.counts, dtype)  # (K,)
    embed_avg = means * counts[:, None]  # (K, D)
    codebook = codebook_from_state(counts, embed_avg, eps=eps, normalize=use_cosine_sim)
    codebook = xp.where((counts == 0)[:, None], means, codebook)
    return EMAState(codebook, counts, embed_avg)


def training_update(
    state: EMAState,
    x: Any,
    indices: Any,
    *,
    decay: float,
    eps: float,
    ema: bool = True,
    dead_code_threshold: float = 0.0,
    rng: Any = None,
    normalize: bool = False,
) -> EMAState:
    """The state update after one training forward: EMA step, then dead-code restarts.

    Parameters
    ----------
    state : EMAState before the step
    x : (N, D) the quantized vectors (l2-normalised for cosine codebooks), in the state's dtype
    indices : (N,) their codes
    decay, eps : EMA decay and Laplace smoothing
    ema : whether the EMA step runs (False: frozen or gradient-trained codebook)
    dead_code_threshold : restart codes with ``N_k`` below this (0 = off)
    rng : numpy Generator for the restarts
    normalize : unit-norm codes (cosine codebooks)
    """
    if ema or dead_code_threshold > 0:
        # The counts are tracked whenever restarts need them, even if the codes do not follow.
        counts, sums = batch_statistics(x, indices, state.codebook.shape[0])
        state = accumulate_statistics(state, counts, sums, decay=decay)
    if ema:
        state = recompute_codebook(state, eps=eps, normalize=normalize)
    if dead_code_threshold > 0:
        state, _ = expire_dead_codes(state, x, threshold=dead_code_threshold, rng=rng, normalize=normalize)
    return state
