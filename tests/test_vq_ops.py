"""The VQ-VAE primitive ops: distances, nearest code, lookup, losses, straight-through.

Gradients: float64 finite differences (random upstream gradient, codes held fixed) and torch
autograd; float32 against the float64 analytic result; negative controls for the checker.
"""

import numpy as np
import pytest
from conftest import separated_problem
from hypothesis import given, settings
from hypothesis import strategies as st

from vqref.ops.distance import nearest_code, squared_distance_backward, squared_distance_forward
from vqref.ops.lookup import lookup_backward, lookup_forward
from vqref.ops.losses import (
    codebook_loss_backward,
    codebook_loss_forward,
    commitment_loss_backward,
    commitment_loss_forward,
    mse_backward,
    mse_forward,
)
from vqref.ops.straight_through import straight_through_backward, straight_through_forward
from vqref.testing import check_vjp, rel_error
from vqref.testing.torch_reference import vq as tref

N, K, D = 11, 7, 5  # distinct sizes: a transposition is a shape error, not a wrong number


# ----------------------------------------------------------------------------- distances


def test_distance_forward_matches_direct_differences(bk, rng):
    x = rng.standard_normal((N, D))
    C = rng.standard_normal((K, D))
    direct = ((x[:, None, :] - C[None, :, :]) ** 2).sum(-1)
    dist, _ = squared_distance_forward(bk.asarray(x), bk.asarray(C))
    assert dist.shape == (N, K) and dist.dtype == bk.dtype
    np.testing.assert_allclose(bk.np(dist), direct, rtol=bk.rtol * 10, atol=1e-12 if bk.is64 else 1e-4)


def test_distance_forward_is_clamped_at_zero(bk, rng):
    """Rows equal to a code (and within rounding of one): the expansion can round below 0."""
    dt = bk.dtype_name
    C = (rng.standard_normal((K, D)) * 3.0 + 50.0).astype(dt)  # far from the origin: cancellation
    near = np.concatenate([C, C, C + 1e-4 * rng.standard_normal((K, D))]).astype(dt)  # (3K, D)
    m = C.mean(axis=0)
    xc, cc = near - m, C - m
    raw = np.sum(xc * xc, axis=1, keepdims=True) - 2 * (xc @ cc.T) + np.sum(cc * cc, axis=1)  # unclamped
    assert (raw < 0).any(), "the inputs must make the unclamped expansion negative"
    dist, _ = squared_distance_forward(bk.asarray(near), bk.asarray(C))
    dist = bk.np(dist)
    assert dist.min() >= 0
    if bk.name != "cupy":  # the host expansion above is this backend's arithmetic
        np.testing.assert_array_equal(dist[raw < 0], 0.0)
    direct = ((near.astype(np.float64)[:, None, :] - C.astype(np.float64)[None]) ** 2).sum(-1)
    scale = 16 * np.finfo(dt).eps * (np.sum(xc * xc, axis=1, keepdims=True) + np.sum(cc * cc, axis=1))
    assert np.all(np.abs(dist - direct) <= scale + 1e-8)


def test_distance_backward_finite_differences_and_torch(bk64, rng):
    x = bk64.asarray(rng.standard_normal((N, D)))
    C = bk64.asarray(rng.standard_normal((K, D)))
    f = lambda x, C: squared_distance_forward(x, C)[0]  # noqa: E731
    vjp = lambda g, x, C: squared_distance_backward(g, squared_distance_forward(x, C)[1])  # noqa: E731
    check_vjp(f, vjp, [x, C], seed=2, rtol=1e-7)
    g = rng.standard_normal((N, K))
    _, tdx, tdc = tref.squared_distance_grads(x, C, g)
    dx, dc = vjp(bk64.asarray(g), x, C)
    assert rel_error(dx, tdx) < 1e-12 and rel_error(dc, tdc) < 1e-12
    # negative control: forgetting the factor 2 on the codebook side must fail
    bad = lambda g, x, C: (vjp(g, x, C)[0], 0.5 * vjp(g, x, C)[1])  # noqa: E731
    assert not check_vjp(f, bad, [x, C], seed=2, raise_on_failure=False).passed


