"""What the ranks must agree on: the rows of the global batch, refusals, shared values.

Symbols: R ranks, N_r the rows on rank r, N = sum_r N_r, B blocks, M requested rows, D features.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

from .. import backend as B
from ..backend import Array
from .comm import Communicator

__all__ = ["RowLayout", "row_layout", "gather_rows", "refuse_together", "check_same"]


class RowLayout(NamedTuple):
    """Where the rows of the global batch live.

    The global batch is what one process would hold: block by block (the depths of a shared
    codebook; a single block otherwise), each block the rank-ordered concatenation of every
    rank's part of it.  ``sizes[r][b]`` is the number of rows of block b on rank r.
    """

    sizes: tuple  # (R, B) ints
    rank: int

    @property
    def total(self) -> int:
        """N, the rows of the global batch."""
        return int(sum(sum(s) for s in self.sizes))

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Owner rank and position in the owner's concatenated blocks of each global row.

        Parameters
        ----------
        rows : (M,) int, global row numbers in ``[0, N)``

        Returns
        -------
        owner : (M,) int64, the rank holding each row
        local : (M,) int64, its row in that rank's ``concat(blocks)``
        """
        sizes = np.asarray(self.sizes, dtype=np.int64).reshape(len(self.sizes), -1)  # (R, B)
        seg = sizes.T.reshape(-1)  # (B R,) segment lengths in global order: block-major, then rank
        seg_start = np.concatenate([[0], np.cumsum(seg)[:-1]])  # (B R,) first global row of each
        # the segment of each row: the first one that ends after it (so empty segments are skipped)
        which = np.searchsorted(seg_start + seg, rows, side="right")  # (M,)
        block, owner = np.divmod(which, sizes.shape[0])  # (M,), (M,)
        # a rank's local rows: its blocks one after another
        block_start = np.concatenate([np.zeros((sizes.shape[0], 1), np.int64), np.cumsum(sizes, 1)[:, :-1]], 1)
        local = block_start[owner, block] + (rows - seg_start[which])  # (M,)
        return owner.astype(np.int64), local.astype(np.int64)


def row_layout(comm: Communicator, blocks: Sequence[Array]) -> RowLayout:
    """The :class:`RowLayout` of the ranks' ``blocks`` (one allgather of the row counts).

    A rank whose blocks are not 2-D arrays sends its complaint instead of its counts, so that
    every rank raises the same ``ValueError`` (naming that rank) instead of some waiting.
    """
    problem = None
    if not isinstance(blocks, (list, tuple)) or not blocks:
        problem = f"blocks must be a non-empty list of (n, D) arrays, got {type(blocks).__name__}"
    elif not all(B.is_array(b) and b.ndim == 2 for b in blocks):
        problem = "blocks must be 2-D arrays (n, D), got " + ", ".join(
            str(getattr(b, "shape", type(b))) for b in blocks
        )
    sizes = comm.allgather(problem if problem else tuple(int(b.shape[0]) for b in blocks))
    for r, s in enumerate(sizes):
        if isinstance(s, str):
            raise ValueError(f"rank {r}: {s}")
    if len({len(s) for s in sizes}) > 1:
        raise ValueError(f"every rank must pass the same number of blocks, got {[len(s) for s in sizes]}")
    return RowLayout(tuple(tuple(s) for s in sizes), comm.rank)


def gather_rows(comm: Communicator, blocks: Sequence[Array], rows: Array, layout: RowLayout = None) -> Array:
    """Rows of the global batch by their global row numbers, on every rank.

    Each rank puts the rows it owns into an ``(M, D)`` array and ``-0.0`` everywhere else, and
    an ``allreduce_sum`` assembles them.  Exactly one rank contributes each entry, and adding
    ``-0.0`` changes no floating-point number (not even ``-0.0``; ``+0.0`` would turn ``-0.0``
    into ``+0.0``), so the result is bit-identical to taking the rows from the whole batch.

    Parameters
    ----------
    comm : the communicator
    blocks : this rank's arrays (n_b, D) of one library and dtype (a rank may hold 0 rows)
    rows : (M,) host ints in ``[0, N)``, the same on every rank (drawn from generators in the
        same state; a rank given other rows would fetch other rows)
    layout : the blocks' :class:`RowLayout` if already known (saves one allgather)

    Returns
    -------
    picked : (M, D), the blocks' library, device and dtype
    """
    layout = row_layout(comm, blocks) if layout is None else layout
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)  # (M,)
    if rows.size and (rows.min() < 0 or rows.max() >= layout.total):
        raise ValueError(f"rows must lie in [0, {layout.total}), got {rows.min()}..{rows.max()}")
    xp = B.get_namespace(*blocks)
    local = blocks[0] if len(blocks) == 1 else xp.concat(list(blocks), axis=0)  # (sum_b n_b, D)
    owner, position = layout.locate(rows)  # (M,), (M,)
    mine = owner == layout.rank  # (M,) host
    device = B.get_device(local)
    fill = xp.full((rows.shape[0], local.shape[1]), -0.0, dtype=local.dtype, device=device)  # (M, D)
    if local.shape[0] == 0:  # this rank owns no row: it contributes -0.0 alone
        picked = fill
    else:
        take = B.from_numpy(np.where(mine, position, 0), xp, device=device)  # (M,) row 0 stands in for others'
        picked = xp.take(local, take, axis=0)  # (M, D)
        picked = xp.where(B.from_numpy(mine, xp, device=device)[:, None], picked, fill)  # (M, D)
    return comm.allreduce_sum(picked)


def refuse_together(comm: Communicator, error: BaseException | None) -> None:
    """Raise on every rank if any rank refused, so that no rank waits for one that left.

    Call it after the local argument checks of a function whose body is collective, with the
    exception they raised (or ``None``).  The refusing rank raises its own exception; the others
    raise a ``RuntimeError`` that names it.  One rank: ``error`` is raised as it is.
    """
    if comm.size == 1:
        if error is not None:
            raise error
        return
    reports = comm.allgather(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    for r, report in enumerate(reports):
        if report is not None:
            raise RuntimeError(f"rank {r} refused this call ({report}); every rank stops with it")


def check_same(comm: Communicator, name: str, value: Any) -> None:
    """Refuse on every rank unless ``value`` is equal on every rank (one allgather).

    Used for what the ranks must share but cannot derive from each other -- the state of the
    random generator that picks rows of the global batch: ranks seeded differently would pick
    different rows, and their codebooks would part for good.
    """
    if comm.size == 1:
        return
    values = comm.allgather(value)
    differ = [r for r, v in enumerate(values) if not v == values[0]]
    if differ:
        raise ValueError(
            f"{name} differs between rank 0 and rank(s) {differ}; every rank must hold the same {name} "
            "(build every rank's module with the same seed)"
        )
