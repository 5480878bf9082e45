"""The fused numpy k-means (vqref.core.kmeans_fast.lloyd_fused) pinned to its definition.

:func:`vqref.core.kmeans.lloyd` is the definition; :func:`lloyd_fused` must give the same
assignments and, to rounding, the same means and objective on every branch: Euclidean and
cosine, float32 and float64, blocks that do not divide N (the tail block), one-row blocks,
empty clusters, fewer rows than clusters, no rows at all, several ranks (one of them empty),
and the path without scipy.  The first assignment of a call is bit-identical (the same matrix
products on the same blocks); later ones are identical on data with an assignment margin.
Independent oracles (float64, direct differences) check what both compute.
"""

from __future__ import annotations

import numpy as np
import pytest

import vqref.core.kmeans as kmeans_module
import vqref.core.kmeans_fast as fast_module
from vqref import threads
from vqref.core.kmeans import kmeans, kmeans_inertia, lloyd
from vqref.core.kmeans_fast import inertia_fused, lloyd_fused
from vqref.distributed import SingleProcess, run_in_threads

DTYPES = [np.float64, np.float32]


def _tol(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-6, atol=2e-6)


def blobs(rng, N, K, D, *, scale=3.0, spread=0.2, offset=0.0):
    """N points around K well separated centres (float64), and the centres."""
    centres = offset + scale * rng.standard_normal((K, D))
    labels = np.arange(N) % K
    rng.shuffle(labels)
    return centres[labels] + spread * rng.standard_normal((N, D)), centres


def both(x, means, iters, **kw):
    """(definition, fused) results of the same iterations, one process."""
    ref = lloyd(x, means, iters, comm=SingleProcess(), **kw)
    got = lloyd_fused(x, means, iters, comm=SingleProcess(), **kw)
    return ref, got


def centred_scale(x, init):
    """sum_i ||x_i - m||^2 for the centre m of the initial means: the size of the terms whose
    cancellation the expanded distances round (each row's error is a few ulps of its term)."""
    x, init = np.asarray(x, np.float64), np.asarray(init, np.float64)
    return float(np.sum((x - init.mean(axis=0)) ** 2))


def assert_same(ref, got, dtype, *, objective_scale=1.0):
    (m_ref, c_ref, o_ref), (m_got, c_got, o_got) = ref, got
    assert m_got.dtype == m_ref.dtype == dtype and o_got.dtype == o_ref.dtype == dtype
    assert c_got.dtype == np.int64 and m_got.shape == m_ref.shape and o_got.shape == o_ref.shape
    np.testing.assert_array_equal(c_got, c_ref)
    np.testing.assert_allclose(m_got, m_ref, **_tol(dtype))
    tol = _tol(dtype)
    atol = 16 * np.finfo(dtype).eps * objective_scale  # a few ulps of every row's terms
    np.testing.assert_allclose(o_got, o_ref, rtol=tol["rtol"] * 10, atol=atol)


def oracle_means(x, means, iters):
    """Lloyd in float64 with direct differences: the means after ``iters`` steps."""
    x = np.asarray(x, np.float64)
    m = np.asarray(means, np.float64).copy()
    for _ in range(iters):
        a = np.argmin(((x[:, None, :] - m[None]) ** 2).sum(-1), axis=1)
        for k in range(m.shape[0]):
            if np.any(a == k):
                m[k] = x[a == k].mean(axis=0)
    return m


# --------------------------------------------------------------------------------------------
# The fused path against the definition
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("chunk", [None, 1, 7, 64, 500])  # 500 > N: one short block
def test_fused_equals_definition_on_separated_blobs(rng, dtype, cosine, chunk):
    N, K, D = 203, 9, 6  # 203 = 29 * 7: chunk 7 divides N, 64 leaves a tail of 11
    x, centres = blobs(rng, N, K, D)
    x = x.astype(dtype)
    init = x[rng.choice(N, K, replace=False)]
    if cosine:  # lloyd takes the rows and means already on the sphere, as kmeans() passes them
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)
        init = (init / np.linalg.norm(init, axis=1, keepdims=True)).astype(dtype)
    ref, got = both(x, init, 6, use_cosine_sim=cosine, chunk_size=chunk)
    assert_same(ref, got, dtype, objective_scale=centred_scale(x, init))
    if not cosine:
        np.testing.assert_allclose(got[0], oracle_means(x, init, 6), **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [None, 13])
