"""Exercise 04: the straight-through estimator (STE).

Symbols: N vectors, D features, K codes.

The forward.  The nearest-code lookup ``q = C[k]`` is piecewise constant in the encoder output
z: its true derivative is zero almost everywhere, so no gradient would reach the encoder.
VQ-VAE (arXiv 1711.00937, section 3.1) passes it anyway, with the straight-through estimator

    z_q = z + sg[C[k] - z]                     z_q : (N, D)

Its value is ``C[k]``, the code; the stop-gradient ``sg[.]`` makes its backward ignore everything
inside the brackets.  This is a *surrogate* gradient: the grader checks it against torch autograd
of the same expression written with ``.detach()``, never against finite differences.

Your task.  Given the upstream gradient ``dz_q (N, D)``, return ``(dz, dcodebook)``: the
gradients of ``<dz_q, z_q>`` with respect to z (N, D) and the codebook C (K, D).

Hints.
* Which terms of ``z + sg[C[k] - z]`` does the backward see?
* Does the codebook appear outside the stop-gradient?  (How does the codebook learn, then?)

Check it: ``vqref grade ex04`` from the repository root.
"""

from array_api_compat import array_namespace


def straight_through_forward(z, codebook, indices):
    """``z + sg[C[k] - z]``: the value is the code itself.  z (N, D), codebook (K, D), indices (N,).  Given."""
    xp = array_namespace(z, codebook)
    return xp.take(codebook, indices, axis=0)  # (N, D), bit for bit the selected codes


def straight_through_backward(dz_q, z, codebook, indices):
    """The straight-through estimator's gradients.

    Parameters
    ----------
    dz_q : (N, D) float, upstream gradient of the quantizer output
    z : (N, D) float, encoder outputs
    codebook : (K, D) float
    indices : (N,) int, the chosen codes

    Returns
    -------
    dz : (N, D)
    dcodebook : (K, D)
    """
    raise NotImplementedError
