"""Orthogonal codebook regulariser (docs/math.md §5, invariants in §5.4).

L = sum_{h,i,j} G_hij^2 / (H n^2) - 1/n,  G = C^ C^T,  C^ = l2(C);  n = K or the subset size.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vqref import backend as B
from vqref.ops.orthogonal import (
    OrthogonalLossCache,
    orthogonal_loss_backward,
    orthogonal_loss_forward,
    select_codes,
)
from vqref.testing import check_vjp, rel_error

K, D, H = 7, 5, 3  # distinct sizes; K > D so the loss cannot reach 0
SUBSET = np.array([0, 2, 3, 6])

fixture_settings = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _codebook(rng, shape=(K, D)):
    """Codes of assorted lengths (0.1 to 10), so that the 1/||c|| factor matters."""
    return rng.standard_normal(shape) * rng.uniform(0.1, 10.0, size=shape[:-1] + (1,))


def _loss(codebook, **kw):
    return orthogonal_loss_forward(codebook, **kw)[0]


def _vjp(dloss, codebook, **kw):
    _, cache = orthogonal_loss_forward(codebook, **kw)
    return (orthogonal_loss_backward(dloss, cache),)


def _run(bk, C, dloss=1.0, **kw):
    loss, cache = orthogonal_loss_forward(bk.asarray(C), **kw)
    dC = orthogonal_loss_backward(dloss, cache)
    return loss, dC


def _orthonormal_rows(rng, k, d):
    """k <= d orthonormal rows of a random rotation."""
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q[:k]


# ------------------------------------------------------------------------------------------
# value and gradient against independent references
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(K, D), (H, K, D)], ids=["one-codebook", "heads"])
@pytest.mark.parametrize("subset", [None, SUBSET], ids=["all-codes", "subset"])
def test_matches_torch_autograd(bk, rng, shape, subset):
    pytest.importorskip("torch")
    from vqref.testing.torch_reference.orthogonal import orthogonal_loss_reference

    C = _codebook(rng, shape)
    dloss = 0.7
    loss_ref, dC_ref = orthogonal_loss_reference(C, dloss, code_ids=subset)
    loss, dC = _run(bk, C, dloss, code_ids=subset)
    assert isinstance(orthogonal_loss_forward(bk.asarray(C))[1], OrthogonalLossCache)
    assert B.library_name(loss) == bk.name and loss.dtype == bk.dtype and loss.ndim == 0
    assert B.get_namespace(loss) is B.get_namespace(bk.asarray(C))  # an array, not a Python scalar
    assert dC.dtype == bk.dtype and tuple(dC.shape) == shape
    np.testing.assert_allclose(bk.np(loss), loss_ref, rtol=bk.rtol)
    assert rel_error(bk.np(dC), dC_ref) < bk.rtol
    if subset is not None:  # codes outside the subset get exactly nothing
        outside = np.setdiff1d(np.arange(K), subset)
        assert np.all(bk.np(dC)[..., outside, :] == 0)
        assert np.all(np.linalg.norm(bk.np(dC)[..., subset, :], axis=-1) > 0)


def test_matches_vector_quantize_pytorch_value(bk64, rng):
    """The library's own orthogonal_loss_fn as the oracle for the value, one and several heads."""
    torch = pytest.importorskip("torch")
    vqp = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch")
    for C in (_codebook(rng, (1, K, D)), _codebook(rng, (H, K, D))):
        expect = float(vqp.orthogonal_loss_fn(torch.tensor(C)))
        np.testing.assert_allclose(bk64.np(_loss(bk64.asarray(C))), expect, rtol=1e-12)


def test_repeated_code_ids_accumulate(bk64, rng):
    """A code listed twice collects both gradients (a segment sum, not an indexed assignment)."""
    pytest.importorskip("torch")
    from vqref.testing.torch_reference.orthogonal import orthogonal_loss_reference

    C = _codebook(rng)
    ids = np.array([5, 1, 5, 3, 1])
    loss_ref, dC_ref = orthogonal_loss_reference(C, 1.3, code_ids=ids)
    loss, dC = _run(bk64, C, 1.3, code_ids=ids)
    np.testing.assert_allclose(bk64.np(loss), loss_ref, rtol=1e-12)
    assert rel_error(bk64.np(dC), dC_ref) < 1e-10


def test_subset_equals_loss_of_gathered_codes(bk, rng):
    """Over a subset, the loss and the subset's gradient rows are those of the smaller codebook."""
    C = _codebook(rng)
    loss, dC = _run(bk, C, code_ids=SUBSET)
    loss_small, dC_small = _run(bk, C[SUBSET])
    np.testing.assert_allclose(bk.np(loss), bk.np(loss_small), rtol=bk.rtol)
    np.testing.assert_allclose(bk.np(dC)[SUBSET], bk.np(dC_small), rtol=bk.rtol, atol=0)


