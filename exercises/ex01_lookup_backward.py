"""Exercise 01: the backward of the code lookup, a segment sum.

Symbols: N vectors, D features, K codes.

The forward.  A vector quantizer (VQ-VAE, van den Oord et al., arXiv 1711.00937) replaces each
input row by a row of its codebook ``C (K, D)``.  With the chosen codes ``k (N,)``, integers in
``[0, K)``, the output is the gather

    q_i = C[k_i]                    q : (N, D)

Written as a matrix product, ``q = E C`` with the one-hot matrix ``E (N, K)``, ``E_ik = 1`` when
``k_i = k`` and 0 otherwise.

Your task.  Given the upstream gradient ``dq = dL/dq (N, D)``, return ``dC = dL/dC (K, D)``.

Hints.
* The forward is linear in C: its backward is the transpose of E.  What does ``E^T dq`` do to the
  rows of ``dq``, code by code?
* Several rows may choose the same code (here N > K, so some must), and some codes may be chosen
  by no row.  Make sure both cases come out right.
* Before you write ``dC[k] += dq``, try it on a tiny example where ``k`` holds the same code twice.

Check it: from the repository root, ``vqref grade ex01`` (or ``python -m vqref grade ex01``); in
Python, ``from vqref.testing.graders import grade; print(grade("ex01"))``.  The grader calls your
function with numpy float64 arrays.  ``--backend array_api_strict`` and ``--dtype float32`` also
check that it is portable (take the namespace from the inputs: ``xp = array_namespace(dq)``) and
that it keeps the input dtype.
"""

from array_api_compat import array_namespace


def lookup_forward(codebook, indices):
    """``q = codebook[indices]``.  codebook (K, D) float, indices (N,) int -> q (N, D).  Given."""
    xp = array_namespace(codebook, indices)
    return xp.take(codebook, indices, axis=0)  # (N, D)


def lookup_backward(dq, indices, num_codes):
    """The gradient of the codebook.

    Parameters
    ----------
    dq : (N, D) float, the upstream gradient dL/dq
    indices : (N,) int in [0, K), the codes the forward chose (with repeats)
    num_codes : int, K

    Returns
    -------
    dcodebook : (K, D), the dtype of dq
    """
    raise NotImplementedError
