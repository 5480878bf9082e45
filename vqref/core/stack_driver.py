"""The host-side steps around a residual stack's forward: the regulariser's codes, usage statistics.

Symbols: N rows, K codes (K_l at depth l), Q depths.

Two steps of a training forward read the codes on the host (driver steps: a synchronisation
each): which codes the orthogonal regulariser sees (its active codes, or a random subset), and
the usage statistics the module reports.  Both take a communicator: in data-parallel training
every rank counts the codes of every rank (a reduced histogram), so every rank makes the same
choice and reports the numbers of the whole batch.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .. import backend as B
from ..backend import Array

__all__ = ["orthogonal_code_subsets", "usage_stats"]


def orthogonal_code_subsets(
    indices: Array,
    num_codes: Any,
    *,
    active_only: bool,
    max_codes: int | None,
    rngs: Sequence[Any],
    ran: Sequence[bool] | None = None,
    comm: Any = None,
) -> list | None:
    """Per depth, the codes the orthogonal regulariser sees (``None``: all K at every depth).

    ``active_only``: the codes depth l used in ``indices[:, l]`` (entries -1, rows a quantize
    dropout stopped, are no code); ``max_codes``: at most that many, drawn at random from depth
    l's generator (``rngs[l]``, or ``rngs[0]`` for a shared codebook).  See
    :func:`vqref.ops.orthogonal.select_codes`.  A depth that did not run (``ran[l]`` False) gets
    an empty subset and draws nothing.  A driver step: the used codes are read on the host.

    Parameters
    ----------
    indices : (N, Q) int, this forward's codes
    num_codes : K, or Q sizes K_l
    ran : per depth, whether it ran (default: every depth)
    comm : communicator (``None``: one process): the active codes are those of every rank (a
        reduced histogram), so every rank evaluates the regulariser on the same codes
    """
    from ..ops.orthogonal import select_codes

    if not active_only and max_codes is None:
        return None
    Q = indices.shape[1]
    sizes = [int(num_codes)] * Q if isinstance(num_codes, int) else [int(k) for k in num_codes]
    ids = []
    xp, device = B.get_namespace(indices), B.get_device(indices)
    for level in range(Q):
        if ran is not None and not ran[level]:
            ids.append(xp.zeros((0,), dtype=xp.int64, device=device))
            continue
        used = None
        if active_only:
            col = np.asarray(B.to_numpy(indices[:, level]))
            used = col[col >= 0]  # (n_l,) host
            if comm is not None and comm.size > 1:  # the codes any rank used
                seen = comm.allreduce_sum(np.bincount(used, minlength=sizes[level]).astype(np.int64))
                used = np.flatnonzero(seen)
        gen = rngs[0 if len(rngs) == 1 else level]
        pick = select_codes(sizes[level], used_indices=used, max_codes=max_codes, rng=gen)
        ids.append(B.from_numpy(pick, xp, device=device))
    return ids


def usage_stats(
    indices: Array,
    num_codes: Any,
    cluster_sizes: Sequence[Array],
    *,
    threshold: float,
    decay: float | None,
    ran: Sequence[bool] | None = None,
    comm: Any = None,
) -> dict:
    """What one forward's codes say about the use of each depth's codebook (docs/math.md §10).

    Per depth l: :func:`vqref.metrics.code_usage` of ``indices[:, l]`` (``perplexity``, ``usage``,
    ``used_codes``) and ``dead_fraction``, the fraction of codes whose EMA count is below
    ``threshold``.  In a training step (``decay`` given) the counts are the ones this step's EMA
    takes (``N + (1 - decay)(n - N)``, the formula of :func:`vqref.core.ema.accumulate_statistics`,
    depth after depth for a shared codebook), before the restarts: so ``dead_fraction`` is the
    fraction of codes the step restarts.  In eval (``decay=None``) they are the committed counts.
    Entries -1 (a row that a quantize dropout stopped before depth l) are not counted, and a
    depth that did not run (``ran[l]`` False) keeps its committed counts.  A reporting step: the
    numbers are read on the host.

    Parameters
    ----------
    indices : (N, Q) int, this forward's codes
    num_codes : K, or Q sizes K_l (per-depth codebook sizes)
    cluster_sizes : the committed counts ``N`` (K_l,), one per codebook (one for a shared codebook)
    threshold : ``threshold_ema_dead_code`` (0: ``dead_fraction`` is 0.0)
    decay : the EMA decay of a training step whose counts are updated, or None
    ran : per depth, whether its state took this step (default: every depth)
    comm : communicator (``None``: one process): the codes of every rank are counted

    Returns
    -------
    dict of tuples (one entry per depth): perplexity, usage (floats), used_codes (ints),
    dead_fraction (floats)
    """
    from ..metrics import code_usage

    xp = B.get_namespace(indices)
    Q = indices.shape[1]
    sizes = [int(num_codes)] * Q if isinstance(num_codes, int) else [int(k) for k in num_codes]
    ran = [True] * Q if ran is None else list(ran)
    counts = list(cluster_sizes)
    stats: dict = {"perplexity": [], "usage": [], "used_codes": [], "dead_fraction": []}
    for level in range(Q):
        col = indices[:, level]
        col = col[col >= 0] if ran[level] else col[:0]  # (n_l,) the rows that reached this depth
        if comm is None or comm.size == 1:
            usage = code_usage(col, sizes[level])
        else:  # every rank's codes: the histogram of the whole batch
            usage = _usage_from_counts(comm.allreduce_sum(B.bincount(col, sizes[level])), sizes[level])
        for key, value in usage.items():
            stats[key].append(value)
        i = 0 if len(counts) == 1 else level
        if decay is not None and threshold > 0 and ran[level]:
            n = xp.astype(B.bincount(col, sizes[level]), counts[i].dtype)  # (K,) this batch's n_k
            if comm is not None:
                n = comm.allreduce_sum(n)
            counts[i] = counts[i] + (1.0 - decay) * (n - counts[i])  # (K,) the EMA step's N_k
        dead = float(xp.sum(xp.astype(counts[i] < threshold, xp.float64))) / sizes[level]
        stats["dead_fraction"].append(dead)
    if len(counts) == 1 and Q > 1:  # one shared codebook: its counts after the last depth's step
        stats["dead_fraction"] = [stats["dead_fraction"][-1]] * Q
    return {k: tuple(v) for k, v in stats.items()}


def _usage_from_counts(counts: Array, num_codes: int) -> dict:
    """:func:`vqref.metrics.code_usage` from a histogram ``counts (K,)`` of the codes."""
    c = np.asarray(B.to_numpy(counts), dtype=np.float64)
    n = c.sum()
    if n == 0:
        return {"perplexity": 0.0, "usage": 0.0, "used_codes": 0}
    p = c[c > 0] / n
    used = int((c > 0).sum())
    return {"perplexity": float(np.exp(-np.sum(p * np.log(p)))), "usage": used / num_codes, "used_codes": used}
