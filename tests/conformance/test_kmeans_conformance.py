"""k-means: vqref.core.kmeans.kmeans against vector-quantize-pytorch's ``kmeans``.

Both libraries draw the initial means at random (vqp with ``torch.randperm``, vqref from a numpy
Generator).  vqp's ``kmeans`` takes the sampling function as an argument (``sample_fn``) and
vqref's ``kmeans`` takes ``init_means``, so here both start from the same means and must then
produce the same centroids and the same counts (those of the last assignment, in both).

Lloyd's iteration is a discontinuous function of its input: an assignment that flips at a
near tie moves two means, and later assignments follow.  vqp ranks with the uncentred
``sqrt(||x||^2 + ||c||^2 - 2 x.c)`` and vqref with the centred expansion, so on data without
cluster structure the two can drift apart within a few iterations even though each is correct
to rounding.  The data here are therefore clustered (blobs whose assignments have wide
margins), which is also what k-means initialisation is meant for.  Module-level k-means (the
first training batch) is compared in test_vector_quantize_conformance.py and
test_residual_conformance.py, with vqp's ``Codebook.sample_fn`` fed vqref's rows
(conftest.vqp_draws_like_vqref).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vector_quantize_pytorch.vector_quantize_pytorch import kmeans as vqp_kmeans

from vqref.core.kmeans import kmeans

from .conftest import batch


def run_vqp(x: np.ndarray, init: np.ndarray, iters: int, cosine: bool):
    samples = torch.from_numpy(x)[None]  # (1, N, D): one codebook
    means, bins = vqp_kmeans(
        samples, init.shape[0], iters, use_cosine_sim=cosine, sample_fn=lambda s, num: torch.from_numpy(init)[None]
    )
    return means[0].numpy(), bins[0].numpy()


def unit(a: np.ndarray) -> np.ndarray:
    return (a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-6)).astype(np.float32)


@pytest.mark.parametrize("iters", [1, 2, 10])
@pytest.mark.parametrize("cosine", [False, True], ids=["euclidean", "cosine"])
def test_same_initial_means_give_the_same_centroids_and_counts(rng, iters, cosine):
    N, K, D = 600, 48, 24
    x = batch(rng, (N, D), centres=40, spread=0.2)
    if cosine:
        x = unit(x)  # vqp's codebook hands k-means l2-normalised rows; vqref normalises itself
    init = x[rng.choice(N, size=K, replace=False)]
    means_t, counts_t = run_vqp(x, init, iters, cosine)
    res = kmeans(x, K, iters, init_means=init, use_cosine_sim=cosine)
    np.testing.assert_array_equal(res.counts, counts_t)
    np.testing.assert_allclose(res.means, means_t, rtol=1e-5, atol=2e-6)
    assert res.counts.sum() == N and res.means.dtype == np.float32


def test_empty_clusters_keep_their_mean_in_both(rng):
    # Two initial means on the same row: ties go to the lower index in both libraries, so in
    # the first assignment the other cluster is empty and keeps its initial mean in both (this
    # is k-means itself; the initialisation built on it differs, see test_deviations.py).
    N, K, D = 300, 20, 16
    x = batch(rng, (N, D), centres=25, spread=0.2)
    rows = rng.choice(N, size=K, replace=False)
    rows[7] = rows[3]  # means 3 and 7 coincide
    init = x[rows]
    means_t, counts_t = run_vqp(x, init, 1, False)
    res = kmeans(x, K, 1, init_means=init)
    assert counts_t[7] == 0 and res.counts[7] == 0
    np.testing.assert_array_equal(means_t[7], init[7])
    np.testing.assert_array_equal(res.means[7], init[7])
    np.testing.assert_array_equal(res.counts, counts_t)
    np.testing.assert_allclose(res.means, means_t, rtol=1e-5, atol=2e-6)


def test_fewer_rows_than_clusters(rng):
    # N < K: the initial means repeat rows (vqp samples with replacement then), so several
    # clusters are empty for ever; both agree on all of them.  Equal means tie exactly, and both
    # libraries give a tie to the lower index only if their distances are exact: halves of small
    # integers and K = 16 (vqref centres by the mean of the K means) make every distance exact in
    # float32, so the BLAS kernel cannot round two equal columns differently.
    N, K, D = 12, 16, 8
    x = np.round(batch(rng, (N, D)) * 2) / 2
    init = x[rng.integers(0, N, size=K)]
    means_t, counts_t = run_vqp(x, init, 4, False)
    res = kmeans(x, K, 4, init_means=init)
    np.testing.assert_array_equal(res.counts, counts_t)
    np.testing.assert_allclose(res.means, means_t, rtol=1e-5, atol=1e-6)
    assert (res.counts == 0).sum() >= K - N


def test_a_wrong_initial_mean_is_detected(rng):
    # Negative control for the comparison above: one different initial mean must show.
    N, K, D = 600, 48, 24
    x = batch(rng, (N, D), centres=40, spread=0.2)
    rows = rng.choice(N, size=K + 1, replace=False)
    means_t, counts_t = run_vqp(x, x[rows[:K]], 10, False)
    other = rows[:K].copy()
    other[5] = rows[K]
    res = kmeans(x, K, 10, init_means=x[other])
    differs = not np.array_equal(res.counts, counts_t) or not np.allclose(res.means, means_t, rtol=1e-5, atol=2e-6)
    assert differs
