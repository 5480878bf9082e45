"""Solution 14: the straight-through Gumbel-softmax estimator.

Symbols: N vectors, D features, K codes.

``out = z C`` with ``z = onehot(k) + soft - sg[soft]``:

    dC      = z^T dout = onehot(k)^T dout       (K, D): z's *value* is the one-hot, a segment sum
    dz      = dout C^T                          (N, K)
    dlogits = soft * (dz - <soft, dz>) / tau    (N, K): z's gradient flows only through soft

The true derivative of the sampled one-hot is zero; the estimator substitutes the soft sample's
Jacobian for it.  A surrogate gradient.
"""

from array_api_compat import array_namespace


def straight_through_gumbel_forward(logits, codebook, indices):
    """The value of ``z C``: the sampled codes."""
    xp = array_namespace(logits, codebook)
    return xp.take(codebook, indices, axis=0)  # (N, D)


def straight_through_gumbel_backward(dout, logits, codebook, indices, temperature):
    """``dlogits = soft * (dz - <soft, dz>) / tau`` and ``dcodebook = onehot^T dout``.

    Parameters
    ----------
    dout : (N, D) float
    logits : (N, K) float
    codebook : (K, D) float
    indices : (N,) int
    temperature : float

    Returns
    -------
    dlogits : (N, K)
    dcodebook : (K, D)
    """
    xp = array_namespace(dout, logits, codebook)
    K = codebook.shape[0]
    z = logits / temperature  # (N, K)
    e = xp.exp(z - xp.max(z, axis=-1, keepdims=True))
    soft = e / xp.sum(e, axis=-1, keepdims=True)  # (N, K)
    one_hot = xp.astype(indices[:, None] == xp.arange(K, dtype=indices.dtype)[None, :], dout.dtype)  # (N, K)
    dcodebook = one_hot.T @ dout  # (K, D)
    dz = dout @ codebook.T  # (N, K)
    dlogits = soft * (dz - xp.sum(soft * dz, axis=-1, keepdims=True)) / temperature  # (N, K)
    return dlogits, dcodebook
