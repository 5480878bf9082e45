"""Solution 04: the straight-through estimator.

Symbols: N vectors, D features, K codes.

In ``z_q = z + sg[C[k] - z]`` the backward sees only the first ``z``: the Jacobian with respect to
z is the identity, and the codebook appears only inside the stop-gradient.  So

    dz = dz_q                 dcodebook = 0

The decoder's gradient is copied to the encoder as if quantization were the identity map.  The
codebook learns elsewhere: from the codebook loss (exercise 03) or from the EMA update
(exercise 05).  A surrogate gradient, not the derivative of the forward.
"""

from array_api_compat import array_namespace


def straight_through_forward(z, codebook, indices):
    """``z + sg[C[k] - z]``: the value is the code itself."""
    xp = array_namespace(z, codebook)
    return xp.take(codebook, indices, axis=0)  # (N, D)


def straight_through_backward(dz_q, z, codebook, indices):
    """``dz = dz_q``, ``dcodebook = 0``.

    Parameters
    ----------
    dz_q, z : (N, D) float
    codebook : (K, D) float
    indices : (N,) int

    Returns
    -------
    dz : (N, D)
    dcodebook : (K, D), zeros
    """
    xp = array_namespace(dz_q, codebook)
    return dz_q, xp.zeros_like(codebook)
