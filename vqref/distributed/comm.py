"""Communicators: the collective operations that ranks of a data-parallel job share.

Symbols: R ranks, r one of them.

:class:`Communicator` is the protocol (``rank``, ``size``, ``allgather``, ``broadcast`` and the
``allreduce_sum`` built on ``allgather``); :class:`SingleProcess` is the default one-rank
identity, :class:`MPIComm` wraps mpi4py, and :class:`ThreadComm` runs R ranks as threads of one
process (:func:`run_in_threads`).
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np

from .. import backend as B
from ..backend import Array

__all__ = ["Communicator", "SingleProcess", "MPIComm", "ThreadComm", "run_in_threads", "as_comm"]


class Communicator:
    """The collective operations of R ranks; a subclass provides ``allgather`` and ``broadcast``.

    Attributes
    ----------
    rank : int, this process's number in ``[0, size)``
    size : int, R
    """

    rank: int = 0
    size: int = 1

    def allgather(self, obj: Any) -> list:
        """Every rank's ``obj`` (small host data), in rank order, on every rank."""
        raise NotImplementedError

    def broadcast(self, obj: Any, root: int = 0) -> Any:
        """Rank ``root``'s ``obj`` (host data) on every rank."""
        raise NotImplementedError

    def allreduce_sum(self, a: Array) -> Array:
        """``sum_r a_r``, element-wise, on every rank.

        The arrays travel through the host: each rank copies its array to a numpy array, the
        copies are gathered, and every rank adds them in rank order,
        ``((a_0 + a_1) + a_2) + ...``.  Every rank thus adds the same numbers in the same order
        and holds bit-identical sums (MPI leaves the order of its own reduction to the
        implementation).  The
        result is moved back to ``a``'s library and device.  This is the simple and
        reproducible choice, not the fast one: a GPU cluster would reduce on the devices.

        Parameters
        ----------
        a : array of any shape, any Array API library; same shape and dtype on every rank

        Returns
        -------
        total : a's shape, dtype, library and device

        Raises
        ------
        TypeError
            ``a`` is not an array.
        ValueError
            the ranks passed different shapes or dtypes (raised on every rank alike).
        """
        _check_array("a", a)
        xp, device = B.get_namespace(a), B.get_device(a)
        host = np.array(B.to_numpy(a), copy=True)  # this rank's contribution, on the host
        parts = self.allgather(host)  # R arrays
        kinds = [(tuple(p.shape), p.dtype.str) for p in parts]
        if len(set(kinds)) > 1:
            raise ValueError(
                "allreduce_sum needs the same shape and dtype on every rank, got "
                + ", ".join(f"rank {r}: {s} {d}" for r, (s, d) in enumerate(kinds))
                + "; every rank must build its module with the same options"
            )
        total = parts[0]
        for part in parts[1:]:
            total = total + part  # rank order: the same bits on every rank
        return B.from_numpy(total, xp, device=device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class SingleProcess(Communicator):
    """One rank: the default communicator.  Every collective is the identity, nothing is copied.

    ``allreduce_sum(a)`` returns ``a`` itself (the core never modifies its inputs, so sharing is
    safe); the state updates called with it compute exactly what they compute without it.
    """

    rank = 0
    size = 1

    def allgather(self, obj: Any) -> list:
        return [obj]

    def broadcast(self, obj: Any, root: int = 0) -> Any:
        _check_root(root, 1)
        return obj

    def allreduce_sum(self, a: Array) -> Array:
        _check_array("a", a)
        return a


class MPIComm(Communicator):
    """An mpi4py communicator (``mpi4py.MPI.Intracomm``) as a vqref communicator.

    mpi4py is imported when the first ``MPIComm`` is made, so ``import vqref`` never needs it
    (``pip install 'vqref[distributed]'`` installs mpi4py and the MPICH runtime).  Host values
    travel as pickles (mpi4py's lower-case methods); arrays are reduced as in
    :meth:`Communicator.allreduce_sum`.

    Parameters
    ----------
    comm : mpi4py ``Intracomm``, default ``MPI.COMM_WORLD`` (every process ``mpiexec`` started)
    """

    def __init__(self, comm: Any = None) -> None:
        try:
            from mpi4py import MPI
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"MPIComm needs mpi4py and an MPI runtime: pip install 'vqref[distributed]' (or mpi4py mpich) ({e})"
            ) from None
        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Intracomm):
            raise TypeError(
                f"comm must be an mpi4py intracommunicator such as MPI.COMM_WORLD, got {type(comm).__name__}"
            )
        self.comm = comm
        self.rank = int(comm.Get_rank())
        self.size = int(comm.Get_size())

    def allgather(self, obj: Any) -> list:
        return list(self.comm.allgather(obj))

    def broadcast(self, obj: Any, root: int = 0) -> Any:
        _check_root(root, self.size)
        return self.comm.bcast(obj, root=root)


