"""Row-wise l2 normalisation (docs/math.md §4.1, invariants in §4.5).

y = x / max(||x||, eps);  dx = (dy - y (y . dy)) / ||x|| above eps, dy / eps below.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vqref import backend as B
from vqref.ops.l2norm import L2NormCache, l2norm_backward, l2norm_forward
from vqref.testing import check_vjp, rel_error

N, D = 7, 5  # distinct sizes: a transposed reduction is a shape error
EPS = 1e-6

fixture_settings = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _rows(rng, n=N, d=D):
    """Rows with norms spread over two orders of magnitude (non-trivial 1/||x|| factors)."""
    return rng.standard_normal((n, d)) * rng.uniform(0.1, 10.0, size=(n, 1))


def _vjp(dy, x, eps=EPS):
    _, cache = l2norm_forward(x, eps=eps)
    return (l2norm_backward(dy, cache),)


def test_forward_unit_rows_and_value(bk, rng):
    x = _rows(rng)
    y, cache = l2norm_forward(bk.asarray(x))
    assert isinstance(cache, L2NormCache)
    assert B.library_name(y) == bk.name and y.dtype == bk.dtype and tuple(y.shape) == (N, D)
    yh = bk.np(y)
    np.testing.assert_allclose(np.linalg.norm(yh, axis=1), 1.0, rtol=bk.rtol)
    np.testing.assert_allclose(yh, x / np.linalg.norm(x, axis=1, keepdims=True), rtol=bk.rtol, atol=0)


def test_forward_does_not_mutate(bk, rng):
    x = bk.asarray(_rows(rng))
    before = bk.np(x).copy()
    y, cache = l2norm_forward(x)
    l2norm_backward(bk.asarray(rng.standard_normal((N, D))), cache)
    np.testing.assert_array_equal(bk.np(x), before)


def test_leading_axes_are_rows(bk, rng):
    x = rng.standard_normal((2, 3, D))
    dy = rng.standard_normal((2, 3, D))
    y, cache = l2norm_forward(bk.asarray(x))
    dx = l2norm_backward(bk.asarray(dy), cache)
    y2, cache2 = l2norm_forward(bk.asarray(x.reshape(6, D)))
    dx2 = l2norm_backward(bk.asarray(dy.reshape(6, D)), cache2)
    assert tuple(y.shape) == (2, 3, D) and tuple(dx.shape) == (2, 3, D)
    np.testing.assert_allclose(bk.np(y).reshape(6, D), bk.np(y2), rtol=bk.rtol)
    np.testing.assert_allclose(bk.np(dx).reshape(6, D), bk.np(dx2), rtol=bk.rtol)


def test_gradient_orthogonal_to_input(bk, rng):
    x = _rows(rng)
    dy = rng.standard_normal((N, D))
    _, cache = l2norm_forward(bk.asarray(x))
    dx = bk.np(l2norm_backward(bk.asarray(dy), cache))
    scale = np.linalg.norm(x, axis=1) * np.linalg.norm(dx, axis=1)
    assert np.all(np.abs(np.sum(x * dx, axis=1)) <= 10 * bk.rtol * scale)
    assert np.all(np.linalg.norm(dx, axis=1) > 0)  # not vacuously zero


def test_jvp_equals_vjp(bk64, rng):
    """J is symmetric: the backward applied to a tangent v is the forward's directional derivative."""
    x = _rows(rng)
    v = rng.standard_normal((N, D))
    w = rng.standard_normal((N, D))
    _, cache = l2norm_forward(bk64.asarray(x))
    jt_v = bk64.np(l2norm_backward(bk64.asarray(v), cache))
    jt_w = bk64.np(l2norm_backward(bk64.asarray(w), cache))
    # JVP by central differences of the forward along v (row-wise independent)
    h = 1e-6
    yp = bk64.np(l2norm_forward(bk64.asarray(x + h * v))[0])
    ym = bk64.np(l2norm_forward(bk64.asarray(x - h * v))[0])
    jvp = (yp - ym) / (2 * h)
    assert rel_error(jvp, jt_v) < 1e-7
    # adjoint identity <w, J v> = <J^T w, v>, row by row
    np.testing.assert_allclose(np.sum(w * jt_v, axis=1), np.sum(jt_w * v, axis=1), rtol=1e-10, atol=1e-14)


def test_below_eps_branch_is_linear(bk, rng):
    """Rows shorter than eps are scaled by 1/eps, forward and backward; other rows are not."""
    eps = 0.5
    x = rng.standard_normal((N, D))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    lengths = np.array([0.1, 2.0, 0.3, 3.0, 0.49, 1.5, 0.0])  # below, above, ..., a zero row
    x *= lengths[:, None]
    dy = rng.standard_normal((N, D))
    y, cache = l2norm_forward(bk.asarray(x), eps=eps)
    dx = bk.np(l2norm_backward(bk.asarray(dy), cache))
    y = bk.np(y)
    below = lengths < eps
    np.testing.assert_allclose(y[below], x[below] / eps, rtol=bk.rtol, atol=0)
    np.testing.assert_allclose(dx[below], dy[below] / eps, rtol=bk.rtol, atol=0)
    u = x[~below] / lengths[~below, None]
    expect = (dy[~below] - u * np.sum(u * dy[~below], axis=1, keepdims=True)) / lengths[~below, None]
    np.testing.assert_allclose(dx[~below], expect, rtol=10 * bk.rtol, atol=1e-12)


