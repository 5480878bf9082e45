"""Data-parallel state updates (vqref.distributed and the ``comm`` argument of vqref.core).

The property: R ranks, each with its part of a batch, end in the state one process reaches on
the whole batch -- bit-identical where no float sum is involved (counts, sampled rows,
restarts), to rounding where sums are added in another order -- and every rank holds the same
bits.  The scenarios live in tests/mpi_scenarios.py; here they run with the ranks as threads
(same reduction code as MPI, another transport), and at the end under ``mpiexec -n 2``.
vector-quantize-pytorch's reported desyncs are among the cases: k-means initialisation with
different data per rank (its issues #17, #25), EMA with unequal batches and an empty rank
(issue #10), dead codes restarted from the global batch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from mpi_scenarios import MPI_CASES, SCENARIOS, K, Lib, batch, ema_state, refusals, run_case

from vqref import backend as B
from vqref.core.ema import EMAState, expire_dead_codes
from vqref.core.kmeans import kmeans
from vqref.core.state import kmeans_init_state, training_update
from vqref.distributed import (
    Communicator,
    MPIComm,
    RowLayout,
    SingleProcess,
    ThreadComm,
    as_comm,
    check_same,
    gather_rows,
    refuse_together,
    row_layout,
    run_in_threads,
    selftest,
)

ROOT = Path(__file__).resolve().parents[1]


def per_rank(fn, size):
    """``fn(comm)`` on ``size`` thread ranks; each rank's result or the exception it raised."""

    def guarded(comm):
        try:
            return fn(comm)
        except (ValueError, TypeError, RuntimeError) as e:
            return e

    return run_in_threads(guarded, size)


class NoSync(ThreadComm):
    """Negative control: a communicator that forgets to reduce (each rank keeps its own sums)."""

    def allreduce_sum(self, a):
        return a


class Averaging(ThreadComm):
    """Negative control: averages over ranks instead of adding (the naive 'average the means')."""

    def allreduce_sum(self, a):
        total = ThreadComm.allreduce_sum(self, a)
        return total / self.size if total.dtype.kind == "f" else total


# ------------------------------------------------------------------------------------------
# the communicators
# ------------------------------------------------------------------------------------------


def test_single_process_is_the_identity_without_a_copy(bk):
    comm = SingleProcess()
    a = bk.asarray(np.arange(6.0).reshape(2, 3))
    assert comm.allreduce_sum(a) is a  # nothing copied: zero overhead for one process
    assert comm.allgather({"n": 3}) == [{"n": 3}] and comm.broadcast("x") == "x"
    assert (comm.rank, comm.size) == (0, 1)
    with pytest.raises(TypeError, match="a must be an array"):
        comm.allreduce_sum([1.0, 2.0])
    with pytest.raises(ValueError, match=r"root must be a rank in \[0, 1\)"):
        comm.broadcast("x", root=1)


def test_allreduce_adds_in_rank_order_and_every_rank_gets_the_same_bits():
    # ((1e16 + 1) - 1e16) = 0 in float64, while any other order that adds the 1 last gives 1
    values = [1e16, 1.0, -1e16]
    out = run_in_threads(lambda c: c.allreduce_sum(np.full((2,), values[c.rank])), 3)
    for total in out:
        np.testing.assert_array_equal(total, [0.0, 0.0])
    ints = run_in_threads(lambda c: c.allreduce_sum(np.arange(4) * (c.rank + 1)), 2)
    assert all(t.dtype == np.int64 and list(t) == [0, 3, 6, 9] for t in ints)


def test_allreduce_keeps_the_library_dtype_and_shape(bk):
    def fn(comm):
        return comm.allreduce_sum(bk.asarray(np.full((3, 2), comm.rank + 0.5)))

    for total in run_in_threads(fn, 2):
        assert B.library_name(total) == bk.name and total.dtype == bk.dtype and total.shape == (3, 2)
        np.testing.assert_array_equal(bk.np(total), np.full((3, 2), 2.0))


def test_allreduce_refuses_other_shapes_on_every_rank():
    out = per_rank(lambda c: c.allreduce_sum(np.zeros(3 + c.rank)), 2)
    assert all(isinstance(e, ValueError) and "rank 0: (3,)" in str(e) and "rank 1: (4,)" in str(e) for e in out)
    out = per_rank(lambda c: c.allreduce_sum(np.zeros(3, dtype=np.float32 if c.rank else np.float64)), 2)
    assert all(isinstance(e, ValueError) for e in out)