def test_first_assignment_is_bit_identical_on_unclustered_data(rng, dtype, chunk):
    """One iteration from the same means: the same products on the same blocks, so the same ids."""
    N, K, D = 517, 37, 11
    x = rng.standard_normal((N, D)).astype(dtype)  # no margin: near-ties everywhere
    init = x[rng.choice(N, K, replace=False)]
    ref, got = both(x, init, 1, chunk_size=chunk)
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_allclose(got[0], ref[0], **_tol(dtype))
    ids = kmeans_module.nearest_code(x, init, chunk_size=chunk)
    np.testing.assert_array_equal(got[1], np.bincount(ids, minlength=K))


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_cluster_keeps_its_mean_bit_exactly(rng, dtype):
    """A duplicated initial mean loses every tie: its cluster stays empty and does not move."""
    N, K, D = 120, 6, 5
    x, _ = blobs(rng, N, K, D)
    x = x.astype(dtype)
    init = x[rng.choice(N, K, replace=False)].copy()
    init[4] = init[1]  # cluster 4 ties with cluster 1 and loses (ties go to the lower index)
    far = np.full((D,), 1e3, dtype=dtype)
    init[5] = far  # cluster 5 is far from every row: empty from the start
    first = lloyd_fused(x, init, 1, comm=SingleProcess())
    assert first[1][4] == 0 and first[1][5] == 0 and first[1][1] > 0
    np.testing.assert_array_equal(first[0][4], init[4])  # bit-exact: no 0/0, no rounding
    ref, got = both(x, init, 4)  # later, cluster 1 moves away and cluster 4 may win rows
    assert got[1][5] == 0
    np.testing.assert_array_equal(got[0][5], far)
    assert_same(ref, got, dtype, objective_scale=centred_scale(x, init))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cosine", [False, True])
def test_fewer_rows_than_clusters(dtype, cosine):
    x = np.array([[0.0, 1.0, 2.0], [3.0, -1.0, 0.5], [-2.0, 0.0, 1.0]], dtype=dtype)  # N=3 < K=5
    for seed in range(3):
        a = kmeans(x, 5, 3, rng=seed, use_cosine_sim=cosine)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(kmeans_module, "lloyd_fused", kmeans_module.lloyd)  # the definition, same draws
            b = kmeans(x, 5, 3, rng=seed, use_cosine_sim=cosine)
        np.testing.assert_array_equal(a.counts, b.counts)
        np.testing.assert_allclose(a.means, b.means, **_tol(dtype))
        np.testing.assert_allclose(a.inertia, b.inertia, rtol=1e-5, atol=1e-5)
        assert np.all(np.isfinite(a.means)) and a.counts.sum() == 3
        if not cosine:  # every row is its own cluster: the objective is 0 up to rounding
            assert 0.0 <= a.inertia[-1] < 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_rows(dtype):
    init = np.arange(12, dtype=dtype).reshape(4, 3)
    m, c, o = lloyd_fused(np.zeros((0, 3), dtype), init, 2, comm=SingleProcess())
    np.testing.assert_array_equal(m, init)
    np.testing.assert_array_equal(c, np.zeros(4, np.int64))
    np.testing.assert_array_equal(o, np.zeros(2, dtype))
    assert m.dtype == o.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cosine", [False, True])