def test_nearest_code_equals_bruteforce_argmin(bk, rng):
    x, C, truth = separated_problem(rng, 200, 13, 6)
    idx = nearest_code(bk.asarray(x), bk.asarray(C), chunk_size=37)
    assert idx.dtype == bk.xp.int64 and idx.shape == (200,)
    np.testing.assert_array_equal(bk.np(idx), truth)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 60), k=st.integers(1, 9), d=st.integers(1, 6), chunk=st.integers(1, 70), seed=st.integers(0, 2**31)
)
def test_nearest_code_chunking_never_changes_the_answer(n, k, d, chunk, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    C = rng.standard_normal((k, d))
    a, sa = nearest_code(x, C, return_score=True)
    b, sb = nearest_code(x, C, chunk_size=chunk, return_score=True)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(sa, sb, rtol=1e-12, atol=1e-12)
    direct = ((x[:, None, :] - C[None]) ** 2).sum(-1)
    np.testing.assert_allclose(sa, direct.min(1), rtol=1e-9, atol=1e-9)


def test_ties_go_to_the_first_index(bk):
    # codes 0 and 2 (and 1 and 3) are identical; the codebook mean is exact in float32
    C = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    x = np.array([[2.0, 0.0], [0.0, 3.0], [0.5, 0.5]])  # the last is equidistant from all four
    idx = bk.np(nearest_code(bk.asarray(x), bk.asarray(C)))
    np.testing.assert_array_equal(idx, [0, 1, 0])
    idx = bk.np(nearest_code(bk.asarray(x), bk.asarray(C), metric="dot"))
    np.testing.assert_array_equal(idx, [0, 1, 0])


def test_float32_offset_data_assigns_like_float64(rng):
    # Features around 1e3 with a spread of 1e-2: without centring, float32's expanded distance
    # is pure rounding noise here.
    K_, D_ = 16, 8
    centres = 1e3 + 1e-2 * rng.standard_normal((K_, D_))
    truth = rng.integers(0, K_, 2000)
    x = centres[truth] + 1e-4 * rng.standard_normal((2000, D_))
    ref = nearest_code(x, centres)  # float64
    direct = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(ref, direct)
    got = nearest_code(x.astype(np.float32), centres.astype(np.float32))
    assert np.mean(got == ref) == 1.0
    # ... and the uncentred expansion really does fail on this data (the reason for centring)
    x32, c32 = x.astype(np.float32), centres.astype(np.float32)
    naive = (np.sum(c32 * c32, 1) - 2 * x32 @ c32.T).argmin(1)
    assert np.mean(naive == ref) < 0.5


def test_metric_is_checked():
    with pytest.raises(ValueError, match="metric"):
        nearest_code(np.zeros((2, 2)), np.zeros((3, 2)), metric="cosine")


# ----------------------------------------------------------------------------- lookup


def test_lookup_is_bit_exact_and_its_backward_is_a_segment_sum(bk, rng):
    C = rng.standard_normal((K, D))
    k = np.array([3, 3, 0, 6, 3, 0, 1, 1, 3, 6, 0])  # repeats; codes 2, 4, 5 unused
    q, cache = lookup_forward(bk.asarray(C), bk.asarray(k))
    np.testing.assert_array_equal(bk.np(q), C.astype(bk.dtype_name)[k])
    dq = rng.standard_normal((N, D))
    dC = bk.np(lookup_backward(bk.asarray(dq), cache))
    expected = np.zeros((K, D))
    np.add.at(expected, k, dq)
    np.testing.assert_allclose(dC, expected, rtol=bk.rtol, atol=1e-12 if bk.is64 else 1e-5)
    assert np.all(dC[[2, 4, 5]] == 0)


def test_lookup_backward_finite_differences_and_torch(bk64, rng):
    C = bk64.asarray(rng.standard_normal((K, D)))
    k = bk64.asarray(rng.integers(0, K, size=N))
    f = lambda C: lookup_forward(C, k)[0]  # noqa: E731
    vjp = lambda g, C: (lookup_backward(g, lookup_forward(C, k)[1]),)  # noqa: E731
    check_vjp(f, vjp, [C], seed=3, rtol=1e-8)
    g = rng.standard_normal((N, D))
    _, tdc = tref.lookup_grads(C, k, g)
    assert rel_error(vjp(bk64.asarray(g), C)[0], tdc) < 1e-14

    # negative control: dC[k] = dq (assignment instead of accumulation) drops repeated rows
    def buffered(g, C):
        out = np.zeros((K, D))
        out[bk64.np(k)] += bk64.np(g)
        return (bk64.asarray(out),)

    assert not check_vjp(f, buffered, [C], seed=3, raise_on_failure=False).passed


def test_all_tokens_on_one_code_accumulate(bk64, rng):
    C = bk64.asarray(rng.standard_normal((K, D)))
    k = bk64.asarray(np.full(N, 4))
    dq = rng.standard_normal((N, D))
    _, cache = lookup_forward(C, k)
    dC = bk64.np(lookup_backward(bk64.asarray(dq), cache))
    np.testing.assert_allclose(dC[4], dq.sum(0), rtol=1e-12)
    assert np.count_nonzero(dC[np.arange(K) != 4]) == 0


# ----------------------------------------------------------------------------- losses and STE


def test_losses_finite_differences_and_torch(bk64, rng):
    x = bk64.asarray(rng.standard_normal((N, D)))
    q = bk64.asarray(rng.standard_normal((N, D)))
    dloss = 1.7
    f = lambda a, b: dloss * mse_forward(a, b)[0]  # noqa: E731
    vjp = lambda g, a, b: mse_backward(g * dloss, mse_forward(a, b)[1])  # noqa: E731
    check_vjp(f, vjp, [x, q], seed=4, rtol=1e-8)
    _, tdx, _ = tref.mse_grads(x, q, dloss, detach_b=True)
    assert rel_error(commitment_loss_backward(dloss, commitment_loss_forward(x, q)[1]), tdx) < 1e-14
    _, _, tdq = tref.mse_grads(x, q, dloss, detach_a=True)
    assert rel_error(codebook_loss_backward(dloss, codebook_loss_forward(x, q)[1]), tdq) < 1e-14
    bad = lambda g, a, b: (vjp(g, a, b)[0], vjp(g, a, b)[0])  # noqa: E731  wrong sign for b
    assert not check_vjp(f, bad, [x, q], seed=4, raise_on_failure=False).passed


def test_commitment_and_codebook_losses_have_equal_values(bk, rng):
    x = bk.asarray(rng.standard_normal((N, D)))
    q = bk.asarray(rng.standard_normal((N, D)))
    a, _ = commitment_loss_forward(x, q)
    b, _ = codebook_loss_forward(x, q)
    assert a.shape == () and a.dtype == bk.dtype
    assert float(bk.np(a)) == float(bk.np(b))
    expected = np.mean((bk.np(x).astype(np.float64) - bk.np(q)) ** 2)
    assert float(bk.np(a)) == pytest.approx(expected, rel=bk.rtol)


def test_straight_through_value_is_q_and_gradient_is_identity(bk, rng):
    z = bk.asarray(rng.standard_normal((N, D)))
    q = bk.asarray(rng.standard_normal((N, D)))
    out, cache = straight_through_forward(z, q)
    np.testing.assert_array_equal(bk.np(out), bk.np(q))
    g = bk.asarray(rng.standard_normal((N, D)))
    np.testing.assert_array_equal(bk.np(straight_through_backward(g, cache)), bk.np(g))
    with pytest.raises(ValueError, match="shapes differ"):
        straight_through_forward(z, q[:3, :])


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(rotation_trick=True),
        dict(use_cosine_sim=True, orthogonal_reg_weight=0.5),
        dict(straight_through=True, sample_codebook_temp=0.7),
        dict(soft_assignment=True, sample_codebook_temp=0.7, use_cosine_sim=True),
        dict(learnable_codebook=True, codebook_diversity_loss_weight=0.3),
    ],
    ids=["ste", "rotation", "cosine-orth", "gumbel-st", "soft-cos", "learnable-div"],
)
def test_backward_without_the_codebook_gradient_gives_the_same_dx(rng, kw):
    """``quantize_backward(codebook=False)`` (what a module whose codebook is not learned asks):
    the same dx, bit for bit, and no codebook gradient; ``squared_distance_backward`` likewise."""
    from vqref.core.quantize import add_orthogonal_term, quantize_backward, quantize_forward

    N, K, D = 40, 6, 5
    x, C = rng.standard_normal((N, D)), rng.standard_normal((K, D))
    orth = kw.pop("orthogonal_reg_weight", 0.0)
    noise = rng.gumbel(size=(N, K)) if kw.get("straight_through") else None
    out, cache = quantize_forward(x, C, noise=noise, **kw)
    if orth:
        _, cache = add_orthogonal_term(cache, C, weight=orth)
    dq = rng.standard_normal((N, D))
    dx_all, dc_all = quantize_backward(dq, 0.8, cache)
    dx, dc = quantize_backward(dq, 0.8, cache, codebook=False)
    assert dc is None
    assert (dc_all is None) == (not kw and not orth or kw == dict(rotation_trick=True))  # skipped, not absent
    np.testing.assert_array_equal(dx, dx_all)
    # the distance's own backward
    dist, dcache = squared_distance_forward(x, C)
    g = rng.standard_normal(dist.shape)
    dx_all, dc_all = squared_distance_backward(g, dcache)
    dx, dc = squared_distance_backward(g, dcache, codebook=False)
    assert dc is None
    np.testing.assert_array_equal(dx, dx_all)
