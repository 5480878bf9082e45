"""The rotation trick (Fifty et al., arXiv 2410.06424): a surrogate gradient that rotates, not copies.

Symbols: N vectors, D features (D >= 2).  Per row, ``e`` is the encoder output and ``q`` the
code selected for it; ``g`` is the upstream gradient with respect to the quantizer's output.

Why: the straight-through estimator hands ``g`` to ``e`` unchanged, so it forgets where ``e``
sits relative to its code.  The rotation trick writes the quantizer's output as a rotation plus
a rescaling of ``e``,

    q~ = sg[lambda R] e,     lambda = ||q|| / ||e||,     R e^ = q^            (paper, section 4)

with ``e^ = e/||e||``, ``q^ = q/||q||`` and ``R`` the rotation that turns ``e^`` into ``q^``
inside the plane span{e^, q^} and leaves every vector orthogonal to that plane alone.  The value
is ``lambda ||e|| q^ = q``, the same as with the STE; only the backward changes:

    de = lambda R^T g                  (lambda and R held constant: sg[.])

It is a *surrogate* gradient, not the derivative of the forward (the true derivative of the
piecewise-constant lookup is zero almost everywhere).  Check it against an autograd expression
written with ``.detach()``, never against finite differences of the quantizer.  Two consequences
serve as tests: ``||de|| = lambda ||g||`` (rotations keep lengths) and ``e . de = q . g`` (the
angle between ``g`` and ``q`` becomes the angle between ``de`` and ``e``).  The codebook gets
nothing through this path.

How ``R`` is applied.  The paper defines ``R = I - 2 r r^T + 2 q^ e^T`` with
``r = (e^ + q^)/||e^ + q^||`` (its O(D) "efficient" form, section 4.2, is
:func:`householder_rotate`).  That form divides by ``||e^ + q^|| = sqrt(2 (1 + cos theta))``: its
errors grow like ``u / sqrt(1 + cos theta)`` as the angle approaches pi, and it is 0/0 (NaN) when
``e`` and ``q`` point in exactly opposite directions.  vqref uses the plane (Rodrigues) form
instead, with an explicitly orthonormal basis (e^, p) of the plane:

    q^ = c e^ + s p,        c = cos theta,   s = sin theta >= 0,   p . e^ = 0, ||p|| = 1
    R v   = v + (c - 1)(e^ (e^.v) + p (p.v)) + s (p (e^.v) - e^ (p.v))
    R^T v = v + (c - 1)(e^ (e^.v) + p (p.v)) - s (p (e^.v) - e^ (p.v))

In the basis (e^, p) this is the 2x2 rotation [[c, -s], [s, c]]; on the orthogonal complement it
is the identity.  It is the same matrix as the Householder form wherever that one is defined, it
costs O(D) per row (never a D x D matrix), and it stays orthogonal to rounding error for every
angle, including theta = pi.

Degenerate rows never give NaN:

* ``e`` and ``q`` (anti)parallel: the plane is not determined (``w = q^ - c e^`` vanishes).  Any
  unit ``p`` orthogonal to ``e^`` then gives a valid rotation (the identity for c = 1, a proper
  rotation by pi, det +1, for c = -1); vqref takes the coordinate axis where ``|e^_j|`` is
  smallest, with its ``e^`` component removed.
* ``e = 0`` or ``q = 0`` (more precisely ``lambda`` outside the open interval ``(eps, 1/eps)``:
  ``||q|| <= eps ||e||`` or ``||e|| <= eps ||q||``): ``e^`` or ``q^`` is undefined and ``lambda``
  is 0 or unbounded.  Those rows fall back to the straight-through estimator, which is the
  rotation trick with ``R = I`` and ``lambda = 1``: ``de = g``.

How the trick's backward applies ``R^T``.  The forward value is ``q`` itself, so only the
backward needs ``lambda`` and ``R`` -- and only the product ``lambda R^T g``, one vector per row.
:func:`rotation_trick_backward` is the definition: ``lambda`` and the plane-form basis, then
:func:`rotate_transpose`.  By default it hands the work to a fast path,
:func:`rotation_trick_backward_fused` (the choice is one line; ``fast=False`` runs the
definition).  With the row scalars ``a = e^.g``, ``b = q^.g`` and ``c = e^.q^``, the
Householder form becomes

    R^T g = g + ((1 + 2c) b - a) / (1 + c) e^  -  (a + b) / (1 + c) q^

so the fast path needs five row dot products (``e.e``, ``q.q``, ``e.q``, ``e.g``, ``q.g``) and
one combination of g, e and q, computed block of rows by block of rows so that each block is
read from memory once.  It is the same matrix, with the rounding error of the Householder
form, about ``u / (1 + c)``: small while the angle stays below 120 degrees (``1 + c >= 1/2``),
as it does for nearly every row in practice.  The rows beyond, and rows whose squared norms
leave the dtype's range, take the definition instead, computed on those rows alone
(:func:`vqref.backend.where_rows`).  The test suite pins the fast path to the definition on
rows that reach each of its masks.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from .. import backend as B
from ..backend import Array

__all__ = [
    "RotationBasis",
    "RotationTrickCache",
    "rotation_basis",
    "rotate",
    "rotate_transpose",
    "householder_rotate",
    "rotation_matrix",
    "rotation_trick_forward",
    "rotation_trick_backward",
    "rotation_trick_backward_fused",
]


class RotationBasis(NamedTuple):
    """Per row, the rotation ``R`` that maps ``e^`` to ``q^``, in plane form."""

    ehat: Any  # (N, D) unit e (zero for a zero row)
    p: Any  # (N, D) unit, orthogonal to ehat: the second axis of the rotation plane
    cos: Any  # (N, 1) cos theta
    sin: Any  # (N, 1) sin theta >= 0, with cos^2 + sin^2 = 1 to rounding


class RotationTrickCache(NamedTuple):
    """What the backward needs: the pair itself and the straight-through threshold.

    ``lambda`` and ``R`` are functions of ``(e, q)`` alone; :attr:`scale` and :attr:`basis`
    build them (for inspection and tests, in O(N D) at each access), while the backward
    applies them without building them.  ``e`` and ``q`` are the forward's arrays, not
    copies (``q`` is also the forward's output): they must not be modified in place before the
    backward.
    """

    e: Array  # (N, D) encoder outputs
    q: Array  # (N, D) selected codes
    eps: float  # rows with lambda <= eps or lambda >= 1/eps use the straight-through estimator

    @property
    def scale(self) -> Array:
        """``lambda = ||q|| / ||e||`` per row, ``(N, 1)``; 1 on straight-through rows."""
        return _plain_rotation(self.e, self.q, self.eps)[1]

    @property
    def basis(self) -> RotationBasis:
        """``R`` per row in plane form (the identity on straight-through rows)."""
        return _plain_rotation(self.e, self.q, self.eps)[0]


def _unit(x: Array, xp: Any) -> tuple[Any, Any]:
    """Rows of ``x`` scaled to unit length, and their lengths: ``(N, D)``, ``(N, 1)``.

    A zero row gives a zero direction and length 0 (no NaN).  Why the division by the largest
    ``|x_j|`` first: the squares inside ``||x||`` underflow for entries below about 1e-19 in
    float32 (1e-154 in float64), which would leave a direction that is not unit length.  After
    the division every entry lies in [-1, 1] and one is +-1, so the norm lies in [1, sqrt(D)].
    """
    m = xp.max(xp.abs(x), axis=1, keepdims=True)  # (N, 1)
    nonzero = m > 0  # (N, 1)
    y = x / xp.where(nonzero, m, 1.0)  # (N, D), entries in [-1, 1]
    n = xp.linalg.vector_norm(y, axis=1, keepdims=True)  # (N, 1), in [1, sqrt(D)] or 0
    return y / xp.where(nonzero, n, 1.0), m * n


def _plane_basis(ehat: Any, qhat: Any, live: Any, xp: Any) -> RotationBasis:
    """The plane-form basis of the rotation taking unit ``ehat`` to unit ``qhat``, row by row.

    Rows where ``live`` is False get the identity (cos 1, sin 0).
    """
    N, D = ehat.shape
    c = xp.sum(ehat * qhat, axis=1, keepdims=True)  # (N, 1) cos theta
    w = qhat - c * ehat  # (N, D), the part of q^ orthogonal to e^
    # Subtracting c e^ once leaves a component along e^ of the size of the rounding error,
    # which is large next to w itself when theta is near 0 or pi.  A second projection removes
    # it ("twice is enough", Parlett and Kahan).
    w = w - xp.sum(ehat * w, axis=1, keepdims=True) * ehat  # (N, D)
    p, s = _unit(w, xp)  # (N, D), (N, 1): s = ||w|| = sin theta

    # When ||w|| is at the rounding level, its direction is noise and is no longer reliably
    # orthogonal to e^ (the error of the projections is about sqrt(D) u / ||w||).  There e^ and
    # q^ are parallel or opposite to working precision, any unit p orthogonal to e^ is right,
    # and a fixed one is used.  The threshold sqrt(D) * eps balances the two errors:
    # a noisy p below it, and the neglected in-plane direction (of size s) above it.
    axis = xp.argmin(xp.abs(ehat), axis=1, keepdims=True)  # (N, 1) the coordinate least along e^
    cols = xp.arange(D, device=B.get_device(ehat))  # (D,)
    a = xp.astype(cols[None, :] == axis, ehat.dtype)  # (N, D) that coordinate axis
    a = a - xp.sum(ehat * a, axis=1, keepdims=True) * ehat  # (N, D), ||a||^2 >= 1 - 1/D
    p_fixed, _ = _unit(a, xp)  # (N, D)
    tiny = math.sqrt(D) * xp.finfo(ehat.dtype).eps
    p = xp.where(s > tiny, p, p_fixed)  # (N, D)

    # c and s are rounded separately; rescale them so that c^2 + s^2 = 1 and R stays orthogonal.
    # On dead rows (q^ = 0 or e^ = 0) the radius is 0: those become the identity rotation.
    radius = xp.sqrt(c * c + s * s)  # (N, 1), 1 to rounding on live rows
    ok = live & (radius > 0)  # (N, 1)
    safe = xp.where(ok, radius, 1.0)  # (N, 1)
    cos = xp.where(ok, c / safe, 1.0)  # (N, 1)
    sin = xp.where(ok, s / safe, 0.0)  # (N, 1)
    return RotationBasis(ehat, p, cos, sin)


def _check_pair(e: Array, q: Array, name: str) -> None:
    if tuple(e.shape) != tuple(q.shape) or e.ndim != 2:
        raise ValueError(f"{name}: e and q must both be (N, D), got {tuple(e.shape)} and {tuple(q.shape)}")
    if e.shape[1] < 2:
        raise ValueError(
            f"{name}: the rotation trick needs D >= 2 (in one dimension no rotation maps +1 to -1); "
            "use the straight-through estimator"
        )


def rotation_basis(e: Array, q: Array) -> RotationBasis:
    """The rotation ``R`` with ``R e^ = q^`` for every row, in plane form (O(N D)).

    Parameters
    ----------
    e : (N, D) float, D >= 2 (only the directions of e and q matter)
    q : (N, D) float

    Returns
    -------
    RotationBasis(ehat, p, cos, sin): ``ehat (N, D)``, ``p (N, D)``, ``cos (N, 1)``, ``sin (N, 1)``
    with ``q^ = cos e^ + sin p``.  Apply it with :func:`rotate` and :func:`rotate_transpose`.

    Notes
    -----
    Exactly (anti)parallel rows use a fixed ``p`` orthogonal to ``e^`` (see the module notes); a
    row where ``e`` or ``q`` is zero gets the identity.  No branch leaves the device.
    """
    _check_pair(e, q, "rotation_basis")
    xp = B.get_namespace(e, q)
    ehat, e_norm = _unit(e, xp)  # (N, D), (N, 1)
    qhat, q_norm = _unit(q, xp)  # (N, D), (N, 1)
    return _plane_basis(ehat, qhat, (e_norm > 0) & (q_norm > 0), xp)


def _apply(v: Any, basis: RotationBasis, sign: float) -> Array:
    xp = B.get_namespace(v, basis.ehat)
    ehat, p, c, s = basis
    ev = xp.sum(ehat * v, axis=1, keepdims=True)  # (N, 1) e^ . v
    pv = xp.sum(p * v, axis=1, keepdims=True)  # (N, 1) p . v
    in_plane = ehat * ev + p * pv  # (N, D) projection of v onto the plane
    turn = p * ev - ehat * pv  # (N, D) that projection turned by +90 degrees
    return v + (c - 1) * in_plane + (sign * s) * turn  # (N, D)


def rotate(v: Any, basis: RotationBasis) -> Array:
    """``R v`` for every row, in O(N D).

    ``R v = v + (c - 1)(e^ (e^.v) + p (p.v)) + s (p (e^.v) - e^ (p.v))``

    Parameters
    ----------
    v : (N, D) float
    basis : RotationBasis from :func:`rotation_basis` (or a forward cache)

    Returns
    -------
    (N, D)
    """
    return _apply(v, basis, 1.0)


def rotate_transpose(v: Any, basis: RotationBasis) -> Array:
    """``R^T v = R^{-1} v`` for every row, in O(N D): :func:`rotate` with the sine negated."""
    return _apply(v, basis, -1.0)


def householder_rotate(v: Any, e: Array, q: Array, *, transpose: bool = False) -> Array:
    """The paper's O(D) form ``R v = v - 2 r (r.v) + 2 q^ (e^.v)``, for teaching and tests.

    ``R^T v = v - 2 r (r.v) + 2 e^ (q^.v)``, with ``r = (e^ + q^)/||e^ + q^||``.  This is the
    expression of arXiv 2410.06424 section 4.2 (and of vector-quantize-pytorch, without its
    clamps).  It has no guards: rows with ``e = -q`` (or a zero ``e`` or ``q``) give NaN, and
    its rounding errors grow like ``u / sqrt(1 + cos theta)`` near theta = pi.  The library path
    is :func:`rotate`.

    Parameters
    ----------
    v, e, q : (N, D) float
    transpose : apply ``R^T`` instead of ``R``

    Returns
    -------
    (N, D)
    """
    xp = B.get_namespace(v, e, q)
    ehat = e / xp.linalg.vector_norm(e, axis=1, keepdims=True)  # (N, D)
    qhat = q / xp.linalg.vector_norm(q, axis=1, keepdims=True)  # (N, D)
    r = ehat + qhat  # (N, D)
    r = r / xp.linalg.vector_norm(r, axis=1, keepdims=True)  # (N, D) the bisector of e^ and q^
    src, dst = (qhat, ehat) if transpose else (ehat, qhat)
    rv = xp.sum(r * v, axis=1, keepdims=True)  # (N, 1)
    sv = xp.sum(src * v, axis=1, keepdims=True)  # (N, 1)
    return v - 2 * r * rv + 2 * dst * sv  # (N, D)


def rotation_matrix(e_row: Any, q_row: Any) -> Array:
    """The dense ``(D, D)`` matrix ``R = I - 2 r r^T + 2 q^ e^T`` of one pair, for tests only.

    Building it costs O(D^2) memory; the op never does.  Unguarded, like :func:`householder_rotate`.

    Parameters
    ----------
    e_row, q_row : (D,) float

    Returns
    -------
    R : (D, D) with ``R e^ = q^``
    """
    xp = B.get_namespace(e_row, q_row)
    D = e_row.shape[0]
    ehat = e_row / xp.linalg.vector_norm(e_row)  # (D,)
    qhat = q_row / xp.linalg.vector_norm(q_row)  # (D,)
    r = ehat + qhat  # (D,)
    r = r / xp.linalg.vector_norm(r)  # (D,)
    eye = xp.eye(D, dtype=e_row.dtype, device=B.get_device(e_row))  # (D, D)
    return eye - 2 * r[:, None] * r[None, :] + 2 * qhat[:, None] * ehat[None, :]  # (D, D)


# Rows with 1 + cos theta below this use the plane form in the backward (see the module notes).
_WIDE_ANGLE = 0.5
# Rows per block of the backward are chosen so a block of one (N, D) array has this many elements.
_BLOCK_ELEMENTS = 1 << 18


def _plain_rotation(e: Array, q: Array, eps: float) -> tuple[RotationBasis, Any]:
    """``R`` in plane form and ``lambda``, row by row, the careful way (the definition).

    Norms after scaling by the largest entry (no under- or overflow); rows with ``lambda`` outside
    the open interval ``(eps, 1/eps)`` -- ``||q|| <= eps ||e||`` or ``||e|| <= eps ||q||`` -- set to
    ``R = I`` and ``lambda = 1``.
    """
    xp = B.get_namespace(e, q)
    ehat, e_norm = _unit(e, xp)  # (N, D), (N, 1)
    qhat, q_norm = _unit(q, xp)  # (N, D), (N, 1)
    # lambda in (eps, 1/eps), written without dividing; False whenever e or q is zero.
    live = (q_norm > eps * e_norm) & (e_norm > eps * q_norm)  # (N, 1)
    scale = xp.where(live, q_norm / xp.where(live, e_norm, 1.0), 1.0)  # (N, 1) lambda
    return _plane_basis(ehat, qhat, live, xp), scale


def rotation_trick_forward(e: Array, q: Array, *, eps: float | None = None) -> tuple[Array, RotationTrickCache]:
    """The rotation-trick quantizer output: value ``q``, gradient routed to ``e`` by a rotation.

    ``q~ = sg[lambda R] e`` with ``R e^ = q^`` and ``lambda = ||q|| / ||e||`` (arXiv 2410.06424,
    section 4).  Because ``lambda R e = lambda ||e|| q^ = q``, the forward returns ``q`` itself,
    bit for bit (as :func:`~vqref.ops.straight_through.straight_through_forward` does); the
    trick only changes the backward.  ``cache.scale * rotate(e, cache.basis)`` recomputes
    ``lambda R e`` and equals ``q`` to rounding.

    Parameters
    ----------
    e : (N, D) float, encoder outputs (where the gradient goes), D >= 2
    q : (N, D) float, selected codes (the value)
    eps : rows whose ``lambda`` falls outside the open interval ``(eps, 1/eps)``, that is
        ``||q|| <= eps ||e||`` or ``||e|| <= eps ||q||`` (``e`` or ``q`` numerically zero next to
        the other, including exactly zero), use the straight-through estimator instead.
        Default: the machine epsilon of the dtype (2.2e-16 in float64, 1.2e-7 in float32).

    Returns
    -------
    q_tilde : (N, D), ``q`` itself
    cache : RotationTrickCache(e, q, eps); ``cache.scale`` (N, 1) and ``cache.basis`` give
        ``lambda`` and ``R`` (straight-through rows: ``lambda = 1``, ``R = I``).

    Notes
    -----
    Nothing is computed here: the rotation is applied in the backward, which is the only place
    that needs it (an eval-mode forward with the rotation trick costs what the STE costs).
    """
    _check_pair(e, q, "rotation_trick_forward")
    xp = B.get_namespace(e, q)
    # A Python float, so that a float32 input is never promoted by a numpy float64 scalar.
    eps = float(xp.finfo(e.dtype).eps if eps is None else eps)
    return q, RotationTrickCache(e, q, eps)


def rotation_trick_backward(dq_tilde: Array, cache: RotationTrickCache, *, fast: bool = True) -> Array:
    """``de = lambda R^T dq_tilde``: the rotation trick's surrogate gradient for ``e``.

    ``lambda`` and ``R`` are functions of the cached ``(e, q)`` and are constants
    (``sg[lambda R]``), so this is the exact VJP of ``v -> lambda R v`` with the rotation
    frozen, not a derivative of the forward value ``q`` (arXiv 2410.06424, section 4).  The
    codebook receives nothing through this path (train it with the codebook loss or an EMA).

    Straight-through rows -- ``||q|| <= eps ||e||`` or ``||e|| <= eps ||q||``, including a zero
    ``e`` or ``q`` -- have ``R = I`` and ``lambda = 1`` and return ``dq_tilde`` unchanged.
    Exactly (anti)parallel rows rotate in a fixed plane (module notes); no row gives NaN.

    Parameters
    ----------
    dq_tilde : (N, D) float, upstream gradient of the quantizer output
    cache : RotationTrickCache
    fast : compute the same product with :func:`rotation_trick_backward_fused` (row dot
        products, block by block; equal to the definition to rounding).  ``False`` runs the
        definition written below, for reading and for the tests that pin the fast path to it.

    Returns
    -------
    de : (N, D), with ``||de_i|| = lambda_i ||dq_tilde_i||`` and ``e_i . de_i = q_i . dq_tilde_i``
    """
    if fast:  # the one-line choice of the fast path; the definition follows
        return rotation_trick_backward_fused(dq_tilde, cache)
    basis, scale = _plain_rotation(cache.e, cache.q, cache.eps)  # R (plane form), lambda (N, 1)
    return scale * rotate_transpose(dq_tilde, basis)  # (N, D) lambda R^T g


def rotation_trick_backward_fused(dq_tilde: Array, cache: RotationTrickCache) -> Array:
    """Fast path of :func:`rotation_trick_backward`: ``lambda R^T g`` from five row dot products.

    With ``g = dq_tilde``, ``a = e^.g``, ``b = q^.g`` and ``c = cos theta`` (module notes), the
    rows it calls *easy* get

        de = lambda (g + ((1 + 2c) b - a)/(1 + c) e^ - (a + b)/(1 + c) q^)

    computed block of rows by block of rows (:func:`vqref.backend.rows_per_block`).  The masks,
    row by row:

    * ``safe``: ``e.e`` and ``q.q`` in ``[lo, hi]`` (no square underflowed enough to matter, no
      product can overflow) and ``e.g``, ``q.g`` finite;
    * ``live``: ``||q|| > eps ||e||`` and ``||e|| > eps ||q||``, the definition's test on the
      norms ``sqrt(e.e)`` and ``sqrt(q.q)`` (``safe`` rows that are not ``live`` are
      straight-through: ``de = g``);
    * ``easy``: ``safe``, ``live`` and ``1 + c >= 1/2`` (the Householder form's rounding error,
      ``u / (1 + c)``, stays small);
    * *hard* = not ``safe``, or ``live`` but not ``easy``: these rows take the definition,
      ``rotation_trick_backward(..., fast=False)``, on those rows alone.

    Parameters and returns as :func:`rotation_trick_backward`.
    """
    xp = B.get_namespace(dq_tilde, cache.e)
    g, (e, q, eps) = dq_tilde, cache
    N, D = g.shape
    info = xp.finfo(g.dtype)
    # A squared norm in [lo, hi] lost less than eps of itself to underflowing squares and
    # cannot overflow, nor can its dot products with the other vector of the pair.
    lo = float(D * info.smallest_normal / info.eps)
    hi = float(info.max * info.eps / D)
    de = xp.empty_like(g)  # (N, D), filled block by block
    hard_parts = []
    step = B.rows_per_block(g, _BLOCK_ELEMENTS)
    for start in range(0, N, step):
        stop = min(start + step, N)
        eb, qb, gb = e[start:stop, :], q[start:stop, :], g[start:stop, :]  # (n, D) each
        ee, qq, eq = xp.vecdot(eb, eb)[:, None], xp.vecdot(qb, qb)[:, None], xp.vecdot(eb, qb)[:, None]  # (n, 1)
        eg, qg = xp.vecdot(eb, gb)[:, None], xp.vecdot(qb, gb)[:, None]  # (n, 1)
        safe = (ee >= lo) & (ee <= hi) & (qq >= lo) & (qq <= hi) & xp.isfinite(eg) & xp.isfinite(qg)
        ne = xp.sqrt(xp.where(safe, ee, 1.0))  # (n, 1) ||e||
        nq = xp.sqrt(xp.where(safe, qq, 1.0))  # (n, 1) ||q||
        live = (nq > eps * ne) & (ne > eps * nq)  # (n, 1) lambda in (eps, 1/eps)
        c = xp.where(safe, eq, 0.0) / (ne * nq)  # (n, 1) cos theta
        easy = safe & live & (1.0 + c >= _WIDE_ANGLE)  # (n, 1)
        hard_parts.append(~safe | (live & ~easy))  # the rows that take the definition
        lam = xp.where(easy, nq / ne, 1.0)  # (n, 1) lambda; 1 elsewhere
        a = xp.where(easy, eg / ne, 0.0)  # (n, 1) e^ . g
        b = xp.where(easy, qg / nq, 0.0)  # (n, 1) q^ . g
        c = xp.where(easy, c, 0.0)
        coef_e = lam * ((1.0 + 2.0 * c) * b - a) / ((1.0 + c) * ne)  # (n, 1), 0 off the easy rows
        coef_q = -lam * (a + b) / ((1.0 + c) * nq)  # (n, 1)
        de[start:stop, :] = lam * gb + coef_e * eb + coef_q * qb  # (n, D); g on straight-through rows
    if not hard_parts:
        return de
    hard = hard_parts[0] if len(hard_parts) == 1 else xp.concat(hard_parts, axis=0)  # (N, 1)

    def definition(g_: Any, e_: Any, q_: Any) -> Array:  # lambda R^T g on the hard rows alone
        return rotation_trick_backward(g_, RotationTrickCache(e_, q_, eps), fast=False)

    return B.where_rows(hard, definition, (g, e, q), de)