def test_degenerate_data_gives_no_nan(dtype, cosine):
    """Identical rows (zero rows in the cosine variant), duplicate means, antipodal pairs."""
    for x in (np.zeros((10, 4), dtype), np.ones((10, 4), dtype), np.array([[1, 0], [-1, 0]] * 3, dtype)):
        res = kmeans(x, 3, 3, rng=0, use_cosine_sim=cosine)
        assert np.all(np.isfinite(res.means)) and np.all(np.isfinite(res.inertia))
        assert res.counts.sum() == x.shape[0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_offset_keeps_precision(rng, dtype):
    """Features ~1e3 with a spread ~1e-2: the assignment and the means stay right in float32."""
    N, K, D = 400, 5, 4
    centres = 1e3 + 0.1 * rng.standard_normal((K, D))
    labels = np.arange(N) % K
    x = (centres[labels] + 1e-2 * rng.standard_normal((N, D))).astype(dtype)
    init = x[:K]  # one row of every cluster
    m, c, o = lloyd_fused(x, init, 3, comm=SingleProcess())
    np.testing.assert_array_equal(c, np.bincount(labels, minlength=K))
    exact = np.stack([x[labels == k].astype(np.longdouble).mean(axis=0) for k in range(K)])
    ulp = np.spacing(np.asarray(1e3, dtype))
    assert np.max(np.abs(m - exact)) <= 1.5 * ulp  # within 1.5 ulps of the exact mean
    spread = sum(np.sum((x[labels == k].astype(np.float64) - exact[k]) ** 2) for k in range(K))
    np.testing.assert_allclose(o[-1], spread, rtol=0.05 if dtype == np.float32 else 1e-8)


def test_float32_means_are_the_correctly_rounded_exact_means(rng):
    """Deviations exact in float64 and summed there: each mean is the exact mean, rounded once.

    (The definition's float32 pairwise sums are within a few ulps; here every entry must be
    exactly the float32 nearest to the mean of the assigned rows.)
    """
    N, K, D = 3000, 13, 6
    x = rng.standard_normal((N, D)).astype(np.float32)
    init = x[:K].copy()
    for workers in (1, 2):
        m, c, _ = lloyd_fused(x, init, 1, comm=SingleProcess(), workers=workers, chunk_size=700)
        ids = kmeans_module.nearest_code(x, init)  # the first assignment, bit-identical
        np.testing.assert_array_equal(c, np.bincount(ids, minlength=K))
        exact = np.stack([x[ids == k].astype(np.longdouble).mean(axis=0) for k in range(K)])
        np.testing.assert_array_equal(m, exact.astype(np.float32))


@pytest.mark.parametrize("seed", range(6))
def test_objective_is_never_negative(seed):
    """Every row on its own mean, far from the origin: the exact objective is 0 and the expanded
    scores cancel to about -u ||x||^2, so the sum must be clamped (as the definition clamps rows)."""
    x = (100 + np.random.default_rng(seed).standard_normal((6, 5))).astype(np.float32)
    _, c, o = lloyd_fused(x, x.copy(), 2, comm=SingleProcess(), workers=1)
    assert np.all(o >= 0) and np.all(o < 1e-2) and np.all(c == 1)


def test_cosine_empty_cluster_keeps_its_mean_without_renormalising(rng):
    """An initial mean shorter than l2norm's eps is scaled by 1/eps, not made unit (kmeans does
    that once); an empty cluster must keep it, not re-normalise it every iteration."""
    N, K, D = 60, 4, 3
    x = np.abs(rng.standard_normal((N, D)))  # the positive octant
    init = np.abs(rng.standard_normal((K, D)))
    init[3] = -1e-7 * np.ones(D)  # opposite the data, norm ~1.7e-7 < eps = 1e-6
    a = kmeans(x, K, 3, init_means=init, use_cosine_sim=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kmeans_module, "lloyd_fused", kmeans_module.lloyd)
        b = kmeans(x, K, 3, init_means=init, use_cosine_sim=True)
    assert a.counts[3] == 0 and b.counts[3] == 0
    start = init[3] / 1e-6  # what kmeans' l2norm made of it: norm ~0.17
    np.testing.assert_allclose(a.means[3], start, rtol=1e-12)
    np.testing.assert_array_equal(a.means[3], b.means[3])
    np.testing.assert_allclose(a.means, b.means, rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_objective_is_that_of_each_assignment(rng, dtype):
    N, K, D = 150, 7, 4
    x, _ = blobs(rng, N, K, D, spread=1.0)
    x = x.astype(dtype)
    init = x[rng.choice(N, K, replace=False)]
    for t in (1, 2, 3):
        m_prev, _, _ = lloyd_fused(x, init, t - 1, comm=SingleProcess()) if t > 1 else (init, None, None)
        _, _, o = lloyd_fused(x, init, t, comm=SingleProcess())
        expect = float(kmeans_inertia(x.astype(np.float64), m_prev.astype(np.float64)))
        np.testing.assert_allclose(o[-1], expect, rtol=1e-10 if dtype == np.float64 else 1e-5)


def test_inputs_are_not_modified(rng):
    x = rng.standard_normal((50, 3)).astype(np.float32)
    init = x[:4].copy()
    x0, i0 = x.copy(), init.copy()
    lloyd_fused(x, init, 3, comm=SingleProcess(), chunk_size=8)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(init, i0)


# --------------------------------------------------------------------------------------------
# Branches: without scipy, several ranks, the choice in kmeans()
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("workers", [1, 2])
def test_without_scipy_equals_with_scipy(rng, dtype, cosine, workers, monkeypatch):
    N, K, D = 181, 8, 5
    x, _ = blobs(rng, N, K, D)
    x = x.astype(dtype)
    if cosine:
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)
    init = x[rng.choice(N, K, replace=False)].copy()
    init[3] = init[2]  # an empty cluster on both paths
    kw = dict(use_cosine_sim=cosine, chunk_size=50, comm=SingleProcess(), workers=workers)
    with_scipy = lloyd_fused(x, init, 4, **kw)
    monkeypatch.setattr(fast_module, "_sparse", None)
    without = lloyd_fused(x, init, 4, **kw)
    np.testing.assert_array_equal(without[1], with_scipy[1])
    np.testing.assert_allclose(without[0], with_scipy[0], **_tol(dtype))
    np.testing.assert_array_equal(without[2][0], with_scipy[2][0])  # the first one uses no sums
    np.testing.assert_allclose(without[2], with_scipy[2], rtol=1e-5 if dtype == np.float32 else 1e-12)
    ref = lloyd(x, init, 4, use_cosine_sim=cosine, chunk_size=50, comm=SingleProcess())
    assert_same(ref, without, dtype, objective_scale=centred_scale(x, init))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cosine", [False, True])
def test_ranks_equal_one_process(rng, dtype, cosine):
    """Three ranks (rows 0-69, none, 70-160) reach the one-process result: the sums are all-reduced."""
    N, K, D = 161, 6, 4
    x, _ = blobs(rng, N, K, D)
    x = x.astype(dtype)
    init = x[rng.choice(N, K, replace=False)]
    parts = [x[:70], x[70:70], x[70:]]
    one = kmeans(x, K, 4, init_means=init, use_cosine_sim=cosine, chunk_size=32)
    ranks = run_in_threads(
        lambda c: kmeans(parts[c.rank], K, 4, init_means=init, use_cosine_sim=cosine, chunk_size=32, comm=c), 3
    )
    for r in ranks:
        np.testing.assert_array_equal(r.counts, one.counts)
        np.testing.assert_allclose(r.means, one.means, **_tol(dtype))
        np.testing.assert_allclose(r.inertia, one.inertia, rtol=1e-5 if dtype == np.float32 else 1e-12)
        np.testing.assert_array_equal(r.means, ranks[0].means)  # bit-identical on every rank


def test_kmeans_chooses_the_fused_path_on_numpy_only(rng, monkeypatch):
    import array_api_strict as xps

    calls = []

    def spy(name, fn):
        def wrapped(*a, **k):
            calls.append(name)
            return fn(*a, **k)

        return wrapped

    monkeypatch.setattr(kmeans_module, "lloyd_fused", spy("fused", lloyd_fused))
    monkeypatch.setattr(kmeans_module, "lloyd", spy("definition", lloyd))
    x = rng.standard_normal((40, 3))
    a = kmeans(x, 4, 2, rng=1)
    b = kmeans(xps.asarray(x), 4, 2, rng=1)
    assert calls == ["fused", "definition"]
    np.testing.assert_array_equal(a.counts, np.asarray(b.counts))
    np.testing.assert_allclose(a.means, np.asarray(b.means), rtol=1e-12)


# --------------------------------------------------------------------------------------------
# Worker threads and the BLAS limit
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("workers, chunk", [(2, None), (2, 16), (3, 5), (8, 1000)])
def test_workers_equal_one_worker(rng, dtype, cosine, workers, chunk):
    """Rows split between W threads (ranges that do not divide into blocks) give W = 1's result."""
    N, K, D = 131, 7, 5
    x, _ = blobs(rng, N, K, D)
    x = x.astype(dtype)
    if cosine:
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)
    init = x[rng.choice(N, K, replace=False)]
    one = lloyd_fused(x, init, 5, use_cosine_sim=cosine, chunk_size=chunk, comm=SingleProcess(), workers=1)
    many = lloyd_fused(x, init, 5, use_cosine_sim=cosine, chunk_size=chunk, comm=SingleProcess(), workers=workers)
    np.testing.assert_array_equal(many[1], one[1])
    np.testing.assert_allclose(many[0], one[0], **_tol(dtype))
    np.testing.assert_allclose(many[2], one[2], rtol=1e-5 if dtype == np.float32 else 1e-12)
    if dtype == np.float32:  # float64 sums of exact float32 deviations: order does not matter
        np.testing.assert_array_equal(many[0], one[0])