def test_code_ids_in_codebook_namespace(bk, rng):
    C = _codebook(rng)
    loss_host, dC_host = _run(bk, C, code_ids=SUBSET)
    loss_dev, dC_dev = _run(bk, C, code_ids=bk.asarray(SUBSET))
    np.testing.assert_array_equal(bk.np(loss_dev), bk.np(loss_host))
    np.testing.assert_array_equal(bk.np(dC_dev), bk.np(dC_host))


def test_finite_differences(bk64, rng):
    for shape in ((K, D), (H, K, D)):
        check_vjp(_loss, _vjp, [bk64.asarray(_codebook(rng, shape))], seed=rng)


def test_finite_differences_subset(bk64, rng):
    C = bk64.asarray(_codebook(rng, (H, K, D)))
    f = lambda c: _loss(c, code_ids=SUBSET)
    check_vjp(f, lambda g, c: _vjp(g, c, code_ids=SUBSET), [C], seed=rng)


def test_negative_controls_fail_the_checker(bk64, rng):
    C = bk64.asarray(_codebook(rng))

    def no_normalisation_chain(dloss, c):
        """dL/dC^ returned as if it were dL/dC."""
        _, cache = orthogonal_loss_forward(c)
        H_, n, _ = cache.gram.shape
        return ((4.0 / (H_ * n * n)) * dloss * (cache.gram @ cache.norm_cache.y))[0, ...]

    def half(dloss, c):
        """G used once instead of twice (2/n^2 instead of 4/n^2)."""
        return (0.5 * _vjp(dloss, c)[0],)

    for wrong in (lambda g, c: (no_normalisation_chain(g, c),), half):
        result = check_vjp(_loss, wrong, [C], seed=rng, raise_on_failure=False)
        assert result.passed is False


def test_float32_matches_float64_analytic(bk, rng):
    C = _codebook(rng, (H, K, D))
    loss64, dC64 = _run_numpy64(C, 0.4, SUBSET)
    loss, dC = _run(bk, C, 0.4, code_ids=SUBSET)
    np.testing.assert_allclose(bk.np(loss), loss64, rtol=bk.rtol)
    assert rel_error(bk.np(dC), dC64) < bk.rtol


def _run_numpy64(C, dloss, code_ids):
    loss, cache = orthogonal_loss_forward(np.asarray(C, dtype=np.float64), code_ids=code_ids)
    return loss, orthogonal_loss_backward(dloss, cache)


def test_dloss_as_0d_array(bk, rng):
    C = _codebook(rng)
    _, dC_float = _run(bk, C, 0.3)
    _, dC_array = _run(bk, C, bk.asarray(np.array(0.3)))
    np.testing.assert_allclose(bk.np(dC_array), bk.np(dC_float), rtol=bk.rtol)


# ------------------------------------------------------------------------------------------
# structure of the loss
# ------------------------------------------------------------------------------------------


def test_gradient_rows_orthogonal_to_codes(bk, rng):
    C = _codebook(rng, (H, K, D))
    _, dC = _run(bk, C)
    dC = bk.np(dC)
    dots = np.abs(np.sum(C * dC, axis=-1))  # (H, K)
    scale = np.linalg.norm(C, axis=-1) * np.linalg.norm(dC, axis=-1)
    assert np.all(dots <= 10 * bk.rtol * scale)
    assert np.all(scale > 0)


def test_frobenius_form_equals_vqp_form(bk64, rng):
    """||G - I||_F^2 / (H n^2), computed here on the host, has the op's value and gradient."""
    pytest.importorskip("torch")
    from vqref.testing.torch_reference.orthogonal import orthogonal_loss_reference

    C = _codebook(rng, (H, K, D))
    Chat = C / np.linalg.norm(C, axis=-1, keepdims=True)
    G = Chat @ np.swapaxes(Chat, -1, -2)
    frob = np.sum((G - np.eye(K)) ** 2) / (H * K * K)
    loss_frob, dC_frob = orthogonal_loss_reference(C, 0.9, form="frobenius")
    np.testing.assert_allclose(loss_frob, frob, rtol=1e-12)
    loss, dC = _run(bk64, C, 0.9)
    np.testing.assert_allclose(bk64.np(loss), frob, rtol=1e-12)
    assert rel_error(bk64.np(dC), dC_frob) < 1e-10


def test_orthonormal_rows_give_zero_loss_and_gradient(bk, rng):
    """K <= D mutually orthogonal codes (of any positive lengths) are the minimum: L = 0, dL = 0."""
    k, d = 4, 6
    C = _orthonormal_rows(rng, k, d) * rng.uniform(0.5, 3.0, size=(k, 1))
    loss, dC = _run(bk, C)
    atol = 1e-14 if bk.is64 else 1e-6
    assert abs(float(bk.np(loss))) <= atol
    assert np.abs(bk.np(dC)).max() <= atol
    # control: tilting one code toward another makes both the loss and the gradient non-zero
    C[1] += 0.3 * C[0]
    loss, dC = _run(bk, C)
    assert float(bk.np(loss)) > 1e-3 and np.abs(bk.np(dC)).max() > 1e-3


