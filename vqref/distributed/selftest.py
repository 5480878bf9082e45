"""``python -m vqref.distributed``: check that the ranks reproduce one process (:func:`selftest`).

Symbols: R ranks, K codes, D features.
"""

from __future__ import annotations

import sys

import numpy as np

from .comm import Communicator, MPIComm, SingleProcess, as_comm

__all__ = ["selftest", "main"]


def selftest(comm: Communicator = None, *, seed: int = 0) -> dict:
    """Check that the ranks of ``comm`` reproduce one process on the whole batch.

    Every rank builds the same global batch from ``seed``, keeps an unequal share of it (rank 0
    the smallest), and runs k-means initialisation and three EMA steps with dead-code restarts on
    it through ``comm`` (codes below the average count restarted); it also runs them alone on
    the whole batch.  The data are multiples of 1/4 and the decay is 1/2, so every sum is exact
    whatever the order of the additions: the states after each step must be bit-identical to
    the single process's, on every rank.

    Returns
    -------
    dict: ``ranks``, ``rows`` (this rank's), ``steps`` (states compared), ``restarts`` (codes
    restarted in all steps)

    Raises
    ------
    AssertionError on every rank, if any check fails on any rank.
    """
    from ..core.ema import expire_dead_codes
    from ..core.state import kmeans_init_state, training_update
    from ..ops.distance import nearest_code

    comm = as_comm(comm)
    R, K, D = comm.size, 7, 3
    gen = np.random.default_rng(seed)
    x = np.round(gen.standard_normal((R * (R + 1) * 3 + 5, D)) * 4) / 4  # quarter steps: sums are exact
    bounds = np.concatenate([[0], np.cumsum(np.arange(1, R + 1) * 3)])  # rank r: 3 (r + 1) rows
    bounds[-1] = x.shape[0]
    part = x[bounds[comm.rank] : bounds[comm.rank + 1]]
    threshold = x.shape[0] / K  # codes below the average count are restarted

    def train(rows: np.ndarray, c: Communicator) -> tuple[list, int]:
        state = kmeans_init_state(rows, K, iters=1, rng=np.random.default_rng(seed), eps=1e-5, comm=c)
        history, rng, restarts = [state], np.random.default_rng(seed + 1), 0
        for step in range(3):
            idx = nearest_code(rows, state.codebook, metric="euclidean")  # (N_r,)
            state = training_update(state, rows, idx, decay=0.5, eps=1e-5, comm=c)  # the EMA step
            state, dead = expire_dead_codes(state, rows, threshold=threshold, rng=rng, comm=c)  # (K,) restarted
            history.append(state)
            restarts += int(np.sum(dead))
        return history, restarts

    (mine, restarts), (whole, _) = train(part, comm), train(x, SingleProcess())
    problems = [
        f"step {step}: {name} differs from one process"
        for step, (a, b) in enumerate(zip(mine, whole))
        for name, u, v in zip(a._fields, a, b)
        if not np.array_equal(u, v)
    ]
    digest = b"".join(np.concatenate([u.ravel() for u in s]).tobytes() for s in mine)
    if any(d != digest for d in comm.allgather(digest)):
        problems.append("the ranks hold different states")
    failures = [p for r, found in enumerate(comm.allgather(problems)) for p in (f"rank {r}: {q}" for q in found)]
    if failures:
        raise AssertionError("; ".join(failures))
    return {"ranks": R, "rows": int(part.shape[0]), "steps": len(mine), "restarts": restarts}


def main() -> int:
    """``python -m vqref.distributed``: the selftest on ``MPI.COMM_WORLD``; rank 0 reports every rank."""
    try:
        comm = MPIComm()
    except ImportError as e:
        print(e, file=sys.stderr)
        return 2
    try:
        results = comm.allgather(selftest(comm))
    except AssertionError as e:  # raised on every rank alike
        if comm.rank == 0:
            print(f"FAILED {e}", flush=True)
        return 1
    if comm.rank == 0:
        for r, res in enumerate(results):
            print(
                f"rank {r}/{comm.size}: ok, {res['rows']} rows, {res['steps']} states bit-identical "
                f"({res['restarts']} codes restarted)",
                flush=True,
            )
    return 0
