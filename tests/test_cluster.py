"""VQ and residual VQ as clustering algorithms (vqref.cluster).

Symbols: N rows, D features, K clusters per level, L levels.  Sizes are distinct.  Oracles:
brute-force numpy distances and residual recursions, scikit-learn's KMeans from the same initial
centroids, and vqref's own quantizer modules (the fit must agree with them as a quantizer).
"""

import contextlib
import io
import pathlib
import re
import warnings

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


# ------------------------------------------------------- the data and option checks of the modules

_Xv = np.random.default_rng(7).standard_normal((N, D))  # a valid float64 data set


def _set(a, value, where=(2, 1)):
    a = a.copy()
    a[where] = value
    return a


BAD_DATA = [
    (_Xv.astype(np.float16), TypeError, "X must be float32 or float64, got dtype float16"),
    (np.ma.masked_array(_Xv, mask=_Xv > 1.5), TypeError, "X is a numpy masked array"),
    (np.ma.masked_array(_Xv), TypeError, "masked array"),  # even without masked entries
    (_Xv.astype(object), TypeError, "X must hold real numbers, got dtype object"),
    (_Xv.astype(np.complex128), TypeError, "X must hold real numbers, got dtype complex128"),
    (_Xv.astype(str), TypeError, "X must hold real numbers"),
    (_Xv > 0, TypeError, "X holds booleans, not numbers"),
    ((_Xv > 0).tolist(), TypeError, "X holds booleans, not numbers"),
    ([[1.0, 2.0], [3.0]], ValueError, "equal-length rows"),
    ([[1.0, None], [3.0, 4.0]], TypeError, "dtype object"),
    (None, ValueError, r"X must be a 2-D array \(N, D\), got shape \(\)"),
    (3.0, ValueError, r"got shape \(\)"),
    ("abc", ValueError, r"got shape \(\)"),
    (_Xv[:, 0], ValueError, r"X must be a 2-D array \(N, D\), got shape \(90,\)"),
    (_Xv[None], ValueError, r"X must be a 2-D array \(N, D\), got shape \(1, 90, 6\)"),
    (_Xv[:0], ValueError, r"X is empty \(shape \(0, 6\)\)"),
    (_Xv[:, :0], ValueError, r"X is empty \(shape \(90, 0\)\)"),
    ([], ValueError, "2-D"),
    (_set(_Xv, np.nan), ValueError, "X contains NaN or infinite values"),
    (_set(_Xv, -np.inf), ValueError, "X contains NaN or infinite values"),
    (_set(_Xv, 1e160), ValueError, "whose squared distances overflow float64; scale it"),
    (_set(_Xv, 1e19).astype(np.float32), ValueError, "overflow float32; scale it or convert it to float64"),
]


@pytest.mark.parametrize("data, error, message", BAD_DATA)
@pytest.mark.parametrize("call", ["VQClustering.fit", "ResidualClustering.fit", "predict", "transform", "score"])
def test_bad_data_is_refused_with_a_message_that_names_it(call, data, error, message):
    if call == "VQClustering.fit":
        go = VQClustering(K, iters=2, seed=0).fit
    elif call == "ResidualClustering.fit":
        go = ResidualClustering(2, K, iters=2, seed=0).fit
    else:
        go = getattr(VQClustering(K, iters=2, seed=0).fit(_Xv), call)
    with pytest.raises(error, match=message):
        go(data)


def test_float16_and_masked_data_the_way_the_errors_suggest():
    """The regressions: float16 data used to fit to an infinite inertia and a mask was ignored.
    Converted or with the masked rows dropped, as the messages say, the data fit normally."""
    x16 = (_Xv * 40).astype(np.float16)  # squared distances beyond float16's 65504
    with pytest.raises(TypeError, match="float16"):
        VQClustering(K, iters=3, seed=0).fit(x16)
    km = VQClustering(K, iters=3, seed=0).fit(x16.astype(np.float32))
    assert np.isfinite(km.inertia_) and km.cluster_centers_.dtype == np.float32

    masked = np.ma.masked_array(_Xv, mask=np.zeros_like(_Xv, dtype=bool))
    masked[:10] = np.ma.masked  # ten rows nobody measured
    with pytest.raises(TypeError, match="mask"):
        VQClustering(K, iters=3, seed=0).fit(masked)
    kept = masked[~masked.mask.any(axis=1)].data
    assert VQClustering(K, iters=3, seed=0).fit(kept).labels_.shape == (N - 10,)


def test_data_that_is_converted():
    """Negative controls: lists, integer arrays and numpy subclasses other than masked arrays are
    accepted as documented, and give the float64 array's fit; large but safe values fit."""
    xi = np.round(_Xv * 10).astype(np.int32)
    ref = VQClustering(K, iters=4, seed=3).fit(xi.astype(np.float64))
    with warnings.catch_warnings():  # numpy discourages np.matrix; users still have them
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        matrix = np.asmatrix(xi.astype(np.float64))
    for same in (xi, xi.astype(np.int64), xi.tolist(), matrix):
        km = VQClustering(K, iters=4, seed=3).fit(same)
        assert km.cluster_centers_.dtype == np.float64
        np.testing.assert_array_equal(km.labels_, ref.labels_)
        assert km.inertia_ == ref.inertia_
    big = VQClustering(K, iters=3, seed=0).fit(_Xv * 1e150)  # squared distances ~1e301: still finite
    assert np.isfinite(big.inertia_)


