"""JAX reference for the rotation trick (Fifty et al., arXiv 2410.06424), as the paper states it.

Symbols: N vectors, D features; per row ``e`` the encoder output, ``q`` its code.

The paper writes the quantizer's output as a frozen rotation and rescaling of ``e`` (section 4):

    q~ = sg[lambda R] e,     lambda = ||q|| / ||e||,
    R = I - 2 r r^T + 2 q^ e^^T,     e^ = e/||e||,  q^ = q/||q||,  r = (e^ + q^)/||e^ + q^||

``R`` is the rotation that takes ``e^`` to ``q^`` in their plane, so ``lambda R e = q``.  Here
``R`` is built as a dense (D, D) matrix per row and applied by a matrix product, the most
literal reading of the equation (vqref applies it in O(D) without building it).  The whole
factor ``lambda R`` sits inside ``stop_gradient``, so JAX's derivative is ``de = lambda R^T g``
and ``q`` gets nothing: the surrogate gradient, not a derivative of the forward value ``q``.

Straight-through rows.  vqref (see :mod:`vqref.ops.rotation`) replaces ``lambda R`` by the
identity where ``lambda`` is outside ``(eps, 1/eps)`` (``e`` or ``q`` zero, or negligible next to
the other); so does this reference.  It has no other guard: rows with ``e^ = -q^`` exactly
give NaN (``r`` is 0/0), so feed it rows at an angle below about 170 degrees.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["rotation_matrices", "rotation_trick"]

sg = jax.lax.stop_gradient


def _unit(x):
    """Rows of x divided by their norms (zero rows stay zero), and the norms: (N, D), (N, 1)."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))  # (N, 1)
    return x / jnp.where(norm > 0, norm, 1.0), norm


def rotation_matrices(e, q, *, eps: float | None = None):
    """Per row, the dense matrix ``lambda R`` (or ``I`` on straight-through rows): (N, D, D).

    Parameters
    ----------
    e, q : (N, D)
    eps : the straight-through threshold on lambda (default: float64 machine epsilon, vqref's
        default for float64 inputs)
    """
    eps = float(np.finfo(np.float64).eps) if eps is None else float(eps)
    D = e.shape[1]
    ehat, ne = _unit(e)  # (N, D), (N, 1)
    qhat, nq = _unit(q)  # (N, D), (N, 1)
    live = (nq > eps * ne) & (ne > eps * nq)  # (N, 1) lambda in (eps, 1/eps)
    r, _ = _unit(ehat + qhat)  # (N, D) the bisector of e^ and q^
    eye = jnp.eye(D, dtype=e.dtype)  # (D, D)
    R = eye - 2 * r[:, :, None] * r[:, None, :] + 2 * qhat[:, :, None] * ehat[:, None, :]  # (N, D, D)
    lam = nq / jnp.where(live, ne, 1.0)  # (N, 1)
    return jnp.where(live[:, :, None], lam[:, :, None] * R, eye)  # (N, D, D)


def rotation_trick(e, q, *, eps: float | None = None):
    """``q~ = sg[lambda R] e`` row by row: value ``q`` (to rounding), gradient ``lambda R^T g`` to ``e``.

    Parameters
    ----------
    e, q : (N, D), D >= 2
    eps : see :func:`rotation_matrices`

    Returns
    -------
    q_tilde : (N, D)
    """
    M = sg(rotation_matrices(e, q, eps=eps))  # (N, D, D), a constant for the derivative
    return jnp.einsum("nij,nj->ni", M, e)  # (N, D)
