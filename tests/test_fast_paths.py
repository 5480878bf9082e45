"""Every fast path against the plain version it replaces (docs/performance.md).

The fast paths change how a result is computed, never what it is: buffers reused, passes fused,
blocks of rows, work skipped on rows that do not need it.  Each test computes the same quantity
both ways on the same inputs -- the numpy fast path against the Array API fallback
(``array_api_strict``), the blocked form against the one-line formula, the row-scalar rotation
against the plane-form definition -- and includes the case that selects every branch (block
boundaries, hard rows, tiny segments, empty inputs, the clamp of distances at 0, every mask of
the fused rotation backward, its eps threshold).  No test here measures time; the benchmark
smoke test (``python -m benchmarks.bench``) only checks that the harness runs and writes its
report.
"""

from __future__ import annotations

import json
import warnings

import array_api_strict
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vqref import backend as B
from vqref import threads
from vqref.core.kmeans import kmeans
from vqref.ops import distance, losses, rotation
from vqref.ops.distance import default_chunk_size, nearest_code, nearest_code_inplace, nearest_code_portable
from vqref.ops.distance_fast import nearest_code_threaded, use_threads
from vqref.ops.rotation import rotate_transpose, rotation_basis, rotation_trick_backward, rotation_trick_forward

XS = B.namespace_from_module(array_api_strict)


def _strict(a):
    return B.from_numpy(np.asarray(a), XS)