def _blas_threads_now():
    """numpy's BLAS threads (another library's OpenMP-built BLAS may report its OpenMP count)."""
    from threadpoolctl import threadpool_info

    return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas" and "numpy" in p["filepath"]]


def test_workers_run_with_one_blas_thread_and_restore_it(rng, monkeypatch):
    from threadpoolctl import threadpool_limits

    seen = []
    inner = fast_module._assign_and_sum

    def spy(*a, **k):
        seen.append(_blas_threads_now())
        return inner(*a, **k)

    monkeypatch.setattr(fast_module, "_assign_and_sum", spy)
    x = rng.standard_normal((90, 4))
    with threadpool_limits(2, user_api="blas"):
        before = _blas_threads_now()
        assert fast_module._blas_threads(fast_module.controller()) == 2  # W follows the BLAS
        lloyd_fused(x, x[:5], 2, comm=SingleProcess(), chunk_size=30)  # 90 rows: blocks for 3 workers
        assert _blas_threads_now() == before
    assert len(seen) == 4 and all(all(n == 1 for n in s) for s in seen)  # 2 iterations x 2 workers
    assert not fast_module._BLAS_LOCK.locked()


def test_a_failing_worker_releases_the_limit_and_the_lock(rng, monkeypatch):
    from threadpoolctl import threadpool_limits

    def boom(*a, **k):
        raise RuntimeError("worker failed")

    monkeypatch.setattr(fast_module, "_assign_and_sum", boom)
    x = rng.standard_normal((40, 3))
    with threadpool_limits(2, user_api="blas"):
        with pytest.raises(RuntimeError, match="worker failed"):
            lloyd_fused(x, x[:4], 2, comm=SingleProcess(), workers=2)
        assert _blas_threads_now() and all(n == 2 for n in _blas_threads_now())
    assert not fast_module._BLAS_LOCK.locked()


