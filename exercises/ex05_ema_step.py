"""Exercise 05: one EMA codebook step with Laplace smoothing.

Symbols: N vectors, D features, K codes; gamma the decay, eps the smoothing constant.

The update.  Instead of a codebook loss, VQ-VAE's appendix A.1 (arXiv 1711.00937) moves every code
to the running mean of the vectors assigned to it.  The state is a running count ``N_k`` (K,) and
a running sum ``m_k`` (K, D).  With this batch's counts and sums

    n_k = #{i : k_i = k}                    s_k = sum_{i : k_i = k} x_i

one step is

    N_k <- gamma N_k + (1 - gamma) n_k
    m_k <- gamma m_k + (1 - gamma) s_k
    c_k  = m_k / N~_k

where the Laplace-smoothed count keeps the division safe for codes that are rarely chosen while
preserving the total ``n = sum_k N_k``:

    N~_k = (N_k + eps) / (n + K eps) * n

(the convention of vector-quantize-pytorch, whose ``laplace_smoothing`` is the fraction).  It is
not a gradient: the grader compares with a plain loop over the rows.

Your task.  Return the new ``(cluster_size, embed_avg, codebook)`` without changing the inputs.

Hints.
* ``indices`` repeats codes.  Counting with ``counts[k] += 1`` has the same trap as exercise 01.
* Which statistics does the new codebook use, the old ones or the updated ones?

Check it: ``vqref grade ex05`` from the repository root.
"""


def ema_step(cluster_size, embed_avg, x, indices, decay, eps):
    """One EMA step.

    Parameters
    ----------
    cluster_size : (K,) float, N_k
    embed_avg : (K, D) float, m_k
    x : (N, D) float, the batch
    indices : (N,) int, the code of each row
    decay : float, gamma in [0, 1)
    eps : float, the Laplace smoothing constant

    Returns
    -------
    cluster_size : (K,) the new N_k
    embed_avg : (K, D) the new m_k
    codebook : (K, D) the new codes c_k
    """
    raise NotImplementedError
