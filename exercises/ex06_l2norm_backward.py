"""Exercise 06: the backward of the l2 normalisation.

Symbols: N vectors, D features; eps the smallest divisor.

The forward.  Cosine-similarity codebooks (ViT-VQGAN, Yu et al., arXiv 2110.04627, section 3.2)
normalise every row to unit length before the lookup.  As ``torch.nn.functional.normalize`` (and
vector-quantize-pytorch, with eps = 1e-6) do it,

    y_i = x_i / max(||x_i||, eps)                 y : (N, D)

Your task.  Given ``dy (N, D)``, return ``dx = (dy/dx)^T dy (N, D)``.

Hints.
* For a row with ``n = ||x|| >= eps``: differentiate ``y = x / n`` with ``dn/dx = x / n = y``.
  You should find a Jacobian ``(I - y y^T) / n``.  Apply it to dy without building a D x D matrix.
* Why is ``x . dx = 0``?  (What can a unit vector's gradient not change?)
* For a row shorter than eps the forward is ``x / eps``, a linear map.  The grader has such rows,
  including a zero row.  Your answer must be finite there.

Check it: ``vqref grade ex06`` from the repository root.
"""

from array_api_compat import array_namespace


def l2norm_forward(x, eps=1e-6):
    """``x / max(||x||, eps)`` row by row.  x (N, D) -> y (N, D).  Given."""
    xp = array_namespace(x)
    norm = xp.linalg.vector_norm(x, axis=-1, keepdims=True)  # (N, 1)
    return x / xp.clip(norm, min=eps)  # (N, D)


def l2norm_backward(dy, x, eps=1e-6):
    """The vector-Jacobian product of :func:`l2norm_forward`.

    Parameters
    ----------
    dy : (N, D) float, upstream gradient
    x : (N, D) float, the forward's input
    eps : float, the forward's smallest divisor

    Returns
    -------
    dx : (N, D)
    """
    raise NotImplementedError
