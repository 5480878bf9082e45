"""Exercise 09: the rotation trick's gradient, lambda R^T g, in O(D) per row.

Symbols: N vectors, D features.  Per row: e the encoder output, q its code, g the upstream gradient.

The forward.  The rotation trick (Fifty et al., arXiv 2410.06424, section 4) replaces the
straight-through estimator by a rotation and a rescaling of e that land exactly on q:

    q~ = sg[lambda R] e,        lambda = ||q|| / ||e||,        R e^ = q^

with ``e^ = e / ||e||``, ``q^ = q / ||q||`` and R the rotation in the plane of e^ and q^.  The paper
writes it with Householder reflections, using ``r = (e^ + q^) / ||e^ + q^||``:

    R = I - 2 r r^T + 2 q^ e^^T                      (D, D)

The value is q; only the backward changes.  lambda and R sit inside the stop-gradient, so the
backward is that of the linear map ``e -> lambda R e`` with lambda and R constant.  This is a
surrogate gradient: the grader checks it against torch autograd with ``.detach()``.

Your task.  Given ``g = dL/dq~ (N, D)``, return ``de (N, D)``, without ever building a D x D
matrix: apply the formula with a few dot products per row.  The grader measures the memory your
function uses on a row with D = 2000.

Hints.
* What is ``R^T`` in the form above?  (Transpose each outer product.)
* ``(u v^T) g = u (v . g)``: one dot product per row.
* Two properties to check yourself: ``||de|| = lambda ||g||`` and ``e . de = q . g``.

Check it: ``vqref grade ex09`` from the repository root.
"""

from array_api_compat import array_namespace


def rotation_trick_forward(e, q):
    """The value of ``sg[lambda R] e``: q itself.  e, q (N, D) -> (N, D).  Given."""
    xp = array_namespace(e, q)
    return xp.asarray(q, copy=True)


def rotation_trick_backward(g, e, q):
    """``de = lambda R^T g`` row by row, in O(N D) time and memory.

    Parameters
    ----------
    g : (N, D) float, upstream gradient
    e : (N, D) float, encoder outputs (non-zero)
    q : (N, D) float, their codes (non-zero, not opposite to e)

    Returns
    -------
    de : (N, D)
    """
    raise NotImplementedError
