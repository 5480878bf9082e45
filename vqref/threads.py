"""Worker threads for numpy's fast paths, with numpy's BLAS held to one thread while they run.

numpy threads the matrix product (its BLAS), and nothing else: on a machine with two cores the
argmin after a product, the gathers and the sums leave one core idle.  The fast paths that split
their rows between W worker threads instead -- each worker running the whole pipeline of a block
(product, argmin, ...) with a single-threaded BLAS, as scikit-learn's k-means does -- use the
helpers here:

* :func:`blas_threads`: how many threads numpy's BLAS has (W follows it), as threadpoolctl
  reports it; 1 without threadpoolctl, which is then never asked for anything else;
* :class:`BlasLimit`: a context in which every BLAS runs one thread.  The limit is process-wide,
  so one such context at a time holds it (a lock): two overlapping calls from threads of one
  process cannot save and restore the limit out of order.  Another thread's BLAS call made
  while it is held runs on one thread;
* :func:`worker_pool`: one thread pool per process for these workers, made on first use;
* :func:`for_blocks`: a blocked elementwise pass (the fast paths' ``for start in range(0, N,
  step)`` loops) with its blocks split between the workers.  Elementwise results do not depend
  on which thread computes a block, so the numbers are those of the loop, bit for bit.

The workers run numpy (and scipy) calls that release the GIL.  threadpoolctl is not a dependency
of vqref (it comes with scikit-learn); without it every fast path that uses workers runs W = 1.
"""

from __future__ import annotations

import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import nullcontext
from typing import Any, Callable

try:  # optional: reads and limits the BLAS threads
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn in the test environment
    ThreadpoolController = None

__all__ = [
    "ThreadpoolController",
    "blas_threads",
    "BlasLimit",
    "worker_pool",
    "run_workers",
    "controller",
    "block_rows",
    "for_blocks",
]

_BLOCK_ELEMENTS = 1 << 19  # numbers in a default score block (2 MiB in float32)
_MIN_ROWS, _MAX_ROWS = 256, 8192

_BLAS_LOCK = threading.Lock()
_POOL_LOCK = threading.Lock()
_POOLS: dict[int, ThreadPoolExecutor] = {}
_CONTROLLER: list = []


def controller() -> Any:
    """The process's threadpoolctl controller (made on first use), or None without threadpoolctl.

    A controller sees the libraries loaded when it is made; numpy's BLAS is loaded with numpy,
    and the limit is only needed for numpy's products.
    """
    if ThreadpoolController is None:
        return None
    with _POOL_LOCK:
        if not _CONTROLLER:
            _CONTROLLER.append(ThreadpoolController())
        return _CONTROLLER[0]


def blas_threads(ctl: Any) -> int:
    """numpy's BLAS threads as ``ctl`` (a threadpoolctl controller) reports them; 1 for None."""
    if ctl is None:
        return 1
    libs = ctl.select(user_api="blas").lib_controllers
    own = [lib for lib in libs if "numpy" in str(lib.filepath)] or libs  # numpy's own BLAS first
    return max((lib.num_threads for lib in own), default=1)


class BlasLimit:
    """A context in which every BLAS of ``ctl`` uses one thread, and no other such context runs."""

    def __init__(self, ctl: Any) -> None:
        self.controller = ctl
        self.limit = None

    def __enter__(self) -> None:
        _BLAS_LOCK.acquire()
        try:
            self.limit = self.controller.limit(limits=1, user_api="blas")
        except BaseException:
            _BLAS_LOCK.release()
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            self.limit.restore_original_limits()
        finally:
            _BLAS_LOCK.release()


def worker_pool(workers: int) -> ThreadPoolExecutor:
    """The process's pool of ``workers`` threads for the fast paths (made on first use, kept).

    Tasks from overlapping calls queue in it; a task never waits for another task of the pool.
    """
    with _POOL_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="vqref-worker")
        return pool


def run_workers(fn: Callable[[int], Any], W: int, pool: ThreadPoolExecutor | None = None) -> list:
    """``[fn(0), ..., fn(W - 1)]``, each call on a thread of ``pool`` (default :func:`worker_pool`).

    Each call runs in a copy of the caller's context, so that context variables reach the
    workers -- numpy's ``errstate`` is one: an overflow inside ``np.errstate(over="ignore")``
    stays silent on the workers too.  Returns when every call is done, with their results in
    order, or raises the first failed call's exception after all have stopped.
    """
    pool = worker_pool(W) if pool is None else pool
    futures = [pool.submit(contextvars.copy_context().run, fn, w) for w in range(W)]
    wait(futures)
    return [f.result() for f in futures]


def block_rows(num_codes: int) -> int:
    """Rows per worker block by default: a (n, K) score block of about 2^19 numbers, 256 to 8192 rows.

    Measured on 2 cores with two workers (a shared machine).  k-means, N = 65536, D = 64,
    K = 256: blocks of 1024-4096 rows ran within a few percent of each other, 2048 rows best in
    most runs, 512 rows 1.2-1.3x slower (the per-block numpy and scipy calls) and 8192 rows
    1.1-1.3x slower (the score block no longer stays in cache between the product and the
    argmin).  The nearest-code search, D = 256: 512 rows best for K = 1024 (1.05-1.06x one
    matrix product; 256 and 1024 rows 1.08x, 2048 rows 1.13-1.19x) and 256 rows for K = 4096
    (1.09x; 128 rows 1.12x, 1024 rows 1.15x).
    """
    return max(_MIN_ROWS, min(_MAX_ROWS, _BLOCK_ELEMENTS // max(int(num_codes), 1)))


def workers() -> int:
    """W for the fast paths: numpy's BLAS threads (the number of cores the caller lets numpy use)."""
    return blas_threads(controller())


def for_blocks(
    N: int, step: int, fn: Callable[[int, int], None], *, num_workers: int | None = None, blas: bool = False
) -> None:
    """Call ``fn(start, stop)`` for the blocks ``[0, step), [step, 2 step), ...`` of N rows.

    With W > 1 workers (default :func:`workers`) and at least two blocks, the blocks are split
    into W contiguous ranges, one per worker thread, and this returns when every block is done
    (raising the first worker's exception, if any, after all have stopped).  ``fn`` must write
    only rows ``start:stop`` of its outputs and read no row that another block writes; numpy
    releases the GIL inside its elementwise loops, so the blocks run on W cores.  ``blas``: ``fn``
    calls numpy's BLAS (a matrix product per block), which is then held to one thread while the
    workers run (:class:`BlasLimit`).  The workers run in copies of the caller's context
    (:func:`run_workers`).
    """
    step = max(1, int(step))
    blocks = -(-int(N) // step)
    W = max(1, min(int(num_workers) if num_workers else workers(), blocks))
    if W == 1:
        for start in range(0, N, step):
            fn(start, min(start + step, N))
        return
    edges = [step * (blocks * w // W) for w in range(W + 1)]  # block-aligned ranges

    def run(w: int) -> None:
        for start in range(edges[w], min(edges[w + 1], N), step):
            fn(start, min(start + step, N))

    ctl = controller() if blas else None
    with BlasLimit(ctl) if ctl is not None else nullcontext():
        run_workers(run, W)