def test_broadcast_and_allgather_on_threads():
    out = run_in_threads(lambda c: (c.allgather(c.rank * 10), c.broadcast(f"from {c.rank}", root=2)), 3)
    assert out == [([0, 10, 20], "from 2")] * 3
    out = per_rank(lambda c: c.broadcast(1, root=3), 3)
    assert all(isinstance(e, ValueError) for e in out)


def test_a_failing_rank_releases_the_others():
    def fn(comm):
        if comm.rank == 1:
            raise KeyError("rank 1 fails before the collective")
        return comm.allgather(comm.rank)  # rank 0 would wait here for ever

    raised = []

    def run():
        try:
            run_in_threads(fn, 2)
        except BaseException as e:  # noqa: BLE001 - inspected below
            raised.append(e)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(timeout=20)
    assert not runner.is_alive(), "rank 0 was left waiting"
    assert len(raised) == 1 and isinstance(raised[0], KeyError), raised  # the failing rank's own error


def test_group_and_runner_validate_their_arguments():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="size must be an int >= 1"):
            ThreadComm.group(bad)
    with pytest.raises(TypeError, match="ThreadComm.group"):
        run_in_threads(lambda c: None, [SingleProcess()])


def test_as_comm():
    assert isinstance(as_comm(None), SingleProcess)
    comm = ThreadComm.group(1)[0]
    assert as_comm(comm) is comm
    with pytest.raises(TypeError, match="comm must be None or a vqref.distributed communicator"):
        as_comm("world")
    with pytest.raises(TypeError, match="got int"):
        training_update(ema_state(Lib(), 0), batch(0, 4), np.zeros(4, np.int64), decay=0.9, eps=1e-5, comm=3)


def test_the_base_class_leaves_transport_to_subclasses():
    with pytest.raises(NotImplementedError):
        Communicator().allgather(1)
    with pytest.raises(NotImplementedError):
        Communicator().broadcast(1)


# ------------------------------------------------------------------------------------------
# the rows of the global batch
# ------------------------------------------------------------------------------------------


def test_row_layout_locates_rows_by_hand():
    # 3 ranks, 2 blocks; global order: block 0 of ranks 0, 1, 2, then block 1 of ranks 0, 1, 2
    layout = RowLayout(sizes=((2, 1), (0, 3), (4, 0)), rank=0)
    assert layout.total == 10
    owner, local = layout.locate(np.array([0, 1, 2, 5, 6, 7, 9]))
    assert owner.tolist() == [0, 0, 2, 2, 0, 1, 1]
    assert local.tolist() == [0, 1, 0, 3, 2, 0, 2]  # rank 0's row 6 follows its 2 rows of block 0


@pytest.mark.parametrize("sizes", [(2, 0, 5), (0, 0, 4), (3, 3, 1)])
def test_gather_rows_equals_taking_from_the_whole_batch_bit_for_bit(bk, sizes):
    gen = np.random.default_rng(1)
    whole = [gen.standard_normal((sum(sizes), 4)) for _ in range(2)]  # two blocks
    whole[1][-1, 2] = -0.0  # the sign of zero survives the assembly
    everything = np.concatenate(whole)
    rows = np.concatenate([gen.integers(0, len(everything), 9), [len(everything) - 1]])

    def fn(comm):
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        mine = [bk.asarray(w[bounds[comm.rank] : bounds[comm.rank + 1]]) for w in whole]
        return bk.np(gather_rows(comm, mine, rows))

    want = everything[rows].astype(bk.np(bk.asarray(everything)).dtype)
    for got in run_in_threads(fn, 3):
        assert got.tobytes() == want.tobytes()
    assert np.signbit(got[-1, 2])


def test_gather_rows_refuses_rows_outside_the_batch():
    out = per_rank(lambda c: gather_rows(c, [np.ones((2, 3))], [4]), 2)
    assert all(isinstance(e, ValueError) and "[0, 4)" in str(e) for e in out)


