"""The fast path of LFQ's entropy penalty: scores, softmax and both entropies block by block.

Symbols: n tokens that enter the penalty, C codebooks per token, d bits per code, K = 2^d
codes, M = n C rows of d entries, v the size of a code's entries, tau the inverse temperature,
gamma the diversity weight, eps = 1e-5 the clamp inside the log.

The definition composes three op pairs of :mod:`vqref.ops.lfq` and :mod:`vqref.ops.entropy`:
the scores ``s = 2 z C^T`` (M, K), the softmax ``p = softmax(tau s)``, the clamped entropies of
every row and of every codebook's batch mean ``pbar``.  It keeps s, p and ``log max(p, eps)``:
three (M, K) arrays, 768 MiB in float32 for M = 65536 and K = 1024, and every step streams
them through memory.  :func:`lfq_entropy_forward_blocked` computes the same numbers on blocks
of rows that stay in cache and keeps only what the backward cannot recompute cheaply:

* forward, per block: ``l = z (2 tau C^T)`` (one small matrix product), ``l - max l``, its
  exponential e and row sums Z, ``p = e / Z`` and ``log p = (l - max l) - log Z`` (the softmax's
  logarithm needs no logarithm per entry), the clamp ``max(log p, log eps)``, each row's entropy,
  and the block's share of every codebook's sum of p;
* backward, per block: the same p and ``log p`` recomputed from z (the cache holds z (M, d) and
  ``pbar`` (C, K): O(M d + C K) memory, never O(M K)), then equations (6)-(8) of
  :mod:`vqref.ops.entropy` and ``dz = 2 ds C`` of :mod:`vqref.ops.lfq`.

Not bit for bit the definition: ``log p`` as ``(l - max l) - log Z`` rounds differently from
``log(p)``, and sums are taken block by block (accumulated in float64).  The test suite pins the
two to float rounding, in both dtypes, for every branch (blocks that split codebooks' rows, the
clamp active on both sides of eps).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .entropy import EntropyPenalty

__all__ = ["BLOCK_ELEMENTS", "BlockedEntropyCache", "lfq_entropy_forward_blocked", "lfq_entropy_backward_blocked"]

BLOCK_ELEMENTS = 1 << 17  # scores per block: 512 KiB of float32, about an L2 cache


class BlockedEntropyCache(NamedTuple):
    z: np.ndarray  # (M, d) the rows, token-major (row i C + c is token i, codebook c)
    codebook: np.ndarray  # (K, d) the codes, entries +-v, z's dtype
    pbar: np.ndarray  # (C, K) every codebook's mean distribution, z's dtype
    num_codebooks: int  # C
    inv_temperature: float  # tau
    diversity_gamma: float  # gamma
    eps: float
    block: int  # rows per block, a multiple of C


def _block_rows(C: int, K: int, block: int) -> int:
    """Rows per block: about ``block / K``, a multiple of C (a block holds whole tokens)."""
    return C * max(1, int(block) // (K * C))


def _probabilities(zb: np.ndarray, scaled_codes_t: np.ndarray, log_eps: float) -> tuple[np.ndarray, np.ndarray]:
    """``(p, max(log p, log eps))`` of a block of rows: both (b, K), zb's dtype."""
    logits = zb @ scaled_codes_t  # (b, K) tau s
    logits -= np.max(logits, axis=1, keepdims=True)  # (b, K) <= 0
    p = np.exp(logits)  # (b, K)
    z_sum = np.sum(p, axis=1, keepdims=True)  # (b, 1)
    p /= z_sum
    logits -= np.log(z_sum)  # (b, K) log p
    np.maximum(logits, log_eps, out=logits)  # (b, K) log max(p, eps)
    return p, logits