def test_without_threadpoolctl_one_worker(rng, monkeypatch):
    monkeypatch.setattr(threads, "ThreadpoolController", None)
    assert fast_module.controller() is None and fast_module._blas_threads(None) == 1
    calls = []
    monkeypatch.setattr(fast_module, "worker_pool", lambda *a, **k: calls.append(a))
    x = rng.standard_normal((60, 3))
    m, c, _ = lloyd_fused(x, x[:4], 3, comm=SingleProcess())
    assert calls == [] and c.sum() == 60  # no pool was made
    ref = lloyd(x, x[:4], 3, comm=SingleProcess())
    np.testing.assert_array_equal(c, ref[1])
    np.testing.assert_allclose(m, ref[0], rtol=1e-12)


def test_ranks_with_worker_threads(rng):
    """Two ranks (threads) each with two workers: the BLAS lock serialises them, no deadlock."""
    N, K, D = 150, 5, 3
    x, _ = blobs(rng, N, K, D)
    init = x[:K]
    one = lloyd_fused(x, init, 3, comm=SingleProcess(), workers=2)
    parts = [x[:80], x[80:]]
    ranks = run_in_threads(lambda c: lloyd_fused(parts[c.rank], init, 3, comm=c, workers=2), 2)
    for m, c, o in ranks:
        np.testing.assert_array_equal(c, one[1])
        np.testing.assert_allclose(m, one[0], rtol=1e-12)
        np.testing.assert_allclose(o, one[2], rtol=1e-12)


