"""k-means (Lloyd's algorithm) on one batch of vectors, used to initialise codebooks.

Symbols: N vectors, D features, K clusters (the codes of the codebook being initialised),
T iterations.

SoundStream (Zeghidour et al., arXiv 2107.03312, in its residual-VQ section) initialises each codebook with the
k-means centroids of the first training batch instead of random vectors, so that no code starts
far from the data and dies unused.  The algorithm is plain Lloyd iteration:

    a_i = argmin_k ||x_i - mu_k||^2                          assignment       (1)
    n_k = |{i : a_i = k}|,   s_k = sum_{i : a_i = k} x_i      statistics       (2)
    mu_k <- s_k / n_k  if n_k > 0, else mu_k unchanged        update           (3)

Step (1) minimises the objective J = sum_i ||x_i - mu_{a_i}||^2 over the assignment and step (3)
over each non-empty mean, so J never increases.  An empty cluster would need 0/0; it keeps its
previous mean instead (an empty cluster adds nothing to J, so this cannot increase J either).

The cosine (spherical) variant works on the unit sphere: inputs and initial means are
l2-normalised, (1) becomes ``argmax_k x_i . mu_k`` and (3) re-normalises the mean,
``mu_k <- l2(s_k / n_k)``, which maximises ``sum_{i in S_k} x_i . mu`` over unit vectors mu.  Its
objective ``-sum_i cos(x_i, mu_{a_i})`` never increases.

The semantics follow vector-quantize-pytorch's ``kmeans`` (and EnCodec's): initial means are K
rows of the batch drawn without replacement (with replacement when N < K), and the returned
counts come from the *last assignment*, which was made with the means from before the last
update.  Nothing here is differentiated: the initialisation has no backward.

This module is a driver, not an op: it loops over iterations on the host and synchronises with
the device at the end, to return the objective history as Python floats (and :func:`kmeans`
at its entry, to refuse inputs with NaN or infinite values).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .. import backend as B
from ..backend import Array
from ..distributed import as_comm, check_same, gather_rows, refuse_together, row_layout
from ..ops.distance import nearest_code
from ..ops.l2norm import l2norm
from ..validation import check_bool, check_float_array, check_int, check_seed, refuse_masked
from .kmeans_fast import inertia_fused, lloyd_fused

__all__ = [
    "KMeansResult",
    "kmeans",
    "lloyd",
    "assign",
    "kmeans_inertia",
    "inertia",
    "sample_initial_means",
    "kmeans_plusplus",
]


class KMeansResult(NamedTuple):
    means: Array  # (K, D) final centroids, x's namespace, device and dtype
    counts: Array  # (K,) int64, cluster sizes of the last assignment (made with the previous means)
    inertia: tuple  # (T,) Python floats, the objective of each iteration's assignment


def sample_initial_means(x: Array, num_clusters: int, rng: Any = None, *, comm: Any = None) -> Array:
    """K rows of ``x`` drawn at random, as vector-quantize-pytorch's ``sample_vectors``.

    The row numbers are drawn on the host from the numpy Generator ``rng`` -- without replacement
    (``rng.choice(N, K, replace=False)``) when N >= K, with replacement
    (``rng.integers(0, N, K)``) otherwise -- and the rows are gathered on x's device, so every
    backend starts from the same means for the same seed.

    With a communicator of R ranks, ``x`` is this rank's part of the global batch and N counts
    the rows of all ranks.  Every rank draws the same row numbers (the generators must be in the
    same state: checked), and :func:`vqref.distributed.gather_rows` brings each drawn row from
    the rank that holds it.  The means are bit-identical to those one process draws from the
    whole batch with the same generator.

    Parameters
    ----------
    x : (N_r, D) float, this rank's rows (N >= 1 over all ranks; one rank may hold none)
    num_clusters : int, K
    rng : numpy Generator or seed (``None``: fresh OS entropy, not reproducible)
    comm : communicator (``None``: one process), see :mod:`vqref.distributed`

    Returns
    -------
    means : (K, D), rows of the global batch (x's namespace, device and dtype), on every rank
    """
    comm = as_comm(comm)
    K = int(num_clusters)
    layout = row_layout(comm, [x])
    N = layout.total  # rows of every rank together
    if N == 0:
        raise ValueError("cannot sample initial means from an empty batch; pass init_means")
    gen = B.as_generator(rng)
    check_same(comm, "random generator state", gen.bit_generator.state)
    if N >= K:
        rows = gen.choice(N, size=K, replace=False)
    else:
        rows = gen.integers(0, N, size=K)
    return gather_rows(comm, [x], rows.astype(np.int64), layout)  # (K, D)


def assign(x: Array, means: Array, use_cosine_sim: bool = False, *, chunk_size: int | None = None) -> Array:
    """The assignment step (1): the index of the nearest mean for every row.

    Parameters
    ----------
    x : (N, D) float
    means : (K, D) float
    use_cosine_sim : argmax of the cosine similarity instead of argmin of the squared distance
        (x and the means are l2-normalised here, so un-normalised inputs are fine)
    chunk_size : rows per chunk of the (chunk, K) score block (see :func:`nearest_code`)

    Returns
    -------
    indices : (N,) int64, ties to the lowest index
    """
    if use_cosine_sim:
        return nearest_code(l2norm(x), l2norm(means), metric="dot", chunk_size=chunk_size)
    return nearest_code(x, means, metric="euclidean", chunk_size=chunk_size)


def kmeans_inertia(x: Array, means: Array, use_cosine_sim: bool = False, *, chunk_size: int | None = None) -> Array:
    """The k-means objective of ``means`` with the best assignment, as a 0-d array (no sync).

        Euclidean:  J(mu) = sum_i min_k ||x_i - mu_k||^2
        cosine:     J(mu) = -sum_i max_k x^_i . mu^_k      (x^, mu^ l2-normalised)

    :func:`inertia` is the definition; numpy arrays of one dtype take
    :func:`vqref.core.kmeans_fast.inertia_fused`, the same sum formed block by block on the
    worker threads of the fused k-means (equal to rounding).

    Parameters
    ----------
    x : (N, D) float
    means : (K, D) float
    use_cosine_sim : which objective

    Returns
    -------
    inertia : () float, x's dtype
    """
    xp = B.get_namespace(x, means)
    fused = B.is_numpy(xp) and x.dtype == means.dtype  # the one-line choice of the fast path
    return (inertia_fused if fused else inertia)(x, means, use_cosine_sim, chunk_size=chunk_size)


def inertia(x: Array, means: Array, use_cosine_sim: bool = False, *, chunk_size: int | None = None) -> Array:
    """:func:`kmeans_inertia` by its definition: every row's clamped distance, summed."""
    xp = B.get_namespace(x, means)
    if use_cosine_sim:
        _, sim = nearest_code(l2norm(x), l2norm(means), metric="dot", chunk_size=chunk_size, return_score=True)  # (N,)
        return -xp.sum(sim)
    _, dist = nearest_code(x, means, metric="euclidean", chunk_size=chunk_size, return_score=True)  # (N,)
    return xp.sum(dist)


def kmeans(
    x: Array,
    num_clusters: int,
    iters: int = 10,
    *,
    rng: Any = None,
    use_cosine_sim: bool = False,
    init_means: Array = None,
    chunk_size: int | None = None,
    comm: Any = None,
) -> KMeansResult:
    """Lloyd's k-means, equations (1)-(3), for ``iters`` iterations (no early stop).

    Parameters
    ----------
    x : (N, D) float32 or float64, finite, any Array API backend; not modified (N may be 0 when
        ``init_means`` is given)
    num_clusters : int >= 1, K (may exceed N: some clusters are then necessarily empty)
    iters : int >= 1, T, the number of assignment + update steps
        (vector-quantize-pytorch ``kmeans_iters``, default 10; scikit-learn ``max_iter`` with
        ``tol=0`` performs the same T updates, see Notes)
    rng : numpy Generator or seed for the initial means (ignored when ``init_means`` is given)
    use_cosine_sim : spherical k-means on l2-normalised data (vector-quantize-pytorch
        ``use_cosine_sim``)
    init_means : (K, D) float32 or float64, finite, x's library; optional explicit initial means
        (cast to x's dtype; l2-normalised in the cosine variant).  Default:
        :func:`sample_initial_means` with ``rng``.
    chunk_size : int >= 1, rows per chunk in the assignment step
    comm : communicator (``None``: one process), see :mod:`vqref.distributed`.  Each rank
        passes its part of the batch (which may be empty); the result, the same on every rank,
        is that of the whole batch (see Notes)

    Returns
    -------
    KMeansResult
        means : (K, D), x's dtype.  Euclidean: cluster means, or the previous value for a
            cluster that was empty.  Cosine: unit vectors (a zero vector only where the
            cluster's inputs sum to zero, e.g. two antipodal points, or where a zero input row
            was sampled as a mean and never attracted another point).
        counts : (K,) int64, the cluster sizes of the *last assignment*, made with the means
            from before the last update; they sum to N.
        inertia : tuple of T Python floats; ``inertia[t]`` is the objective of the assignment of
            iteration t, i.e. :func:`kmeans_inertia` of the means entering iteration t
            (``inertia[0]`` is that of the initial means).  Non-increasing up to rounding.
            The objective of the returned means is ``kmeans_inertia(x, result.means)``.

    Raises
    ------
    TypeError
        ``x`` or ``init_means`` is not an array, is a numpy masked array (its mask would be
        ignored), is not float32/float64, or the two come from different libraries; a count
        is not an int (bools are not counts); ``use_cosine_sim`` is not a bool; ``rng`` is not
        None, a non-negative int or a Generator.
    ValueError
        ``x`` is not 2-D, or either array holds NaN or infinite values, or has the wrong shape;
        a count is below 1; ``x`` is empty and no ``init_means`` are given (with several ranks:
        every rank's ``x``); the ranks' generators differ (``rng``, with several ranks).
    RuntimeError
        with several ranks, on the ranks whose own arguments were fine, when another rank's
        were refused (that rank raises its own error): no rank is left waiting.

    Notes
    -----
    *Counts.*  As in vector-quantize-pytorch and EnCodec, the counts (and ``inertia[-1]``) belong
    to the assignment that produced the returned means, not to an assignment with them.  At a
    fixed point the two coincide.  scikit-learn instead re-runs the assignment after its last
    update, so its ``labels_`` after ``max_iter = T - 1`` give our counts after T iterations,
    while its ``cluster_centers_`` after ``max_iter = T`` equal our means after T (as long as no
    cluster becomes empty: scikit-learn moves empty clusters to far-away points, we keep them).

    *Precision.*  The assignment centres the data itself (:func:`nearest_code`), which is what
    keeps float32 assignments right on data with a large common offset.  The update computes
    ``s_k / n_k`` as ``mu_k + sum (x_i - mu_k) / n_k``: the rounding error of a running sum
    grows with the magnitude of its terms, and deviations from the current mean are small
    where raw rows may carry a large offset (measured on features ~1e3 with a spread ~1e-2,
    500 rows per cluster, float32: 3e-5 from the exact mean, one ulp of 1e3, against 8e-5 for
    raw sums).  It is also exact where it should be: a cluster whose points all equal its mean
    (a singleton sampled from its own row) does not move by a rounding error, and a cluster
    that is empty keeps its previous mean bit-exactly (``xp.where``).

    *Duplicates.*  If two initial means coincide (duplicate rows, or N < K), ties go to the
    lower index and the other cluster stays empty for as long as the two coincide (for ever,
    unless the lower one moves away); no NaN appears.

    *Fast path.*  On numpy the iterations run in :func:`vqref.core.kmeans_fast.lloyd_fused`:
    the same assignments and updates, fused block by block into one pass over x per iteration
    and split between worker threads (docs/performance.md).  :func:`lloyd` is the definition,
    which every other library runs; the tests pin the two together (same assignments, means
    and objectives to rounding; for float32 the fused means are the exact means of their
    clusters, correctly rounded).

    *Determinism.*  The same seed gives the same result on every run: cupy's segment sums are
    one-hot matrix products, not atomic adds, and the fused numpy path gives its worker
    threads fixed ranges of rows and adds their parts in a fixed order.  Across libraries the
    results agree to rounding.

    *Synchronisation.*  The objective of each iteration is kept as a 0-d device array and
    converted to Python floats once, after the loop; with the finiteness checks of the inputs
    at entry, a call synchronises with the device two or three times.

    *Several ranks.*  Lloyd's update needs the per-cluster counts and sums of the whole batch,
    and both are sums over rows: each rank computes them on its rows and an allreduce adds
    them (the means are formed afterwards -- averaging per-rank means would weight the ranks
    equally whatever their row counts).  The initial means are drawn from the global batch
    (:func:`sample_initial_means`), and a refusal of any rank's arguments is raised on every
    rank.  Counts are exact; the sums differ from one process's by rounding only, because the
    additions happen in another order (docs/distributed.md).
    """
    comm = as_comm(comm)
    refused = None
    try:
        K, iters, use_cosine_sim, rng, chunk_size = _checked_arguments(
            x, num_clusters, iters, use_cosine_sim, rng, chunk_size, init_means
        )
    except (TypeError, ValueError) as error:
        refused = error
    refuse_together(comm, refused)  # every rank raises, or none does
    xp = B.get_namespace(x)

    if use_cosine_sim:
        x = l2norm(x)  # (N, D) rows on the unit sphere (zero rows stay zero)
    if init_means is None:
        means = sample_initial_means(x, K, rng, comm=comm)  # (K, D)
    else:
        means = xp.astype(init_means, x.dtype) if init_means.dtype != x.dtype else init_means
        if use_cosine_sim:
            means = l2norm(means)

    run = lloyd_fused if B.is_numpy(xp) else lloyd  # the one-line choice of the fast path
    means, counts, objective = run(x, means, iters, use_cosine_sim=use_cosine_sim, chunk_size=chunk_size, comm=comm)
    history = tuple(float(v) for v in B.to_numpy(objective))  # the one host sync
    return KMeansResult(means, counts, history)


def lloyd(
    x: Array,
    means: Array,
    iters: int,
    *,
    use_cosine_sim: bool = False,
    chunk_size: int | None = None,
    comm: Any,
) -> tuple[Array, Array, Array]:
    """Lloyd's iterations (1)-(3) from ``means``: the definition behind :func:`kmeans`.

    Each iteration assigns every row (:func:`nearest_code`), then sums each cluster's rows in
    a second pass (:func:`vqref.backend.segment_sum`) and moves the means.  On numpy,
    :func:`kmeans` runs :func:`vqref.core.kmeans_fast.lloyd_fused` instead, which does the same
    arithmetic block by block in one pass over x; the tests pin the two together.

    Parameters
    ----------
    x : (N, D) float, this rank's rows (l2-normalised in the cosine variant), checked
    means : (K, D) float, x's library and dtype, the initial means (unit rows in the cosine variant)
    iters : int >= 1, T
    use_cosine_sim : spherical k-means (argmax of ``x . mu``, re-normalised means)
    chunk_size : rows per chunk of the assignment
    comm : communicator; counts, sums and objectives are summed over its ranks

    Returns
    -------
    means : (K, D), x's dtype
    counts : (K,) int64, the cluster sizes of the last assignment, every rank's rows
    objective : (T,) x's dtype, the objective of each iteration's assignment, every rank's rows
    """
    xp = B.get_namespace(x, means)
    K = means.shape[0]
    metric = "dot" if use_cosine_sim else "euclidean"
    objective = []
    counts = None
    for _ in range(iters):
        idx, score = nearest_code(x, means, metric=metric, chunk_size=chunk_size, return_score=True)  # (N,)
        objective.append(-xp.sum(score) if use_cosine_sim else xp.sum(score))
        counts = comm.allreduce_sum(B.bincount(idx, K))  # (K,) int64, n_k of every rank's rows
        # s_k / n_k written as mu_k + sum_{a_i = k} (x_i - mu_k) / n_k: the same value, but the
        # summed deviations are small, so a float32 sum keeps its precision (see kmeans' Notes).
        dsums = comm.allreduce_sum(B.segment_sum(x, idx, K, offsets=means))  # (K, D) sums of x_i - mu_{a_i}
        denom = xp.astype(xp.maximum(counts, xp.ones_like(counts)), x.dtype)  # (K,) max(n_k, 1)
        new_means = means + dsums / denom[:, None]  # (K, D) s_k / n_k where n_k > 0
        if use_cosine_sim:
            new_means = l2norm(new_means)
        # An empty cluster's deviation sum is 0, so new_means already equals means there in the
        # Euclidean case; the where states rule (3) outright and skips the cosine re-normalisation.
        means = xp.where((counts > 0)[:, None], new_means, means)  # (K, D) empty clusters keep theirs
    return means, counts, comm.allreduce_sum(xp.stack(objective))  # (T,) over every rank's rows


def _checked_arguments(x, num_clusters, iters, use_cosine_sim, rng, chunk_size, init_means) -> tuple:
    """The checks of :func:`kmeans`' arguments; returns ``K, iters, use_cosine_sim, rng, chunk_size``."""
    _check_array("x", x)
    if x.ndim != 2:
        raise ValueError(f"x must be a 2-D array (N, D), got shape {tuple(x.shape)}")
    K = check_int("num_clusters", num_clusters, 1)
    iters = check_int("iters", iters, 1)  # >= 1: the counts come from an assignment
    use_cosine_sim = check_bool("use_cosine_sim", use_cosine_sim)
    rng = check_seed("rng", rng)
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size, 1)
    check_float_array("x", x, x)
    if init_means is not None:
        _check_array("init_means", init_means)
        if B.library_name(init_means) != B.library_name(x):
            raise TypeError(
                f"init_means is a {B.library_name(init_means)} array but x is a {B.library_name(x)} array; "
                "give both in one library"
            )
        check_float_array("init_means", init_means, x, shape=(K, x.shape[1]))
    return K, iters, use_cosine_sim, rng, chunk_size