def lfq_entropy_forward_blocked(
    z: np.ndarray,
    codebook: np.ndarray,
    *,
    num_codebooks: int,
    inv_temperature: float,
    diversity_gamma: float,
    eps: float,
    block: int = BLOCK_ELEMENTS,
) -> tuple[EntropyPenalty, BlockedEntropyCache]:
    """The entropy penalty of the rows z against every code, block by block.

    Parameters
    ----------
    z : (M, d) numpy float, M = n C rows, token-major
    codebook : (K, d) the codes (:func:`vqref.ops.lfq.sign_codebook`), z's dtype
    num_codebooks : C
    inv_temperature, diversity_gamma, eps : tau, gamma and the clamp of the logarithm
    block : about this many scores per block

    Returns
    -------
    out : EntropyPenalty(loss, per_sample, batch), 0-d arrays of z's dtype
    cache : BlockedEntropyCache
    """
    M, K, C = z.shape[0], codebook.shape[0], int(num_codebooks)
    n = M // C
    rows = _block_rows(C, K, block)
    scaled_t = np.ascontiguousarray((2 * inv_temperature) * codebook.T, dtype=z.dtype)  # (d, K) 2 tau C^T
    log_eps = math.log(eps)
    h_sum = 0.0  # sum of the rows' entropies, float64
    p_sum = np.zeros((C, K), dtype=np.float64)  # every codebook's sum of p, float64
    for start in range(0, M, rows):
        p, log_p = _probabilities(z[start : start + rows], scaled_t, log_eps)  # (b, K) each
        h_sum -= float(np.vdot(p, log_p))  # the block's rows, H = -sum p log max(p, eps)
        p_sum += np.sum(p.reshape(-1, C, K), axis=0)  # (C, K)
    pbar = (p_sum / n).astype(z.dtype)  # (C, K)
    log_pbar = np.log(np.maximum(pbar, eps))  # (C, K)
    per_sample = h_sum / M
    batch = float(-np.sum(pbar * log_pbar, dtype=np.float64)) / C
    as_array = lambda v: np.asarray(v, dtype=z.dtype)  # noqa: E731  0-d in z's dtype
    out = EntropyPenalty(as_array(per_sample - diversity_gamma * batch), as_array(per_sample), as_array(batch))
    cache = BlockedEntropyCache(z, codebook, pbar, C, float(inv_temperature), float(diversity_gamma), eps, rows)
    return out, cache


def lfq_entropy_backward_blocked(dloss: float, cache: BlockedEntropyCache) -> np.ndarray:
    """``dz`` for the upstream gradient ``dloss`` of the penalty; p recomputed block by block.

    Per row: ``dp = dh (-log max(p, eps) - [p >= eps]) + dpbar_c / n`` with ``dh = dloss / M``
    and ``dpbar = -gamma dloss / C (-log max(pbar, eps) - [pbar >= eps])``; then
    ``ds = tau p (dp - <p, dp>)`` and ``dz = 2 ds C``.

    Returns
    -------
    dz : (M, d), z's dtype
    """
    z, codebook, pbar, C, tau, gamma, eps, rows = cache
    M, K = z.shape[0], codebook.shape[0]
    n = M // C
    dtype = z.dtype
    dh = float(dloss) / M  # every row's entropy, weight 1 / (n C)
    log_pbar = np.log(np.maximum(pbar, eps))  # (C, K)
    dpbar = (-gamma * float(dloss) / C) * (-log_pbar - (pbar >= eps))  # (C, K)
    share = (dpbar / n).astype(dtype)  # (C, K) what each row of codebook c gets from pbar_c
    scaled_t = np.ascontiguousarray((2 * tau) * codebook.T, dtype=dtype)  # (d, K)
    back = ((2 * tau) * codebook).astype(dtype)  # (K, d) 2 tau C: ds = tau (...), dz = 2 ds C
    log_eps = math.log(eps)
    dz = np.empty_like(z)  # (M, d)
    for start in range(0, M, rows):
        p, log_p = _probabilities(z[start : start + rows], scaled_t, log_eps)  # (b, K) each
        b = p.shape[0]
        passes = p >= eps  # (b, K) where the clamp lets the gradient through
        dp = log_p  # reuse: dp = dh (-log max(p, eps) - [p >= eps]) + dpbar_c / n
        dp += passes
        dp *= -dh
        dp = (dp.reshape(-1, C, K) + share).reshape(b, K)  # (b, K)
        inner = np.sum(p * dp, axis=1, keepdims=True)  # (b, 1) <p, dp>
        dp -= inner
        dp *= p  # (b, K) ds / tau
        np.matmul(dp, back, out=dz[start : start + rows])  # (b, d) 2 tau (p (dp - <p, dp>)) C
    return dz