def test_a_rank_with_bad_blocks_is_reported_on_every_rank():
    out = per_rank(lambda c: row_layout(c, [np.ones((2, 3))] if c.rank == 0 else [np.ones(3)]), 2)
    assert all(isinstance(e, ValueError) and str(e).startswith("rank 1: blocks must be 2-D") for e in out)
    out = per_rank(lambda c: row_layout(c, [np.ones((2, 3))] * (c.rank + 1)), 2)
    assert all(isinstance(e, ValueError) and "same number of blocks" in str(e) for e in out)
    with pytest.raises(ValueError, match="non-empty list"):
        row_layout(SingleProcess(), [])


def test_refuse_together():
    out = per_rank(lambda c: refuse_together(c, ValueError("bad x") if c.rank == 1 else None), 3)
    assert isinstance(out[1], ValueError) and str(out[1]) == "bad x"
    for r in (0, 2):
        assert isinstance(out[r], RuntimeError) and "rank 1 refused this call (ValueError: bad x)" in str(out[r])
    assert run_in_threads(lambda c: refuse_together(c, None), 2) == [None, None]
    with pytest.raises(TypeError, match="alone"):
        refuse_together(SingleProcess(), TypeError("alone"))
    refuse_together(SingleProcess(), None)


def test_check_same():
    assert run_in_threads(lambda c: check_same(c, "seed", {"s": 1}), 2) == [None, None]
    out = per_rank(lambda c: check_same(c, "seed", c.rank // 2), 3)
    assert all(isinstance(e, ValueError) and "rank 0 and rank(s) [2]" in str(e) for e in out)
    check_same(SingleProcess(), "seed", object())  # one rank: nothing to compare


# ------------------------------------------------------------------------------------------
# R ranks against one process (threads)
# ------------------------------------------------------------------------------------------


def _case_id(case):
    scenario, sizes, options = case
    return f"{scenario}-{'-'.join(map(str, sizes))}" + "".join(f"-{k}" for k in options)


THREE_RANKS = [
    ("ema_step", (4, 0, 9), {"dead_code_threshold": 1.5}),
    ("lloyd", (0, 5, 8), {}),
    ("restart", (1, 0, 1), {}),  # N = 2 < K
    ("residual", (5, 0, 9), {"shared": True}),
]


@pytest.mark.parametrize("case", MPI_CASES + THREE_RANKS, ids=_case_id)
def test_ranks_reproduce_one_process(bk, case):
    scenario, sizes, options = case
    problems = run_in_threads(
        lambda c: run_case(c, scenario, sizes, Lib(bk.name, bk.dtype_name), **options), len(sizes)
    )
    assert problems == [[]] * len(sizes), problems[0]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_the_comparison_fails_without_the_reduction(scenario):
    # negative control: with a communicator that does not reduce, every scenario reports it
    sizes = (5, 8)
    problems = run_in_threads(lambda c: run_case(c, scenario, sizes), NoSync.group(2))
    assert problems[0] and problems[0] == problems[1]


@pytest.mark.parametrize("scenario", ["ema_step", "lloyd", "initial_means"])
def test_averaging_over_ranks_is_not_the_global_update(scenario):
    # why sums and counts: averaging over ranks weighs the rows of a small rank more (3 vs 10)
    problems = run_in_threads(lambda c: run_case(c, scenario, (3, 10)), Averaging.group(2))
    assert problems[0]


def test_kmeans_init_without_sync_parts_the_ranks():
    # the desync of vector-quantize-pytorch's issue #17: each rank clustering its own rows
    x = batch(3, 20)

    def init(comm, local):
        rows = x[:7] if comm.rank == 0 else x[7:]
        state = kmeans_init_state(rows, K, iters=3, rng=np.random.default_rng(0), eps=1e-5, comm=local or comm)
        return state.codebook

    separate = run_in_threads(lambda c: init(c, SingleProcess()), 2)
    assert not np.array_equal(separate[0], separate[1])
    synced = run_in_threads(lambda c: init(c, None), 2)
    assert synced[0].tobytes() == synced[1].tobytes()
    whole = kmeans_init_state(x, K, iters=3, rng=np.random.default_rng(0), eps=1e-5).codebook
    np.testing.assert_allclose(synced[0], whole, rtol=1e-12, atol=1e-12)


def test_refusals_stop_every_rank():
    out = run_in_threads(refusals, 2)
    assert out[1]["nan_on_last_rank"] == "ValueError" and out[0]["nan_on_last_rank"] == "RuntimeError"
    for case in ("seeds_differ", "codebook_sizes_differ", "restart_seeds_differ"):
        assert out[0][case] == out[1][case] == "ValueError", case
    assert out[0]["fine_afterwards"] is None and out[1]["fine_afterwards"] is None  # still in step


def test_an_empty_global_batch():
    # restarts: nothing to draw from, so nothing changes and no number is drawn
    state = ema_state(Lib(), 4)

    def restart(comm):
        gen = np.random.default_rng(2)
        before = gen.bit_generator.state
        new, dead = expire_dead_codes(state, np.zeros((0, 5)), threshold=9.0, rng=gen, comm=comm)
        return new, dead, gen.bit_generator.state == before

    for new, dead, untouched in run_in_threads(restart, 2) + [restart(SingleProcess())]:
        assert untouched and not np.any(dead) and all(a is b for a, b in zip(new, state))
    # k-means: refused on every rank alike
    out = per_rank(lambda c: kmeans(np.zeros((0, 5)), K, rng=0, comm=c), 2)
    assert all(isinstance(e, ValueError) and "empty batch" in str(e) for e in out)


def test_a_rank_without_rows_can_run_kmeans_from_given_means():
    x = batch(5, 9)
    means = x[:K]

    def fn(comm):
        rows = x if comm.rank == 1 else x[:0]
        return kmeans(rows, K, iters=2, init_means=means, comm=comm)

    ref = kmeans(x, K, iters=2, init_means=means)
    for res in run_in_threads(fn, 2):
        np.testing.assert_array_equal(res.counts, ref.counts)
        np.testing.assert_allclose(res.means, ref.means, rtol=1e-12)
        np.testing.assert_allclose(res.inertia, ref.inertia, rtol=1e-12)


# ------------------------------------------------------------------------------------------
# one process: the default path is the old one
# ------------------------------------------------------------------------------------------


def test_restarts_in_one_process_draw_the_documented_rows(bk):
    # oracle: a permutation of the N rows from the generator, the first K of them, dead codes only
    x = batch(6, 11)
    state = EMAState(*(bk.asarray(a) for a in (np.zeros((K, 5)), np.array([0, 3, 0, 9, 1, 0, 2.0]), np.zeros((K, 5)))))
    new, dead = expire_dead_codes(state, bk.asarray(x), threshold=1.5, rng=np.random.default_rng(4))
    rows = np.random.default_rng(4).permutation(11)[:K]
    want = np.where((np.array([0, 3, 0, 9, 1, 0, 2]) < 1.5)[:, None], x[rows], 0.0)
    np.testing.assert_array_equal(bk.np(dead), [True, False, True, False, True, True, False])
    np.testing.assert_allclose(bk.np(new.codebook), want, rtol=bk.rtol)
    # a list of blocks is their concatenation
    blocks = [bk.asarray(x[:4]), bk.asarray(x[4:])]
    again, _ = expire_dead_codes(state, blocks, threshold=1.5, rng=np.random.default_rng(4))
    assert bk.np(again.codebook).tobytes() == bk.np(new.codebook).tobytes()


def test_comm_none_and_single_process_agree_bit_for_bit(bk):
    x, idx = bk.asarray(batch(7, 13)), bk.asarray(np.random.default_rng(8).integers(0, K, 13))
    state = ema_state(Lib(bk.name, bk.dtype_name), 9)
    outs = [
        training_update(state, x, idx, decay=0.8, eps=1e-5, dead_code_threshold=1.0, rng=np.random.default_rng(1), **kw)
        for kw in ({}, {"comm": None}, {"comm": SingleProcess()})
    ]
    for out in outs[1:]:
        assert all(bk.np(a).tobytes() == bk.np(b).tobytes() for a, b in zip(out, outs[0]))
    res = [kmeans(x, K, 3, rng=0, **kw) for kw in ({}, {"comm": SingleProcess()})]
    assert bk.np(res[0].means).tobytes() == bk.np(res[1].means).tobytes() and res[0].inertia == res[1].inertia


# ------------------------------------------------------------------------------------------
# real MPI processes
# ------------------------------------------------------------------------------------------


def _mpiexec():
    if importlib.util.find_spec("mpi4py") is None:
        return None, "mpi4py is not installed (pip install 'vqref[distributed]')"
    here = Path(sys.executable).parent  # the mpiexec of the mpich wheel beside this Python
    found = shutil.which("mpiexec", path=os.pathsep.join([str(here), os.environ.get("PATH", "")]))
    return found, "no mpiexec on PATH or beside the Python executable (pip install mpich)"


MPIEXEC, WHY_NOT = _mpiexec()
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason=WHY_NOT)


def _mpirun(n, *args, timeout=180):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [MPIEXEC, "-n", str(n), sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@needs_mpi
def test_two_mpi_processes_reproduce_one_process():
    proc = _mpirun(2, str(ROOT / "tests" / "mpi_worker.py"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["ranks"] == 2 and len(report["cases"]) == 3 * len(MPI_CASES)
    assert report["problems"] == [], report["problems"]
    first, last = report["refusals"]
    assert last["nan_on_last_rank"] == "ValueError" and first["nan_on_last_rank"] == "RuntimeError"
    for case in ("seeds_differ", "codebook_sizes_differ", "restart_seeds_differ"):
        assert first[case] == last[case] == "ValueError", case
    assert first["fine_afterwards"] is None and last["fine_afterwards"] is None


@needs_mpi
def test_the_selftest_runs_under_mpiexec():
    proc = _mpirun(3, "-m", "vqref.distributed")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("rank "))
    assert [line.split(":")[0] for line in lines] == ["rank 0/3", "rank 1/3", "rank 2/3"], proc.stdout
    assert all("states bit-identical" in line and "(0 codes" not in line for line in lines)


def test_the_selftest_in_threads_and_its_negative_control():
    assert [r["rows"] for r in run_in_threads(selftest, 2)] == [3, 20]
    with pytest.raises(AssertionError, match="differs from one process"):
        run_in_threads(selftest, NoSync.group(2))


@needs_mpi
def test_mpicomm_in_one_process():
    from mpi4py import MPI

    comm = MPIComm()
    assert (comm.rank, comm.size) == (0, 1) and comm.allgather(5) == [5] and comm.broadcast("b") == "b"
    np.testing.assert_array_equal(comm.allreduce_sum(np.arange(3.0)), [0.0, 1.0, 2.0])
    with pytest.raises(TypeError, match="intracommunicator"):
        MPIComm(MPI.COMM_NULL)
    with pytest.raises(TypeError, match=r"MPIComm\(comm\)"):
        as_comm(MPI.COMM_WORLD)


def _doc_snippet() -> str:
    text = (ROOT / "docs" / "distributed.md").read_text()
    section = text.split("## 8. How to run", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@needs_mpi
def test_the_training_step_of_the_docs_runs_under_mpiexec(tmp_path):
    script = tmp_path / "train_step.py"
    script.write_text(_doc_snippet())
    proc = _mpirun(2, str(script))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the ranks print at once, so their lines may interleave: look for each
    for line in ("rank 0: 40 rows, every", "rank 1: 70 rows, every"):
        assert line in proc.stdout, proc.stdout


@needs_mpi
@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("vector_quantize_pytorch") is None,
    reason="needs torch and vector-quantize-pytorch (the test extra)",
)
def test_vector_quantize_pytorch_under_torch_distributed():
    # vqp 1.32.0 in a 2-rank gloo group (rows 3 + 10) next to vqref on MPI; see docs/distributed.md §9
    proc = _mpirun(2, str(ROOT / "tests" / "mpi_vqp_worker.py"), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    ema = report["ema"]
    assert ema["vqp_ddp_vs_vqp_alone"] <= 1e-6  # vqp's DDP EMA step is the whole batch's
    codebook, counts, sums = ema["vqref_vs_vqp_ddp"]
    assert codebook <= 1e-6 and sums <= 1e-6 and counts == 0.0  # vqref's is the same step
    # vqp's k-means init agrees across ranks but is not its own single-process initialisation
    assert report["kmeans"] == {"ranks_agree": True, "equal_to_alone": False}
    # vqp repeats rows among 7 drawn from 13; vqref's global draw never does when N >= K
    assert min(report["sampling"]["vqp_distinct"]) < K
    assert set(report["sampling"]["vqref_distinct"]) == {K}
