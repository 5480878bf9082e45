"""The EMA codebook update with Laplace smoothing (docs/math.md §1.5; invariants in §1.7)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vqref.core.ema import (
    EMAState,
    batch_statistics,
    codebook_from_state,
    ema_update,
    expire_dead_codes,
    laplace_smoothing,
)

K, D, N = 6, 4, 29


def loop_reference(cluster_size, embed_avg, x, idx, decay, eps):
    """The update written one code and one row at a time, in float64 (an independent oracle)."""
    Kk = len(cluster_size)
    cs, ea = cluster_size.astype(float).copy(), embed_avg.astype(float).copy()
    for k in range(Kk):
        n_k, s_k = 0.0, np.zeros(x.shape[1])
        for i in range(len(idx)):
            if idx[i] == k:
                n_k += 1
                s_k += x[i]
        cs[k] = decay * cs[k] + (1 - decay) * n_k
        ea[k] = decay * ea[k] + (1 - decay) * s_k
    total = cs.sum()
    cb = np.array([ea[k] / ((cs[k] + eps) / (total + Kk * eps) * total) for k in range(Kk)])
    return cs, ea, cb


def _state(bk, rng):
    cb = rng.standard_normal((K, D))
    return EMAState(bk.asarray(cb), bk.asarray(np.ones(K)), bk.asarray(cb.copy())), cb


def test_vectorised_update_equals_loop_reference(bk, rng):
    state, cb = _state(bk, rng)
    x = rng.standard_normal((N, D))
    idx = rng.integers(0, K - 1, size=N)  # the last code is never used
    counts, sums = batch_statistics(bk.asarray(x), bk.asarray(idx), K)
    new = ema_update(state, counts, sums, decay=0.8, eps=1e-5)
    cs, ea, ref_cb = loop_reference(np.ones(K), cb, x, idx, 0.8, 1e-5)
    for got, ref in zip(new, (ref_cb, cs, ea)):
        assert got.dtype == bk.dtype
        np.testing.assert_allclose(bk.np(got), ref, rtol=bk.rtol * 10, atol=1e-12 if bk.is64 else 1e-5)
    # the input state is untouched (pure function)
    np.testing.assert_array_equal(bk.np(state.cluster_size), np.ones(K))


@settings(max_examples=50, deadline=None)
@given(counts=st.lists(st.floats(0, 1e4), min_size=1, max_size=20), eps=st.floats(1e-8, 1e-2))
def test_smoothing_keeps_the_total_and_stays_positive(counts, eps):
    c = np.array(counts)
    s = laplace_smoothing(c, eps)
    if c.sum() > 0:
        assert np.all(s > 0)
        np.testing.assert_allclose(s.sum(), c.sum(), rtol=1e-12)
    assert not np.any(np.isnan(s))


def test_decay_one_leaves_state_unchanged(bk, rng):
    state, cb = _state(bk, rng)
    x = bk.asarray(rng.standard_normal((N, D)))
    counts, sums = batch_statistics(x, bk.asarray(rng.integers(0, K, size=N)), K)
    new = ema_update(state, counts, sums, decay=1.0, eps=1e-5)
    np.testing.assert_array_equal(bk.np(new.cluster_size), bk.np(state.cluster_size))
    np.testing.assert_array_equal(bk.np(new.embed_avg), bk.np(state.embed_avg))
    np.testing.assert_allclose(bk.np(new.codebook), bk.np(state.codebook), rtol=1e-6 if not bk.is64 else 1e-14)


def test_decay_zero_eps_zero_gives_cluster_means(bk, rng):
    state, cb = _state(bk, rng)
    x = rng.standard_normal((N, D))
    idx = np.arange(N) % (K - 1)  # code K-1 unused
    counts, sums = batch_statistics(bk.asarray(x), bk.asarray(idx), K)
    new = ema_update(state, counts, sums, decay=0.0, eps=0.0)
    got = bk.np(new.codebook)
    for k in range(K - 1):
        np.testing.assert_allclose(got[k], x[idx == k].mean(0), rtol=bk.rtol * 10, atol=1e-6)
    # the unused code has count 0: 0/0 is avoided, it keeps its previous value
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got[K - 1], bk.np(state.codebook)[K - 1])


def test_repeated_updates_converge_to_cluster_means(rng):
    state = EMAState(rng.standard_normal((K, D)), np.ones(K), None)
    state = state._replace(embed_avg=state.codebook.copy())
    x = rng.standard_normal((N, D))
    idx = np.arange(N) % K
    counts, sums = batch_statistics(x, idx, K)
    for _ in range(200):
        state = ema_update(state, counts, sums, decay=0.8, eps=1e-5)
    means = np.stack([x[idx == k].mean(0) for k in range(K)])
    np.testing.assert_allclose(state.codebook, means, rtol=1e-4, atol=1e-4)


def test_dead_codes_are_restarted_consistently(bk, rng):
    cb = rng.standard_normal((K, D))
    cs = np.array([5.0, 0.1, 3.0, 0.0, 2.5, 1.9])
    state = EMAState(bk.asarray(cb), bk.asarray(cs), bk.asarray(cb * cs[:, None]))
    x = rng.standard_normal((N, D))
    new, dead = expire_dead_codes(state, bk.asarray(x), threshold=2.0, rng=np.random.default_rng(0))
    dead = bk.np(dead)
    np.testing.assert_array_equal(dead, cs < 2.0)
    got = bk.np(new.codebook)
    for k in range(K):
        if dead[k]:
            assert np.any(np.all(np.isclose(x.astype(bk.dtype_name), got[k]), axis=1)), (
                "a restarted code is a batch row"
            )
            assert bk.np(new.cluster_size)[k] == 2.0
            np.testing.assert_allclose(bk.np(new.embed_avg)[k], 2.0 * got[k], rtol=1e-6)
        else:
            np.testing.assert_array_equal(got[k], cb[k].astype(bk.dtype_name))
    restarted = got[dead]
    assert len(np.unique(restarted, axis=0)) == len(restarted), "distinct rows when N >= K"


def test_cosine_codebooks_use_the_l2norm_convention(bk, rng):
    """``normalize``: each code divided by ``max(||c||, 1e-6)`` (vqref.ops.l2norm's clamp).

    A code shorter than 1e-6 is scaled by 1e6, not blown up to unit length, and a zero code stays
    zero (no NaN) -- in the rebuilt codebook and in restarted codes alike.
    """
    lengths = np.array([2.0, 0.5, 1e-8, 0.0, 3e-7, 1.0])  # (K,): two below 1e-6, one zero
    u = rng.standard_normal((K, D))
    c = u / np.linalg.norm(u, axis=1, keepdims=True) * lengths[:, None]  # (K, D)
    want = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-6)
    cs = np.full(K, 2.0)  # equal counts: the smoothed counts are exactly 2, c = m / 2
    got = codebook_from_state(bk.asarray(cs), bk.asarray(2.0 * c), eps=0.0, normalize=True)
    np.testing.assert_allclose(bk.np(got), want, rtol=bk.rtol, atol=0)
    np.testing.assert_array_equal(bk.np(got)[3], 0.0)
    # restarted codes: every code dead, N = K rows, so each row of x becomes one code
    state = EMAState(bk.asarray(u), bk.asarray(np.zeros(K)), bk.asarray(u))
    new, dead = expire_dead_codes(state, bk.asarray(c), threshold=1.0, rng=np.random.default_rng(1), normalize=True)
    assert bk.np(dead).all()
    got = bk.np(new.codebook).astype(np.float64)
    for k in range(K):  # each restarted code is the normalised form of one row
        match = np.abs(want - got[k]).max(axis=1) <= bk.rtol * np.abs(want).max(axis=1) + 1e-300
        assert match.sum() >= 1, k
    np.testing.assert_allclose(
        np.sort(np.linalg.norm(got, axis=1)), np.sort(np.linalg.norm(want, axis=1)), rtol=bk.rtol
    )
