"""Solution 13: the backward of LFQ's entropy penalty.

Symbols: n rows, K codes.

With ``h'(q) = d/dq [-q log max(q, eps)] = -log max(q, eps) - [q >= eps]`` entry by entry:

    dp_i   = dloss / n * h'(p_i)                      the per-sample term, every row weight 1/n
           + (-gamma dloss) h'(pbar) / n              the batch term, through pbar = mean_i p_i
    ds_i   = tau p_i * (dp_i - <p_i, dp_i>)           the softmax of tau s_i

The softmax backward removes any constant added to a row of dp, so the ``- 1`` in ``h'`` only
matters for entries below the clamp (where it is absent): above eps, ``-(log q + 1)`` and
``-log q`` give the same ds.  Below the clamp the softmax backward multiplies the entry by
``p < eps``, so the clamp hardly changes the gradient; it is there to keep ``log`` finite.
"""

from array_api_compat import array_namespace

ENTROPY_EPS = 1e-5


def entropy_penalty_forward(scores, inv_temperature, diversity_gamma):
    """``H_sample - gamma H_batch`` of ``softmax(tau scores)``."""
    xp = array_namespace(scores)
    z = inv_temperature * scores
    e = xp.exp(z - xp.max(z, axis=-1, keepdims=True))
    p = e / xp.sum(e, axis=-1, keepdims=True)  # (n, K)

    def entropy(q):
        return -xp.sum(q * xp.log(xp.clip(q, min=ENTROPY_EPS)), axis=-1)

    return xp.mean(entropy(p)) - diversity_gamma * entropy(xp.mean(p, axis=0))


def entropy_penalty_backward(dloss, scores, inv_temperature, diversity_gamma):
    """``ds = tau p * (dp - <p, dp>)`` with dp from both entropy terms.

    Parameters
    ----------
    dloss : float
    scores : (n, K) float
    inv_temperature, diversity_gamma : float

    Returns
    -------
    dscores : (n, K)
    """
    xp = array_namespace(scores)
    n = scores.shape[0]
    z = inv_temperature * scores  # (n, K)
    e = xp.exp(z - xp.max(z, axis=-1, keepdims=True))
    p = e / xp.sum(e, axis=-1, keepdims=True)  # (n, K)
    pbar = xp.mean(p, axis=0)  # (K,)

    def dentropy(q):  # d/dq of -q log max(q, eps), entry by entry
        return -xp.log(xp.clip(q, min=ENTROPY_EPS)) - xp.astype(q >= ENTROPY_EPS, q.dtype)

    dp = (dloss / n) * dentropy(p)  # (n, K) H_sample
    dp = dp + (-diversity_gamma * dloss / n) * dentropy(pbar)  # (n, K) H_batch, through the mean
    return inv_temperature * (p * (dp - xp.sum(p * dp, axis=-1, keepdims=True)))  # (n, K)
