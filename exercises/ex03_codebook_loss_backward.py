"""Exercise 03: the codebook and commitment losses, and where each stop-gradient sends the gradient.

Symbols: N vectors, D features; M = N * D; beta the commitment weight.

The forward.  VQ-VAE (arXiv 1711.00937, eq. 3) trains the codebook and the encoder with two
terms of the same value, which differ only in where their gradients go:

    L = mse(sg[x], q) + beta * mse(x, sg[q])                      a scalar
        codebook loss   commitment loss

``sg[.]`` (stop-gradient) is the identity in the forward and has a zero Jacobian in the backward.
In torch it is ``.detach()``.  ``mse(a, b) = (1/M) sum (a - b)^2`` averages over all M elements.

Your task.  Given the upstream scalar ``dloss``, return ``(dx, dq)``, the gradients of
``dloss * L`` with respect to the encoder outputs x (N, D) and the selected codes q (N, D).

Hints.
* Treat each term on its own: which of x and q does it differentiate, and which does it hold
  constant?
* ``d/dq (x - q)^2`` and ``d/dx (x - q)^2`` have opposite signs.
* The grader knows the usual slips: a gradient through a stop-gradient, beta on the wrong term.

Check it: ``vqref grade ex03`` from the repository root.
"""

from array_api_compat import array_namespace


def vq_loss_forward(x, q, beta):
    """The value of ``mse(sg[x], q) + beta * mse(x, sg[q])``, i.e. ``(1 + beta) mse(x, q)``.  Given."""
    xp = array_namespace(x, q)
    return (1.0 + beta) * xp.mean((x - q) ** 2)


def codebook_loss_backward(dloss, x, q, beta):
    """Gradients of ``dloss * (mse(sg[x], q) + beta * mse(x, sg[q]))``.

    Parameters
    ----------
    dloss : float, the upstream gradient
    x : (N, D) float, encoder outputs
    q : (N, D) float, their selected codes
    beta : float, the commitment weight

    Returns
    -------
    dx : (N, D)
    dq : (N, D)
    """
    raise NotImplementedError
