"""The training step's fast paths against their definitions (docs/performance.md).

Each fast path here changes how a training step computes a gradient, never what it is:

* ``losses.commitment_loss_backward_added``: ``dx + (2 w / M)(x - q)`` in one blocked pass,
  bit for bit the formula;
* ``losses.codebook_loss_backward_codes``: the codebook term's gradient as a segment sum of
  deviations from the codes, equal to the formula (scatter of ``(2 w / M)(q - x)``) to rounding;
* ``l2norm.l2norm_forward_fast`` / ``l2norm_backward_fast``: one ``sqrt(x . x)`` per row and the
  careful norm only on rows whose squares overflow; the backward with a row coefficient, blocked;
* the quantizer's backward skips a loss term of weight 0, the residual stack sums its depths'
  gradients in a buffer of its own, and no backward copies (or writes) the caller's upstream
  gradient, nor hands it back as ``dx``.

Every test also shows that the check would catch the fast path going wrong (a negative control).
"""

from __future__ import annotations

import numpy as np
import pytest

from vqref import ResidualVQ, VectorQuantize
from vqref import backend as B
from vqref.core.quantize import quantize_backward, quantize_forward
from vqref.core.residual import residual_backward, residual_forward
from vqref.ops import l2norm as L2
from vqref.ops import losses

N, K, D = 37, 11, 6  # distinct sizes


# --------------------------------------------------------------------------------------------
# losses: the commitment gradient added, the codebook gradient per code
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [None, 5 * D])  # one block / 8 blocks (the last one short)
def test_commitment_added_equals_formula_bit_for_bit(bk, rng, block, monkeypatch):
    if block is not None:
        monkeypatch.setattr(losses, "_BLOCK_ELEMENTS", block)
    x, q, dx = (bk.asarray(rng.standard_normal((N, D))) for _ in range(3))
    _, cache = losses.mse_forward(x, q)
    before = bk.np(dx).copy()
    fast = losses.commitment_loss_backward_added(dx, 0.7, cache)
    slow = losses.commitment_loss_backward_added(dx, 0.7, cache, fast=False)
    np.testing.assert_array_equal(bk.np(fast), bk.np(slow))  # the same operations per element
    np.testing.assert_array_equal(bk.np(dx), before)  # dx is only read
    assert fast.dtype == bk.dtype and fast is not dx
    # an independent float64 value: dx + (2 * 0.7 / M)(x - q)
    X, Qh, G = (bk.np(a).astype(np.float64) for a in (x, q, dx))
    np.testing.assert_allclose(bk.np(fast), G + 2 * 0.7 / (N * D) * (X - Qh), rtol=bk.rtol, atol=1e-6)
    # negative control: the gradient of the other side (q's) added instead is caught
    wrong = dx + losses.codebook_loss_backward(0.7, cache)
    assert not np.allclose(bk.np(fast), bk.np(wrong), rtol=bk.rtol)


def test_scaled_difference_with_base_other_shapes_and_empty(rng):
    a, b, base = rng.standard_normal((4, 3)), rng.standard_normal(3), rng.standard_normal((4, 3))
    np.testing.assert_array_equal(losses.scaled_difference_blocked(0.5, a, b, base=base), base + 0.5 * (a - b))
    a2 = rng.standard_normal((4, 3))  # a base of another shape (broadcast): the one-line expression
    np.testing.assert_array_equal(losses.scaled_difference_blocked(0.5, a, a2, base=b), b + 0.5 * (a - a2))
    e = np.zeros((0, 3))
    assert losses.scaled_difference_blocked(0.5, e, e, base=e).shape == (0, 3)


