"""numpy fast path of Lloyd's k-means: distance, assignment and cluster sums fused per block.

Symbols: N vectors, D features, K clusters, T iterations, n rows in one block (the last block
of a range may be shorter), W worker threads.

:func:`vqref.core.kmeans.lloyd` is the definition: each iteration assigns every row
(:func:`vqref.ops.distance.nearest_code`, itself blocked), then makes a second pass over x for
the cluster sums (:func:`vqref.backend.segment_sum`, a sort of the ids and one reduction per
cluster).  :func:`lloyd_fused` performs the same iterations, equations (1)-(3) of
:mod:`vqref.core.kmeans`, but finishes each block of rows before moving to the next, while the
block is still in cache:

    xc   = x_b - m                          (n, D)   centred rows, made once per call
    s    = [xc, 1] @ [[-2 cc^T], [|cc|^2]]  (n, K)   ||x_i - mu_k||^2 less ||xc_i||^2, one product
    a    = argmin_k s                       (n,)     assignment (1)
    dev  = x_b - mu[a]                      (n, D)   float64: exact for float32 rows
    S   += onehot(a)^T dev                  (K, D)   statistics (2), a sparse product
    J   += sum_i max(s_ia + |xc_i|^2, 0)            objective, each row's distance (a = a_i)

and after the last block ``mu_k <- mu_k + S_k / n_k`` where ``n_k > 0``, the definition's
update (3).  Each row's distance is the definition's (the chosen score plus ``||xc_i||^2``,
clamped at 0); the rows' sum is formed in float64, block by block.

Here m is the mean of the initial means (the definition re-centres on the current means at
every iteration; any centre near the data keeps the expansion's float32 cancellation small),
so the centred rows ``[x - m, 1]`` and their ``||xc_i||^2`` are computed once per call: memory
O(N D) for that copy, as scikit-learn centres its own copy of x, plus O(n K) per worker for a
score block.  This is how scikit-learn organises its Lloyd iteration: one pass over x per
iteration, and the rows split between W threads that each run the whole pipeline on their own
range of rows with a single-threaded BLAS.  That last part matters on a small machine:
numpy's BLAS threads only the matrix product, and with two cores the argmin, the gathers and
the sums (a third of the work) would leave one core idle.  The worker threads run numpy and
scipy calls that release the GIL; W is the number of threads numpy's BLAS had, as
threadpoolctl reports it, and the BLAS is limited to one thread while the workers run.

What it changes, to rounding:

* With W = 1 and the same ``chunk_size`` the products are those of
  :func:`vqref.ops.distance.nearest_code_inplace` on the same blocks, so the first
  iteration's assignment is bit-identical.  Later iterations start from means that differ by
  rounding and centre on the first m, not the current one, and with W > 1 a block may start
  at another row; each can move a near-tie.
* The deviations of float32 rows are exact in float64, and so are their sums unless a
  cluster's values span more than about 2^28 in magnitude: for float32 each new mean is the
  exact mean of its cluster, correctly rounded, whatever W is (the definition's float32
  pairwise sums are within a few ulps).  A cluster whose rows all equal its mean has S_k = 0
  and does not move, as in the definition.
* The objective sums the same row distances in another order (float64, block by block,
  instead of float32 pairwise over all rows).

:func:`inertia_fused` is one such pass without the sums (the objective of given means), behind
:func:`vqref.core.kmeans.kmeans_inertia`.

The sparse product ``onehot(a)^T dev`` is scipy's compressed-sparse-column matrix times a dense
block, a scatter-add in compiled code: about five times faster than numpy's best (a sort of the
ids and ``np.add.reduceat``, ``np.add.at`` on flattened indices, or ``np.bincount`` with
weights) on blocks of 8192 rows.  scipy and threadpoolctl are not dependencies of vqref (both
come with scikit-learn).  Without scipy the blocks only assign, and the sums come from the
definition's own :func:`vqref.backend.segment_sum` over all rows; without threadpoolctl W = 1.

The cosine variant is the same loop on the l2-normalised rows themselves (no centred copy) and
unit means: the scores are ``x . mu`` (argmax), the objective is ``-sum_i x_i . mu_{a_i}``,
and the updated means are re-normalised.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, NamedTuple

import numpy as np

from .. import backend as B
from ..ops.l2norm import l2norm

# numpy's BLAS threads and the one-thread limit while the workers run: shared with the other
# fast paths that use worker threads (vqref.threads), so that they cannot overlap either.
from ..threads import _BLAS_LOCK, block_rows, controller, run_workers, worker_pool  # noqa: F401 (the lock: tests)
from ..threads import BlasLimit as _BlasLimit
from ..threads import blas_threads as _blas_threads

try:  # optional: the sparse one-hot product of the cluster sums (see the module notes)
    from scipy import sparse as _sparse
except ImportError:  # pragma: no cover - scipy comes with scikit-learn in the test environment
    _sparse = None

__all__ = ["lloyd_fused", "inertia_fused", "block_rows"]


def lloyd_fused(
    x: np.ndarray,
    means: np.ndarray,
    iters: int,
    *,
    use_cosine_sim: bool = False,
    chunk_size: int | None = None,
    comm: Any,
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fused numpy version of :func:`vqref.core.kmeans.lloyd`; same arguments and results.

    Parameters
    ----------
    x : (N, D) numpy float32 or float64, this rank's rows (l2-normalised in the cosine variant)
    means : (K, D) numpy array of x's dtype, the initial means (unit rows in the cosine variant)
    iters : int >= 1, T
    use_cosine_sim : spherical k-means
    chunk_size : rows per block (default :func:`block_rows`)
    comm : communicator; the counts, sums and objectives are summed over its ranks
    workers : W, threads that split the rows (default: numpy's BLAS threads, 1 without
        threadpoolctl, and no more than there are blocks of rows); W > 1 limits the BLAS to
        one thread while they run

    Returns
    -------
    means : (K, D), x's dtype
    counts : (K,) int64, the sizes of the last assignment, every rank's rows
    objective : (T,) x's dtype, the objective of each iteration's assignment, every rank's rows
    """
    K = means.shape[0]
    dtype = x.dtype
    cosine = bool(use_cosine_sim)
    objective = np.empty((iters,), dtype=dtype)
    counts = None
    centre = np.zeros((x.shape[1],), dtype=dtype) if cosine else np.mean(means, axis=0)  # (D,) m
    passes = _Passes(x, K, centre, cosine=cosine, chunk_size=chunk_size, workers=workers, sums=_sparse is not None)
    for t in range(iters):
        best, sums = passes.run(means)  # float, (K, D) float64 or None
        objective[t] = -best if cosine else best  # -sum_i x_i . mu_{a_i} or sum_i ||x_i - mu_{a_i}||^2
        counts = comm.allreduce_sum(np.bincount(passes.indices, minlength=K))  # (K,) int64, n_k
        if sums is None:  # no scipy: the definition's second pass over x
            sums = B.segment_sum(x, passes.indices, K, offsets=means)  # (K, D)
        sums = comm.allreduce_sum(sums)  # (K, D) S_k over every rank's rows
        denom = np.maximum(counts, 1)[:, None]  # (K, 1) max(n_k, 1)
        new_means = (means + sums / denom).astype(dtype)  # (K, D) mu_k + S_k / n_k = s_k / n_k
        if cosine:
            new_means = l2norm(new_means)
        means = np.where((counts > 0)[:, None], new_means, means)  # empty clusters keep theirs
    return means, counts, comm.allreduce_sum(objective)


