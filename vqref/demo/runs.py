"""Which training runs ``vqref demo`` makes, how it makes them, and how seeds are summarised.

Symbols: K the command's codebook size, Q its residual depths, T tokens per image, S seeds.

**The runs.**  Every configuration of :data:`vqref.demo.train.CONFIGS` that the command names,
once per seed (``--seed``, ``--seed + 1``, ..., S seeds: the weights, codebooks and batches change,
the held-out images do not).  Then the extra points of the rate-distortion plot: the same
training with another codebook size or number of depths, so that bits per image,
``T * sum over depths of log2 K``, vary (:func:`rate_points`).

**The summary.**  A configuration's numbers over its seeds are reported as the mean and the
sample standard deviation (``ddof=1``; 0 with one seed), and :mod:`vqref.demo.claims` compares
two configurations seed by seed: with one seed both start from the same weights and see the
same batches, so the difference of a pair is the effect of the technique on that draw.

**Execution.**  Each run depends only on its configuration, its settings and its seed, so the
runs can go to a pool of worker processes (``--jobs``) and give the same numbers, bit for bit,
as one after the other in one process.  Each process limits its BLAS library to one thread.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np

from .datasets import Dataset, load_dataset, make_model
from .train import RunResult, TrainSettings, train_one

__all__ = [
    "Run",
    "Summary",
    "default_jobs",
    "execute",
    "plan",
    "rate_points",
    "single_threaded_blas",
    "summarise",
    "train_run",
]


@dataclass(frozen=True)
class Run:
    """One training run: a configuration, on a dataset, with a codebook size, depths and a seed."""

    dataset: str  # "digits" or "photos"
    config: str  # a name of CONFIGS
    codebook_size: int  # K asked for (FSQ and LFQ get the nearest size they can make)
    depths: int  # Q, for the residual configurations (the others ignore it)
    seed: int
    table: bool  # True: a configuration of the results table; False: an extra rate-distortion point

    @property
    def variant(self) -> tuple:
        """What the seeds of one summary share: everything but the seed."""
        return (self.dataset, self.config, self.codebook_size, self.depths, self.table)

    @property
    def label(self) -> str:
        """``ema`` for a table configuration, ``ema K=16`` / ``residual K=16 Q=2`` for an extra point."""
        if self.table:
            return self.config
        depth = f" Q={self.depths}" if self.config.startswith("residual") else ""
        return f"{self.config} K={self.codebook_size}{depth}"


def rate_points(K: int, Q: int, *, full: bool) -> list[tuple[str, int, int]]:
    """The extra ``(config, K', Q')`` of the rate-distortion plot, around the command's K and Q.

    Default: one codebook of K/16 and of 4K codes (4 bits less and 2 bits more per token than
    K = 256) for VQ, FSQ, LFQ; a residual stack of sqrt(K) codes in Q depths (at Q = 2 the bits
    of one codebook of K codes: depth against size at equal bits) and one depth more at K.
    ``full`` adds K/4 codes, and sqrt(K) codes in 2Q depths (the bits of the Q-depth stack of K).
    """
    small, large, root = max(2, K // 16), 4 * K, max(2, round(math.sqrt(K)))
    points = [("ema", small, 1), ("ema", large, 1), ("fsq", small, 1), ("lfq", small, 1)]
    points += [("residual", root, Q), ("residual", K, Q + 1)]
    if full:
        quarter = max(2, K // 4)
        points += [("fsq", large, 1), ("lfq", large, 1), ("ema", quarter, 1), ("fsq", quarter, 1)]
        points += [("lfq", quarter, 1), ("residual", root, 2 * Q)]
    return points


def plan(datasets: list[str], configs: list[str], seeds: list[int], K: int, Q: int, *, rate: str) -> list[Run]:
    """The runs of a command, in the order of the report: per dataset, the table's configurations
    seed by seed, then the extra rate-distortion points (``rate``: ``"none"``, ``"default"`` or
    ``"full"``) whose configuration the command trains.  A point equal to a table
    configuration (the residual stack of K codes in Q depths, ...) is that configuration's run."""
    runs = []
    for data in datasets:
        table = [Run(data, c, K, Q, seed, True) for c in configs for seed in seeds]
        runs += table
        if rate == "none":
            continue
        have = {(r.config, r.codebook_size, r.depths if r.config.startswith("residual") else 1) for r in table}
        for config, k, q in rate_points(K, Q, full=rate == "full"):
            if config in configs and (config, k, q) not in have:
                runs += [Run(data, config, k, q, seed, False) for seed in seeds]
                have.add((config, k, q))
    return runs


