"""Tests of Lloyd's k-means (vqref.core.kmeans): the invariants of docs/math.md §3.5.

The oracles are written here in plain numpy float64 with direct differences (no expansion, no
centring): brute-force assignment, objective, cluster means.  External references:
scikit-learn's ``KMeans(algorithm="lloyd")`` and vector-quantize-pytorch's ``kmeans``, both
given the same initial means.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vqref import backend as B
from vqref.core.kmeans import KMeansResult, assign, kmeans, kmeans_inertia, sample_initial_means

# --------------------------------------------------------------------------------------------
# Data and float64 oracles
# --------------------------------------------------------------------------------------------


def blobs(rng, N, K, D, *, scale=3.0, spread=0.3, offset=0.0):
    """N points around K random centres: host float64 ``x (N, D)``, centres, labels."""
    centres = offset + scale * rng.standard_normal((K, D))
    labels = rng.integers(0, K, size=N)
    x = centres[labels] + spread * rng.standard_normal((N, D))
    return x, centres, labels


def unit(a):
    n = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.maximum(n, 1e-6)


def oracle_assign(x, means, cosine=False):
    x = np.asarray(x, dtype=np.float64)
    means = np.asarray(means, dtype=np.float64)
    if cosine:
        return np.argmax(unit(x) @ unit(means).T, axis=1)
    d = ((x[:, None, :] - means[None, :, :]) ** 2).sum(-1)  # (N, K) direct differences
    return np.argmin(d, axis=1)


def oracle_objective(x, means, cosine=False):
    x = np.asarray(x, dtype=np.float64)
    means = np.asarray(means, dtype=np.float64)
    if cosine:
        return -float(np.max(unit(x) @ unit(means).T, axis=1).sum())
    d = ((x[:, None, :] - means[None, :, :]) ** 2).sum(-1)
    return float(d.min(axis=1).sum())


def sampled_rows(seed, N, K):
    """The row numbers the documented sampling contract draws for ``seed``."""
    g = np.random.default_rng(seed)
    return g.choice(N, size=K, replace=False) if N >= K else g.integers(0, N, size=K)


def assert_non_increasing(values, rtol):
    v = np.asarray(values, dtype=np.float64)
    slack = rtol * np.maximum(np.abs(v[:-1]), 1.0)
    assert np.all(v[1:] <= v[:-1] + slack), v


def run(bk, x, K, iters, **kw):
    if "init_means" in kw and isinstance(kw["init_means"], np.ndarray):
        kw["init_means"] = bk.asarray(kw["init_means"])
    return kmeans(bk.asarray(x), K, iters, **kw)


def obj_rtol(bk):
    return 1e-10 if bk.is64 else 1e-5


# --------------------------------------------------------------------------------------------
# Types, shapes and argument checks
# --------------------------------------------------------------------------------------------


def test_result_types(bk, rng):
    x, _, _ = blobs(rng, 70, 6, 4)
    res = run(bk, x, 6, 5, rng=0)
    assert isinstance(res, KMeansResult)
    assert B.library_name(res.means) == bk.name and B.library_name(res.counts) == bk.name
    assert res.means.dtype == bk.dtype and tuple(res.means.shape) == (6, 4)
    assert res.counts.dtype == bk.xp.int64 and tuple(res.counts.shape) == (6,)
    assert len(res.inertia) == 5 and all(isinstance(v, float) for v in res.inertia)
    inertia = kmeans_inertia(bk.asarray(x), res.means)
    assert inertia.dtype == bk.dtype and inertia.ndim == 0


def test_argument_checks(rng):
    x = rng.standard_normal((20, 3))
    with pytest.raises(ValueError):
        kmeans(x, 4, 0, rng=0)
    with pytest.raises(ValueError):
        kmeans(x, 0, 3, rng=0)
    with pytest.raises(ValueError):
        kmeans(x, 4, 3, init_means=np.zeros((5, 3)))
    with pytest.raises(ValueError):
        kmeans(np.zeros((0, 3)), 4, 3, rng=0)
    with pytest.raises(ValueError):
        kmeans(x[0], 4, 3, rng=0)
    # An empty batch is fine when the means are given: nothing moves, every count is zero.
    init = rng.standard_normal((4, 3))
    res = kmeans(np.zeros((0, 3)), 4, 3, init_means=init)
    assert np.array_equal(res.means, init) and np.array_equal(res.counts, np.zeros(4, np.int64))


def test_input_not_modified(bk, rng):
    x, _, _ = blobs(rng, 50, 4, 3)
    init = x[[1, 5, 9, 20]] + 0.01
    xa, ia = bk.asarray(x), bk.asarray(init)
    x0, i0 = bk.np(xa).copy(), bk.np(ia).copy()
    kmeans(xa, 4, 5, init_means=ia, use_cosine_sim=True)
    kmeans(xa, 4, 5, init_means=ia)
    assert np.array_equal(bk.np(xa), x0) and np.array_equal(bk.np(ia), i0)


# --------------------------------------------------------------------------------------------
# Sampling of the initial means
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N, K", [(40, 7), (7, 7), (5, 9)])
def test_initial_means_are_sampled_rows(bk, rng, N, K):
    x = rng.standard_normal((N, 3))
    means = sample_initial_means(bk.asarray(x), K, 123)
    rows = sampled_rows(123, N, K)
    assert np.array_equal(bk.np(means), bk.np(bk.asarray(x))[rows])
    if N >= K:
        assert len(set(rows.tolist())) == K  # without replacement


# --------------------------------------------------------------------------------------------
# Objective and counts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cosine", [False, True], ids=["euclidean", "cosine"])
def test_objective_non_increasing(bk, rng, cosine):
    # Overlapping blobs, so the means keep moving for several iterations.
    N, K, D, T = 150, 7, 4, 8
    x, _, _ = blobs(rng, N, K, D, scale=1.0, spread=0.8)
    res = run(bk, x, K, T, rng=5, use_cosine_sim=cosine)
    hist = np.asarray(res.inertia)
    assert_non_increasing(hist, obj_rtol(bk))
    assert hist[-1] < hist[0]  # the iterations did something
    # inertia[t] is the objective of the means entering iteration t; recompute those means
    # with shorter runs (same seed) and evaluate the objective with the float64 oracle.
    xb = bk.np(bk.asarray(x))
    entering = [xb[sampled_rows(5, N, K)]] + [
        bk.np(run(bk, x, K, t, rng=5, use_cosine_sim=cosine).means) for t in range(1, T)
    ]
    expected = [oracle_objective(xb, m, cosine) for m in entering]
    np.testing.assert_allclose(hist, expected, rtol=obj_rtol(bk) * 10, atol=1e-9)
    # The objective of the returned means continues the sequence.
    final = float(bk.np(kmeans_inertia(bk.asarray(x), res.means, cosine)))
    np.testing.assert_allclose(final, oracle_objective(xb, bk.np(res.means), cosine), rtol=obj_rtol(bk) * 10)
    assert final <= hist[-1] + obj_rtol(bk) * abs(hist[-1])


@pytest.mark.parametrize("cosine", [False, True], ids=["euclidean", "cosine"])
def test_counts_come_from_the_last_assignment(bk, rng, cosine):
    N, K, D, T = 120, 5, 3, 4
    x, _, _ = blobs(rng, N, K, D, scale=1.0, spread=0.8)
    res = run(bk, x, K, T, rng=9, use_cosine_sim=cosine)
    counts = bk.np(res.counts)
    assert counts.sum() == N
    # The last assignment was made with the means from before the last update (vqp, EnCodec).
    before = bk.np(run(bk, x, K, T - 1, rng=9, use_cosine_sim=cosine).means)
    assert np.array_equal(counts, np.bincount(oracle_assign(x, before, cosine), minlength=K))
    # ... which, before convergence, differs from an assignment with the returned means.
    after = np.bincount(oracle_assign(x, bk.np(res.means), cosine), minlength=K)
    assert not np.array_equal(counts, after)


def test_fixed_point_means_are_cluster_means(bk, rng):
    N, K, D = 240, 6, 5
    x, _, _ = blobs(rng, N, K, D)
    res = run(bk, x, K, 40, rng=2)
    means = bk.np(res.means).astype(np.float64)
    xb = bk.np(bk.asarray(x)).astype(np.float64)  # the data the backend actually saw
    a = oracle_assign(xb, means)
    counts = np.bincount(a, minlength=K)
    assert np.array_equal(bk.np(res.counts), counts)  # converged: the last assignment is stable
    assert np.all(counts > 0)
    for k in range(K):
        np.testing.assert_allclose(means[k], xb[a == k].mean(axis=0), rtol=0, atol=1e-12 if bk.is64 else 2e-6)


def test_more_clusters_than_rows(bk, rng):
    N, K, D = 5, 9, 3
    x = 10.0 * rng.standard_normal((N, D))  # far-apart points
    init = bk.np(bk.asarray(x))[sampled_rows(4, N, K)]  # with replacement: duplicates
    for iters in (1, 10):
        res = run(bk, x, K, iters, rng=4)
        means, counts = bk.np(res.means), bk.np(res.counts)
        assert np.all(np.isfinite(means)) and counts.sum() == N
        empty = counts == 0
        assert empty.sum() >= K - N
        assert np.array_equal(means[empty], init[empty])  # bit-exact: they never moved


@pytest.mark.parametrize("cosine", [False, True], ids=["euclidean", "cosine"])
def test_duplicates_and_zero_rows_give_no_nan(bk, rng, cosine):
    base = rng.standard_normal((6, 4))
    x = np.concatenate([base, base, base[:2], np.zeros((3, 4))])  # duplicates and zero rows
    x = x[rng.permutation(len(x))]
    for K in (3, 10, 25):  # K < N, K ~ N, K > N
        res = run(bk, x, K, 6, rng=K, use_cosine_sim=cosine)
        means = bk.np(res.means)
        assert np.all(np.isfinite(means)) and bk.np(res.counts).sum() == len(x)
        assert np.all(np.isfinite(res.inertia))
        if cosine:
            norms = np.linalg.norm(means, axis=1)
            assert np.all((np.abs(norms - 1) < 1e-5) | (norms == 0))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    N=st.integers(1, 30),
    K=st.integers(1, 12),
    D=st.integers(1, 5),
    cosine=st.booleans(),
    grid=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_counts_objective_no_nan(bk, N, K, D, cosine, grid, seed):
    r = np.random.default_rng(seed)
    # grid=True draws from {-1, 0, 1}: many duplicates and zero rows.
    x = r.integers(-1, 2, size=(N, D)).astype(np.float64) if grid else r.standard_normal((N, D))
    res = run(bk, x, K, 5, rng=seed, use_cosine_sim=cosine)
    means, counts = bk.np(res.means), bk.np(res.counts)
    assert np.all(np.isfinite(means)) and np.all(np.isfinite(res.inertia))
    assert counts.sum() == N and np.all(counts >= 0)
    assert_non_increasing(res.inertia, obj_rtol(bk))
    if cosine:
        norms = np.linalg.norm(means, axis=1)
        assert np.all((np.abs(norms - 1) < 1e-5) | (norms == 0))


# --------------------------------------------------------------------------------------------
# Determinism, backends, chunking, float32
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cosine", [False, True], ids=["euclidean", "cosine"])
def test_deterministic_for_a_seed(bk, rng, cosine):
    x, _, _ = blobs(rng, 90, 5, 3, scale=1.0, spread=0.8)
    a = run(bk, x, 5, 6, rng=11, use_cosine_sim=cosine)
    b = run(bk, x, 5, 6, rng=np.random.default_rng(11), use_cosine_sim=cosine)
    assert np.array_equal(bk.np(a.counts), bk.np(b.counts))
    assert np.array_equal(bk.np(a.means), bk.np(b.means))  # bit-identical, cupy included
    assert a.inertia == b.inertia
    c = run(bk, x, 5, 6, rng=12, use_cosine_sim=cosine)  # another seed, another start
    assert not np.array_equal(bk.np(a.means), bk.np(c.means))


@pytest.mark.parametrize("cosine", [False, True], ids=["euclidean", "cosine"])
def test_backend_agrees_with_numpy(bk, rng, cosine):
    if bk.name == "numpy":
        pytest.skip("numpy is the reference here")
    x, _, _ = blobs(rng, 130, 6, 4)
    r = run(bk, x, 6, 8, rng=21, use_cosine_sim=cosine)
    ref = kmeans(x.astype(bk.dtype_name), 6, 8, rng=21, use_cosine_sim=cosine)  # numpy, same dtype
    tol = 1e-12 if bk.is64 else 1e-5
    assert np.array_equal(bk.np(r.counts), ref.counts)
    np.testing.assert_allclose(bk.np(r.means), ref.means, rtol=tol, atol=tol)
    np.testing.assert_allclose(r.inertia, ref.inertia, rtol=tol)


def test_chunking_does_not_change_the_result(bk, rng):
    x, _, _ = blobs(rng, 200, 6, 3)
    a = run(bk, x, 6, 7, rng=3)
    b = run(bk, x, 6, 7, rng=3, chunk_size=17)
    assert np.array_equal(bk.np(a.counts), bk.np(b.counts))
    np.testing.assert_allclose(bk.np(a.means), bk.np(b.means), rtol=bk.rtol)


def test_float32_on_offset_data(bk64, rng):
    # Features ~1e3 with a spread of 1e-2 between clusters and 5e-4 within: well separated in
    # relative terms, but the distance expansion of raw float32 data ranks codes wrongly.
    N, K, D = 400, 6, 5
    x, _, labels = blobs(rng, N, K, D, offset=1e3, scale=1e-2, spread=5e-4)
    init = x[[int(np.flatnonzero(labels == k)[0]) for k in range(K)]]  # one point per blob
    xp = bk64.xp
    x64, x32 = B.from_numpy(x, xp, dtype=xp.float64), B.from_numpy(x, xp, dtype=xp.float32)
    r64 = kmeans(x64, K, 10, init_means=B.from_numpy(init, xp, dtype=xp.float64))
    r32 = kmeans(x32, K, 10, init_means=B.from_numpy(init, xp, dtype=xp.float32))
    assert r32.means.dtype == xp.float32
    assert np.array_equal(bk64.np(r32.counts), bk64.np(r64.counts))
    a32, a64 = bk64.np(assign(x32, r32.means)), bk64.np(assign(x64, r64.means))
    assert np.array_equal(a32, a64) and np.array_equal(a64, labels)
    # float32 means within a few ulps of 1e3 (6e-5) of the float64 ones.
    np.testing.assert_allclose(bk64.np(r32.means), bk64.np(r64.means), rtol=0, atol=2e-4)
    # Control: the same data defeat an uncentred float32 expansion, so the test is not vacuous.
    h32, m32 = x.astype(np.float32), bk64.np(r64.means).astype(np.float32)
    naive = np.argmin((h32 * h32).sum(1)[:, None] - 2 * h32 @ m32.T + (m32 * m32).sum(1)[None, :], axis=1)
    assert np.mean(naive != labels) > 0.2


@pytest.mark.parametrize("cosine", [False, True], ids=["euclidean", "cosine"])
def test_assign_matches_oracle(bk, rng, cosine):
    x, centres, labels = blobs(rng, 80, 7, 4, scale=3.0, spread=0.1)
    idx = bk.np(assign(bk.asarray(x), bk.asarray(centres), cosine))
    assert idx.dtype == np.int64
    assert np.array_equal(idx, oracle_assign(x, centres, cosine))


def test_cosine_means_are_unit_norm(bk, rng):
    x, _, _ = blobs(rng, 150, 7, 5, scale=1.0, spread=0.5)
    x = x * rng.uniform(0.1, 10.0, size=(150, 1))  # norms must not matter
    res = run(bk, x, 7, 10, rng=8, use_cosine_sim=True)
    norms = np.linalg.norm(bk.np(res.means).astype(np.float64), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=0, atol=1e-12 if bk.is64 else 1e-6)
    # Scale invariance of the spherical variant: rescaling rows changes nothing but rounding.
    res2 = run(bk, x * rng.uniform(0.5, 2.0, size=(150, 1)), 7, 10, rng=8, use_cosine_sim=True)
    assert np.array_equal(bk.np(res.counts), bk.np(res2.counts))
    np.testing.assert_allclose(bk.np(res.means), bk.np(res2.means), rtol=0, atol=1e-10 if bk.is64 else 1e-5)


# --------------------------------------------------------------------------------------------
# External references
# --------------------------------------------------------------------------------------------


def test_matches_scikit_learn(bk64, rng):
    """scikit-learn's Lloyd from the same initial means, ``tol=0``.

    Conventions: ``max_iter = T`` performs T assignment + update steps, as ``iters = T`` here,
    so the centroids agree.  scikit-learn may stop earlier on strict convergence (labels
    unchanged), which leaves the centroids where more iterations would.  Its ``labels_`` come
    from an extra assignment with the final centroids, so our counts after T iterations are
    the ``labels_`` counts of ``max_iter = T - 1`` (off by one).  It relocates empty clusters, so
    the data here keep every cluster populated (asserted).
    """
    sk_cluster = pytest.importorskip("sklearn.cluster")
    N, K, D = 300, 8, 3
    x, _, _ = blobs(rng, N, K, D, scale=1.0, spread=0.7)
    init = x[rng.choice(N, size=K, replace=False)]

    def sk(max_iter):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est = sk_cluster.KMeans(K, init=init, n_init=1, max_iter=max_iter, tol=0.0, algorithm="lloyd")
            return est.fit(x)

    for T in (1, 2, 5, 30):
        res = run(bk64, x, K, T, init_means=init)
        counts = bk64.np(res.counts)
        assert np.all(counts > 0)
        est = sk(T)
        np.testing.assert_allclose(bk64.np(res.means), est.cluster_centers_, rtol=1e-6, atol=1e-9)
        prev_labels = oracle_assign(x, init) if T == 1 else sk(T - 1).labels_
        assert np.array_equal(counts, np.bincount(prev_labels, minlength=K))
    # Not converged after 2 iterations: scikit-learn's own labels_ disagree with our counts.
    assert not np.array_equal(
        bk64.np(run(bk64, x, K, 2, init_means=init).counts), np.bincount(sk(2).labels_, minlength=K)
    )


@pytest.mark.parametrize("cosine", [False, True], ids=["euclidean", "cosine"])
def test_matches_vector_quantize_pytorch(bk64, rng, cosine):
    """vector-quantize-pytorch's ``kmeans`` with a sampling function that returns our means.

    vqp works on a batch of codebooks: samples ``(H, N, D)``, means ``(H, K, D)`` and bins
    ``(H, K)`` int64, here with H = 1.  It expects l2-normalised samples for the cosine variant
    (its ``Codebook`` normalises before calling it) and does not normalise the initial means;
    ours normalises both, so it is given the normalised rows.  Its Euclidean assignment is
    ``argmax(-cdist)``, an uncentred expansion clamped at 1e-8 and square-rooted: the same
    argmin on data without near-ties.  One initial mean is put where no point will ever choose it
    (opposite the data, which sit around (3, ..., 3)); both keep its value.

    Where the two differ: duplicated initial means.  vqp's ``cdist`` columns for two identical
    means differ by rounding (measured ~1e-14), so its argmax splits their points at random;
    here they tie exactly and the lower index takes them all (test_duplicate_means_tie_low).
    """
    torch = pytest.importorskip("torch")
    vqp = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch")
    N, K, D, T = 160, 6, 4, 7
    x, _, _ = blobs(rng, N, K, D, scale=1.0, spread=0.7, offset=3.0)
    rows = rng.choice(N, size=K, replace=False)
    xs = unit(x) if cosine else x
    init = xs[rows]
    init[3] = -10.0 * np.ones(D)  # never chosen
    if cosine:
        init = unit(init)

    samples = torch.from_numpy(xs)[None]  # (1, N, D) float64
    means_t, bins_t = vqp.kmeans(
        samples, K, num_iters=T, use_cosine_sim=cosine, sample_fn=lambda s, num: torch.from_numpy(init)[None]
    )
    res = run(bk64, x, K, T, init_means=init, use_cosine_sim=cosine)
    counts = bk64.np(res.counts)
    assert tuple(bins_t.shape) == (1, K) and counts[3] == 0
    assert np.array_equal(counts, bins_t[0].numpy())
    np.testing.assert_allclose(bk64.np(res.means), means_t[0].numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(bk64.np(res.means)[3], init[3], rtol=1e-15, atol=0)


@pytest.mark.parametrize("cosine", [False, True], ids=["euclidean", "cosine"])
def test_duplicate_means_tie_low(bk, rng, cosine):
    # Two identical initial means: every point that would choose them goes to the lower index.
    x, _, _ = blobs(rng, 90, 5, 3, scale=1.0, spread=0.7, offset=2.0)
    init = x[[3, 8, 21, 8, 40]]  # codes 1 and 3 coincide
    one = bk.np(run(bk, x, 5, 1, init_means=init, use_cosine_sim=cosine).counts)
    without_twin = np.bincount(oracle_assign(x, init[[0, 1, 2, 4]], cosine), minlength=4)  # codes 0, 1, 2, 4
    assert one[3] == 0 and np.array_equal(one[[0, 1, 2, 4]], without_twin)


# --------------------------------------------------------------------------------------------
# Arguments checked at the entry (kmeans is public: vqref.kmeans)
# --------------------------------------------------------------------------------------------

N_, K_, D_ = 20, 4, 3  # the sizes of the calls below
_X = np.random.default_rng(5).standard_normal((N_, D_))


def _with_nan(a, value=np.nan):
    a = a.copy()
    a[2, 1] = value
    return a


BAD_ARGUMENTS = [
    # x
    (dict(x=_X.astype(np.float16)), TypeError, "x must be float32 or float64, got dtype float16"),
    (dict(x=np.ma.masked_array(_X, mask=_X > 1)), TypeError, "x is a numpy masked array"),
    (dict(x=_X.tolist()), TypeError, "x must be an array"),
    (dict(x=None), TypeError, "x must be an array"),
    (dict(x=_X.astype(object)), TypeError, "x must be a real floating-point array, got dtype object"),
    (dict(x=(10 * _X).astype(np.int64)), TypeError, "x must be a real floating-point array, got dtype int64"),
    (dict(x=_X > 0), TypeError, "x must be a real floating-point array, got dtype bool"),
    (dict(x=_X.astype(np.complex128)), TypeError, "x must be a real floating-point array"),
    (dict(x=_with_nan(_X)), ValueError, "x contains NaN or infinite values"),
    (dict(x=_with_nan(_X, -np.inf)), ValueError, "x contains NaN or infinite values"),
    (dict(x=_X[:, 0]), ValueError, r"x must be a 2-D array \(N, D\), got shape \(20,\)"),
    (dict(x=_X[None]), ValueError, r"x must be a 2-D array \(N, D\), got shape \(1, 20, 3\)"),
    (dict(x=_X[:0]), ValueError, "empty batch; pass init_means"),
    # counts and flags
    (dict(num_clusters=4.0), TypeError, "num_clusters must be an integer, got 4.0"),
    (dict(num_clusters=True), TypeError, "num_clusters must be an integer, got True"),
    (dict(num_clusters="4"), TypeError, "num_clusters must be an integer"),
    (dict(num_clusters=0), ValueError, "num_clusters must be >= 1, got 0"),
    (dict(iters=2.5), TypeError, "iters must be an integer"),
    (dict(iters=False), TypeError, "iters must be an integer"),
    (dict(iters=0), ValueError, "iters must be >= 1, got 0"),
    (dict(use_cosine_sim="yes"), TypeError, "use_cosine_sim must be True or False"),
    (dict(use_cosine_sim=1), TypeError, "use_cosine_sim must be True or False"),
    (dict(rng=-1), ValueError, "rng must be a non-negative int"),
    (dict(rng=0.5), TypeError, "rng must be None, a non-negative int or a numpy Generator"),
    (dict(chunk_size=0), ValueError, "chunk_size must be >= 1"),
    (dict(chunk_size=64.0), TypeError, "chunk_size must be an integer"),
    # init_means
    (dict(init_means=np.zeros((3, D_))), ValueError, r"init_means must have shape \(4, 3\), got \(3, 3\)"),
    (dict(init_means=np.zeros((K_, D_ + 1))), ValueError, r"init_means must have shape \(4, 3\), got \(4, 4\)"),
    (dict(init_means=np.zeros((K_, D_), np.int64)), TypeError, "init_means must be a real floating-point array"),
    (dict(init_means=np.zeros((K_, D_), np.float16)), TypeError, "init_means must be float32 or float64"),
    (dict(init_means=np.zeros((K_, D_)).tolist()), TypeError, "init_means must be an array"),
    (dict(init_means=np.ma.masked_array(np.zeros((K_, D_)))), TypeError, "init_means is a numpy masked array"),
    (dict(init_means=_with_nan(np.zeros((K_, D_)))), ValueError, "init_means contains NaN or infinite values"),
]


@pytest.mark.parametrize("change, error, message", BAD_ARGUMENTS)
def test_bad_arguments_are_refused_by_name(change, error, message):
    args = dict(x=_X, num_clusters=K_, iters=3, rng=0)
    args.update(change)
    with pytest.raises(error, match=message):
        kmeans(args.pop("x"), args.pop("num_clusters"), args.pop("iters"), **args)


def test_arrays_from_two_libraries_are_refused():
    import array_api_strict as xs

    with pytest.raises(TypeError, match="init_means is a array_api_strict array but x is a numpy array"):
        kmeans(_X, K_, 2, init_means=xs.asarray(_X[:K_]))
    with pytest.raises(TypeError, match="init_means is a numpy array but x is a array_api_strict array"):
        kmeans(xs.asarray(_X), K_, 2, init_means=_X[:K_])


def test_valid_arguments_in_their_other_spellings():
    """Negative controls: numpy integers and bools, a Generator, float32 means for float64 data
    and an explicit chunk size are accepted, and give the plain call's result."""
    plain = kmeans(_X, K_, 3, rng=0)
    spelled = kmeans(_X, np.int64(K_), np.int32(3), rng=np.random.default_rng(0), use_cosine_sim=np.bool_(False))
    assert np.array_equal(plain.means, spelled.means) and plain.inertia == spelled.inertia
    init = _X[[1, 5, 9, 14]]
    as64 = kmeans(_X, K_, 3, init_means=init)
    as32 = kmeans(_X, K_, 3, init_means=init.astype(np.float32), chunk_size=7)
    assert as32.means.dtype == np.float64
    np.testing.assert_allclose(as32.means, as64.means, rtol=1e-6)
    x32 = _X.astype(np.float32)
    assert kmeans(x32, K_, 3, rng=0).means.dtype == np.float32