def test_zero_rows_give_zero_and_no_nan(bk, rng):
    x = _rows(rng)
    x[[1, 4]] = 0.0
    dy = rng.standard_normal((N, D))
    y, cache = l2norm_forward(bk.asarray(x))
    dx = l2norm_backward(bk.asarray(dy), cache)
    assert B.all_finite(y) and B.all_finite(dx)
    np.testing.assert_array_equal(bk.np(y)[[1, 4]], 0.0)
    np.testing.assert_allclose(bk.np(dx)[[1, 4]], dy[[1, 4]] / EPS, rtol=bk.rtol)


def test_finite_differences(bk64, rng):
    x = bk64.asarray(_rows(rng))
    f = lambda a: l2norm_forward(a)[0]
    check_vjp(f, _vjp, [x], seed=rng)


def test_finite_differences_both_branches(bk64, rng):
    """With eps = 0.5 both branches are exercised in one array, far from the kink at ||x|| = eps."""
    eps = 0.5
    x = rng.standard_normal((N, D))
    x *= (np.array([0.1, 2.0, 0.3, 3.0, 0.2, 1.5, 0.05]) / np.linalg.norm(x, axis=1))[:, None]
    f = lambda a: l2norm_forward(a, eps=eps)[0]
    check_vjp(f, lambda dy, a: _vjp(dy, a, eps), [bk64.asarray(x)], seed=rng)


def test_negative_control_fails_the_checker(bk64, rng):
    """Forgetting the projection (dx = dy / ||x||) must be caught."""
    x = bk64.asarray(_rows(rng))
    f = lambda a: l2norm_forward(a)[0]

    def wrong(dy, a):
        _, cache = l2norm_forward(a)
        return (dy / cache.scale,)

    result = check_vjp(f, wrong, [x], seed=rng, raise_on_failure=False)
    assert result.passed is False


def test_matches_torch_autograd(bk64, rng):
    pytest.importorskip("torch")
    from vqref.testing.torch_reference.cosine import l2norm_reference

    x = _rows(rng)
    x[2] = 0.0  # zero row: the clamp branch
    x[5] *= 1e-8 / np.linalg.norm(x[5])  # tiny row, below eps
    dy = rng.standard_normal((N, D))
    y_ref, dx_ref = l2norm_reference(x, dy, eps=EPS)
    y, cache = l2norm_forward(bk64.asarray(x), eps=EPS)
    dx = l2norm_backward(bk64.asarray(dy), cache)
    assert rel_error(bk64.np(y), y_ref) < 1e-12
    assert rel_error(bk64.np(dx), dx_ref) < 1e-10
    np.testing.assert_allclose(bk64.np(dx)[[0, 1, 3, 4, 6]], dx_ref[[0, 1, 3, 4, 6]], rtol=1e-10)


def test_float32_matches_float64_analytic(bk, rng):
    x = _rows(rng)
    dy = rng.standard_normal((N, D))
    y64, c64 = l2norm_forward(x.astype(np.float64))
    dx64 = l2norm_backward(dy, c64)
    y, cache = l2norm_forward(bk.asarray(x))
    dx = l2norm_backward(bk.asarray(dy), cache)
    assert y.dtype == bk.dtype and dx.dtype == bk.dtype
    assert rel_error(bk.np(y), y64) < bk.rtol
    assert rel_error(bk.np(dx), dx64) < bk.rtol