@dataclass
class Summary:
    """A configuration's results over its seeds."""

    run: Run  # the first seed's run (dataset, config, K, Q)
    results: list[RunResult]  # one per seed, in seed order

    def values(self, metric: str) -> np.ndarray:
        """``metric`` ("test_mse", "perplexity", "codes_used", "quantization_error", ...) per seed."""
        return np.asarray([getattr(r, metric) for r in self.results], dtype=np.float64)

    def mean(self, metric: str) -> float:
        return float(np.mean(self.values(metric)))

    def std(self, metric: str) -> float:
        """The sample standard deviation over the seeds (0 for one seed)."""
        v = self.values(metric)
        return float(np.std(v, ddof=1)) if v.size > 1 else 0.0

    @property
    def label(self) -> str:
        return self.run.label

    @property
    def first(self) -> RunResult:
        return self.results[0]


def summarise(runs: list[Run], results: list[RunResult]) -> list[Summary]:
    """Group the results of ``runs`` (in the same order) by everything but the seed, keeping the order."""
    groups: dict[tuple, Summary] = {}
    for run, result in zip(runs, results):
        if run.variant not in groups:
            groups[run.variant] = Summary(run, [])
        groups[run.variant].results.append(result)
    return list(groups.values())


# --------------------------------------------------------------------------------------------
# Execution
# --------------------------------------------------------------------------------------------


def single_threaded_blas():
    """Limit BLAS to one thread, when threadpoolctl (a scikit-learn dependency) exists.

    The matrices here are tiny (at most batch x 256), so threads cannot pay off, and when the
    cores are busy OpenBLAS's spinning worker threads slowed a training step about 50-fold in
    our measurements.  One thread also makes the sums, hence the numbers, independent of the
    machine's core count.  Returns a context manager (which also works as a plain call).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings it
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


@lru_cache(maxsize=4)
def _data(name: str, split_seed: int, sizes: tuple) -> Dataset:
    """The dataset, loaded once per process (a worker trains several runs on it)."""
    return load_dataset(name, split_seed, *sizes)


def train_run(run: Run, s: TrainSettings, split_seed: int, sizes: tuple, progress: Any = None) -> RunResult:
    """Train one run: its dataset (cached; ``sizes`` = (train_size, test_size) of
    :func:`vqref.demo.datasets.load_dataset`), its model, :func:`vqref.demo.train.train_one`."""
    data = _data(run.dataset, split_seed, tuple(sizes))
    settings = replace(s, seed=run.seed, codebook_size=run.codebook_size, depths=run.depths)
    model = make_model(run.dataset, run.config, settings)
    return train_one(run.config, settings, data.train, data.test, data.show, progress=progress, model=model)


def _worker_init() -> None:
    single_threaded_blas()  # for the worker's lifetime


def _train_task(task: tuple) -> tuple[int, RunResult]:
    """A worker's job: ``(i, run, settings, split_seed, sizes)`` -> ``(i, result)``."""
    i, *args = task
    return i, train_run(*args)


def execute(
    runs: list[Run],
    settings: Callable[[Run], TrainSettings],
    split_seed: int,
    sizes: Callable[[Run], tuple],
    *,
    jobs: int,
    serial: Callable[[int, Run], RunResult],
    done: Callable[[int, Run, RunResult], None],
) -> list[RunResult]:
    """Train ``runs`` and return their results in the same order.

    ``jobs == 1`` (or one run): one after the other in this process, each by ``serial(i, run)``
    (the command line's progress bars).  Otherwise a pool of ``jobs`` worker processes (spawned,
    so that nothing of this process's state leaks into them) trains them in any order; a run's
    exception, or an interrupt, stops the pool's processes at once and is raised here.
    ``done(i, run, result)`` is called as each run finishes.
    """
    if jobs <= 1 or len(runs) <= 1:
        results = []
        for i, run in enumerate(runs):
            results.append(serial(i, run))
            done(i, run, results[-1])
        return results
    import multiprocessing

    out: list[Any] = [None] * len(runs)
    tasks = [(i, run, settings(run), split_seed, sizes(run)) for i, run in enumerate(runs)]
    pool = multiprocessing.get_context("spawn").Pool(jobs, initializer=_worker_init)
    try:
        for i, result in pool.imap_unordered(_train_task, tasks):  # a worker's exception is raised here
            out[i] = result
            done(i, runs[i], result)
        pool.close()
    except BaseException:
        pool.terminate()  # the other runs' results would be thrown away: stop them now
        raise
    finally:
        pool.join()
    return out


def default_jobs(n_runs: int) -> int:
    """The CPU cores this process may use, at most ``n_runs``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, n_runs))
