"""Solution 01: the backward of the code lookup, a segment sum.

Symbols: N vectors, D features, K codes.

The forward ``q = E C`` is linear in C, with the one-hot ``E (N, K)``.  Its vector-Jacobian
product is the transpose:

    dC = E^T dq,        dC[k] = sum_{i : k_i = k} dq[i]          (K, D)

Each code collects the gradients of every row that chose it; a code no row chose gets a zero
row.  Written as a one-hot product it is one matrix multiplication and portable to any Array API
library.  (numpy alone: ``dC = np.zeros((K, D)); np.add.at(dC, k, dq)``.)

The trap: ``dC[k] += dq`` means ``dC[k] = dC[k] + dq``, and a fancy-index assignment writes each
repeated index once, so a code chosen by three rows ends up with one row's gradient.
"""

from array_api_compat import array_namespace


def lookup_forward(codebook, indices):
    """``q = codebook[indices]``.  codebook (K, D) float, indices (N,) int -> q (N, D)."""
    xp = array_namespace(codebook, indices)
    return xp.take(codebook, indices, axis=0)  # (N, D)


def lookup_backward(dq, indices, num_codes):
    """``dC = E^T dq`` by a one-hot product.

    Parameters
    ----------
    dq : (N, D) float
    indices : (N,) int in [0, K)
    num_codes : int, K

    Returns
    -------
    dcodebook : (K, D), the dtype of dq
    """
    xp = array_namespace(dq, indices)
    codes = xp.arange(num_codes, dtype=indices.dtype)  # (K,)
    one_hot = xp.astype(indices[:, None] == codes[None, :], dq.dtype)  # (N, K) the matrix E
    return one_hot.T @ dq  # (K, D) each code sums the rows that chose it
