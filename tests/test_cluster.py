"""VQ and residual VQ as clustering algorithms (vqref.cluster).

Symbols: N rows, D features, K clusters per level, L levels.  Sizes are distinct.  Oracles:
brute-force numpy distances and residual recursions, scikit-learn's KMeans from the same initial
centroids, and vqref's own quantizer modules (the fit must agree with them as a quantizer).
"""

import contextlib
import io
import pathlib
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vqref import ResidualVQ, VectorQuantize
from vqref import backend as B
from vqref.cluster import ResidualClustering, VQClustering, collision_rate, kmeans_plusplus

N, D, K, L = 90, 6, 5, 3


def blobs(rng, n=N, k=K, d=D, spread=0.3, scale=4.0):
    centres = rng.standard_normal((k, d)) * scale
    labels = rng.integers(0, k, size=n)
    return centres[labels] + spread * rng.standard_normal((n, d)), labels


def hierarchical(rng, n, k, d, levels, ratio=0.2, noise=0.01):
    """Rows that are sums of one offset per level, offsets shrinking by ``ratio`` per level.

    This is the additive structure residual VQ models: every level has k offsets, shared by all
    the rows' coarser choices.
    """
    x = noise * rng.standard_normal((n, d))
    for level in range(levels):
        offsets = rng.standard_normal((k, d)) * 10.0 * ratio**level
        x = x + offsets[rng.integers(0, k, size=n)]
    return x


def _unit(a):
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-6)


def np_residual_codes(x, codebooks, cosine=False):
    r = np.asarray(x, dtype=np.float64)
    codes = []
    for C in codebooks:
        C = np.asarray(C, dtype=np.float64)
        if cosine:
            C = _unit(C)
            k = np.argmax(_unit(r) @ C.T, axis=1)
        else:
            k = np.argmin(((r[:, None, :] - C[None, :, :]) ** 2).sum(-1), axis=1)
        codes.append(k)
        r = r - C[k]
    return np.stack(codes, axis=1), r


# --------------------------------------------------------------------------------- one level


def test_vq_clustering_fit_predict_and_attributes(bk, rng):
    x, truth = blobs(rng)
    X = bk.asarray(x)
    km = VQClustering(K, iters=15, seed=0).fit(X)
    C = bk.np(km.cluster_centers_).astype(np.float64)
    assert km.cluster_centers_.shape == (K, D) and km.cluster_centers_.dtype == bk.dtype
    assert type(km.cluster_centers_) is type(X)
    labels = bk.np(km.labels_)
    assert km.labels_.dtype == bk.xp.int64 and labels.shape == (N,)
    xh = bk.np(X).astype(np.float64)
    d2 = ((xh[:, None, :] - C[None, :, :]) ** 2).sum(-1)  # (N, K)
    np.testing.assert_array_equal(labels, d2.argmin(1))
    np.testing.assert_array_equal(bk.np(km.predict(X)), labels)
    np.testing.assert_array_equal(bk.np(km.counts_), np.bincount(labels, minlength=K))
    assert km.inertia_ == pytest.approx(d2.min(1).sum(), rel=1e-10 if bk.is64 else 1e-5)
    assert km.score(X) == pytest.approx(-km.inertia_, rel=1e-10 if bk.is64 else 1e-5)
    np.testing.assert_allclose(bk.np(km.transform(X)), np.sqrt(d2), rtol=1e-10 if bk.is64 else 1e-5, atol=1e-6)
    np.testing.assert_array_equal(bk.np(km.quantize(X)), bk.np(km.cluster_centers_)[labels])
    np.testing.assert_array_equal(bk.np(VQClustering(K, iters=15, seed=0).fit_predict(X)), labels)
    # the objective history is non-increasing (Lloyd), and ends at or above the final inertia
    hist = np.array(km.inertia_history_)
    assert len(hist) == 15 and np.all(np.diff(hist) <= 1e-6 * hist[0])
    assert km.inertia_ <= hist[-1] * (1 + (1e-10 if bk.is64 else 2e-5))
    # on well-separated blobs the fit recovers the partition
    contingency = np.zeros((K, K), int)
    np.add.at(contingency, (labels, truth), 1)
    assert np.all((contingency > 0).sum(1) <= 1)