def test_codebook_codes_equals_formula(bk, rng):
    C = bk.asarray(rng.standard_normal((K, D)))
    idx_h = rng.integers(0, K - 2, N)  # the last two codes unused
    idx = bk.asarray(idx_h)
    x = bk.asarray(rng.standard_normal((N, D)))
    q = B.get_namespace(C).take(C, idx, axis=0)
    _, cache = losses.mse_forward(x, q)
    fast = losses.codebook_loss_backward_codes(1.3, cache, idx, C)
    slow = losses.codebook_loss_backward_codes(1.3, cache, idx, C, fast=False)
    assert fast.shape == (K, D) and fast.dtype == bk.dtype
    np.testing.assert_allclose(bk.np(fast), bk.np(slow), rtol=50 * np.finfo(bk.dtype_name).eps, atol=1e-12)
    assert not np.any(bk.np(fast)[K - 2 :])  # unused codes: exactly zero
    # oracle: an unbuffered float64 scatter-add of (2 * 1.3 / M)(q_i - x_i)
    want = np.zeros((K, D))
    np.add.at(want, idx_h, 2 * 1.3 / (N * D) * (bk.np(q).astype(np.float64) - bk.np(x).astype(np.float64)))
    np.testing.assert_allclose(bk.np(fast), want, rtol=bk.rtol, atol=1e-7)
    # negative control: the sign of the deviations flipped
    assert not np.allclose(bk.np(fast), -want, rtol=bk.rtol, atol=1e-7)


# --------------------------------------------------------------------------------------------
# l2 normalisation: one norm per row, the careful norm on overflowing rows only
# --------------------------------------------------------------------------------------------


def _norm_rows(bk, rng, eps):
    x = rng.standard_normal((N, D)) * np.exp(rng.uniform(-3, 3, (N, 1)))
    x[0] = 0.0  # a zero row
    x[1] = 0.0
    x[1, 2] = eps  # norm exactly eps: sqrt(fl(eps^2)) = eps, the projection branch
    x[2] = 0.1 * eps * rng.standard_normal(D)  # below eps: the linear branch
    big = 3e30 if bk.dtype_name == "float32" else 3e200  # squares overflow, the norm does not
    x[3] = big * rng.standard_normal(D)
    x[4] = 0.0
    x[4, 0] = big
    return bk.asarray(x)


@pytest.mark.parametrize("eps", [1e-6, 1e-3])
def test_l2norm_forward_fast_equals_definition(bk, rng, eps):
    x = _norm_rows(bk, rng, eps)
    y, c = L2.l2norm_forward_fast(x, eps=eps)
    y0, c0 = L2.l2norm_forward(x, eps=eps, fast=False)
    tol = 8 * np.finfo(bk.dtype_name).eps
    np.testing.assert_allclose(bk.np(y), bk.np(y0), rtol=tol, atol=tol)
    np.testing.assert_allclose(bk.np(c.scale), bk.np(c0.scale), rtol=tol)
    np.testing.assert_array_equal(bk.np(c.above), bk.np(c0.above))  # every row takes the same branch
    assert bk.np(c.above)[:5, 0].tolist() == [False, True, False, True, True]  # the boundary row is above
    assert bk.np(c.scale)[1, 0] == np.asarray(eps, dtype=bk.dtype_name)  # exactly eps
    assert np.all(np.isfinite(bk.np(y)))
    np.testing.assert_allclose(np.linalg.norm(bk.np(y)[3:5].astype(np.float64), axis=1), 1.0, rtol=tol)
    # the default is the fast path (the one-line choice); other shapes take the definition
    np.testing.assert_array_equal(bk.np(L2.l2norm_forward(x, eps=eps)[0]), bk.np(y))
    x3 = bk.asarray(bk.np(x)[:36].reshape(4, 9, D))
    np.testing.assert_array_equal(bk.np(L2.l2norm_forward(x3, eps=eps)[0]), bk.np(y0)[:36].reshape(4, 9, D))