def test_default_workers_get_a_block_each(rng, monkeypatch):
    """Without ``workers``, W is the BLAS threads, but no more than there are blocks of rows."""
    made = []
    real = fast_module.worker_pool
    monkeypatch.setattr(fast_module, "worker_pool", lambda W: made.append(W) or real(W))
    monkeypatch.setattr(fast_module, "_blas_threads", lambda controller: 3)
    x = rng.standard_normal((100, 3))
    for chunk, expect in ((40, [3]), (50, [2]), (100, []), (None, [])):  # [] : one worker, no pool
        made.clear()
        lloyd_fused(x, x[:4], 1, comm=SingleProcess(), chunk_size=chunk)
        assert made == expect, chunk


def test_block_rows():
    assert fast_module.block_rows(256) == 2048
    assert fast_module.block_rows(1) == 8192  # capped
    assert fast_module.block_rows(1 << 20) == 256  # at least a few hundred rows


# --------------------------------------------------------------------------------------------
# The objective of given means: inertia_fused against the definition
# --------------------------------------------------------------------------------------------


def oracle_inertia(x, means, cosine=False):
    x, means = np.asarray(x, np.float64), np.asarray(means, np.float64)
    if cosine:
        u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)
        v = means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-6)
        return -float(np.max(u @ v.T, axis=1).sum())
    return float((((x[:, None, :] - means[None]) ** 2).sum(-1)).min(axis=1).sum())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("workers, chunk", [(1, None), (1, 17), (2, None), (3, 10)])
def test_inertia_fused_equals_definition(rng, dtype, cosine, workers, chunk):
    N, K, D = 157, 9, 6
    x = (3 + rng.standard_normal((N, D))).astype(dtype)  # not centred: the norms matter
    means = (3 + rng.standard_normal((K, D))).astype(dtype)
    got = inertia_fused(x, means, cosine, chunk_size=chunk, workers=workers)
    ref = kmeans_module.inertia(x, means, cosine, chunk_size=chunk)
    assert got.shape == () and got.dtype == ref.dtype == dtype
    rtol = 1e-5 if dtype == np.float32 else 1e-11
    np.testing.assert_allclose(got, ref, rtol=rtol)
    np.testing.assert_allclose(got, oracle_inertia(x, means, cosine), rtol=rtol)


@pytest.mark.parametrize("seed", range(4))
def test_inertia_fused_is_clamped_and_handles_no_rows(seed):
    x = (100 + np.random.default_rng(seed).standard_normal((6, 5))).astype(np.float32)
    assert 0 <= float(inertia_fused(x, x.copy(), workers=1)) < 1e-2  # every row on a mean
    assert float(inertia_fused(x[:0], x)) == 0.0
    assert float(inertia_fused(x[:0], x, True)) == 0.0


def test_kmeans_inertia_chooses_the_fused_path_for_one_numpy_dtype(rng, monkeypatch):
    import array_api_strict as xps

    calls = []
    monkeypatch.setattr(kmeans_module, "inertia_fused", lambda *a, **k: calls.append("fused") or 0.0)
    monkeypatch.setattr(kmeans_module, "inertia", lambda *a, **k: calls.append("definition") or 0.0)
    x = rng.standard_normal((20, 3))
    kmeans_inertia(x, x[:4])
    kmeans_inertia(x.astype(np.float32), x[:4])  # two dtypes: the definition casts
    kmeans_inertia(xps.asarray(x), xps.asarray(x[:4]))
    assert calls == ["fused", "definition", "definition"]
