"""Exercise 02: the backward of the commitment loss.

Symbols: N vectors, D features; M = N * D, the number of averaged elements.

The forward.  VQ-VAE (arXiv 1711.00937, eq. 3) keeps the encoder's outputs ``x (N, D)`` close to
their selected codes ``q (N, D)`` with the *commitment loss*

    L = mse(x, sg[q]) = (1/M) sum_{i,j} (x_ij - q_ij)^2          a scalar

where ``sg[.]`` is the stop-gradient: the codes are constants here, only x learns.  Like
``torch.nn.functional.mse_loss`` (and vector-quantize-pytorch), the mean runs over all M elements.

Your task.  The loss is one term of a larger objective, so its gradient arrives from above as a
scalar ``dloss = dObjective/dL`` (e.g. the loss weight beta).  Return ``dx = dloss * dL/dx``.

Hints.
* Differentiate one element ``(x_ij - q_ij)^2`` first, then the mean.
* Which normalisation does a mean over *all* elements bring in?
* The grader's ``dloss`` is never 1: forgetting it is visible.

Check it: ``vqref grade ex02`` from the repository root (see exercise 01 for the options).
"""

from array_api_compat import array_namespace


def commitment_loss_forward(x, q):
    """``mean((x - q)^2)`` over all elements.  x, q (N, D) -> 0-d array.  Given."""
    xp = array_namespace(x, q)
    return xp.mean((x - q) ** 2)


def commitment_loss_backward(dloss, x, q):
    """The gradient of ``dloss * mse(x, sg[q])`` with respect to x.

    Parameters
    ----------
    dloss : float, the upstream gradient of the scalar loss
    x : (N, D) float, encoder outputs
    q : (N, D) float, their codes (constants)

    Returns
    -------
    dx : (N, D), the dtype of x
    """
    raise NotImplementedError