def test_l2norm_overflow_branch_is_needed(bk, rng, monkeypatch):
    """Negative control: without the careful norm on the overflowing rows, those rows come out 0."""
    x = _norm_rows(bk, rng, 1e-6)
    monkeypatch.setattr(B, "where_rows", lambda mask, fn, arrays, default: default)
    y, _ = L2.l2norm_forward_fast(x)
    y0, _ = L2.l2norm_forward(x, fast=False)
    assert not np.allclose(bk.np(y)[3:5], bk.np(y0)[3:5])
    np.testing.assert_allclose(bk.np(y)[5:], bk.np(y0)[5:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block", [None, 4 * D])
def test_l2norm_backward_fast_equals_definition(bk, rng, block, monkeypatch):
    if block is not None:
        monkeypatch.setattr(L2, "_BLOCK_ELEMENTS", block)
    eps = 1e-3
    x = _norm_rows(bk, rng, eps)
    _, cache = L2.l2norm_forward(x, eps=eps)
    dy = bk.asarray(rng.standard_normal((N, D)))
    fast = L2.l2norm_backward_fast(dy, cache)
    slow = L2.l2norm_backward(dy, cache, fast=False)
    assert fast.dtype == bk.dtype
    tol = 8 * np.finfo(bk.dtype_name).eps
    np.testing.assert_allclose(bk.np(fast), bk.np(slow), rtol=tol, atol=tol * np.abs(bk.np(slow)).max())
    # rows below eps: dy / eps exactly, on both
    for r in (0, 2):
        np.testing.assert_array_equal(bk.np(fast)[r], bk.np(dy)[r] / np.asarray(eps, dtype=bk.dtype_name))
    np.testing.assert_array_equal(bk.np(L2.l2norm_backward(dy, cache)), bk.np(fast))  # the default
    # negative control: the projection applied on every row (the eps branch ignored) is caught
    wrong = L2.l2norm_backward_fast(dy, cache._replace(above=B.get_namespace(dy).ones_like(cache.above)))
    assert not np.allclose(bk.np(wrong)[2], bk.np(slow)[2])


def test_l2norm_fast_paths_empty():
    y, c = L2.l2norm_forward(np.zeros((0, 4)))
    assert y.shape == (0, 4) and L2.l2norm_backward(np.zeros((0, 4)), c).shape == (0, 4)


# --------------------------------------------------------------------------------------------
# quantizer and residual stack: skipped terms, summed depths, the caller's arrays untouched
# --------------------------------------------------------------------------------------------


def test_zero_weight_term_is_skipped_and_dx_is_the_estimator_gradient(bk, rng):
    x, C = bk.asarray(rng.standard_normal((N, D))), bk.asarray(rng.standard_normal((K, D)))
    dq = bk.asarray(rng.standard_normal((N, D)))
    _, cache = quantize_forward(x, C, commitment_weight=0.0)
    dx, dC = quantize_backward(dq, 1.0, cache)
    np.testing.assert_array_equal(bk.np(dx), bk.np(dq))  # the STE alone, nothing added
    assert dC is None
    _, cache = quantize_forward(x, C, commitment_weight=0.25)  # negative control: a term that counts
    assert not np.array_equal(bk.np(quantize_backward(dq, 1.0, cache)[0]), bk.np(dq))


@pytest.mark.parametrize("codebook_weight", [None, 0.0, 2.0])
def test_learnable_codebook_gradient_equals_scatter_of_the_formula(bk, rng, codebook_weight):
    x, C = bk.asarray(rng.standard_normal((N, D))), bk.asarray(rng.standard_normal((K, D)))
    dq = bk.asarray(rng.standard_normal((N, D)))
    out, cache = quantize_forward(x, C, commitment_weight=0.3, learnable_codebook=True, codebook_weight=codebook_weight)
    _, dC = quantize_backward(dq, 1.7, cache)
    w = 0.3 if codebook_weight is None else codebook_weight
    idx = bk.np(out.indices)
    want = np.zeros((K, D))
    np.add.at(want, idx, 2 * w * 1.7 / (N * D) * (bk.np(C).astype(np.float64)[idx] - bk.np(x).astype(np.float64)))
    if codebook_weight == 0.0:
        assert dC is None  # a codebook term of weight 0 is skipped
    else:
        np.testing.assert_allclose(bk.np(dC), want, rtol=bk.rtol, atol=1e-7)


@pytest.mark.parametrize("Q", [1, 3])
@pytest.mark.parametrize("routing", ["per_depth", "sum"])
@pytest.mark.parametrize("weight", [0.0, 0.4])
def test_residual_backward_sum_equals_plain_sum_and_is_a_new_array(bk, rng, Q, routing, weight):
    x = bk.asarray(rng.standard_normal((N, D)))
    cbs = [bk.asarray(rng.standard_normal((K, D))) for _ in range(Q)]
    dq = bk.asarray(rng.standard_normal((N, D)))
    before = bk.np(dq).copy()
    out, cache = residual_forward(x, cbs, routing=routing, commitment_weight=weight)
    # the output is the plain sum of the codes (the in-place sum never wrote a code)
    codes = [bk.np(c) for c in out.codes]
    np.testing.assert_array_equal(codes[0], bk.np(cbs[0])[bk.np(out.indices)[:, 0]])
    want_q = codes[0]
    for c in codes[1:]:
        want_q = want_q + c
    np.testing.assert_array_equal(bk.np(out.quantized), want_q)
    dx, _ = residual_backward(dq, 1.0, cache)
    np.testing.assert_array_equal(bk.np(dq), before)  # the upstream gradient is never written
    assert dx is not dq and not np.shares_memory(bk.np(dx), bk.np(dq))
    # the plain sum of the depths' gradients, in depth order
    xp = B.get_namespace(dq)
    want = None if routing == "per_depth" else dq
    for depth in cache.depths:
        up = dq if routing == "per_depth" else xp.zeros_like(dq)
        term = bk.np(quantize_backward(up, 1.0, depth)[0])
        want = term if want is None else bk.np(want) + term
    np.testing.assert_array_equal(bk.np(dx), bk.np(want))
    if Q > 1 and weight > 0:  # negative control: one depth left out of the sum is caught
        short = bk.np(want) - term
        assert not np.array_equal(bk.np(dx), short)


@pytest.mark.parametrize(
    "make",
    [
        lambda: VectorQuantize(D, K, seed=0, commitment_weight=0.0),
        lambda: VectorQuantize(D, K, seed=0, use_cosine_sim=True),
        lambda: VectorQuantize(D, K, seed=0, rotation_trick=True),
        lambda: VectorQuantize(D, K, seed=0, ema_update=False, learnable_codebook=True),
        lambda: ResidualVQ(dim=D, num_quantizers=3, codebook_size=K, seed=0),
        lambda: ResidualVQ(dim=D, num_quantizers=3, codebook_size=K, seed=0, shared_codebook=True),
    ],
    ids=["ste-no-commitment", "cosine", "rotation", "learnable", "rvq", "rvq-shared"],
)
def test_module_backward_neither_writes_nor_returns_the_upstream_gradient(rng, make):
    m = make()
    x = rng.standard_normal((N, D))
    g = rng.standard_normal((N, D))
    before = g.copy()
    m(x)
    dx = m.backward(g)
    np.testing.assert_array_equal(g, before)
    assert not np.shares_memory(dx, g)
    dx[...] = 0.0  # the caller owns dx: writing it changes nothing of theirs
    np.testing.assert_array_equal(g, before)


@pytest.mark.parametrize("fast", [True, False])
def test_in_place_variants_equal_the_new_array_ones(bk, rng, fast, monkeypatch):
    """``in_place`` (a buffer the caller owns) gives the same numbers, written into that buffer."""
    monkeypatch.setattr(losses, "_BLOCK_ELEMENTS", 5 * D)
    monkeypatch.setattr(L2, "_BLOCK_ELEMENTS", 4 * D)
    x, q, dx = (bk.asarray(rng.standard_normal((N, D))) for _ in range(3))
    _, cache = losses.mse_forward(x, q)
    want = losses.commitment_loss_backward_added(dx, 0.3, cache, fast=fast)
    buf = B.get_namespace(dx).asarray(dx, copy=True)
    got = losses.commitment_loss_backward_added(buf, 0.3, cache, fast=fast, in_place=True)
    assert got is buf
    np.testing.assert_array_equal(bk.np(got), bk.np(want))
    _, ncache = L2.l2norm_forward(_norm_rows(bk, rng, 1e-3), eps=1e-3)
    want = L2.l2norm_backward(dx, ncache, fast=fast)
    buf = B.get_namespace(dx).asarray(dx, copy=True)
    got = L2.l2norm_backward(buf, ncache, fast=fast, in_place=True)
    assert got is buf
    np.testing.assert_array_equal(bk.np(got), bk.np(want))
    # the one-line fallback of other shapes, into a buffer
    a, b, base = rng.standard_normal((4, 3)), rng.standard_normal(3), rng.standard_normal((4, 3))
    out = np.empty((4, 3))
    assert losses.scaled_difference_blocked(0.5, a, b, base=base, out=out) is out
    np.testing.assert_array_equal(out, base + 0.5 * (a - b))
