"""Data-parallel quantizer modules: ``comm``, ``sync_codebook``, ``sync_kmeans`` (docs/distributed.md §10).

The equivalence itself -- R ranks on the parts of every batch give one process's outputs,
losses, statistics, state and (summed) gradients -- runs as the ``module`` scenarios of
tests/mpi_scenarios.py, on threads (tests/test_distributed.py, every backend) and on MPI
processes (``mpiexec -n 2``, tests/mpi_worker.py).  Here: its negative controls, the options
that switch it off, refusals that stop every rank, and the module-level plumbing.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
from mpi_scenarios import MODULES, Lib, run_case

from vqref import GroupedResidualVQ, ResidualVQ, VectorQuantize
from vqref import backend as B
from vqref.distributed import SingleProcess, ThreadComm, run_in_threads

D, K = 5, 7


def host(a):
    return np.asarray(B.to_numpy(a))


def _steps(comm, sizes, make, steps=2, tokens=3):
    """Each rank its samples of ``steps`` batches; returns the rank's module."""
    m = make(comm)
    for step in range(steps):
        gen = np.random.default_rng(step)
        x = gen.standard_normal((sum(sizes), tokens, D))
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        mine = x[bounds[comm.rank] : bounds[comm.rank + 1]]
        m(mine)
        if m.training and m.codebook_is_learnable:
            m.backward(np.zeros_like(mine))
    return m


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_three_ranks_one_of_them_empty(kind):
    problems = run_in_threads(lambda c: run_case(c, "module", (2, 0, 3), Lib(), kind=kind), 3)
    assert problems == [[]] * 3, problems[0]


def test_without_sync_codebook_the_ranks_part():
    make = lambda c: ResidualVQ(dim=D, num_quantizers=2, codebook_size=K, seed=0, comm=c, sync_codebook=False,
                                dtype="float64")  # noqa: E731  # fmt: skip
    ranks = run_in_threads(lambda c: _steps(c, (2, 3), make).state_dict(), 2)
    one = _steps(SingleProcess(), (5,), make).state_dict()
    assert not np.allclose(ranks[0]["0.codebook"], ranks[1]["0.codebook"])  # every rank its own rows
    assert not np.allclose(ranks[0]["0.codebook"], one["0.codebook"])
    synced = run_in_threads(lambda c: _steps(c, (2, 3), lambda cc: ResidualVQ(
        dim=D, num_quantizers=2, codebook_size=K, seed=0, comm=cc, dtype="float64")).state_dict(), 2)  # fmt: skip
    np.testing.assert_allclose(synced[0]["0.codebook"], one["0.codebook"], rtol=1e-12)


def test_without_sync_kmeans_each_rank_clusters_its_rows():
    def make(c, sync_kmeans):
        return VectorQuantize(D, K, seed=0, comm=c, kmeans_init=True, kmeans_iters=2, sync_kmeans=sync_kmeans,
                              dtype="float64", decay=1.0)  # fmt: skip

    apart = run_in_threads(lambda c: _steps(c, (3, 4), lambda cc: make(cc, False), steps=1).codebook.copy(), 2)
    together = run_in_threads(lambda c: _steps(c, (3, 4), lambda cc: make(cc, True), steps=1).codebook.copy(), 2)
    np.testing.assert_array_equal(together[0], together[1])
    assert not np.allclose(apart[0], apart[1])


def test_a_rank_refusing_its_input_stops_every_rank_and_changes_nothing():
    def work(c):
        m = ResidualVQ(dim=D, num_quantizers=2, codebook_size=K, seed=0, comm=c, kmeans_init=True)
        before = {k: host(v).copy() for k, v in m.state_dict().items()}
        x = np.random.default_rng(c.rank).standard_normal((4, D))
        if c.rank == c.size - 1:
            x[0, 0] = np.nan
        try:
            m(x)
            raised = None
        except (ValueError, RuntimeError) as e:
            raised = type(e).__name__
        same = all(np.array_equal(before[k], host(v)) for k, v in m.state_dict().items())
        m(np.random.default_rng(c.rank).standard_normal((4, D)))  # the ranks are still in step
        return raised, same, m.layers[0].initted

    out = run_in_threads(work, 3)
    assert [r[0] for r in out] == ["RuntimeError", "RuntimeError", "ValueError"]
    assert all(r[1] and r[2] for r in out)


def test_ranks_seeded_differently_are_refused():
    def work(c):
        m = ResidualVQ(dim=D, num_quantizers=3, codebook_size=K, seed=c.rank, comm=c, quantize_dropout=True)
        try:
            m(np.ones((3, 2, D)))
        except ValueError as e:
            return str(e)

    messages = run_in_threads(work, 2)
    assert all(m is not None and "same seed" in m for m in messages)


def test_grouped_modules_share_the_step_too():
    make = lambda c: GroupedResidualVQ(dim=6, groups=2, num_quantizers=2, codebook_size=K, seed=0, comm=c,
                                       threshold_ema_dead_code=1.0, dtype="float64")  # noqa: E731  # fmt: skip

    def steps(c, sizes):
        m = make(c)
        for step in range(2):
            x = np.random.default_rng(step).standard_normal((sum(sizes), 3, 6))
            bounds = np.concatenate([[0], np.cumsum(sizes)])
            m(x[bounds[c.rank] : bounds[c.rank + 1]])
        return {k: host(v) for k, v in m.state_dict().items()}

    ranks = run_in_threads(lambda c: steps(c, (1, 3)), 2)
    one = steps(SingleProcess(), (4,))
    for key, value in one.items():
        np.testing.assert_allclose(ranks[0][key], value, rtol=1e-12, err_msg=key)
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key])


def test_copies_are_single_process_and_the_comm_is_not_configuration():
    comm = ThreadComm.group(2)[0]
    m = VectorQuantize(D, K, comm=comm)
    assert m.comm is comm and m.communicators()[0] is comm
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert isinstance(other.comm, SingleProcess)
    assert "comm" not in m.config() and m.config()["sync_codebook"] is None
    m.comm = None
    assert isinstance(m.comm, SingleProcess)
    assert isinstance(VectorQuantize(D, K, comm=comm, sync_codebook=False).communicators()[0], SingleProcess)
    with pytest.raises(TypeError):
        VectorQuantize(D, K, comm="mpi")
