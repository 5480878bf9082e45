"""Exercise 14: the straight-through Gumbel-softmax estimator.

Symbols: N vectors, D features, K codes; tau the temperature.

The forward.  A stochastic quantizer samples a code instead of taking the nearest one.  With the
logits ``l (N, K)`` of each row for each code, the Gumbel-max trick (Maddison et al., arXiv
1411.0030) draws ``k_i = argmax_k (l_ik / tau + g_ik)`` with Gumbel noise g, a sample of
``softmax(l_i / tau)``.  The sample is discrete, so Jang et al. (arXiv 1611.01144, section 2.2)
pass gradients *straight through* a soft version.  vector-quantize-pytorch's ``gumbel_sample``
(``straight_through=True``) writes it as

    soft = softmax(l / tau)                         (N, K)
    z    = onehot(k) + soft - sg[soft]              value: the one-hot; gradient: the soft's
    out  = z C                                      (N, D), the sampled codes

The sampled ``indices`` are given (the noise is not part of the backward).  This is a surrogate
gradient: the grader checks it against torch autograd with ``.detach()``.

Your task.  Given ``dout (N, D)``, return ``(dlogits (N, K), dcodebook (K, D))``.

Hints.
* ``out = z C`` is a product: dz and dC.  Which value of z goes into dC?
* Then through ``soft``: the softmax backward (exercise 13) with the 1/tau of ``l / tau``.
* The indices repeat (N > K): exercise 01 again.

Check it: ``vqref grade ex14`` from the repository root.
"""

from array_api_compat import array_namespace


def straight_through_gumbel_forward(logits, codebook, indices):
    """The value of ``z C``: the sampled codes.  logits (N, K), codebook (K, D), indices (N,).  Given."""
    xp = array_namespace(logits, codebook)
    return xp.take(codebook, indices, axis=0)  # (N, D)


def straight_through_gumbel_backward(dout, logits, codebook, indices, temperature):
    """Gradients of ``<dout, z C>`` for the logits and the codebook.

    Parameters
    ----------
    dout : (N, D) float
    logits : (N, K) float
    codebook : (K, D) float
    indices : (N,) int, the sampled codes
    temperature : float, tau

    Returns
    -------
    dlogits : (N, K)
    dcodebook : (K, D)
    """
    raise NotImplementedError