@fixture_settings
@given(
    n=st.integers(1, 9),
    d=st.integers(1, 9),
    seed=st.integers(0, 2**32 - 1),
    alpha=st.floats(1e-3, 1e3),
)
def test_properties(bk64, n, d, seed, alpha):
    """Unit rows, x . dx = 0, and y(alpha x) = y(x), dx(alpha x) = dx(x) / alpha for alpha > 0."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, d))
    x = g / np.linalg.norm(g, axis=1, keepdims=True) * rng.uniform(0.1, 10.0, size=(n, 1))
    dy = rng.standard_normal((n, d))
    y, cache = l2norm_forward(bk64.asarray(x))
    dx = bk64.np(l2norm_backward(bk64.asarray(dy), cache))
    ya, cache_a = l2norm_forward(bk64.asarray(alpha * x))
    dxa = bk64.np(l2norm_backward(bk64.asarray(dy), cache_a))
    np.testing.assert_allclose(np.linalg.norm(bk64.np(y), axis=1), 1.0, rtol=1e-12)
    scale = np.linalg.norm(x, axis=1) * np.linalg.norm(dx, axis=1) + 1e-300
    assert np.all(np.abs(np.sum(x * dx, axis=1)) <= 1e-12 * scale)
    np.testing.assert_allclose(bk64.np(ya), bk64.np(y), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(alpha * dxa, dx, rtol=1e-9, atol=1e-12 * np.abs(dx).max())


@pytest.mark.parametrize("eps", [EPS, 0.5])
def test_norm_exactly_eps_takes_the_projection_branch(bk, rng, eps):
    """The two branches meet at ``||x|| = eps``; that row belongs to the projection (``>=``).

    Rows with one nonzero entry have an exact norm (``sqrt(x^2) = |x|``), so the lengths below
    are the lengths the op sees: one ulp below eps (in the dtype, where the op compares), eps
    itself, one ulp above, and eps (1 -+ 1e-12) (the same rows as eps itself in float32).
    """
    dt = np.dtype(bk.dtype_name)
    e = dt.type(eps)  # eps as the op compares it: a Python float meets the dtype's array
    lengths = np.array(
        [
            np.nextafter(e, dt.type(0)),
            e,
            np.nextafter(e, dt.type(np.inf)),
            dt.type(eps * (1 - 1e-12)),
            dt.type(eps * (1 + 1e-12)),
            e,
            2 * e,
        ],
        dtype=dt,
    )  # (7,), N rows
    x = np.zeros((N, D), dtype=dt)
    x[np.arange(N), np.arange(N) % D] = lengths * np.where(np.arange(N) % 2, -1, 1)
    dy = rng.standard_normal((N, D))
    y, cache = l2norm_forward(bk.asarray(x), eps=eps)
    dx = bk.np(l2norm_backward(bk.asarray(dy), cache)).astype(np.float64)
    # the documented convention, on the host in float64 from the lengths the op saw
    n = lengths.astype(np.float64)[:, None]  # (N, 1)
    above = n >= float(e)  # (N, 1)
    X, dY = x.astype(np.float64), bk.np(bk.asarray(dy)).astype(np.float64)
    Y = X / np.maximum(n, float(e))
    want = np.where(above, dY - Y * np.sum(Y * dY, axis=1, keepdims=True), dY) / np.maximum(n, float(e))
    assert above[:3, 0].tolist() == [False, True, True]  # one ulp below, at, one ulp above
    np.testing.assert_allclose(bk.np(y), Y, rtol=bk.rtol, atol=0)
    np.testing.assert_allclose(dx, want, rtol=bk.rtol, atol=bk.rtol * np.abs(want).max())
    # at exactly eps the component along x is projected out; one ulp below it is not
    j = np.arange(N) % D
    assert dx[1, j[1]] == 0.0 and dx[0, j[0]] != 0.0


def test_rows_whose_squares_overflow_are_still_unit_rows(bk, rng):
    """The overflow branch: ``||x||`` representable, ``sum x^2`` not.  Only those rows take it."""
    big = 1e200 if bk.is64 else 1e30
    x = _rows(rng)
    x[[1, 4]] *= big  # their squares overflow
    dy = rng.standard_normal((N, D))
    with np.errstate(over="ignore"):
        y, cache = l2norm_forward(bk.asarray(x))
        dx = l2norm_backward(bk.asarray(dy), cache)
    y, dx = bk.np(y), bk.np(dx)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    xs = bk.np(bk.asarray(x)).astype(np.float64)
    s = np.max(np.abs(xs), axis=1, keepdims=True)
    unit = xs / s / np.linalg.norm(xs / s, axis=1, keepdims=True)  # the direction, without overflow
    np.testing.assert_allclose(y, unit, rtol=bk.rtol, atol=0)
    np.testing.assert_allclose(np.linalg.norm(y.astype(np.float64), axis=1), 1.0, rtol=bk.rtol)
    length = s * np.linalg.norm(xs / s, axis=1, keepdims=True)  # (N, 1) ||x||
    want = (dy - unit * np.sum(unit * dy, axis=1, keepdims=True)) / length
    row_size = np.abs(want).max(axis=1, keepdims=True)  # the big rows' gradients are ~1/big
    assert np.all(np.abs(dx - want) <= 10 * bk.rtol * row_size)
    if bk.name == "numpy":  # every other row keeps the rounding of the plain formula, bit for bit
        rest = [0, 2, 3, 5, 6]
        xr = bk.np(bk.asarray(x))[rest]
        # the fast path (the default) takes each norm as sqrt(x . x); the definition, vector_norm
        plain = xr / np.maximum(np.sqrt(np.vecdot(xr, xr))[:, None], EPS)
        np.testing.assert_array_equal(y[rest], plain)
        with np.errstate(over="ignore"):
            y_def = bk.np(l2norm_forward(bk.asarray(x), fast=False)[0])
        plain = xr / np.maximum(np.linalg.vector_norm(xr, axis=-1, keepdims=True), EPS)
        np.testing.assert_array_equal(y_def[rest], plain)
        np.testing.assert_allclose(y_def, y, rtol=8 * np.finfo(bk.dtype_name).eps, atol=0)
