"""Data-parallel training: the communicator that the codebook state updates talk through.

Symbols: R ranks (processes), r one of them, N_r the rows of the batch on rank r,
N = sum_r N_r the rows of the global batch, K codes, D features.

In data-parallel training every rank holds the same model and quantizes its own part of the
batch.  The outputs and gradients of a row depend on that row and the codebook alone, but the
codebook's state updates (k-means initialisation, the EMA step, dead-code restarts) read the
whole batch.  They stay right when every rank contributes what it has and all ranks combine the
contributions the same way, so that R ranks holding the parts of a batch end in the state one
process would reach on the whole batch.  ``docs/distributed.md`` explains which quantities
are combined and why.

A communicator offers the three collective operations the core needs:

* ``allreduce_sum(a)`` -- the element-wise sum over ranks of an array of any library, returned
  to every rank in that library and on that device;
* ``allgather(obj)`` -- the list of every rank's small host value (row counts, error reports);
* ``broadcast(obj, root)`` -- rank ``root``'s host value on every rank.

Every rank must make the same collective calls in the same order: a rank that skips one leaves
the others waiting.  The helpers here therefore decide anything that could branch (is the
global batch empty? did a rank refuse its input?) from values that every rank has received.

Where things are: ``comm.py`` holds the communicators, ``sync.py`` what the ranks must agree on
(:func:`gather_rows`, :func:`refuse_together`, :func:`check_same`), ``selftest.py`` the check
that ``python -m vqref.distributed`` runs.  The communicators:

* :class:`SingleProcess` -- the default: one rank; every operation is the identity, so the
  single-process results do not change.
* :class:`MPIComm` -- an mpi4py communicator (``mpiexec -n 2 python ...``).
* :class:`ThreadComm` -- R ranks as R threads of one process (:func:`run_in_threads`): the
  same reduction code as :class:`MPIComm` without MPI, for tests and for trying things out.

``mpiexec -n 2 python -m vqref.distributed`` runs :func:`selftest` on two processes.
"""

from .comm import Communicator, MPIComm, SingleProcess, ThreadComm, as_comm, run_in_threads
from .selftest import selftest
from .sync import RowLayout, check_same, gather_rows, refuse_together, row_layout

__all__ = [
    "Communicator",
    "SingleProcess",
    "MPIComm",
    "ThreadComm",
    "run_in_threads",
    "as_comm",
    "RowLayout",
    "row_layout",
    "gather_rows",
    "refuse_together",
    "check_same",
    "selftest",
]
