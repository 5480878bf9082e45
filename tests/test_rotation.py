"""Tests of the rotation trick (vqref.ops.rotation): the invariants of docs/math.md §6.5.

Expected values come from host float64 formulas, dense matrices, torch autograd with
``.detach()`` where the paper has sg[.], or vector-quantize-pytorch itself; never from the code
under test.  Sizes N != D throughout.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vqref import backend as B
from vqref.ops.rotation import (
    RotationBasis,
    householder_rotate,
    rotate,
    rotate_transpose,
    rotation_basis,
    rotation_matrix,
    rotation_trick_backward,
    rotation_trick_forward,
)
from vqref.testing import check_vjp, rel_error

# ------------------------------------------------------------------------------------------
# Helpers (host float64 unless said otherwise)
# ------------------------------------------------------------------------------------------


def _pairs(rng, N, D):
    """Generic (e, q): random directions and norms spread over two orders of magnitude."""
    e = rng.standard_normal((N, D)) * np.exp(rng.uniform(-2, 2, size=(N, 1)))
    q = rng.standard_normal((N, D)) * np.exp(rng.uniform(-2, 2, size=(N, 1)))
    return e, q


def _unit_rows(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _seen(bk, x):
    """What the backend sees of host data ``x`` (float32 rounding included), back in float64."""
    return bk.np(bk.asarray(x)).astype(np.float64)


def _eps(bk):
    return float(np.finfo(np.float64 if bk.is64 else np.float32).eps)


def _dense_from_basis(bk, basis, i):
    """The (D, D) matrix of row i's plane-form rotation, built by rotating the identity's rows."""
    xp = bk.xp
    D = basis.ehat.shape[1]
    row = RotationBasis(*(xp.broadcast_to(f[i : i + 1, :], (D, f.shape[1])) for f in basis))
    images = rotate(xp.eye(D, dtype=bk.dtype), row)  # row k is R e_k, the k-th column of R
    return bk.np(images).astype(np.float64).T


def _householder_dense(e_row, q_row):
    """R = H_q^ H_r, the product of two reflections, built independently in float64."""
    D = e_row.shape[0]
    eh, qh = e_row / np.linalg.norm(e_row), q_row / np.linalg.norm(q_row)
    r = (eh + qh) / np.linalg.norm(eh + qh)
    I = np.eye(D)
    return (I - 2 * np.outer(qh, qh)) @ (I - 2 * np.outer(r, r))


# ------------------------------------------------------------------------------------------
# Geometry of R
# ------------------------------------------------------------------------------------------


def test_basis_maps_ehat_to_qhat(bk, rng):
    N, D = 6, 5
    e, q = _pairs(rng, N, D)
    basis = rotation_basis(bk.asarray(e), bk.asarray(q))
    eh, qh = _unit_rows(_seen(bk, e)), _unit_rows(_seen(bk, q))
    tol = 20 * _eps(bk)

    ehat, p = bk.np(basis.ehat).astype(np.float64), bk.np(basis.p).astype(np.float64)
    c, s = bk.np(basis.cos)[:, 0].astype(np.float64), bk.np(basis.sin)[:, 0].astype(np.float64)
    assert basis.ehat.shape == (N, D) and basis.cos.shape == (N, 1)
    np.testing.assert_allclose(ehat, eh, atol=tol)
    np.testing.assert_allclose(np.linalg.norm(p, axis=1), 1.0, atol=tol)
    np.testing.assert_allclose(np.sum(p * eh, axis=1), 0.0, atol=tol)
    np.testing.assert_allclose(c, np.sum(eh * qh, axis=1), atol=tol)
    assert np.all(s >= 0)
    np.testing.assert_allclose(c**2 + s**2, 1.0, atol=tol)
    Re = bk.np(rotate(basis.ehat, basis)).astype(np.float64)
    np.testing.assert_allclose(Re, qh, atol=tol)
    # and back: R^T q^ = e^
    Rtq = bk.np(rotate_transpose(bk.asarray(qh), basis)).astype(np.float64)
    np.testing.assert_allclose(Rtq, eh, atol=tol)


@pytest.mark.parametrize("D", [2, 3, 8])
def test_dense_matrix_is_a_proper_rotation(bk64, rng, D):
    e, q = _pairs(rng, 1, D)
    R = bk64.np(rotation_matrix(bk64.asarray(e[0]), bk64.asarray(q[0])))
    eh, qh = _unit_rows(e)[0], _unit_rows(q)[0]
    c = eh @ qh
    I = np.eye(D)
    assert R.shape == (D, D)
    np.testing.assert_allclose(R.T @ R, I, atol=1e-13)
    assert abs(np.linalg.det(R) - 1.0) < 1e-12
    np.testing.assert_allclose(R @ eh, qh, atol=1e-13)
    np.testing.assert_allclose(R @ qh, 2 * c * qh - eh, atol=1e-13)
    np.testing.assert_allclose(np.trace(R), D - 2 + 2 * c, atol=1e-12)  # rotation angle theta
    np.testing.assert_allclose(R, _householder_dense(e[0], q[0]), atol=1e-13)


def test_plane_form_equals_dense_matrix(bk, rng):
    N, D = 4, 7
    e, q = _pairs(rng, N, D)
    v = rng.standard_normal((N, D))
    basis = rotation_basis(bk.asarray(e), bk.asarray(q))
    Rv = bk.np(rotate(bk.asarray(v), basis))
    Rtv = bk.np(rotate_transpose(bk.asarray(v), basis))
    es, qs, vs = _seen(bk, e), _seen(bk, q), _seen(bk, v)
    for i in range(N):
        R = _householder_dense(es[i], qs[i])
        assert rel_error(_dense_from_basis(bk, basis, i), R) < 20 * D * _eps(bk)
        assert rel_error(Rv[i], R @ vs[i]) < bk.rtol
        assert rel_error(Rtv[i], R.T @ vs[i]) < bk.rtol


def test_fixes_the_orthogonal_complement(bk, rng):
    N, D = 3, 6
    e, q = _pairs(rng, N, D)
    v = rng.standard_normal((N, D))
    es, qs = _seen(bk, e), _seen(bk, q)
    for i in range(N):  # remove the components in span{e, q}
        Qb, _ = np.linalg.qr(np.stack([es[i], qs[i]], axis=1))  # (D, 2)
        v[i] -= Qb @ (Qb.T @ v[i])
    vs = _seen(bk, v)
    basis = rotation_basis(bk.asarray(e), bk.asarray(q))
    np.testing.assert_allclose(bk.np(rotate(bk.asarray(v), basis)), vs, atol=20 * _eps(bk))
    np.testing.assert_allclose(bk.np(rotate_transpose(bk.asarray(v), basis)), vs, atol=20 * _eps(bk))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(data=st.data(), N=st.integers(1, 4), D=st.integers(2, 16))
def test_plane_form_matches_householder_form(data, N, D):
    elements = st.floats(-100, 100, allow_nan=False, allow_infinity=False)
    e = data.draw(hnp.arrays(np.float64, (N, D), elements=elements))
    q = data.draw(hnp.arrays(np.float64, (N, D), elements=elements))
    v = data.draw(hnp.arrays(np.float64, (N, D), elements=elements))
    ne, nq = np.linalg.norm(e, axis=1), np.linalg.norm(q, axis=1)
    assume(np.all(ne >= 1e-3) and np.all(nq >= 1e-3))
    assume(np.all(1 + np.sum(_unit_rows(e) * _unit_rows(q), axis=1) > 1e-6))
    scale = np.linalg.norm(v, axis=1) + 1e-300
    for name in ("numpy", "array_api_strict"):
        xp = B.namespace_from_module(name)
        ex, qx, vx = (B.from_numpy(a, xp) for a in (e, q, v))
        basis = rotation_basis(ex, qx)
        for transpose, plane in ((False, rotate), (True, rotate_transpose)):
            got = B.to_numpy(plane(vx, basis))
            want = B.to_numpy(householder_rotate(vx, ex, qx, transpose=transpose))
            assert np.all(np.linalg.norm(got - want, axis=1) <= 1e-11 * scale), name


# ------------------------------------------------------------------------------------------
# Forward value and gradient identities
# ------------------------------------------------------------------------------------------


def test_forward_value_is_q(bk, rng):
    N, D = 5, 3
    e, q = _pairs(rng, N, D)
    ex, qx = bk.asarray(e), bk.asarray(q)
    out, cache = rotation_trick_forward(ex, qx)
    assert out is qx  # the value is the code itself, bit for bit
    qs = _seen(bk, q)
    lam = np.linalg.norm(qs, axis=1, keepdims=True) / np.linalg.norm(_seen(bk, e), axis=1, keepdims=True)
    np.testing.assert_allclose(bk.np(cache.scale).astype(np.float64), lam, rtol=bk.rtol)
    # lambda R e, the expression the backward differentiates, equals q to rounding
    lre = bk.np(cache.scale * rotate(ex, cache.basis)).astype(np.float64)
    assert np.all(np.linalg.norm(lre - qs, axis=1) <= 30 * _eps(bk) * np.linalg.norm(qs, axis=1))


def test_gradient_norm_and_angle(bk, rng):
    N, D = 7, 4
    e, q = _pairs(rng, N, D)
    g = rng.standard_normal((N, D))
    _, cache = rotation_trick_forward(bk.asarray(e), bk.asarray(q))
    de = bk.np(rotation_trick_backward(bk.asarray(g), cache)).astype(np.float64)
    es, qs, gs = _seen(bk, e), _seen(bk, q), _seen(bk, g)
    lam = np.linalg.norm(qs, axis=1) / np.linalg.norm(es, axis=1)
    np.testing.assert_allclose(np.linalg.norm(de, axis=1), lam * np.linalg.norm(gs, axis=1), rtol=bk.rtol)
    # e . de = q . g, relative to the size of the terms
    size = np.linalg.norm(qs, axis=1) * np.linalg.norm(gs, axis=1)
    assert np.all(np.abs(np.sum(es * de, axis=1) - np.sum(qs * gs, axis=1)) <= bk.rtol * size)


def test_reduces_to_straight_through_when_aligned(bk, rng):
    N, D = 4, 6
    q = rng.standard_normal((N, D))
    g = rng.standard_normal((N, D))
    gs = _seen(bk, g)
    # e = q: R = I, lambda = 1, the STE gradient
    _, cache = rotation_trick_forward(bk.asarray(q), bk.asarray(q))
    np.testing.assert_allclose(bk.np(rotation_trick_backward(bk.asarray(g), cache)), gs, rtol=bk.rtol, atol=bk.rtol)
    # e = a q with a > 0: R = I, lambda = 1/a
    a = np.array([[0.5], [3.0], [0.3], [7.25]])
    e = a * q
    _, cache = rotation_trick_forward(bk.asarray(e), bk.asarray(q))
    de = bk.np(rotation_trick_backward(bk.asarray(g), cache)).astype(np.float64)
    lam = np.linalg.norm(_seen(bk, q), axis=1, keepdims=True) / np.linalg.norm(_seen(bk, e), axis=1, keepdims=True)
    np.testing.assert_allclose(de, lam * gs, rtol=bk.rtol, atol=bk.rtol)
    np.testing.assert_allclose(lam, 1 / a, rtol=bk.rtol)


# ------------------------------------------------------------------------------------------
# References: torch autograd, vector-quantize-pytorch, float64, finite differences
# ------------------------------------------------------------------------------------------


def test_backward_matches_torch_reference(bk64, rng):
    pytest.importorskip("torch")
    from vqref.testing.torch_reference.rotation import rotation_trick_reference

    N, D = 6, 5
    e, q = _pairs(rng, N, D)
    g = rng.standard_normal((N, D))
    out, cache = rotation_trick_forward(bk64.asarray(e), bk64.asarray(q))
    de = rotation_trick_backward(bk64.asarray(g), cache)
    ref = rotation_trick_reference(e, q, g)
    assert rel_error(de, ref.de) < 1e-10
    assert rel_error(out, ref.out) < 1e-12  # the reference expression's value is q too
    assert not np.any(ref.dq)  # the codebook gets nothing through this path


def test_matches_vector_quantize_pytorch(rng):
    torch = pytest.importorskip("torch")
    vqp = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch")

    N, D = 5, 9  # all norms far above the library's 1e-6 clamps
    e, q = _pairs(rng, N, D)
    g = rng.standard_normal((N, D))
    e_t = torch.tensor(e, requires_grad=True)
    out_t = vqp.rotate_to(e_t, torch.tensor(q))
    out_t.backward(torch.tensor(g))

    out, cache = rotation_trick_forward(e, q)
    de = rotation_trick_backward(g, cache)
    assert rel_error(out, out_t.detach().numpy()) < 1e-12
    assert rel_error(de, e_t.grad.numpy()) < 1e-10


def test_matches_float64(bk, rng):
    N, D = 8, 5
    e, q = _pairs(rng, N, D)
    g = rng.standard_normal((N, D))
    _, cache = rotation_trick_forward(bk.asarray(e), bk.asarray(q))
    de = rotation_trick_backward(bk.asarray(g), cache)
    assert de.dtype == bk.dtype and de.shape == (N, D)
    assert B.get_namespace(de) is B.get_namespace(bk.asarray(g))
    # float64 analytic result on exactly the numbers this backend saw
    _, cache64 = rotation_trick_forward(_seen(bk, e), _seen(bk, q))
    de64 = rotation_trick_backward(_seen(bk, g), cache64)
    assert rel_error(de, de64) < (1e-5 if not bk.is64 else 1e-12)


def test_finite_differences_with_frozen_rotation(bk64, rng):
    N, D = 3, 5
    e, q = _pairs(rng, N, D)
    ex, qx = bk64.asarray(e), bk64.asarray(q)
    _, cache = rotation_trick_forward(ex, qx)
    scale, basis = cache.scale, cache.basis

    def f(v):  # v -> lambda R v, with R and lambda computed once from the fixed (e, q)
        return scale * rotate(v, basis)

    res = check_vjp(f, lambda dout, v: (rotation_trick_backward(dout, cache),), [ex], seed=rng, rtol=1e-8)
    assert res.passed

    # negative controls: R instead of R^T, and the scale forgotten
    wrong_r = check_vjp(f, lambda dout, v: (scale * rotate(dout, basis),), [ex], seed=rng, raise_on_failure=False)
    no_scale = check_vjp(f, lambda dout, v: (rotate_transpose(dout, basis),), [ex], seed=rng, raise_on_failure=False)
    assert wrong_r.passed is False and no_scale.passed is False


# ------------------------------------------------------------------------------------------
# Degenerate rows
# ------------------------------------------------------------------------------------------


def test_exactly_opposite_vectors_give_a_proper_rotation(bk, rng):
    N, D = 4, 6
    q = rng.standard_normal((N, D))
    e = -q.copy()  # exactly antipodal, also after a float32 cast (negation is exact)
    e[2:] *= 2.5  # ... and with a different norm (antipodal up to one rounding)
    g = rng.standard_normal((N, D))
    ex, qx = bk.asarray(e), bk.asarray(q)
    assert np.array_equal(bk.np(ex)[:2], -bk.np(qx)[:2])
    with np.errstate(invalid="ignore", divide="ignore"):  # the naive form is 0/0 here
        assert not np.all(np.isfinite(bk.np(householder_rotate(bk.asarray(g), ex, qx))[:2]))

    _, cache = rotation_trick_forward(ex, qx)
    de = bk.np(rotation_trick_backward(bk.asarray(g), cache)).astype(np.float64)
    assert all(np.all(np.isfinite(bk.np(f))) for f in cache.basis) and np.all(np.isfinite(de))

    es, qs, gs = _seen(bk, e), _seen(bk, q), _seen(bk, g)
    eps = _eps(bk)
    Re = bk.np(rotate(cache.basis.ehat, cache.basis)).astype(np.float64)
    assert np.all(np.linalg.norm(Re - _unit_rows(qs), axis=1) < 20 * eps)
    for i in range(N):
        R = _dense_from_basis(bk, cache.basis, i)
        assert np.linalg.norm(R.T @ R - np.eye(D)) < 40 * eps
        assert abs(np.linalg.det(R) - 1.0) < 20 * D * eps  # a rotation by pi, not a reflection
    lam = np.linalg.norm(qs, axis=1) / np.linalg.norm(es, axis=1)
    np.testing.assert_allclose(np.linalg.norm(de, axis=1), lam * np.linalg.norm(gs, axis=1), rtol=bk.rtol)
    size = np.linalg.norm(qs, axis=1) * np.linalg.norm(gs, axis=1)
    assert np.all(np.abs(np.sum(es * de, axis=1) - np.sum(qs * gs, axis=1)) <= bk.rtol * size)


def test_zero_rows_fall_back_to_straight_through(bk, rng):
    N, D = 5, 4
    e, q = _pairs(rng, N, D)
    e[0] = 0.0  # e = 0
    q[1] = 0.0  # q = 0 (a collapsed code)
    e[2] = q[2] = 0.0  # both
    g = rng.standard_normal((N, D))
    ex, qx, gx = bk.asarray(e), bk.asarray(q), bk.asarray(g)
    out, cache = rotation_trick_forward(ex, qx)
    de = bk.np(rotation_trick_backward(gx, cache))
    assert out is qx
    assert all(np.all(np.isfinite(bk.np(f))) for f in cache.basis) and np.all(np.isfinite(de))
    np.testing.assert_array_equal(de[:3], bk.np(gx)[:3])  # exactly the STE: R = I, lambda = 1
    np.testing.assert_array_equal(bk.np(cache.scale)[:3, 0], 1.0)
    # the other rows are unaffected by their neighbours
    _, cache_rest = rotation_trick_forward(_seen(bk, e)[3:], _seen(bk, q)[3:])
    want = rotation_trick_backward(_seen(bk, g)[3:], cache_rest)
    assert rel_error(de[3:], want) < (1e-5 if not bk.is64 else 1e-12)
    # rotation_basis alone gives the identity on zero rows
    basis = rotation_basis(ex, qx)
    np.testing.assert_array_equal(bk.np(rotate(gx, basis))[:3], bk.np(gx)[:3])


def test_eps_sets_the_straight_through_threshold(bk64, rng):
    D = 3
    q = rng.standard_normal((1, D))
    e = 1e-4 * rng.standard_normal((1, D))  # lambda about 1e4
    g = rng.standard_normal((1, D))
    lam = np.linalg.norm(q) / np.linalg.norm(e)
    _, cache = rotation_trick_forward(bk64.asarray(e), bk64.asarray(q))  # eps = 2.2e-16
    de = bk64.np(rotation_trick_backward(bk64.asarray(g), cache))
    np.testing.assert_allclose(np.linalg.norm(de), lam * np.linalg.norm(g), rtol=1e-12)
    _, cache = rotation_trick_forward(bk64.asarray(e), bk64.asarray(q), eps=1e-3)  # lambda > 1/eps
    np.testing.assert_array_equal(bk64.np(rotation_trick_backward(bk64.asarray(g), cache)), g)
    _, cache = rotation_trick_forward(bk64.asarray(q), bk64.asarray(e), eps=1e-3)  # lambda < eps
    np.testing.assert_array_equal(bk64.np(rotation_trick_backward(bk64.asarray(g), cache)), g)


@pytest.mark.parametrize("gap", [1e-1, 1e-5, 1e-9])
def test_near_opposite_sweep_stays_at_rounding_level(bk, rng, gap):
    N, D = 3, 8
    eh = _unit_rows(rng.standard_normal((N, D)))
    u = rng.standard_normal((N, D))
    u = _unit_rows(u - np.sum(u * eh, axis=1, keepdims=True) * eh)  # unit, orthogonal to e^
    cos = -1.0 + gap  # 1 + cos theta = gap
    qh = cos * eh + np.sqrt(1 - cos**2) * u
    e, q = 2.0 * eh, 0.7 * qh
    es, qs = _seen(bk, e), _seen(bk, q)
    np.testing.assert_allclose(1 + np.sum(_unit_rows(es) * _unit_rows(qs), axis=1), gap, rtol=1e-2)

    ex, qx = bk.asarray(e), bk.asarray(q)
    basis = rotation_basis(ex, qx)
    eps = _eps(bk)
    Re = bk.np(rotate(basis.ehat, basis)).astype(np.float64)
    err_plane = np.linalg.norm(Re - _unit_rows(qs), axis=1)
    assert np.all(err_plane < 20 * eps)
    for i in range(N):
        R = _dense_from_basis(bk, basis, i)
        assert np.linalg.norm(R.T @ R - np.eye(D)) < 40 * eps
    if not bk.is64 and gap == 1e-9:
        # the sweep does reach the regime where the unguarded Householder form breaks down
        Rh = bk.np(householder_rotate(bk.asarray(_unit_rows(es)), ex, qx)).astype(np.float64)
        assert np.max(np.linalg.norm(Rh - _unit_rows(qs), axis=1)) > 100 * np.max(err_plane)


def test_scale_invariance_across_the_dtype_range(bk, rng):
    # R and lambda depend on directions and on a ratio of norms only, so scaling e and q by one
    # factor changes nothing -- even where the squares inside a naive norm under- or overflow.
    N, D = 4, 5
    e, q = _pairs(rng, N, D)
    g = rng.standard_normal((N, D))
    _, cache = rotation_trick_forward(bk.asarray(e), bk.asarray(q))
    want = bk.np(rotation_trick_backward(bk.asarray(g), cache))
    powers = (-100, 100) if not bk.is64 else (-560, 560)  # squares leave the dtype's range
    for k in powers:
        f = 2.0**k  # a power of two: the scaled inputs are exact
        _, cache_f = rotation_trick_forward(bk.asarray(e * f), bk.asarray(q * f))
        got = bk.np(rotation_trick_backward(bk.asarray(g), cache_f))
        np.testing.assert_allclose(got, want, rtol=bk.rtol, atol=bk.rtol)
        np.testing.assert_allclose(bk.np(cache_f.scale), bk.np(cache.scale), rtol=bk.rtol)


def test_shapes_are_checked(bk):
    with pytest.raises(ValueError, match="D >= 2"):
        rotation_trick_forward(bk.asarray(np.ones((3, 1))), bk.asarray(np.ones((3, 1))))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        rotation_trick_forward(bk.asarray(np.ones((3, 2))), bk.asarray(np.ones((2, 3))))
