"""Run the data-parallel scenarios on MPI processes: ``mpiexec -n 2 python tests/mpi_worker.py``.

Every rank runs every case of tests/mpi_scenarios.py (``MPI_CASES``, on numpy float64 and
float32 and on array_api_strict float64) and the refusal checks; rank 0 prints one JSON object
``{"ranks": R, "cases": [...], "problems": [...], "refusals": [...]}`` for
tests/test_distributed.py to read.  The exit status is 0 when every rank got to the end.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # mpi_scenarios beside this file
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # vqref from this checkout

from mpi_scenarios import MPI_CASES, Lib, refusals, run_case  # noqa: E402

from vqref.distributed import MPIComm  # noqa: E402


def main() -> int:
    comm = MPIComm()
    if comm.size != 2:
        print(json.dumps({"error": f"run me on 2 ranks, not {comm.size}"}), flush=True)
        return 2
    cases, problems = [], []
    for lib in (Lib("numpy", "float64"), Lib("numpy", "float32"), Lib("array_api_strict", "float64")):
        for scenario, sizes, options in MPI_CASES:
            label = f"{scenario}{list(sizes)}{options or ''}-{lib.name}-{lib.dtype_name}"
            cases.append(label)
            problems += [f"{label}: {p}" for p in run_case(comm, scenario, sizes, lib, **options)]
    raised = comm.allgather(refusals(comm))  # one dict per rank
    if comm.rank == 0:
        print(json.dumps({"ranks": comm.size, "cases": cases, "problems": problems, "refusals": raised}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
