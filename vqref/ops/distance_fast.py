"""numpy fast path of the nearest-code search: the rows split between worker threads.

Symbols: N vectors, D features, K codes, W worker threads, n rows in one block.

:func:`vqref.ops.distance.nearest_code_portable` is the definition, and
:func:`vqref.ops.distance.nearest_code_inplace` its single-threaded numpy form: per chunk of
rows one matrix product (numpy's BLAS threads it) and one argmin (on one core).  On two cores
the argmin, a fifth of the search, leaves one core idle, and the chunk's (chunk, K) score block
is too large to stay in cache between the product and the argmin.

:func:`nearest_code_threaded` computes the same scores as :func:`nearest_code_inplace`

    s = [x_b - m, 1] @ [[-2 cc^T], [||cc||^2]]    (n, K)   ||x_i - c_k||^2 less ||x_i - m||^2
    a = argmin_k s                                (n,)     (dot: s = x_b @ c^T, a = argmax)

but W worker threads each take a contiguous range of rows and run both steps block after
block, with numpy's BLAS held to one thread (:mod:`vqref.threads`), as scikit-learn's k-means
does.  A block holds :func:`vqref.threads.block_rows` rows (a 2 MiB score block, 256
to 8192 rows), which stays in cache.  Measured on 2 cores, float32, D = 256: the search took
1.25-1.29x one (N x D)(D x K) matrix product single-threaded in chunks (K = 1024 and 4096), and
1.05-1.09x with two workers.

What it changes: the rows each product sees, and the BLAS threads of each product.  The
BLAS may round a row's scores differently in another block (a row at a block's edge can go to
another kernel), so the scores are those of :func:`nearest_code_inplace` to rounding and the
indices the same except between codes that tie to within it; the tests hold both paths to the
definition on random data, at the clamp and on ties.  For one W and block size the result is
the same on every run (each worker's rows and blocks are fixed).  W follows numpy's BLAS
threads; with threadpoolctl missing, one BLAS thread, or fewer than two blocks of rows,
:func:`use_threads` says no and :func:`vqref.ops.distance.nearest_code` runs
:func:`nearest_code_inplace` instead.
"""

from __future__ import annotations

import numpy as np

from .. import threads
from ..threads import block_rows

__all__ = ["nearest_code_threaded", "use_threads", "search_workers"]


def search_workers() -> int:
    """W: numpy's BLAS threads (1 without threadpoolctl)."""
    return threads.workers()


def use_threads(N: int, K: int, chunk_size: int | None = None) -> bool:
    """Whether the threaded search applies: W > 1 and at least two full blocks of rows."""
    rows = int(chunk_size) if chunk_size else block_rows(K)
    return N >= 2 * rows and search_workers() > 1


def nearest_code_threaded(
    x: np.ndarray,
    codebook: np.ndarray,
    *,
    metric: str = "euclidean",
    chunk_size: int | None = None,
    return_score: bool = False,
    return_codes: bool = False,
    workers: int | None = None,
):
    """:func:`vqref.ops.distance.nearest_code` on W worker threads; same arguments and results.

    Parameters
    ----------
    x : (N, D) numpy float array
    codebook : (K, D) numpy array of x's dtype
    metric, return_score, return_codes : as in :func:`vqref.ops.distance.nearest_code`; each
        worker gathers the chosen codes of a block right after its argmin, so the lookup runs on
        every worker and the output's pages are first touched there
    chunk_size : rows per block of each worker (default :func:`block_rows`): memory W blocks of
        (n, K) scores and (n, D + 1) centred rows
    workers : W (default :func:`search_workers`); no more than there are rows

    Returns
    -------
    indices : (N,) int64
    score : (N,) x's dtype, only if ``return_score``
    codes : (N, D) ``codebook[indices]``, only if ``return_codes``
    """
    N, D = x.shape
    K = codebook.shape[0]
    dtype = x.dtype
    W = max(1, min(int(workers) if workers else search_workers(), max(N, 1)))
    rows = max(1, min(int(chunk_size) if chunk_size else block_rows(K), -(-max(N, 1) // W)))
    euclid = metric == "euclidean"
    indices = np.empty((N,), dtype=np.int64)
    score = np.empty((N,), dtype=dtype) if return_score else None
    gathered = np.empty((N, D), dtype=codebook.dtype) if return_codes else None
    if euclid:
        m = np.mean(codebook, axis=0)  # (D,) common centre
        cc = codebook - m  # (K, D) centred codes
        codes = np.empty((D + 1, K), dtype=dtype)  # (D + 1, K) = [[-2 cc^T], [||cc||^2]]
        np.multiply(cc.T, -2, out=codes[:D])
        codes[D] = np.vecdot(cc, cc)
    else:
        m, codes = None, codebook.T  # (D, K)
    bounds = [N * w // W for w in range(W + 1)]  # worker w takes rows bounds[w]:bounds[w + 1]

    def work(w: int) -> None:
        s_buf = np.empty((rows, K), dtype=dtype)  # (n, K) scores
        x_buf = np.ones((rows, D + 1), dtype=dtype) if euclid else None  # (n, D + 1) = [x - m, 1]
        offsets = np.arange(0, rows * K, K) if return_score else None  # (n,) flat index of each row
        for start in range(bounds[w], bounds[w + 1], rows):
            stop = min(start + rows, bounds[w + 1])
            n = stop - start
            s, idx = s_buf[:n], indices[start:stop]  # idx is written in place
            if euclid:
                xc1 = x_buf[:n]
                np.subtract(x[start:stop], m, out=xc1[:, :D])  # centred rows; column D stays 1
                np.matmul(xc1, codes, out=s)  # ||c||^2 - 2 xc . c
                np.argmin(s, axis=1, out=idx)
            else:
                np.matmul(x[start:stop], codes, out=s)  # x . c
                np.argmax(s, axis=1, out=idx)
            if return_score:
                best = np.take(s.reshape(-1), idx + offsets[:n])  # (n,) s[i, idx[i]]
                if euclid:  # the distance: ||xc||^2 added back, clamped at 0
                    xc = xc1[:, :D]
                    best = np.maximum(best + np.vecdot(xc, xc), 0)
                score[start:stop] = best
            if return_codes:
                np.take(codebook, idx, axis=0, out=gathered[start:stop], mode="clip")  # the block's lookup (valid ids)

    if W == 1:
        work(0)
    else:
        with threads.BlasLimit(threads.controller()):
            threads.run_workers(work, W)  # every worker done before the limit is lifted, even if one failed
    out = (indices,) + ((score,) if return_score else ()) + ((gathered,) if return_codes else ())
    return out if len(out) > 1 else indices
