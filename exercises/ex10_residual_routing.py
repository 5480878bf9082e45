"""Exercise 10: residual VQ and its two gradient routings.

Symbols: N vectors, D features, K codes per depth, Q depths; M = N * D.

The forward.  Residual quantization (SoundStream, arXiv 2107.03312; RQ-VAE, arXiv 2203.01941)
quantizes, at each depth, what the depths before it left over.  With the codes held fixed
(``k_l = indices[:, l]``, ``c_l = C_l[k_l]``):

    r_0 = x
    o_l = r_l + sg[c_l - r_l]                  depth l's straight-through output (value c_l)
    loss_l = beta * mse(r_l, sg[c_l])          depth l's commitment loss
    r_{l+1} = r_l - sg[o_l]                    the next depth sees the code as a constant

and the output has the value ``sum_l c_l``.  Two places for the estimator give two routings:

* ``"per_depth"`` (vector-quantize-pytorch): ``quantized = sum_l o_l``, one estimator per depth;
* ``"sum"`` (RQ-VAE's code): ``quantized = x + sg[sum_l c_l - x]``, one estimator on the total.

Your task.  Given ``dquantized (N, D)`` and the per-depth upstream gradients ``dlosses (Q,)``,
return dx (N, D), the gradient of ``<dquantized, quantized> + sum_l dlosses[l] * loss_l``.  The
codebooks receive nothing here (the losses stop their gradient).  The gradients are surrogates:
the grader checks them against torch autograd with ``.detach()``.

Hints.
* What is the Jacobian of ``r_{l+1}`` with respect to ``r_l``?  And of ``r_l`` with respect to x?
* Count how many times the decoder's gradient reaches x in each routing.
* Each commitment loss compares its own residual with its own code (exercise 02).

Check it: ``vqref grade ex10`` from the repository root.
"""

from array_api_compat import array_namespace


def residual_forward(x, codebooks, indices):
    """The value ``sum_l c_l`` and the residuals ``r_0 .. r_Q``.  x (N, D), codebooks (Q, K, D),
    indices (N, Q) -> quantized (N, D), list of Q + 1 arrays (N, D).  Given."""
    xp = array_namespace(x, codebooks)
    residuals = [x]
    for level in range(codebooks.shape[0]):
        code = xp.take(codebooks[level, ...], indices[:, level], axis=0)  # (N, D) c_l
        residuals.append(residuals[-1] - code)
    return x - residuals[-1], residuals


def residual_backward(dquantized, dlosses, x, codebooks, indices, beta, routing):
    """dx for either routing.

    Parameters
    ----------
    dquantized : (N, D) float
    dlosses : (Q,) float, upstream gradient of each depth's loss
    x : (N, D) float
    codebooks : (Q, K, D) float
    indices : (N, Q) int
    beta : float, the commitment weight
    routing : "per_depth" or "sum"

    Returns
    -------
    dx : (N, D)
    """
    raise NotImplementedError