@pytest.mark.parametrize("stack", [2, 3])
def test_tight_frame_reaches_the_bound(bk, rng, stack):
    """`stack` orthonormal bases of R^D stacked (K = stack D) give L = 1/D - 1/K exactly."""
    d = 4
    C = np.concatenate([_orthonormal_rows(rng, d, d) for _ in range(stack)])
    C *= rng.uniform(0.5, 3.0, size=(C.shape[0], 1))  # lengths do not matter
    k = C.shape[0]
    loss, dC = _run(bk, C)
    np.testing.assert_allclose(float(bk.np(loss)), 1 / d - 1 / k, rtol=10 * bk.rtol)
    # it is a minimum, so the gradient vanishes there too
    assert np.abs(bk.np(dC)).max() <= (1e-13 if bk.is64 else 1e-6)


def test_zero_code_rows_give_no_nan(bk, rng):
    C = _codebook(rng)
    C[[1, 4]] = 0.0
    loss, dC = _run(bk, C)
    assert B.all_finite(loss) and B.all_finite(dC)
    np.testing.assert_array_equal(bk.np(dC)[[1, 4]], 0.0)  # a zero code has no direction to turn
    if bk.is64:
        pytest.importorskip("torch")
        from vqref.testing.torch_reference.orthogonal import orthogonal_loss_reference

        loss_ref, dC_ref = orthogonal_loss_reference(C, 1.0)
        np.testing.assert_allclose(bk.np(loss), loss_ref, rtol=1e-12)
        assert rel_error(bk.np(dC), dC_ref) < 1e-10


def test_forward_does_not_mutate(bk, rng):
    C = bk.asarray(_codebook(rng))
    before = bk.np(C).copy()
    _, cache = orthogonal_loss_forward(C, code_ids=SUBSET)
    orthogonal_loss_backward(1.0, cache)
    np.testing.assert_array_equal(bk.np(C), before)


def test_empty_subset_is_an_error(bk, rng):
    with pytest.raises(ValueError, match="no codes"):
        orthogonal_loss_forward(bk.asarray(_codebook(rng)), code_ids=np.zeros((0,), dtype=np.int64))


@fixture_settings
@given(
    k=st.integers(2, 10),
    d=st.integers(2, 6),
    seed=st.integers(0, 2**32 - 1),
    scales=st.lists(st.floats(1e-2, 1e2), min_size=10, max_size=10),
)
def test_invariances_and_bound(bk64, k, d, seed, scales):
    """L(P C S) = L(C) for a row permutation P and positive row scaling S; the gradient follows
    as P dC S^-1; and L >= max(0, 1/d - 1/k)."""
    rng = np.random.default_rng(seed)
    C = rng.standard_normal((k, d))
    C /= np.linalg.norm(C, axis=1, keepdims=True)  # no row near the eps floor
    loss, dC = _run(bk64, C)
    loss, dC = float(bk64.np(loss)), bk64.np(dC)
    perm = rng.permutation(k)
    s = np.asarray(scales[:k])[:, None]
    loss2, dC2 = _run(bk64, C[perm] * s)
    np.testing.assert_allclose(float(bk64.np(loss2)), loss, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(bk64.np(dC2) * s, dC[perm], rtol=1e-8, atol=1e-12)
    assert loss >= max(0.0, 1 / d - 1 / k) - 1e-12


# ------------------------------------------------------------------------------------------
# choosing the subset
# ------------------------------------------------------------------------------------------


def test_select_codes_all_and_active(bk):
    np.testing.assert_array_equal(select_codes(K), np.arange(K))
    used = bk.asarray(np.array([6, 2, 2, 0, 6, 3]))
    ids = select_codes(K, used_indices=used)
    assert isinstance(ids, np.ndarray) and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, [0, 2, 3, 6])
    np.testing.assert_array_equal(select_codes(K, used_indices=used, max_codes=4), [0, 2, 3, 6])


def test_select_codes_random_subset():
    used = np.array([9, 1, 4, 4, 7, 12, 3, 1, 15])  # 7 distinct codes
    draws = [select_codes(16, used_indices=used, max_codes=3, rng=np.random.default_rng(s)) for s in range(200)]
    for ids in draws:
        assert ids.shape == (3,) and len(np.unique(ids)) == 3 and np.all(np.isin(ids, used))
    # every active code gets picked sometimes, inactive ones never
    np.testing.assert_array_equal(np.unique(np.concatenate(draws)), np.unique(used))
    # reproducible from the same seed, different from another
    a = select_codes(64, max_codes=8, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(a, select_codes(64, max_codes=8, rng=np.random.default_rng(5)))
    assert not np.array_equal(a, select_codes(64, max_codes=8, rng=np.random.default_rng(6)))


def test_select_codes_errors():
    with pytest.raises(ValueError, match="rng"):
        select_codes(K, max_codes=3)
    with pytest.raises(ValueError, match="used_indices"):
        select_codes(K, used_indices=np.array([0, K]))