class ThreadComm(Communicator):
    """One of R ranks that run as threads of this process (see :func:`run_in_threads`).

    A collective waits until every rank of the group has called it (a barrier), so the ranks
    proceed in lock step as MPI processes would.  Only the transport differs from
    :class:`MPIComm`: the reductions are the same code.  When a rank fails, :meth:`abort`
    (which :func:`run_in_threads` calls) breaks the barrier, and the others stop with
    ``threading.BrokenBarrierError`` instead of waiting.
    """

    def __init__(self, rank: int, size: int, barrier: threading.Barrier, slots: list) -> None:
        self.rank, self.size = rank, size
        self.barrier = barrier
        self.slots = slots

    @classmethod
    def group(cls, size: int) -> list:
        """``size`` communicators that form one group: hand one to each thread."""
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"size must be an int >= 1 (the number of ranks), got {size!r}")
        size = int(size)
        barrier, slots = threading.Barrier(size), [None] * size
        return [cls(r, size, barrier, slots) for r in range(size)]

    def allgather(self, obj: Any) -> list:
        self.slots[self.rank] = obj
        self.barrier.wait()  # every rank has written its slot
        out = list(self.slots)
        self.barrier.wait()  # every rank has read them: the slots may be written again
        return out

    def broadcast(self, obj: Any, root: int = 0) -> Any:
        _check_root(root, self.size)
        return self.allgather(obj)[root]

    def abort(self) -> None:
        """Release the other ranks from a collective this rank will never reach."""
        self.barrier.abort()


def run_in_threads(fn: Callable[[Communicator], Any], size: Any) -> list:
    """Run ``fn(comm)`` on ``size`` ranks, one thread each; return the results in rank order.

    ``size`` is the number of ranks, or a group made by :meth:`ThreadComm.group` (of a
    subclass, say).  If any rank raises, the others are released (they see
    ``BrokenBarrierError``) and the first rank's own exception, in rank order, is raised here.
    """
    comms = list(size) if isinstance(size, (list, tuple)) else ThreadComm.group(size)
    if not comms or not all(isinstance(c, ThreadComm) for c in comms):
        raise TypeError("size must be a number of ranks or a list made by ThreadComm.group(size)")
    results: list = [None] * len(comms)
    errors: list = [None] * len(comms)

    def work(comm: ThreadComm) -> None:
        try:
            results[comm.rank] = fn(comm)
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            errors[comm.rank] = e
            comm.abort()

    threads = [threading.Thread(target=work, args=(c,), name=f"rank-{c.rank}") for c in comms]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    own = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
    if own or any(e is not None for e in errors):
        raise (own or [e for e in errors if e is not None])[0]
    return results


def as_comm(comm: Any) -> Communicator:
    """``comm`` as a communicator: ``None`` is :class:`SingleProcess`; anything else must be one."""
    if comm is None:
        return SingleProcess()
    if isinstance(comm, Communicator):
        return comm
    hint = " (wrap it: vqref.distributed.MPIComm(comm))" if type(comm).__module__.startswith("mpi4py") else ""
    raise TypeError(
        f"comm must be None or a vqref.distributed communicator (SingleProcess(), MPIComm(...)), "
        f"got {type(comm).__name__}{hint}"
    )


def _check_array(name: str, a: Any) -> None:
    if not B.is_array(a):
        raise TypeError(f"{name} must be an array of an Array API library (numpy, cupy, ...), got {type(a).__name__}")


def _check_root(root: Any, size: int) -> None:
    if isinstance(root, bool) or not isinstance(root, (int, np.integer)) or not 0 <= root < size:
        raise ValueError(f"root must be a rank in [0, {size}), got {root!r}")