def inertia_fused(
    x: np.ndarray,
    means: np.ndarray,
    use_cosine_sim: bool = False,
    *,
    chunk_size: int | None = None,
    workers: int | None = None,
) -> np.ndarray:
    """The fused numpy version of :func:`vqref.core.kmeans.inertia`: one assignment pass.

    The blocks of :func:`lloyd_fused` without the sums: every row's clamped distance (or
    chosen cosine similarity), summed in float64.

    Parameters
    ----------
    x : (N, D) numpy float32 or float64
    means : (K, D) numpy array of x's dtype
    use_cosine_sim : the cosine objective (x and means are l2-normalised here)
    chunk_size, workers : as in :func:`lloyd_fused`

    Returns
    -------
    inertia : () x's dtype
    """
    cosine = bool(use_cosine_sim)
    if cosine:
        x, means = l2norm(x), l2norm(means)
    centre = np.zeros((x.shape[1],), dtype=x.dtype) if cosine else np.mean(means, axis=0)  # (D,) m
    passes = _Passes(x, means.shape[0], centre, cosine=cosine, chunk_size=chunk_size, workers=workers, sums=False)
    best, _ = passes.run(means)
    return np.asarray(-best if cosine else best, dtype=x.dtype)


class _Passes:
    """Assignment passes over x in fixed blocks, split between W worker threads.

    Made once per call: the centred rows ``[x - m, 1]`` and their squared norms (Euclidean),
    the row ranges (worker w takes rows ``bounds[w]:bounds[w + 1]``), each worker's buffers
    and the process's pool of W worker threads (:func:`vqref.threads.worker_pool`).
    :meth:`run` assigns every row to the nearest of ``means`` (the indices land in ``self.indices``) and returns the sum of the rows' distances
    (cosine: of their chosen similarities) and, with ``sums``, the (K, D) float64 sums of
    ``x_i - mu_{a_i}`` per cluster.
    """

    def __init__(self, x, K: int, centre, *, cosine: bool, chunk_size=None, workers=None, sums: bool) -> None:
        N, D = x.shape
        self.x, self.centre, self.cosine = x, centre, cosine
        self.rows1 = self.norms = None
        if not cosine:  # centred once, as scikit-learn centres its copy of x
            self.rows1 = np.empty((N, D + 1), dtype=x.dtype)  # (N, D + 1) = [x - m, 1]
            np.subtract(x, centre, out=self.rows1[:, :D])
            self.rows1[:, D] = 1
            self.norms = np.vecdot(self.rows1[:, :D], self.rows1[:, :D])  # (N,) ||xc_i||^2
        self.controller = controller()  # the process's (numpy's BLAS is loaded with numpy), or None
        rows = int(chunk_size) if chunk_size else block_rows(K)
        if workers:  # as asked, one row at least per worker
            W = max(1, min(int(workers), N))
        else:  # as many as the BLAS has threads, but a block of rows at least per worker
            W = max(1, min(_blas_threads(self.controller), -(-N // rows)))
        self.W = W
        step = max(1, min(rows, -(-max(N, 1) // W)))
        self.bounds = [N * w // W for w in range(W + 1)]  # (W + 1,) row ranges
        self.buffers = [_Buffers.make(step, D, K, x.dtype, sums) for _ in range(W)]
        self.indices = np.empty((N,), dtype=np.int64)  # (N,) the assignment of the last pass
        self.codes = np.empty((D + 1, K), dtype=x.dtype)  # (D + 1, K) = [[-2 cc^T], [|cc|^2]]
        self.pool = worker_pool(W) if W > 1 else None  # the process's pool of W workers (kept)

    def run(self, means: np.ndarray) -> tuple[float, Any]:
        D = self.x.shape[1]
        cc = means - self.centre  # (K, D) centred means
        if self.cosine:
            self.codes[:D] = cc.T  # x . mu
            self.codes[D] = 0
        else:
            np.multiply(cc.T, -2, out=self.codes[:D])
            self.codes[D] = np.vecdot(cc, cc)

        def work(w: int) -> tuple[Any, float]:
            rows = (self.bounds[w], self.bounds[w + 1])
            return _assign_and_sum(self, rows, means, self.buffers[w])

        with _BlasLimit(self.controller) if self.pool else nullcontext():
            parts = run_workers(work, self.W, self.pool) if self.pool else [work(0)]
        best = sum(p[1] for p in parts)  # in worker order: the same on every run
        sums = parts[0][0]  # (K, D) float64, or None without sum buffers
        for p in parts[1:] if sums is not None else ():
            sums = sums + p[0]
        return best, sums


class _Buffers(NamedTuple):
    """One worker's block buffers, allocated once per call (the last three only with sums)."""

    scores: np.ndarray  # (n, K) score block
    row_offsets: np.ndarray  # (n,) flat index of each row of the score block
    picked: Any  # (n, D) the chosen mean of every row, x's dtype
    # (n, D) x_i - mu_{a_i} in float64: the difference of two float32 numbers is exact there,
    # and the sums add float64 numbers, so no float32 rounding accumulates over a cluster
    deviations: Any
    onehot_sums: Any  # _OneHotSums of the worker's blocks

    @classmethod
    def make(cls, step: int, D: int, K: int, dtype: Any, sums: bool) -> _Buffers:
        return cls(
            np.empty((step, K), dtype=dtype),
            np.arange(0, step * K, K),
            np.empty((step, D), dtype=dtype) if sums else None,
            np.empty((step, D), dtype=np.float64) if sums else None,
            _OneHotSums(step, K) if sums else None,
        )


def _assign_and_sum(passes: _Passes, rows: tuple, means: np.ndarray, buf: _Buffers):
    """Assign the rows ``rows[0]:rows[1]`` block by block; their deviation sums and best scores.

    Writes the indices into ``indices[rows[0]:rows[1]]`` and returns ``(S, best)``: (K, D)
    float64 sums of ``x_i - mu_{a_i}`` per cluster (None when ``buf`` has no sum buffers) and
    the float sum of the rows' distances, ``max(s_{i, a_i} + ||xc_i||^2, 0)`` (cosine: of
    the chosen similarities ``s_{i, a_i}``).
    """
    x, codes, indices, cosine = passes.x, passes.codes, passes.indices, passes.cosine
    D = x.shape[1]
    K = means.shape[0]
    step = buf.scores.shape[0]
    sums = np.zeros((K, D)) if buf.onehot_sums is not None else None  # (K, D) float64
    best = 0.0
    for start in range(rows[0], rows[1], step):
        stop = min(start + step, rows[1])
        n = stop - start
        s = buf.scores[:n]  # (n, K)
        idx = indices[start:stop]  # (n,) written in place
        if cosine:
            np.matmul(x[start:stop], codes[:D], out=s)  # x . mu
            np.argmax(s, axis=1, out=idx)
        else:
            np.matmul(passes.rows1[start:stop], codes, out=s)  # |cc|^2 - 2 xc . cc
            np.argmin(s, axis=1, out=idx)
        chosen = np.take(s.reshape(-1), idx + buf.row_offsets[:n], mode="clip")  # (n,) s[i, a_i]
        if not cosine:  # the distance, as nearest_code's score: ||xc_i||^2 added back, clamped
            chosen = np.maximum(np.add(chosen, passes.norms[start:stop], out=chosen), 0, out=chosen)  # (n,)
        best += float(np.sum(chosen, dtype=np.float64))
        if sums is not None:
            mu = np.take(means, idx, axis=0, out=buf.picked[:n], mode="clip")  # (n, D) mu_{a_i}
            dev = np.subtract(x[start:stop], mu, out=buf.deviations[:n], dtype=np.float64)  # x_i - mu_{a_i}
            sums += buf.onehot_sums(dev, idx)  # (K, D)
    return sums, best


class _OneHotSums:
    """``onehot(idx, K)^T @ rows``, the (K, D) sums of each cluster's rows of a block, by scipy.

    The transposed one-hot matrix is a (K, n) compressed-sparse-column matrix with one entry per
    column (row i of the block goes to cluster idx[i]); its product with the dense block is a
    scatter-add in compiled code, in the order of the rows.  Building a scipy matrix checks its
    structure, which costs about as much as the product itself for a few thousand rows, so the
    matrix of a full block is built once over an int32 buffer of ids, and each full block only
    writes its ids into that buffer.  A shorter block (the last of a range) builds its own, and
    so does every block if scipy ever copies the buffer instead of keeping it.
    """

    def __init__(self, step: int, K: int) -> None:
        self.K = K
        self.ids = np.zeros((step,), dtype=np.int32)  # (n,) the ids of the current full block
        ptr = np.arange(step + 1, dtype=np.int32)  # (n + 1,) one entry per column
        full = _sparse.csc_matrix((np.ones((step,)), self.ids, ptr), shape=(K, step))  # (K, n)
        self.full = full if np.shares_memory(full.indices, self.ids) else None

    def __call__(self, rows: np.ndarray, idx: np.ndarray) -> np.ndarray:
        n = idx.shape[0]
        if self.full is not None and n == self.ids.shape[0]:
            self.ids[:] = idx
            return np.asarray(self.full @ rows)  # (K, D)
        onehot_t = _sparse.csc_matrix((np.ones((n,)), idx, np.arange(n + 1)), shape=(self.K, n))  # (K, n)
        return np.asarray(onehot_t @ rows)  # (K, D)
