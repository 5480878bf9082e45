"""Solution 05: one EMA codebook step with Laplace smoothing.

Symbols: N vectors, D features, K codes.

The batch statistics come from the one-hot matrix ``E (N, K)``: ``n = E^T 1`` (column sums) and
``s = E^T x``, so repeated codes are counted every time.  Then the two moving averages, then the
codes from the *updated* statistics:

    N <- gamma N + (1 - gamma) n          m <- gamma m + (1 - gamma) s
    N~_k = (N_k + eps) / (n_tot + K eps) * n_tot,      c_k = m_k / N~_k

Every ``N~_k`` is positive (for eps > 0 and a positive total), so no code divides by zero, and
``sum_k N~_k = n_tot``: the smoothing moves a little count from frequent codes to rare ones.
"""

from array_api_compat import array_namespace


def ema_step(cluster_size, embed_avg, x, indices, decay, eps):
    """One EMA step; returns the new ``(cluster_size, embed_avg, codebook)``.

    Parameters
    ----------
    cluster_size : (K,) float
    embed_avg : (K, D) float
    x : (N, D) float
    indices : (N,) int
    decay, eps : float

    Returns
    -------
    cluster_size (K,), embed_avg (K, D), codebook (K, D)
    """
    xp = array_namespace(x, embed_avg, indices)
    K = embed_avg.shape[0]
    codes = xp.arange(K, dtype=indices.dtype)  # (K,)
    one_hot = xp.astype(indices[:, None] == codes[None, :], x.dtype)  # (N, K)
    counts = xp.sum(one_hot, axis=0)  # (K,) n_k
    sums = one_hot.T @ x  # (K, D) s_k
    cluster_size = decay * cluster_size + (1.0 - decay) * counts  # (K,)
    embed_avg = decay * embed_avg + (1.0 - decay) * sums  # (K, D)
    total = xp.sum(cluster_size)  # ()
    smoothed = (cluster_size + eps) / (total + K * eps) * total  # (K,) N~_k
    codebook = embed_avg / smoothed[:, None]  # (K, D)
    return cluster_size, embed_avg, codebook
