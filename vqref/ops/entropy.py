"""The entropy penalty of lookup-free quantization: softmax over codes, per-sample and batch entropy.

Symbols: n rows (tokens) that enter the penalty, C codebooks per token, K codes per codebook,
tau the inverse temperature, gamma the diversity weight, eps = 1e-5 the clamp inside the log.

MAGVIT-v2 (Yu et al., arXiv 2310.05737, section 3.1, eq. 5) trains a lookup-free quantizer with an
entropy penalty.  Each row gets a soft assignment over all K codes from a score ``s_k`` (for LFQ
the negative squared distance to code k, up to a constant per row: :mod:`vqref.ops.lfq`):

    p_k      = softmax(tau s)_k = exp(tau s_k) / sum_l exp(tau s_l)                          (1)
    H(p)     = - sum_k p_k log max(p_k, eps)                                                 (2)
    H_sample = mean over the n C rows of H(p_ic)          low: each row is confident         (3)
    H_batch  = mean over c of H(pbar_c),  pbar_c = (1/n) sum_i p_ic
                                                          high: the batch uses every code    (4)
    L        = H_sample - gamma H_batch                                                      (5)

Minimising L makes each token's assignment sharp while spreading the batch over the codebook.
(2) is the entropy with the logarithm clamped below at ``log eps``, as vector-quantize-pytorch
computes it: for ``p_k < eps`` the term is ``-p_k log eps`` instead of ``-p_k log p_k``.  The clamp
keeps the gradient finite where p underflows; it is not the exact entropy (section 8 of
docs/math.md shows what it changes).

Derivatives, written as the vector-Jacobian products of the backward pairs below.

* Softmax.  ``dp_k/ds_l = tau p_k ([k = l] - p_l)``, so for an upstream ``dp``

      ds = tau p * (dp - <p, dp>)                       <p, dp> = sum_k p_k dp_k           (6)

  (the Jacobian is symmetric; ``sum_l ds_l = 0``: adding a constant to every score changes
  nothing).
* Clamped entropy.  ``d/dp [-p log max(p, eps)] = -log max(p, eps) - [p >= eps]``: above the clamp
  the usual ``-(log p + 1)``, below it the constant ``-log eps`` (the derivative of the clamp is
  0 there).  At ``p = eps`` exactly the gradient passes, as torch's ``clamp`` lets it.      (7)
* The penalty (5).  With upstream ``dL``: ``dH_sample = dL``, ``dH_batch = -gamma dL``; every row's
  entropy gets ``dL / (n C)``; every ``pbar_c`` gets ``-gamma dL / C`` through (7), and passes
  ``1/n`` of it to each of its n rows; the two contributions to ``dp_ic`` add, then (6).      (8)

Memory.  Everything here is O(n C K): the scores, the probabilities and their clamped logarithms.
The batch mean ``pbar`` is what makes that unavoidable: per row, with codes that are sign
patterns, the softmax factorises over the bits (docs/math.md section 8), but the mean of
factorised distributions is not factorised, so ``H_batch`` needs all K probabilities of every row.
What is unavoidable is the work, not the memory: on numpy, :mod:`vqref.core.lfq` runs
:mod:`vqref.ops.entropy_fast`, the same numbers block by block with O(block K) memory.

The optional ``softplus`` (vector-quantize-pytorch's ``experimental_softplus_entropy_loss``)
makes the penalty positive: ``softplus(L + offset)``, with derivative ``sigmoid(L + offset)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .. import backend as B
from ..backend import Array

__all__ = [
    "ENTROPY_EPS",
    "SoftmaxCache",
    "softmax_forward",
    "softmax_backward",
    "EntropyCache",
    "entropy_forward",
    "entropy_backward",
    "EntropyPenalty",
    "EntropyPenaltyCache",
    "entropy_penalty_forward",
    "entropy_penalty_backward",
    "SoftplusCache",
    "softplus_forward",
    "softplus_backward",
]

ENTROPY_EPS = 1e-5  # vector-quantize-pytorch's clamp inside the log of the entropy


# ---------------------------------------------------------------- (1) softmax over codes


class SoftmaxCache(NamedTuple):
    p: Array  # (..., K) the probabilities
    inv_temperature: float  # tau


def softmax_forward(scores: Array, *, inv_temperature: float = 1.0) -> tuple[Array, SoftmaxCache]:
    """``p = softmax(tau * scores)`` over the last axis, equation (1).

    Parameters
    ----------
    scores : (..., K) float, finite
    inv_temperature : tau > 0; large values make p nearly one-hot

    Returns
    -------
    p : (..., K), the dtype of ``scores``; every row sums to 1
    cache : SoftmaxCache(p, tau)

    Notes
    -----
    The largest score of each row is subtracted before ``exp`` (the softmax does not change when
    a constant is added to a row), so no exponential overflows: the largest term is ``exp(0)``.
    """
    xp = B.get_namespace(scores)
    logits = scores * inv_temperature  # (..., K)
    shifted = logits - xp.max(logits, axis=-1, keepdims=True)  # (..., K) <= 0
    e = xp.exp(shifted)  # (..., K) in (0, 1]
    p = e / xp.sum(e, axis=-1, keepdims=True)  # (..., K)
    return p, SoftmaxCache(p, inv_temperature)


def softmax_backward(dp: Array, cache: SoftmaxCache) -> Array:
    """``dscores = tau p * (dp - <p, dp>)``, equation (6).

    Parameters
    ----------
    dp : (..., K) float, the upstream gradient of p
    cache : SoftmaxCache

    Returns
    -------
    dscores : (..., K); each row sums to 0
    """
    xp = B.get_namespace(dp)
    p, tau = cache
    inner = xp.sum(p * dp, axis=-1, keepdims=True)  # (..., 1) <p, dp>
    return tau * (p * (dp - inner))  # (..., K)


# ---------------------------------------------------------------- (2) the clamped entropy


class EntropyCache(NamedTuple):
    p: Array  # (..., K) the distribution
    log_p: Array  # (..., K) log max(p, eps)
    eps: float


def entropy_forward(p: Array, *, eps: float = ENTROPY_EPS) -> tuple[Array, EntropyCache]:
    """``H(p) = -sum_k p_k log max(p_k, eps)`` over the last axis, equation (2).

    Parameters
    ----------
    p : (..., K) float, rows of a distribution (non-negative)
    eps : the clamp of the logarithm (vector-quantize-pytorch's 1e-5)

    Returns
    -------
    h : (...), the dtype of ``p``; 0 for a one-hot row, about ``log K`` for a uniform one
    cache : EntropyCache(p, log max(p, eps), eps)
    """
    xp = B.get_namespace(p)
    log_p = xp.log(xp.clip(p, min=eps))  # (..., K) finite: never log 0
    return -xp.sum(p * log_p, axis=-1), EntropyCache(p, log_p, eps)


def entropy_backward(dh: Array, cache: EntropyCache) -> Array:
    """``dp = dh * (-log max(p, eps) - [p >= eps])``, equation (7).

    Parameters
    ----------
    dh : (...) float (or a 0-d array / number for every row)
    cache : EntropyCache

    Returns
    -------
    dp : (..., K)
    """
    xp = B.get_namespace(cache.p)
    p, log_p, eps = cache
    passes = xp.astype(p >= eps, p.dtype)  # (..., K) 1 where the clamp is inactive
    dh = dh[..., None] if B.is_array(dh) and dh.ndim else dh
    return dh * (-log_p - passes)  # (..., K)


# ---------------------------------------------------------------- (3)-(5) the penalty


class EntropyPenalty(NamedTuple):
    loss: Array  # 0-d  L = H_sample - gamma H_batch
    per_sample: Array  # 0-d  H_sample, eq. (3)
    batch: Array  # 0-d  H_batch, eq. (4)


class EntropyPenaltyCache(NamedTuple):
    softmax: SoftmaxCache  # p (n, C, K)
    rows: EntropyCache  # the entropy of every row
    mean: EntropyCache  # the entropy of every codebook's batch mean pbar (C, K)
    diversity_gamma: float


def entropy_penalty_forward(
    scores: Array, *, inv_temperature: float, diversity_gamma: float, eps: float = ENTROPY_EPS
) -> tuple[EntropyPenalty, EntropyPenaltyCache]:
    """The entropy penalty of MAGVIT-v2 (arXiv 2310.05737, eq. 5), equations (1)-(5).

    Parameters
    ----------
    scores : (n, C, K) float, n >= 1: each row's score for each of its codebook's K codes
    inv_temperature : tau of the softmax (1)
    diversity_gamma : gamma, the weight of the batch entropy
    eps : the clamp of the logarithm

    Returns
    -------
    out : EntropyPenalty(loss, per_sample, batch), 0-d arrays of the scores' dtype
    cache : EntropyPenaltyCache
    """
    xp = B.get_namespace(scores)
    p, sm_cache = softmax_forward(scores, inv_temperature=inv_temperature)  # (n, C, K)
    h, row_cache = entropy_forward(p, eps=eps)  # (n, C)
    per_sample = xp.asarray(xp.mean(h))  # ()  eq. (3); asarray: numpy reduces to a scalar
    pbar = xp.mean(p, axis=0)  # (C, K) every codebook's average distribution over the batch
    hbar, mean_cache = entropy_forward(pbar, eps=eps)  # (C,)
    batch = xp.asarray(xp.mean(hbar))  # ()  eq. (4)
    loss = xp.asarray(per_sample - diversity_gamma * batch)  # ()  eq. (5)
    cache = EntropyPenaltyCache(sm_cache, row_cache, mean_cache, float(diversity_gamma))
    return EntropyPenalty(loss, per_sample, batch), cache


def entropy_penalty_backward(dloss: Any, cache: EntropyPenaltyCache) -> Array:
    """``dscores`` for the upstream gradient ``dloss`` of the penalty, equation (8).

    Parameters
    ----------
    dloss : a number or 0-d array, the upstream gradient of ``loss``
    cache : EntropyPenaltyCache

    Returns
    -------
    dscores : (n, C, K)
    """
    n, C, _ = cache.softmax.p.shape
    dh = dloss / (n * C)  # every row's entropy enters H_sample with weight 1 / (n C)
    dp = entropy_backward(dh, cache.rows)  # (n, C, K)  through eq. (3)
    dhbar = -cache.diversity_gamma * dloss / C  # every codebook's batch entropy, weight -gamma / C
    dpbar = entropy_backward(dhbar, cache.mean)  # (C, K)  through eq. (4)
    dp = dp + dpbar[None, ...] / n  # (n, C, K)  pbar_c is the mean of its n rows
    return softmax_backward(dp, cache.softmax)  # (n, C, K)  through eq. (1)


# ---------------------------------------------------------------- softplus


class SoftplusCache(NamedTuple):
    t: Array  # 0-d (or any shape) the argument


def softplus_forward(t: Array) -> tuple[Array, SoftplusCache]:
    """``softplus(t) = log(1 + exp(t))``, written ``max(t, 0) + log1p(exp(-|t|))`` so that no
    exponential overflows (the two are equal for every t).

    torch's ``softplus`` returns t itself above ``t = 20``; the exact value differs from that by
    less than ``exp(-20) = 2e-9``.
    """
    xp = B.get_namespace(t)
    return xp.asarray(xp.maximum(t, 0.0) + xp.log1p(xp.exp(-xp.abs(t)))), SoftplusCache(t)


def softplus_backward(dy: Array, cache: SoftplusCache) -> Array:
    """``dt = dy * sigmoid(t)``, the derivative of softplus, computed without overflow."""
    xp = B.get_namespace(cache.t)
    t = cache.t
    e = xp.exp(-xp.abs(t))  # in (0, 1]
    sig = xp.where(t >= 0, 1.0 / (1.0 + e), e / (1.0 + e))  # sigmoid(t), both branches bounded
    return dy * sig