def test_vq_clustering_matches_scikit_learn_from_the_same_init(bk64, rng):
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    x, _ = blobs(rng, n=300, k=7, spread=1.5, scale=2.0)  # overlapping blobs: Lloyd takes many steps
    init = x[rng.choice(300, 7, replace=False)]
    for iters in (1, 3, 25):
        ours = VQClustering(7, iters=iters, init=bk64.asarray(init)).fit(bk64.asarray(x))
        with threadpool_limits(1):  # a small problem; no OpenMP oversubscription under pytest -n
            sk = KMeans(7, init=init, n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd").fit(x)
        assert sk.n_iter_ == iters or iters == 25  # sklearn may stop early once labels settle
        np.testing.assert_allclose(bk64.np(ours.cluster_centers_), sk.cluster_centers_, rtol=1e-6, atol=1e-9)
        assert ours.inertia_ == pytest.approx(sk.inertia_, rel=1e-6)
        np.testing.assert_array_equal(bk64.np(ours.labels_), sk.labels_)


def test_ema_with_decay_zero_is_lloyds_step(bk64, rng):
    # VQ-VAE's EMA codebook with gamma = 0 and no smoothing sets c_k = s_k / n_k: one full-batch
    # training forward is one Lloyd iteration.  That is why a quantizer is a clusterer.
    x, _ = blobs(rng, n=120, k=6, spread=1.0, scale=2.0)
    init = x[:6] + 0.1
    vq = VectorQuantize(D, 6, decay=0.0, eps=0.0, dtype="float64", xp=bk64.module, seed=0)
    vq.load_state_dict({"codebook": init, "cluster_size": np.ones(6), "embed_avg": init, "initted": True})
    for _ in range(4):
        vq(bk64.asarray(x))
    km = VQClustering(6, iters=4, init=bk64.asarray(init)).fit(bk64.asarray(x))
    np.testing.assert_allclose(bk64.np(vq.codebook), bk64.np(km.cluster_centers_), rtol=1e-12, atol=1e-12)
    # ... and the fitted clusterer is a quantizer whose indices are the labels
    q, idx, _ = km.to_vector_quantize()(bk64.asarray(x))
    np.testing.assert_array_equal(bk64.np(idx), bk64.np(km.labels_))
    np.testing.assert_array_equal(bk64.np(q), bk64.np(km.quantize(bk64.asarray(x))))


def test_kmeans_plusplus_draws_rows_and_spreads_them(rng):
    x, truth = blobs(rng, n=200, k=8, spread=0.05, scale=10.0)
    hits_pp, hits_random = [], []
    for s in range(20):
        C = kmeans_plusplus(x, 8, rng=s)
        assert C.shape == (8, D)
        assert all(np.any(np.all(x == c, axis=1)) for c in C)  # rows of x
        hits_pp.append(len({truth[np.flatnonzero(np.all(x == c, axis=1))[0]] for c in C}))
        R = x[np.random.default_rng(s).choice(200, 8, replace=False)]
        hits_random.append(len({truth[np.flatnonzero(np.all(x == c, axis=1))[0]] for c in R}))
    # k-means++ lands in (nearly) every blob; random rows often double up
    assert np.mean(hits_pp) > 7.5 and np.mean(hits_pp) > np.mean(hits_random) + 1.0
    # more centroids than distinct rows: no NaN, no error
    C = kmeans_plusplus(np.zeros((3, D)), 5, rng=0)
    assert C.shape == (5, D) and np.all(C == 0)


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_degenerate_data_gives_no_nan(bk, init):
    for x in (np.zeros((4, D)), np.ones((3, D)), np.eye(D)[:2]):
        km = VQClustering(K, iters=3, init=init, seed=1).fit(bk.asarray(x))  # K > N
        assert np.all(np.isfinite(bk.np(km.cluster_centers_))) and km.inertia_ == pytest.approx(0.0, abs=1e-6)
        km = VQClustering(K, iters=3, init=init, use_cosine_sim=True, seed=1).fit(bk.asarray(x))
        assert np.all(np.isfinite(bk.np(km.cluster_centers_)))
        rc = ResidualClustering(L, K, iters=3, init=init, seed=1).fit(bk.asarray(x))
        assert np.all(np.isfinite(bk.np(rc.cluster_centers_))) and np.all(np.isfinite(rc.inertia_))


def test_cosine_clustering_has_unit_centroids_and_scale_free_labels(bk, rng):
    x, _ = blobs(rng)
    X = bk.asarray(x)
    km = VQClustering(K, use_cosine_sim=True, seed=0).fit(X)
    norms = np.linalg.norm(bk.np(km.cluster_centers_).astype(np.float64), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    scaled = bk.asarray(x * rng.uniform(0.1, 10.0, size=(N, 1)))  # rescaling rows changes nothing
    np.testing.assert_array_equal(bk.np(km.predict(scaled)), bk.np(km.labels_))
    xu = _unit(bk.np(X).astype(np.float64))
    C = bk.np(km.cluster_centers_).astype(np.float64)
    np.testing.assert_array_equal(bk.np(km.labels_), np.argmax(xu @ C.T, axis=1))
    expected = np.sum((xu - C[bk.np(km.labels_)]) ** 2)
    assert km.inertia_ == pytest.approx(expected, rel=1e-8 if bk.is64 else 1e-4)


# -------------------------------------------------------------------------------- residual


@pytest.mark.parametrize("cosine", [False, True], ids=["euclid", "cosine"])
def test_residual_clustering_fit_predict_decode(bk, rng, cosine):
    x = hierarchical(rng, N, K, D, L)
    X = bk.asarray(x)
    rc = ResidualClustering(L, K, iters=10, use_cosine_sim=cosine, seed=0).fit(X)
    assert rc.cluster_centers_.shape == (L, K, D) and rc.cluster_centers_.dtype == bk.dtype
    codes = rc.predict(X)
    assert codes.shape == (N, L) and codes.dtype == bk.xp.int64
    np.testing.assert_array_equal(bk.np(codes), bk.np(rc.labels_))
    ref_codes, ref_res = np_residual_codes(bk.np(X), bk.np(rc.cluster_centers_), cosine=cosine)
    np.testing.assert_array_equal(bk.np(codes), ref_codes)
    np.testing.assert_array_equal(bk.np(rc.counts_), [np.bincount(ref_codes[:, l], minlength=K) for l in range(L)])
    recon = bk.np(rc.decode(codes)).astype(np.float64)
    tol = 1e-10 if bk.is64 else 1e-4
    np.testing.assert_allclose(recon, bk.np(X) - ref_res, rtol=tol, atol=tol)
    assert rc.inertia_[-1] == pytest.approx(np.sum(ref_res**2), rel=tol)
    # a prefix of the codes decodes the coarser reconstruction
    coarse = bk.np(rc.decode(codes[:, :1])).astype(np.float64)
    C0 = bk.np(rc.cluster_centers_)[0].astype(np.float64)
    np.testing.assert_allclose(coarse, (_unit(C0) if cosine else C0)[ref_codes[:, 0]], rtol=tol, atol=tol)
    np.testing.assert_array_equal(
        bk.np(ResidualClustering(L, K, iters=10, use_cosine_sim=cosine, seed=0).fit_predict(X)), bk.np(codes)
    )


@pytest.mark.parametrize("cosine", [False, True], ids=["euclid", "cosine"])
def test_predict_equals_residual_vq_eval_indices(bk, rng, cosine):
    x = hierarchical(rng, N, K, D, L)
    rc = ResidualClustering(L, K, iters=8, use_cosine_sim=cosine, seed=3).fit(bk.asarray(x))
    rq = rc.to_residual_vq()
    assert isinstance(rq, ResidualVQ) and not rq.training and rq.num_quantizers == L
    new = bk.asarray(hierarchical(np.random.default_rng(1), 40, K, D, L))
    quantized, indices, _ = rq(new)
    np.testing.assert_array_equal(bk.np(indices), bk.np(rc.predict(new)))
    np.testing.assert_array_equal(bk.np(quantized), bk.np(rc.decode(indices)))
    # the EMA state holds the codebooks and statistics consistent with them: c = m / N~
    state = {k: bk.np(v).astype(np.float64) for k, v in rq.state_dict().items()}
    for level in range(L):
        C, n = bk.np(rc.cluster_centers_)[level], bk.np(rc.counts_)[level]
        np.testing.assert_array_equal(state[f"{level}.codebook"], C)
        np.testing.assert_array_equal(state[f"{level}.cluster_size"], n)
        smoothed = (n + 1e-5) / (n.sum() + K * 1e-5) * n.sum()
        np.testing.assert_allclose(state[f"{level}.embed_avg"] / smoothed[:, None], C, rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 60), k=st.integers(1, 9), levels=st.integers(1, 4))
def test_residual_energy_never_increases_with_levels(seed, n, k, levels):
    # Each level's centroids are means of the rows last assigned to them, so
    # sum ||r - mu_a||^2 <= sum ||r||^2 for that assignment, and re-assigning to the nearest
    # centroid only lowers it further.
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, 3)) * g.uniform(0.1, 10.0)
    rc = ResidualClustering(levels, k, iters=5, seed=seed).fit(x)
    energy = np.array((np.sum(x**2),) + rc.inertia_)
    assert np.all(np.diff(energy) <= 1e-9 * energy[0])