BAD_OPTIONS = [
    (VQClustering, dict(n_clusters=3.0), TypeError, r"n_clusters must be an integer, got 3.0 \(float\)"),
    (VQClustering, dict(n_clusters=True), TypeError, r"n_clusters must be an integer, got True \(bool\)"),
    (VQClustering, dict(n_clusters=np.float64(3)), TypeError, "n_clusters must be an integer"),
    (VQClustering, dict(n_clusters=0), ValueError, "n_clusters must be >= 1"),
    (VQClustering, dict(n_clusters=3, iters=2.5), TypeError, "iters must be an integer"),
    (VQClustering, dict(n_clusters=3, iters=False), TypeError, "iters must be an integer"),
    (VQClustering, dict(n_clusters=3, use_cosine_sim="no"), TypeError, "use_cosine_sim must be True or False"),
    (VQClustering, dict(n_clusters=3, use_cosine_sim=1), TypeError, "use_cosine_sim must be True or False"),
    (VQClustering, dict(n_clusters=3, seed=-1), ValueError, "seed must be a non-negative int"),
    (VQClustering, dict(n_clusters=3, seed=1.5), TypeError, "seed must be None, a non-negative int"),
    (VQClustering, dict(n_clusters=3, chunk_size=True), TypeError, "chunk_size must be an integer"),
    (VQClustering, dict(n_clusters=3, init=[[0.0] * D] * 3), ValueError, "init must be one of"),
    (VQClustering, dict(n_clusters=3, init=None), ValueError, "init must be one of"),
    (VQClustering, dict(n_clusters=3, init=np.zeros((3, D), np.float16)), TypeError, "init must be float32 or float64"),
    (VQClustering, dict(n_clusters=3, init=np.zeros((3, D), bool)), TypeError, "init holds booleans"),
    (VQClustering, dict(n_clusters=3, init=np.ma.masked_array(np.zeros((3, D)))), TypeError, "init is a numpy masked"),
    (VQClustering, dict(n_clusters=3, init=np.full((3, D), np.inf)), ValueError, "init contains NaN or infinite"),
    (VQClustering, dict(n_clusters=3, init=np.zeros(D)), ValueError, r"init must be a 2-D array \(K, D\)"),
    (ResidualClustering, dict(num_levels=2.0, codebook_size=3), TypeError, "num_levels must be an integer"),
    (ResidualClustering, dict(num_levels=2, codebook_size=True), TypeError, "codebook_size must be an integer"),
    (ResidualClustering, dict(num_levels=2, codebook_size=3, iters=np.float32(2)), TypeError, "iters must be an"),
    (ResidualClustering, dict(num_levels=2, codebook_size=3, init=np.zeros((3, D))), ValueError, "init must be one of"),
    (ResidualClustering, dict(num_levels=2, codebook_size=3, use_cosine_sim=None), TypeError, "use_cosine_sim"),
    (ResidualClustering, dict(num_levels=2, codebook_size=3, seed="0"), TypeError, "seed must be None"),
]


@pytest.mark.parametrize("cls, options, error, message", BAD_OPTIONS)
def test_bad_options_are_refused_at_construction(cls, options, error, message):
    with pytest.raises(error, match=message):
        cls(**options)


def test_init_arrays_checked_against_the_data():
    import array_api_strict as xs

    with pytest.raises(ValueError, match=r"init must have shape \(3, 6\), got \(3, 5\)"):
        VQClustering(3, init=np.zeros((3, D - 1))).fit(_Xv)
    with pytest.raises(TypeError, match="init is a array_api_strict array but X is a numpy array"):
        VQClustering(3, init=xs.asarray(_Xv[:3])).fit(_Xv)
    with pytest.raises(TypeError, match="init is a numpy array but X is a array_api_strict array"):
        VQClustering(3, init=_Xv[:3]).fit(xs.asarray(_Xv))
    # negative controls: integer and float32 initial centroids are converted to the data's dtype
    ref = VQClustering(3, iters=3, init=np.round(_Xv[:3])).fit(_Xv)
    for init in (np.round(_Xv[:3]).astype(np.int64), np.round(_Xv[:3]).astype(np.float32)):
        km = VQClustering(3, iters=3, init=init).fit(_Xv)
        assert km.cluster_centers_.dtype == np.float64
        np.testing.assert_array_equal(km.cluster_centers_, ref.cluster_centers_)


def test_codes_checked_by_collision_rate_and_decode():
    assert collision_rate([]) == 0.0 and collision_rate(np.zeros((0, 2), np.int64)) == 0.0
    with pytest.raises(TypeError, match="masked array"):
        collision_rate(np.ma.masked_array([1, 2, 1], mask=[0, 1, 0]))
    with pytest.raises(ValueError, match="equal-length tuples"):
        collision_rate([[1, 2], [3]])
    with pytest.raises(TypeError, match="codes must be integers, got dtype bool"):
        collision_rate([True, False])
    with pytest.raises(TypeError, match="codes must be integers, got dtype float64"):
        collision_rate([[1.0, 2.0]])
    rc = ResidualClustering(2, K, iters=2, seed=0).fit(_Xv)
    ids = rc.labels_[:4]
    np.testing.assert_array_equal(rc.decode(ids.tolist()), rc.decode(ids))  # semantic IDs as lists
    with pytest.raises(TypeError, match="masked array"):
        rc.decode(np.ma.masked_array(ids))
    with pytest.raises(ValueError, match="codes must be an integer array"):
        rc.decode([[True, False]])


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
