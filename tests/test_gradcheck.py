"""The shipped finite-difference checker: it passes right gradients, fails wrong ones, and
never touches the caller's arrays."""

import numpy as np
import pytest

from vqref.testing import check_vjp, numerical_vjp, rel_error


def test_rel_error_basics():
    assert rel_error(np.zeros(3), np.zeros(3)) == 0.0
    assert rel_error(np.ones(3), np.ones(3)) == 0.0
    assert rel_error(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(np.sqrt(2))
    with pytest.raises(ValueError, match="shapes differ"):
        rel_error(np.zeros(2), np.zeros(3))


def test_checker_accepts_right_and_rejects_wrong_gradient(bk64, rng):
    A = bk64.asarray(rng.standard_normal((4, 3)))
    x = bk64.asarray(rng.standard_normal((5, 4)))
    f = lambda x, A: (x @ A) ** 2  # noqa: E731

    def vjp(dout, x, A):
        y = x @ A
        g = 2 * y * dout
        return g @ A.mT, x.mT @ g

    res = check_vjp(f, vjp, [x, A], seed=1, rtol=1e-7)
    assert res.passed and max(res.errors) < 1e-8
    wrong = lambda dout, x, A: (vjp(dout, x, A)[0], vjp(dout, x, A)[1].mT.mT * 1.01)  # noqa: E731
    bad = check_vjp(f, wrong, [x, A], seed=1, raise_on_failure=False)
    assert not bad.passed
    with pytest.raises(AssertionError, match="input 1"):
        check_vjp(f, wrong, [x, A], seed=1)


def test_checker_does_not_mutate_inputs(rng):
    x = rng.standard_normal((3, 2))
    keep = x.copy()
    numerical_vjp(lambda a: a * a, [x], np.ones((3, 2)))
    np.testing.assert_array_equal(x, keep)


def test_guard_detects_a_flip():
    x = np.array([0.5 + 1e-8, 0.0])
    with pytest.raises(AssertionError, match="discrete state changed"):
        numerical_vjp(lambda a: a, [x], np.ones(2), h=1e-6, guard=lambda a: a > 0.5)


def test_atol_lets_an_exactly_zero_gradient_pass():
    # the true VJP is zero: finite differences give rounding noise, so the relative error is ~1
    f = lambda a: a - np.mean(a)  # noqa: E731  centring; with dout = ones its VJP is 0
    vjp = lambda d, a: (d - np.mean(d),)  # noqa: E731
    x = np.random.default_rng(0).standard_normal(7) * 100
    res = check_vjp(f, vjp, [x], dout=np.ones(7), raise_on_failure=False)
    assert not res.passed or res.errors[0] == 0.0
    assert check_vjp(f, vjp, [x], dout=np.ones(7), atol=1e-8).passed
    wrong = lambda d, a: (d,)  # noqa: E731  the centring forgotten: off by far more than atol
    assert not check_vjp(f, wrong, [x], dout=np.ones(7), atol=1e-8, raise_on_failure=False).passed