# --------------------------------------------------------------------------------------------
# backend: segment_sum, all_finite, where_rows
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "N,K,D",
    [
        (3000, 40, 64),  # the per-segment loop (many elements per segment)
        (500, 300, 2),  # reduceat (few elements per segment) and 16-bit ids
        (700, 70000, 3),  # ids wider than 16 bits
        (1, 5, 4),
        (0, 3, 2),
    ],
)
@pytest.mark.parametrize("with_offsets", [False, True], ids=["sums", "offsets"])
def test_segment_sum_numpy_equals_portable(rng, N, K, D, with_offsets):
    values = rng.standard_normal((N, D))
    ids = rng.integers(0, min(K, 50) if K > 1000 else K, size=N)  # many empty segments too
    offsets = rng.standard_normal((K, D)) if with_offsets else None
    fast = B.segment_sum(values, ids, K, offsets=offsets)
    slow = B.segment_sum(_strict(values), _strict(ids), K, offsets=None if offsets is None else _strict(offsets))
    expected = np.zeros((K, D))
    for i in range(N):  # the definition
        expected[ids[i]] += values[i] - (0 if offsets is None else offsets[ids[i]])
    assert fast.shape == (K, D) and fast.dtype == np.float64
    np.testing.assert_allclose(fast, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(B.to_numpy(slow), expected, rtol=1e-12, atol=1e-12)


def test_segment_sum_float32_and_vector_values(rng):
    values = rng.standard_normal(1000).astype(np.float32)  # (N,) values
    ids = rng.integers(0, 7, size=1000)
    offsets = rng.standard_normal(7).astype(np.float32)
    got = B.segment_sum(values, ids, 7, offsets=offsets)
    want = B.to_numpy(B.segment_sum(_strict(values), _strict(ids), 7, offsets=_strict(offsets)))
    assert got.shape == (7,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-4)
    # offsets are what segment_sum(values - offsets[ids]) means
    np.testing.assert_allclose(got, B.segment_sum(values - offsets[ids], ids, 7), rtol=2e-5, atol=1e-4)


def test_all_finite_fast_path(bk):
    big = np.finfo(bk.dtype_name).max
    cases = {
        "zeros": (np.zeros((3, 4)), True),
        "nan": (np.array([0.0, np.nan, 1.0]), False),
        "inf": (np.array([0.0, np.inf]), False),
        "-inf": (np.array([-np.inf, 2.0]), False),
        "inf and -inf": (np.array([np.inf, -np.inf]), False),  # their sum is NaN, still caught
        "finite but the sum overflows": (np.array([big, big, -1.0]), True),
        "empty": (np.zeros((0, 3)), True),
    }
    for name, (a, want) in cases.items():
        with np.errstate(over="ignore", invalid="ignore"):
            assert B.all_finite(bk.asarray(a)) is want, name
    assert B.all_finite(bk.asarray(np.arange(5)))  # integers: the plain check


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_all_finite_block_sums_on_workers(rng, monkeypatch, workers):
    """Contiguous arrays larger than one block are summed block by block on the workers: a bad
    value in any block (first, middle, the partial last one) is found, a block whose sum overflows
    falls back to the element check, and the workers' overflow is silent."""
    monkeypatch.setattr(B, "_FINITE_BLOCK", 8)
    monkeypatch.setattr(threads, "workers", lambda: workers)
    a = rng.standard_normal((7, 5)).astype(np.float32)  # 35 elements: blocks of 8, the last of 3
    big = np.finfo(np.float32).max
    assert B.all_finite(a) and B._sums_are_finite(a)
    for where in (0, 13, 34):
        for bad in (np.nan, np.inf, -np.inf):
            b = a.copy()
            b.flat[where] = bad
            assert not B.all_finite(b) and not B._sums_are_finite(b), (where, bad)
    b = a.copy()
    b.flat[16:18] = big  # finite, but the sum of that block overflows
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from the workers' sums
        assert not B._sums_are_finite(b) and B.all_finite(b)
    b = np.asfortranarray(a)  # not C-contiguous: one sum
    b[6, 4] = np.nan
    assert not B.all_finite(b) and not B.all_finite(b[:, ::2]) and B.all_finite(b[:, :4:2])
    assert B._sums_are_finite(np.zeros(8, np.float32))  # exactly one block


@pytest.mark.parametrize("mask_kind", ["none", "some", "all"])
@pytest.mark.parametrize("column", [False, True], ids=["(N,)", "(N,1)"])
def test_where_rows_subset_equals_full_evaluation(rng, mask_kind, column):
    N, D = 9, 4
    a, b = rng.standard_normal((N, D)), rng.standard_normal((N, 1))
    mask = {"none": np.zeros(N, bool), "some": rng.random(N) < 0.4, "all": np.ones(N, bool)}[mask_kind]
    mask[3] = mask_kind != "none"
    m = mask[:, None] if column else mask
    calls = []

    def fn(u, v):  # row-wise
        calls.append(u.shape[0])
        return u * v + 1.0

    default = rng.standard_normal((N, D))
    want = np.where(mask[:, None], a * b + 1.0, default)
    got = B.where_rows(m, fn, (a, b), default.copy())
    np.testing.assert_array_equal(got, want)
    assert sum(calls) == int(mask.sum())  # numpy: fn saw the selected rows only
    calls.clear()
    got_strict = B.where_rows(_strict(m), fn, (_strict(a), _strict(b)), _strict(default))
    np.testing.assert_array_equal(B.to_numpy(got_strict), want)
    assert calls == [N]  # the portable path evaluates every row and selects


# --------------------------------------------------------------------------------------------
# nearest_code: in-place numpy variant against the portable loop
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("metric", ["euclidean", "dot"])
@pytest.mark.parametrize("chunk", [None, 1, 37, 5000])
def test_nearest_code_inplace_equals_portable(rng, clear_rows, dtype, metric, chunk):
    N, K, D = 777, 45, 11
    x = (rng.standard_normal((N, D)) + 3.0).astype(dtype)  # an offset: centring matters
    C = (rng.standard_normal((K, D)) + 3.0).astype(dtype)
    i_fast, s_fast = nearest_code_inplace(x, C, metric=metric, chunk_size=chunk, return_score=True)
    i_port, s_port = nearest_code_portable(x, C, metric=metric, chunk_size=chunk, return_score=True)
    i_strict, s_strict = nearest_code_portable(
        _strict(x), _strict(C), metric=metric, chunk_size=chunk, return_score=True
    )
    assert i_fast.dtype == np.int64 and i_fast.shape == (N,) and s_fast.dtype == np.dtype(dtype)
    clear = clear_rows(x, C, metric)  # rows without a near-tie
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(i_fast[clear], i_port[clear])
    np.testing.assert_array_equal(B.to_numpy(i_strict), i_port)
    rtol = 1e-12 if dtype == "float64" else 2e-4
    np.testing.assert_allclose(s_fast[clear], s_port[clear], rtol=rtol, atol=rtol)
    np.testing.assert_allclose(B.to_numpy(s_strict), s_port, rtol=rtol, atol=rtol)


def test_nearest_code_dispatch_and_edge_cases(rng):
    x, C = rng.standard_normal((50, 3)), rng.standard_normal((4, 3))
    np.testing.assert_array_equal(nearest_code(x, C), nearest_code_inplace(x, C))
    np.testing.assert_array_equal(B.to_numpy(nearest_code(_strict(x), _strict(C))), nearest_code_portable(x, C))
    # mixed dtypes keep the portable path (numpy promotes, the buffers could not)
    np.testing.assert_array_equal(nearest_code(x.astype(np.float32), C), nearest_code_portable(x.astype(np.float32), C))
    for metric in ("euclidean", "dot"):
        idx, score = nearest_code_inplace(x[:0], C, metric=metric, return_score=True)
        assert idx.shape == (0,) and score.shape == (0,) and idx.dtype == np.int64
        idx = nearest_code_inplace(x, C[:1], metric=metric)
        np.testing.assert_array_equal(idx, 0)
    # ties still go to the lowest index
    C2 = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    x2 = np.array([[2.0, 0.0], [0.0, 3.0], [0.5, 0.5]])
    np.testing.assert_array_equal(nearest_code_inplace(x2, C2), [0, 1, 0])
    np.testing.assert_array_equal(nearest_code_inplace(x2, C2, metric="dot"), [0, 1, 0])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("chunk", [None, 29])
def test_nearest_code_scores_are_clamped_at_zero(rng, dtype, chunk):
    # Every row is a code, exactly: the true distance is 0, and the expanded form
    # ||c||^2 - 2 xc.c + ||xc||^2 rounds to either side of it.  Far from the origin (an offset of
    # 50 next to a spread of 3) the rounding is large enough that many rows come out negative
    # before the clamp, in both orders of summation.
    N, K, D = 300, 23, 7
    C = (rng.standard_normal((K, D)) * 3.0 + 50.0).astype(dtype)
    truth = rng.integers(0, K, size=N)
    x = C[truth]
    m = C.mean(axis=0)
    xc, cc = x - m, C - m
    raw = (np.vecdot(cc, cc) - 2 * (xc @ cc.T))[np.arange(N), truth] + np.vecdot(xc, xc)  # unclamped
    assert (raw < 0).sum() > N // 20, "the inputs must make the unclamped expansion negative"
    i_fast, s_fast = nearest_code_inplace(x, C, chunk_size=chunk, return_score=True)
    i_def, s_def = nearest_code_portable(x, C, chunk_size=chunk, return_score=True)
    i_strict, s_strict = nearest_code_portable(_strict(x), _strict(C), chunk_size=chunk, return_score=True)
    np.testing.assert_array_equal(i_fast, truth)
    np.testing.assert_array_equal(i_def, truth)
    np.testing.assert_array_equal(B.to_numpy(i_strict), truth)
    # the branch: a squared distance is never negative, on either path
    assert s_fast.min() >= 0 and s_def.min() >= 0 and B.to_numpy(s_strict).min() >= 0
    # and the fast path equals the definition to the rounding of the expansion
    tol = 16 * np.finfo(dtype).eps * (np.vecdot(xc, xc) + np.vecdot(cc, cc).max())  # (N,)
    assert np.all(np.abs(s_fast - s_def) <= tol) and np.all(s_fast <= tol)
    # the threaded fast path (two workers) at the clamp as well
    i_thr, s_thr = nearest_code_threaded(x, C, chunk_size=chunk, return_score=True, workers=2)
    np.testing.assert_array_equal(i_thr, truth)
    assert s_thr.min() >= 0 and np.all(s_thr <= tol)
    np.testing.assert_array_equal(B.to_numpy(s_strict), s_def)
    # the public function takes the fast path on these inputs, bit for bit (the threaded one where
    # numpy's BLAS has several threads: tests/test_nearest_threaded.py holds it to the others)
    chosen = nearest_code_threaded if use_threads(N, K, chunk) else nearest_code_inplace
    s_chosen = chosen(x, C, chunk_size=chunk, return_score=True)[1]
    np.testing.assert_array_equal(nearest_code(x, C, chunk_size=chunk, return_score=True)[1], s_chosen)


def test_default_chunk_size_bounds():
    assert default_chunk_size(1024, 256) == distance._CHUNK_ROWS
    assert default_chunk_size(4096, 256) == distance._CHUNK_ROWS
    assert default_chunk_size(256, 64) == distance._CALL_WORK // (256 * 64)  # thin products: more rows
    assert default_chunk_size(1, 1) == distance._BLOCK_ELEMENTS  # ... within the block cap
    assert default_chunk_size(distance._BLOCK_ELEMENTS // 100, 8) == 100  # huge codebooks: smaller chunks
    assert default_chunk_size(10**9, 8) == 64
    for K, D in [(7, 3), (256, 64), (1024, 256), (8192, 256), (70000, 32)]:
        rows = default_chunk_size(K, D)
        assert 64 <= rows and (rows * K <= distance._BLOCK_ELEMENTS or rows == 64)


def test_kmeans_with_offset_segment_sums_matches_deviation_form(rng):
    # the k-means update sums x_i - mu_{a_i} through segment_sum(..., offsets=means); the
    # numpy fast path (blockwise) and the portable path (two temporaries) give the same run
    x = rng.standard_normal((600, 5)) + 100.0
    a = kmeans(x, 7, 5, rng=3)
    b = kmeans(_strict(x), 7, 5, rng=3)
    np.testing.assert_array_equal(a.counts, B.to_numpy(b.counts))
    np.testing.assert_allclose(a.means, B.to_numpy(b.means), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a.inertia, b.inertia, rtol=1e-12)


# --------------------------------------------------------------------------------------------
# losses: blocked sum of squares and scaled differences
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [None, 7 * 5, 10**6])
def test_mse_blocked_equals_one_line_formula(bk, rng, block, monkeypatch):
    if block is not None:
        monkeypatch.setattr(losses, "_BLOCK_ELEMENTS", block)  # 7 rows per block: several blocks
    N, D = 23, 5
    a_h, b_h = rng.standard_normal((N, D)), rng.standard_normal((N, D))
    a, b = bk.asarray(a_h), bk.asarray(b_h)
    loss, cache = losses.mse_forward(a, b)
    A, Bh = bk.np(a).astype(np.float64), bk.np(b).astype(np.float64)  # what the backend saw
    assert loss.shape == () and loss.dtype == bk.dtype
    np.testing.assert_allclose(float(bk.np(loss)), np.mean((A - Bh) ** 2), rtol=bk.rtol)
    dloss = 1.3
    da, db = losses.mse_backward(dloss, cache)
    want = 2.0 / (N * D) * dloss * (A - Bh)
    np.testing.assert_allclose(bk.np(da), want, rtol=bk.rtol, atol=1e-15)
    np.testing.assert_array_equal(bk.np(db), -bk.np(da))
    # the one-sided backwards are those two, bit for bit
    np.testing.assert_array_equal(bk.np(losses.commitment_loss_backward(dloss, cache)), bk.np(da))
    np.testing.assert_array_equal(bk.np(losses.codebook_loss_backward(dloss, cache)), bk.np(db))
    # ... and a deliberately wrong one (the sign of the codebook side flipped) is caught
    assert not np.array_equal(bk.np(losses.commitment_loss_backward(dloss, cache)), bk.np(db))
    # the fast paths against the formulas the public functions write out (fast=False)
    loss_def, cache_def = losses.mse_forward(a, b, fast=False)
    blocks = -(-N // B.rows_per_block(a, losses._BLOCK_ELEMENTS))
    assert blocks == (1 if block != 7 * 5 or bk.name == "cupy" else 4)
    if blocks == 1:  # one block: the same additions, bit for bit
        np.testing.assert_array_equal(bk.np(loss), bk.np(loss_def))
    else:  # the partial sums are added in another order
        np.testing.assert_allclose(bk.np(loss), bk.np(loss_def), rtol=N * np.finfo(bk.dtype_name).eps)
    assert cache_def.count == cache.count == N * D
    for fast, slow in [
        (losses.mse_backward(dloss, cache)[0], losses.mse_backward(dloss, cache_def, fast=False)[0]),
        (losses.commitment_loss_backward(dloss, cache), losses.commitment_loss_backward(dloss, cache, fast=False)),
        (losses.codebook_loss_backward(dloss, cache), losses.codebook_loss_backward(dloss, cache, fast=False)),
    ]:
        np.testing.assert_array_equal(bk.np(fast), bk.np(slow))  # the same two operations per element


def test_mse_other_shapes_and_empty(rng):
    a, b = rng.standard_normal((4, 3)), rng.standard_normal(3)  # broadcasting: the plain path
    loss, cache = losses.mse_forward(a, b)
    np.testing.assert_allclose(loss, np.mean((a - b) ** 2), rtol=1e-14)
    np.testing.assert_allclose(losses.mse_backward(2.0, cache)[0], 2.0 * 2 / 12 * (a - b), rtol=1e-14)
    loss, cache = losses.mse_forward(np.zeros((0, 3)), np.zeros((0, 3)))
    assert float(loss) == 0.0 and losses.mse_backward(1.0, cache)[0].shape == (0, 3)


# --------------------------------------------------------------------------------------------
# rotation trick: row-scalar backward against the plane-form definition
# --------------------------------------------------------------------------------------------


def _rotation_rows(rng, N, D):
    """Pairs covering every branch: generic, aligned, wide angles, antipodal, zero rows."""
    e = rng.standard_normal((N, D)) * np.exp(rng.uniform(-2, 2, (N, 1)))
    q = rng.standard_normal((N, D)) * np.exp(rng.uniform(-2, 2, (N, 1)))
    q[0] = 0.7 * e[0]  # aligned: R = I
    q[1] = -2.0 * e[1]  # exactly antipodal
    q[2] = -e[2] + 1e-3 * rng.standard_normal(D)  # nearly antipodal
    q[3] = -e[3] + 0.5 * e[3].std() * rng.standard_normal(D)  # a wide angle
    e[4] = 0.0  # straight-through rows
    q[5] = 0.0
    return e, q


@pytest.mark.parametrize("block", [None, 3 * 8])
def test_rotation_backward_equals_plane_form_definition(bk, rng, block, monkeypatch):
    if block is not None:
        monkeypatch.setattr(rotation, "_BLOCK_ELEMENTS", block)  # 3 rows per block
    N, D = 40, 8
    e_h, q_h = _rotation_rows(rng, N, D)
    g_h = rng.standard_normal((N, D))
    e, q, g = bk.asarray(e_h), bk.asarray(q_h), bk.asarray(g_h)
    out, cache = rotation_trick_forward(e, q)
    assert out is q
    de = rotation.rotation_trick_backward_fused(g, cache)
    want = rotation_trick_backward(g, cache, fast=False)  # lambda R^T g from the plane-form basis
    assert de.shape == (N, D) and de.dtype == bk.dtype
    de_h, want_h = bk.np(de).astype(np.float64), bk.np(want).astype(np.float64)
    assert np.all(np.isfinite(de_h))
    scale = np.linalg.norm(want_h, axis=1) + 1e-300
    err = np.linalg.norm(de_h - want_h, axis=1) / scale
    assert np.all(err[:2] <= (1e-13 if bk.is64 else 1e-5)), err[:2]
    assert np.all(err <= (1e-11 if bk.is64 else 1e-4)), err
    np.testing.assert_array_equal(de_h[4:6], bk.np(g)[4:6])  # straight-through rows: g itself
    # a deliberately wrong backward (R instead of R^T) is far from the definition
    wrong = bk.np(cache.scale * rotate_transpose(g, cache.basis._replace(sin=-cache.basis.sin))).astype(np.float64)
    assert np.max(np.linalg.norm(wrong - want_h, axis=1) / scale) > 1e-2


def _rotation_branch_rows(dtype):
    """One row (D = 4) per branch of ``rotation_trick_backward_fused``, and which rows are hard.

    Returns host arrays ``e, q, g (14, 4)``, the expected *hard* mask (the rows the fast path
    hands to the definition) and the rows that are straight-through (``de = g``).  Each
    ``safe`` clause has its own row, on which only that clause fails: squares that underflow
    (``e.e < lo``) or overflow (``e.e > hi``) while ``lambda`` stays inside ``(eps, 1/eps)``, so
    that the fused formula on those rows would give a wrong number, not only a wrong mask.
    """
    info = np.finfo(dtype)
    eps, sn, big = float(info.eps), float(info.smallest_normal), float(info.max)
    tiny = np.sqrt(sn) * 2.0**-10  # its squares are subnormal, with a few bits left
    low = 2 * np.sqrt(sn / eps)  # squares just inside [lo, hi] next to ``tiny``: lambda < 1/eps
    huge = np.sqrt(big) / 2  # 9 huge^2 overflows
    high = np.sqrt(big * eps) / 8  # 9 high^2 < hi: lambda = high / huge > eps
    u, w = np.array([1.0, 2.0, 2.0, 0.0]), np.array([2.0, 1.0, 0.0, 2.0])  # norm 3 each, cos 4/9
    a, b = np.array([24.0, 1.0, 1.0, 1.0]), np.array([1.0, 24.0, 1.0, 1.0])  # cos 50/579
    r = np.random.default_rng(7)
    rows = [  # (e, q, g or None, hard, straight-through)
        ([1.0, 2.0, -0.5, 0.3], [1.2, 1.5, 0.1, 0.5], None, False, False),  # easy
        ([1.0, 1.0, 1.0, 1.0], [-1.0, 0.0, 0.0, 0.0], None, False, False),  # 1 + c = 1/2 exactly: easy
        ([1.0, 1.0, 1.0, 1.0], [-1.0, -0.0625, 0.0, 0.0], None, True, False),  # 1 + c < 1/2: wide angle
        ([1.0, -2.0, 0.5, 3.0], [-2.0, 4.0, -1.0, -6.0], None, True, False),  # exactly antipodal
        (tiny * u, low * w, None, True, False),  # e.e < lo
        (low * u, tiny * w, None, True, False),  # q.q < lo
        (huge * u, high * w, None, True, False),  # e.e > hi (it overflows)
        (high * u, huge * w, None, True, False),  # q.q > hi
        (a, b, [big / 16, 0.0, 0.0, 0.0], True, False),  # e.g overflows, q.g does not
        (b, a, [big / 16, 0.0, 0.0, 0.0], True, False),  # q.g overflows, e.g does not
        ([4.0, 2.0, 1.0, 2.0], eps / 8 * np.array([1.0, 0.0, 2.0, 2.0]), None, False, True),  # ||q|| <= eps ||e||
        (eps / 8 * np.array([1.0, 0.0, 2.0, 2.0]), [4.0, 2.0, 1.0, 2.0], None, False, True),  # ||e|| <= eps ||q||
        ([0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0], None, True, True),  # e = 0 (e.e < lo)
        ([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], None, True, True),  # q = 0
    ]
    e = np.array([np.asarray(row[0], np.float64) for row in rows]).astype(dtype)
    q = np.array([np.asarray(row[1], np.float64) for row in rows]).astype(dtype)
    g = np.array([r.standard_normal(4) if row[2] is None else row[2] for row in rows]).astype(dtype)
    assert np.all(np.isfinite(e)) and np.all(np.isfinite(q)) and np.all(np.isfinite(g))
    return e, q, g, np.array([row[3] for row in rows]), np.array([row[4] for row in rows])


def _spy_on_hard_rows(monkeypatch):
    """Record the mask the fused backward passes to ``where_rows`` (its hard rows)."""
    seen, real = [], B.where_rows

    def spy(mask, fn, arrays, default):
        seen.append(B.to_numpy(mask).reshape(-1).copy())
        return real(mask, fn, arrays, default)

    monkeypatch.setattr(B, "where_rows", spy)
    return seen


@pytest.mark.parametrize("block", [None, 3 * 4])
def test_rotation_fused_reaches_every_mask_and_equals_the_definition(bk, block, monkeypatch):
    if block is not None:
        monkeypatch.setattr(rotation, "_BLOCK_ELEMENTS", block)  # 3 rows per block, 5 blocks
    e_h, q_h, g_h, hard, straight = _rotation_branch_rows(np.dtype(bk.dtype_name))
    e, q, g = bk.asarray(e_h), bk.asarray(q_h), bk.asarray(g_h)
    _, cache = rotation_trick_forward(e, q)
    with np.errstate(over="ignore", invalid="ignore"):  # the rows built to overflow do
        want = bk.np(rotation_trick_backward(g, cache, fast=False)).astype(np.float64)  # the definition
        seen = _spy_on_hard_rows(monkeypatch)
        de = bk.np(rotation.rotation_trick_backward_fused(g, cache))
        default = bk.np(rotation_trick_backward(g, cache))
    assert len(seen) == 2
    np.testing.assert_array_equal(seen[0], hard)  # each row took the branch it was built for
    assert np.all(np.isfinite(de)) and np.all(np.isfinite(want))
    np.testing.assert_array_equal(de[straight], g_h[straight])  # straight-through rows: g itself
    np.testing.assert_array_equal(want[straight], g_h[straight].astype(np.float64))
    size = np.max(np.abs(want), axis=1, keepdims=True)  # rows 8, 9 are near the overflow threshold
    err = np.linalg.norm((de.astype(np.float64) - want) / size, axis=1) / np.linalg.norm(want / size, axis=1)
    assert np.all(err <= (1e-13 if bk.is64 else 1e-5)), err
    # the lambda of the under/overflow rows is far from 1, so a wrong mask would show in the value
    lam = bk.np(cache.scale)[:, 0]
    assert np.all((lam[4:8] > 1e3) | (lam[4:8] < 1e-3)) and not np.any(straight[4:8])
    np.testing.assert_array_equal(default, de)  # the default is the fast path


@pytest.mark.parametrize("eps", [None, 2.0**-10, 1e-3])
def test_rotation_eps_threshold_on_both_paths(bk, eps):
    # ||e|| = 10 and ||q|| = t (or the mirror), with t one ulp below, at, and one ulp above
    # eps * 10 as the dtype rounds it.  Both norms are exact (3-4-5 and a single entry), so
    # the documented test -- straight-through when ||q|| <= eps ||e|| or ||e|| <= eps ||q|| --
    # has one answer, and both paths must give it.
    dt = np.dtype(bk.dtype_name)
    e_eps = dt.type(np.finfo(dt).eps if eps is None else eps)  # eps in the dtype, as the op compares
    thr = e_eps * dt.type(10.0)  # eps ||e||, rounded as the op rounds it
    ts = [np.nextafter(thr, dt.type(0)), thr, np.nextafter(thr, dt.type(np.inf))]
    wide = np.array([6.0, 8.0, 0.0, 0.0, 0.0])  # norm 10
    rows_e, rows_q = [], []
    for t in ts:
        rows_e.append(wide), rows_q.append([0.0, 0.0, float(t), 0.0, 0.0])  # lambda = t / 10
        rows_e.append([0.0, 0.0, float(t), 0.0, 0.0]), rows_q.append(wide)  # lambda = 10 / t
    e_h, q_h = np.array(rows_e).astype(dt), np.array(rows_q).astype(dt)
    g_h = np.random.default_rng(3).standard_normal((6, 5)).astype(dt)
    _, cache = rotation_trick_forward(bk.asarray(e_h), bk.asarray(q_h), eps=eps)
    g = bk.asarray(g_h)
    # the oracle: e^ and q^ are orthogonal, so R^T q^ = e^, R^T e^ = -q^ and the rest is fixed
    E, Q, G = (a.astype(np.float64) for a in (e_h, q_h, g_h))
    eh = E / np.linalg.norm(E, axis=1, keepdims=True)
    qh = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    ge, gq = np.sum(eh * G, 1, keepdims=True), np.sum(qh * G, 1, keepdims=True)
    lam = np.linalg.norm(Q, axis=1, keepdims=True) / np.linalg.norm(E, axis=1, keepdims=True)
    rotated = lam * (G - eh * ge - qh * gq + eh * gq - qh * ge)
    straight = np.array([True, True, True, True, False, False])  # t <= eps ||e||: below and at
    for name, de in [
        ("definition", rotation_trick_backward(g, cache, fast=False)),
        ("fused", rotation.rotation_trick_backward_fused(g, cache)),
    ]:
        de = bk.np(de)
        np.testing.assert_array_equal(de[straight], g_h[straight], err_msg=name)
        np.testing.assert_allclose(de[~straight], rotated[~straight], rtol=bk.rtol, err_msg=name)
        assert np.all(np.abs(de[~straight]).max(axis=1) != np.abs(g_h[~straight]).max(axis=1)), name


def test_rotation_cache_properties_match_rotation_basis(rng):
    e, q = rng.standard_normal((6, 5)), rng.standard_normal((6, 5))
    _, cache = rotation_trick_forward(e, q)
    basis = rotation_basis(e, q)
    for got, want in zip(cache.basis, basis):
        np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(cache.scale[:, 0], np.linalg.norm(q, axis=1) / np.linalg.norm(e, axis=1), rtol=1e-14)


@settings(max_examples=40, deadline=None)
@given(
    N=st.integers(1, 12),
    D=st.integers(2, 9),
    seed=st.integers(0, 2**31),
    cos=st.floats(-1.0, 1.0),
    log_ratio=st.floats(-5, 5),
)
def test_rotation_backward_property_any_angle(N, D, seed, cos, log_ratio):
    # every angle, including the plane-form rows (1 + cos < 1/2), in float64
    rng = np.random.default_rng(seed)
    eh = rng.standard_normal((N, D))
    eh /= np.linalg.norm(eh, axis=1, keepdims=True)
    u = rng.standard_normal((N, D))
    u -= np.sum(u * eh, axis=1, keepdims=True) * eh
    u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-300)
    qh = cos * eh + np.sqrt(max(0.0, 1 - cos * cos)) * u
    e, q = 3.0 * eh, np.exp(log_ratio) * qh
    g = rng.standard_normal((N, D))
    _, cache = rotation_trick_forward(e, q)
    de = rotation_trick_backward(g, cache)  # the fast path, chosen by default
    want = rotation_trick_backward(g, cache, fast=False)
    assert np.all(np.linalg.norm(de - want, axis=1) <= 1e-10 * np.linalg.norm(want, axis=1) + 1e-300)


# --------------------------------------------------------------------------------------------
# python -m benchmarks.bench --quick: the harness runs and writes its report (no timing is asserted)
# --------------------------------------------------------------------------------------------


def test_bench_quick_writes_the_report(tmp_path, capsys):
    pytest.importorskip("threadpoolctl")
    from benchmarks import bench  # the harness lives in the repository, not the package

    assert bench.main(["--quick", "--reps", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    md = (tmp_path / "bench.md").read_text()
    assert report["quick"] is True
    assert [r["name"] for r in report["rows"]] == list(bench.BENCHMARKS)
    for row in report["rows"]:
        assert row["targets"], row["name"]
        for t in row["targets"]:
            assert t["met"] in (True, False, None) and t["shown"]
        for name, s in row["times"].items():
            assert s["min"] <= s["median"] <= s["max"] and len(s["runs"]) >= 1, (row["name"], name)
        if row["name"] != "scaling":
            assert "floor" in row["times"] and "vqref/floor" in row["ratios"]
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["threads"] >= 1 and "numpy" in machine["versions"]
    assert "## Targets" in md and "| vq-ste |" in md and "## Scaling" in md
    assert "vq-ste" in capsys.readouterr().out


def test_bench_rejects_unknown_names(capsys):
    from benchmarks import bench  # the harness lives in the repository, not the package

    with pytest.raises(SystemExit) as exc:
        bench.main(["--only", "nope"])
    assert exc.value.code == 2
    assert "unknown benchmark" in capsys.readouterr().err


def test_rows_per_block(bk):
    x = bk.asarray(np.zeros((1000, 8)))
    got = B.rows_per_block(x, 64)
    assert got == (1000 if bk.name == "cupy" else 8)  # a GPU takes every row at once
    assert B.rows_per_block(bk.asarray(np.zeros((5, 100))), 10) == (5 if bk.name == "cupy" else 1)