def test_collision_rate_falls_as_levels_are_added_on_structured_data(rng):
    x = hierarchical(rng, 120, 16, 10, 3)
    rc = ResidualClustering(3, 16, iters=20, seed=0).fit(x)
    codes = rc.labels_
    rates = [collision_rate(codes[:, :l]) for l in (1, 2, 3)]
    assert rates[0] > rates[1] > rates[2]
    assert rates[0] == 1.0 and rates[2] < 0.5
    assert rc.collision_rate(codes) == rates[2]
    # the residual energy falls by an order of magnitude per level on such data
    assert rc.inertia_[0] < 0.2 * np.sum((x - x.mean(0)) ** 2) and rc.inertia_[1] < 0.2 * rc.inertia_[0]


def test_collision_rate_by_hand():
    assert collision_rate(np.array([[0, 1], [0, 1], [1, 0]])) == pytest.approx(2 / 3)
    assert collision_rate(np.array([[0, 1], [1, 1], [1, 0]])) == 0.0
    assert collision_rate(np.array([3, 3, 3, 3])) == 1.0
    assert collision_rate(np.array([[5, 1, 2], [5, 1, 3], [5, 1, 2], [0, 0, 0], [0, 0, 0]])) == pytest.approx(4 / 5)
    assert collision_rate(np.zeros((0, 2), dtype=np.int64)) == 0.0
    with pytest.raises(TypeError, match="integers"):
        collision_rate(np.zeros((3, 2)))


