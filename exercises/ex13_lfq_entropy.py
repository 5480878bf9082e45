"""Exercise 13: the backward of LFQ's entropy penalty.

Symbols: n rows, K codes; tau the inverse temperature, gamma the diversity weight, eps = 1e-5.

The forward.  Lookup-free quantization (MAGVIT-v2, Yu et al., arXiv 2310.05737, eq. 5) trains
with an entropy penalty on soft assignments.  Each row has a score ``s_ik`` for every code (for
LFQ, minus the squared distance to code k).  As vector-quantize-pytorch computes it:

    p_i      = softmax(tau s_i)                               (n, K), each row sums to 1
    H(q)     = - sum_k q_k log max(q_k, eps)                  the entropy, its log clamped
    H_sample = (1/n) sum_i H(p_i)                             low: every row is confident
    pbar     = (1/n) sum_i p_i                                (K,), the batch's average use
    H_batch  = H(pbar)                                        high: the batch uses every code
    L        = H_sample - gamma H_batch

Your task.  Given the upstream scalar ``dloss``, return ``dscores = dloss * dL/ds (n, K)``.  The
grader compares with torch autograd (float64).

Hints.
* Go backwards: dL/dp from the two terms (pbar passes 1/n of its gradient to every row), then the
  softmax.
* ``d/dq [-q log max(q, eps)]`` is ``-(log q + 1)`` above eps and ``-log eps`` below it.
* The softmax's Jacobian ``dp_k/dz_l = p_k ([k = l] - p_l)`` is symmetric; apply it as one dot
  product per row, not as a K x K matrix.  Why does the ``+ 1`` above not matter where q >= eps?

Check it: ``vqref grade ex13`` from the repository root.
"""

from array_api_compat import array_namespace

ENTROPY_EPS = 1e-5


def entropy_penalty_forward(scores, inv_temperature, diversity_gamma):
    """``H_sample - gamma H_batch`` of ``softmax(tau scores)``.  scores (n, K) -> 0-d.  Given."""
    xp = array_namespace(scores)
    z = inv_temperature * scores
    e = xp.exp(z - xp.max(z, axis=-1, keepdims=True))
    p = e / xp.sum(e, axis=-1, keepdims=True)  # (n, K)

    def entropy(q):
        return -xp.sum(q * xp.log(xp.clip(q, min=ENTROPY_EPS)), axis=-1)

    return xp.mean(entropy(p)) - diversity_gamma * entropy(xp.mean(p, axis=0))


def entropy_penalty_backward(dloss, scores, inv_temperature, diversity_gamma):
    """The gradient of ``dloss * L`` with respect to the scores.

    Parameters
    ----------
    dloss : float
    scores : (n, K) float
    inv_temperature : float, tau
    diversity_gamma : float, gamma

    Returns
    -------
    dscores : (n, K)
    """
    raise NotImplementedError
