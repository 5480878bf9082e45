"""JAX references for soft assignments over codes and their entropies.

Symbols: K codes (the last axis), n rows (tokens), C codebooks per token, tau an inverse
temperature, gamma the diversity weight, eps the clamp inside the logarithm.

    softmax        p = exp(tau s - logsumexp(tau s))               over the last axis
    entropy        H(p) = -sum_k p_k log max(p_k, eps)            (vector-quantize-pytorch's clamp)
    penalty        L = mean_{i,c} H(p_ic) - gamma mean_c H(mean_i p_ic)
                   (MAGVIT-v2, arXiv 2310.05737, eq. 5: sharp per token, spread over the batch)
    softplus       log(1 + e^t) = logaddexp(t, 0)

The softmax is written through ``logsumexp`` (vqref divides by a sum of shifted exponentials);
the clamp is a ``where`` on ``p >= eps`` inside the logarithm, so at ``p = eps`` exactly the
gradient passes, as torch's ``clamp`` lets it, and below eps the term is ``-p log eps``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.scipy.special import logsumexp

__all__ = ["softmax", "entropy", "entropy_penalty", "softplus", "ENTROPY_EPS"]

ENTROPY_EPS = 1e-5


def softmax(scores, *, inv_temperature: float = 1.0):
    """``softmax(tau * scores)`` over the last axis; (..., K) -> (..., K)."""
    t = inv_temperature * scores  # (..., K)
    return jnp.exp(t - logsumexp(t, axis=-1, keepdims=True))


def entropy(p, *, eps: float = ENTROPY_EPS):
    """``-sum_k p_k log max(p_k, eps)`` over the last axis; (..., K) -> (...)."""
    return -jnp.sum(p * jnp.log(jnp.where(p >= eps, p, eps)), axis=-1)


def entropy_penalty(scores, *, inv_temperature: float, diversity_gamma: float, eps: float = ENTROPY_EPS):
    """``(loss, per_sample, batch)`` of the entropy penalty for ``scores`` (n, C, K); 0-d each."""
    p = softmax(scores, inv_temperature=inv_temperature)  # (n, C, K)
    per_sample = jnp.mean(entropy(p, eps=eps))  # mean over the n C rows
    batch = jnp.mean(entropy(jnp.mean(p, axis=0), eps=eps))  # each codebook's batch mean (C, K), then over C
    return per_sample - diversity_gamma * batch, per_sample, batch


def softplus(t):
    """``log(1 + exp(t))``, elementwise."""
    return jnp.logaddexp(t, 0.0)