# --------------------------------------------------------------------- backends, determinism


def test_same_seed_same_fit_and_numpy_agrees_with_strict(rng):
    import array_api_strict as xs

    x = hierarchical(rng, N, K, D, L)
    fits = []
    for mod in (np, np, xs):
        X = B.from_numpy(x, B.namespace_from_module(mod))
        rc = ResidualClustering(L, K, iters=6, seed=11).fit(X)
        km = VQClustering(K, iters=6, seed=11, init="random").fit(X)
        fits.append(
            [B.to_numpy(a) for a in (rc.cluster_centers_, rc.labels_, rc.counts_, km.cluster_centers_, km.labels_)]
            + [np.array(rc.inertia_), np.array(km.inertia_)]
        )
    for a, b in zip(fits[0], fits[1]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(fits[0], fits[2]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    other = ResidualClustering(L, K, iters=6, seed=12).fit(x)
    assert not np.array_equal(other.cluster_centers_, fits[0][0])


def test_float32_in_float32_out(rng):
    x = hierarchical(rng, N, K, D, L).astype(np.float32)
    rc = ResidualClustering(L, K, iters=6, seed=0).fit(x)
    assert rc.cluster_centers_.dtype == np.float32 and rc.decode(rc.labels_).dtype == np.float32
    rc64 = ResidualClustering(L, K, iters=6, seed=0).fit(x.astype(np.float64))
    np.testing.assert_array_equal(rc.labels_, rc64.labels_)
    np.testing.assert_allclose(rc.cluster_centers_, rc64.cluster_centers_, rtol=1e-4, atol=1e-4)


def test_array_likes_and_validation(rng):
    x = rng.standard_normal((20, 3))
    km = VQClustering(4, iters=3, seed=0).fit(x.tolist())  # a list becomes float64 numpy
    assert isinstance(km.cluster_centers_, np.ndarray) and km.cluster_centers_.dtype == np.float64
    assert VQClustering(4, iters=3, seed=0).fit(np.arange(40).reshape(20, 2)).cluster_centers_.dtype == np.float64
    with pytest.raises(RuntimeError, match="not fitted"):
        VQClustering(4).predict(x)
    with pytest.raises(RuntimeError, match="not fitted"):
        ResidualClustering(2, 4).decode(np.zeros((3, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="features"):
        km.predict(x[:, :2])
    with pytest.raises(ValueError, match="NaN"):
        VQClustering(4).fit(np.full((5, 3), np.nan))
    with pytest.raises(ValueError, match="2-D"):
        VQClustering(4).fit(np.zeros(5))
    with pytest.raises(ValueError, match="empty"):
        VQClustering(4).fit(np.zeros((0, 3)))
    with pytest.raises(ValueError, match=r"init must have shape \(4, 3\)"):
        VQClustering(4, init=np.zeros((3, 3))).fit(x)
    with pytest.raises(ValueError, match="init must be one of"):
        VQClustering(4, init="kmeans||")
    with pytest.raises(ValueError, match="n_clusters must be >= 1"):
        VQClustering(0)
    with pytest.raises(ValueError, match="num_levels must be >= 1"):
        ResidualClustering(0, 4)
    rc = ResidualClustering(2, 4, iters=3, seed=0).fit(x)
    with pytest.raises(ValueError, match="codes must lie"):
        rc.decode(np.array([[0, 4]]))
    with pytest.raises(ValueError, match="codes must be an integer array"):
        rc.decode(np.zeros((3, 3), dtype=np.int64))
    import array_api_strict as xs

    with pytest.raises(TypeError, match="different libraries"):
        rc.predict(xs.asarray(x))


DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "clustering.md"


@pytest.mark.skipif(not DOC.exists(), reason="docs/clustering.md is not in this checkout")
def test_docs_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    examples = [b for b in blocks if not b.startswith("# benchmark")]
    assert len(examples) >= 5
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    for block in examples:
        out = io.StringIO()
        # one BLAS/OpenMP thread: small problems, and no oversubscription under pytest -n
        with contextlib.redirect_stdout(out), threadpool_limits(1):
            exec(compile(block, str(DOC), "exec"), {"__name__": "docs_example"})
        # the printed lines appear in the block as "# ..." comments; check the ones that are
        # not floating-point noise (booleans, shapes, integer codes and rates)
        expected = [line[2:] for line in block.splitlines() if line.startswith("# ")]
        printed = out.getvalue().splitlines()
        assert len(printed) == len(expected)
        for got, want in zip(printed, expected):
            if "e-1" not in want:
                assert got == want
