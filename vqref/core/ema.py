"""The exponential-moving-average (EMA) codebook of VQ-VAE (arXiv 1711.00937, appendix A.1).

Symbols: N vectors, D features, K codes; gamma the decay, eps the Laplace-smoothing constant.

Instead of a codebook loss, each code follows the running mean of the vectors assigned to it.
With this batch's counts ``n_k`` and sums ``s_k`` (from the assignment made with the codebook
*before* the update):

    N_k <- gamma N_k + (1 - gamma) n_k                  cluster-size EMA, (K,)
    m_k <- gamma m_k + (1 - gamma) s_k                  cluster-sum EMA, (K, D)
    c_k  = m_k / N~_k                                   the new code

Laplace smoothing keeps the denominator positive for codes that are never chosen while
preserving the total count ``n = sum_k N_k``:

    N~_k = (N_k + eps) / (n + K eps) * n

vqref starts from the state vector-quantize-pytorch uses: ``N_k = 1`` and ``m_k = c_k`` (one
pseudo-count of the initial code), with no debiasing.  Every re-initialisation (k-means,
dead-code restarts) keeps the invariant ``c_k = m_k / N~_k`` by setting ``m_k = c_k N_k``.

Data-parallel training keeps this form: the EMA step is linear in ``n_k`` and ``s_k``, which are
sums over the batch's rows, so the ranks add their ``n_k`` and ``s_k`` (an allreduce) and every
rank takes the step with the global batch's statistics (:func:`vqref.core.state.training_update`).
The batch means ``s_k / n_k`` are never averaged over ranks: that would weigh a rank's rows by
the inverse of its row count.

All functions are pure: they return new arrays and never modify their inputs.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .. import backend as B
from ..backend import Array
from ..distributed import as_comm, check_same, gather_rows, row_layout
from ..ops.l2norm import l2norm

__all__ = [
    "EMAState",
    "batch_statistics",
    "laplace_smoothing",
    "codebook_from_state",
    "accumulate_statistics",
    "recompute_codebook",
    "ema_update",
    "expire_dead_codes",
]


class EMAState(NamedTuple):
    codebook: Array  # (K, D)
    cluster_size: Array  # (K,) N_k
    embed_avg: Array  # (K, D) m_k


def batch_statistics(x: Array, indices: Array, num_codes: int) -> tuple[Any, Any]:
    """This batch's counts ``n_k`` and sums ``s_k``.

    Parameters
    ----------
    x : (N, D) float, the vectors that were quantized
    indices : (N,) int, their codes
    num_codes : K

    Returns
    -------
    counts : (K,) in x's dtype
    sums : (K, D) in x's dtype
    """
    xp = B.get_namespace(x, indices)
    counts = xp.astype(B.bincount(indices, num_codes), x.dtype)  # (K,)
    sums = B.segment_sum(x, indices, num_codes)  # (K, D)
    return counts, sums


def laplace_smoothing(cluster_size: Array, eps: float) -> Array:
    """``N~_k = (N_k + eps) / (sum N + K eps) * sum N``: positive, same total (K,)."""
    xp = B.get_namespace(cluster_size)
    K = cluster_size.shape[0]
    total = xp.sum(cluster_size)
    denom = total + K * eps  # 0 only when every count is 0 and eps = 0: then every N~_k is 0
    return (cluster_size + eps) / xp.where(denom > 0, denom, 1.0) * total


def codebook_from_state(
    cluster_size: Array, embed_avg: Array, *, eps: float, normalize: bool = False, fallback: Any = None
) -> Array:
    """``c_k = m_k / N~_k``; with ``normalize`` (cosine codebooks) each code is then l2-normalised.

    With ``eps > 0`` and a positive total count every ``N~_k`` is positive.  A code whose count is
    exactly zero (an empty k-means cluster, or an unused code with ``decay = 0``) has ``m_k = 0``:
    it keeps its ``fallback`` value (the previous code) instead of becoming the zero vector (or
    0/0 with ``eps = 0``); without a fallback it becomes zero.

    Returns
    -------
    codebook : (K, D)
    """
    xp = B.get_namespace(cluster_size, embed_avg)
    smoothed = laplace_smoothing(cluster_size, eps)  # (K,)
    positive = smoothed > 0  # (K,)
    safe = xp.where(positive, smoothed, xp.ones_like(smoothed))
    codebook = embed_avg / safe[:, None]  # (K, D)
    if fallback is not None:
        # N_k = 0 exactly: no vector has reached this code since it was (re)seeded, m_k = 0
        # carries no information, and m_k / N~_k would turn the code into the zero vector.
        keep = positive & (cluster_size > 0)  # (K,)
        codebook = xp.where(keep[:, None], codebook, fallback)
    if normalize:
        codebook = l2norm(codebook)  # (K, D) unit rows, the norm clamped at 1e-6
    return codebook


def accumulate_statistics(state: EMAState, counts: Array, sums: Array, *, decay: float) -> EMAState:
    """The EMA of the statistics alone: ``N <- gamma N + (1 - gamma) n``, ``m <- gamma m + (1 - gamma) s``.

    The codebook is returned unchanged.  Written as the interpolation ``a + (1 - gamma)(b - a)``,
    which equals ``gamma a + (1 - gamma) b``.
    """
    cluster_size = state.cluster_size + (1.0 - decay) * (counts - state.cluster_size)  # (K,)
    embed_avg = state.embed_avg + (1.0 - decay) * (sums - state.embed_avg)  # (K, D)
    return EMAState(state.codebook, cluster_size, embed_avg)


def recompute_codebook(state: EMAState, *, eps: float, normalize: bool = False) -> EMAState:
    """``c_k = m_k / N~_k`` from the state's statistics (codes with a zero count keep their value)."""
    codebook = codebook_from_state(
        state.cluster_size, state.embed_avg, eps=eps, normalize=normalize, fallback=state.codebook
    )
    return state._replace(codebook=codebook)