def _check_array(name: str, a: Array) -> None:
    """``a`` must be an array of an Array API library, and not a numpy masked array."""
    refuse_masked(name, a)
    if not B.is_array(a):
        raise TypeError(f"{name} must be an array of an Array API library (numpy, cupy, ...), got {type(a).__name__}")


def kmeans_plusplus(x: Array, num_clusters: int, rng: Any = None) -> Array:
    """k-means++ seeding (Arthur and Vassilvitskii, SODA 2007): spread-out initial centroids.

    The first centroid is a uniformly random row; each next one is a row drawn with probability
    proportional to its squared distance to the nearest centroid chosen so far,

        P(i) = d_i^2 / sum_j d_j^2,     d_i = min_{chosen c} ||x_i - c||.

    This is the plain version (one candidate per step); scikit-learn's default is the "greedy"
    version, which draws ``2 + log K`` candidates per step and keeps the best, so the two do not
    pick the same rows for the same seed.

    Parameters
    ----------
    x : (N, D) float, any Array API backend
    num_clusters : K >= 1 (may exceed N: once every row is a centroid, rows are drawn uniformly)
    rng : numpy Generator or seed; the draws happen on the host

    Returns
    -------
    means : (K, D), rows of x (same namespace, device and dtype)

    Notes
    -----
    The distances are direct differences (no expansion), so they are never negative.  Each
    step moves the (N,) distances to the host to draw from them: K synchronisations in all.
    """
    xp = B.get_namespace(x)
    N = x.shape[0]
    K = check_int("num_clusters", num_clusters, 1)
    gen = B.as_generator(rng)
    rows = [int(gen.integers(N))]
    d2 = xp.sum((x - x[rows[0] : rows[0] + 1, :]) ** 2, axis=1)  # (N,) squared distance to the nearest centroid
    for _ in range(1, K):
        weights = np.asarray(B.to_numpy(d2), dtype=np.float64)  # host copy to sample from
        total = float(weights.sum())
        if total > 0.0 and np.isfinite(total):
            row = int(gen.choice(N, p=weights / total))
        else:  # every row already coincides with a centroid (duplicates, or K > N)
            row = int(gen.integers(N))
        rows.append(row)
        d2 = xp.minimum(d2, xp.sum((x - x[row : row + 1, :]) ** 2, axis=1))  # (N,)
    idx = B.from_numpy(np.asarray(rows, dtype=np.int64), xp, device=B.get_device(x))  # (K,)
    return xp.take(x, idx, axis=0)  # (K, D)