def ema_update(
    state: EMAState,
    counts: Array,
    sums: Array,
    *,
    decay: float,
    eps: float,
    normalize: bool = False,
) -> EMAState:
    """One EMA step from a batch's statistics; returns the new state (the input is unchanged).

    Parameters
    ----------
    state : EMAState(codebook (K, D), cluster_size (K,), embed_avg (K, D))
    counts : (K,) this batch's ``n_k`` (see :func:`batch_statistics`)
    sums : (K, D) this batch's ``s_k``
    decay : gamma in [0, 1]; 1 freezes the statistics, 0 replaces them by the batch's
    eps : Laplace smoothing constant
    normalize : l2-normalise the new codes (cosine-similarity codebooks)

    Returns
    -------
    EMAState with the new cluster_size, embed_avg and codebook
    """
    state = accumulate_statistics(state, counts, sums, decay=decay)
    return recompute_codebook(state, eps=eps, normalize=normalize)


def expire_dead_codes(
    state: EMAState,
    x: Any,
    *,
    threshold: float,
    rng: Any,
    normalize: bool = False,
    comm: Any = None,
) -> tuple[EMAState, Any]:
    """Replace codes whose EMA count fell below ``threshold`` by random vectors of the batch.

    Dead-code restarts (SoundStream, arXiv 2107.03312; vector-quantize-pytorch's
    ``threshold_ema_dead_code``): a code with ``N_k < threshold`` is moved onto a row of the
    current batch, and its EMA state is reset consistently with ``N_k = threshold`` and
    ``m_k = threshold * c_k`` -- so ``c_k = m_k / N~_k`` keeps holding (up to smoothing).

    With a communicator of R ranks the candidates come from the global batch: every rank draws
    the same global row numbers (its generator must be in the same state as the others':
    checked) and :func:`vqref.distributed.gather_rows` fetches each from the rank that holds
    it.  The counts ``N_k`` are the same on every rank (they follow the reduced batch counts),
    so every rank replaces the same codes by the same vectors -- those one process drawing from
    the whole batch would take, bit for bit.

    Parameters
    ----------
    state : EMAState
    x : (N, D) float, this batch's (normalised, for cosine) vectors; or a sequence of such
        arrays, whose concatenation is the batch (the depths of a shared codebook)
    threshold : float > 0
    rng : numpy Generator; one row per code is drawn on the host (distinct rows when N >= K,
        with replacement otherwise), and dead codes take theirs.  No number is drawn when the
        batch (of every rank together) is empty: then nothing is replaced.
    normalize : l2-normalise the replacements (cosine codebooks)
    comm : communicator (``None``: one process), see :mod:`vqref.distributed`; x is then this
        rank's part of the batch and may be empty

    Returns
    -------
    new_state : EMAState
    dead : (K,) bool, which codes were replaced
    """
    comm = as_comm(comm)
    blocks = [x] if B.is_array(x) else list(x)
    xp = B.get_namespace(state.codebook, *blocks)
    K = state.codebook.shape[0]
    layout = row_layout(comm, blocks)
    N = layout.total  # rows of the batch: every block, every rank
    if N == 0:  # nothing to restart from (the same decision on every rank: N is global)
        return state, xp.zeros(state.cluster_size.shape, dtype=xp.bool, device=B.get_device(state.cluster_size))
    gen = B.as_generator(rng)
    check_same(comm, "random generator state", gen.bit_generator.state)
    rows = gen.permutation(N)[:K] if N >= K else gen.integers(0, N, size=K)
    samples = gather_rows(comm, blocks, rows, layout)  # (K, D), one candidate per code
    if normalize:
        samples = l2norm(samples)  # (K, D) unit rows, the norm clamped at 1e-6
    samples = xp.astype(samples, state.codebook.dtype)
    dead = state.cluster_size < threshold  # (K,)
    codebook = xp.where(dead[:, None], samples, state.codebook)
    cluster_size = xp.where(dead, xp.full_like(state.cluster_size, threshold), state.cluster_size)
    embed_avg = xp.where(dead[:, None], threshold * samples, state.embed_avg)
    return EMAState(codebook, cluster_size, embed_avg), dead
