"""Metrics of quantizer codes.

:func:`code_usage` -- perplexity and the fraction of the codebook used by one batch of indices
(what every quantizer puts in its ``stats`` after each forward).
:func:`collision_rate` -- how often whole code tuples (semantic IDs) are shared between rows (a
reporting function: it runs on the host).
"""

from __future__ import annotations

import numpy as np

from . import backend as B
from .backend import Array
from .validation import as_array

__all__ = ["code_usage", "collision_rate"]


def code_usage(indices: Array, codebook_size: int) -> dict:
    """Perplexity and usage of one codebook's indices in a batch.

    With ``n_k`` the number of inputs that chose code k among the batch's n inputs and
    ``p_k = n_k / n``:

        perplexity = exp(-sum_k p_k log p_k)      in [1, min(n, K)]
        usage      = #{k : n_k > 0} / K           in (0, 1]

    A perplexity of K means every code is chosen equally often; 1 means one code takes every
    input (codebook collapse).  Only the codes that occur are counted (a sort of the indices,
    ``unique_counts``), so this costs O(n log n) whatever K is -- also for the implicit codebooks
    of FSQ and LFQ, whose K = prod(levels) or 2^d can be far larger than any histogram.

    Parameters
    ----------
    indices : integer array of any shape and array library, entries in [0, codebook_size)
        (not checked here: the quantizers produce them)
    codebook_size : K

    Returns
    -------
    dict with ``perplexity`` (float), ``usage`` (float) and ``used_codes`` (int).  An empty batch
    gives 0.0, 0.0 and 0 (no code is used; there is no distribution to take the entropy of).
    """
    xp = B.get_namespace(indices)
    flat = xp.reshape(indices, (-1,))
    n = flat.shape[0]
    if n == 0:
        return {"perplexity": 0.0, "usage": 0.0, "used_codes": 0}
    _, counts = xp.unique_counts(flat)  # (U,) counts of the codes that occur, all > 0
    p = xp.astype(counts, xp.float64) / n  # (U,)
    entropy = -xp.sum(p * xp.log(p))  # no 0 log 0: only codes that occur are counted
    used = int(counts.shape[0])
    return {"perplexity": float(xp.exp(entropy)), "usage": used / codebook_size, "used_codes": used}


def collision_rate(codes: Array) -> float:
    """The fraction of rows whose whole code tuple is shared with at least one other row.

    ``codes`` are semantic IDs, one tuple per row; two rows collide when every level agrees.
    0 means every row has an ID of its own; 1 means no row does.  A prefix ``codes[:, :l]``
    gives the collision rate of the first l levels.

    Parameters
    ----------
    codes : (N, L) or (N,) integer array of any backend (or array-like)

    Returns
    -------
    rate : float in [0, 1]

    Notes
    -----
    A reporting function: the codes are moved to the host and grouped there with
    ``numpy.unique(axis=0)`` (the Array API's ``unique_counts`` is one-dimensional, and packing a
    tuple into one integer overflows int64 once ``K^L > 2^63``).
    """
    host = B.to_numpy(as_array(codes, "codes", "an (N, L) array or a list of equal-length tuples of integers"))
    if host.ndim == 1:
        host = host[:, None]
    if host.ndim != 2:
        raise ValueError(f"codes must be (N, L) or (N,), got shape {host.shape}")
    if host.shape[0] == 0:
        return 0.0
    if not np.issubdtype(host.dtype, np.integer):
        raise TypeError(f"codes must be integers, got dtype {host.dtype}")
    _, inverse, counts = np.unique(host, axis=0, return_inverse=True, return_counts=True)
    shared = counts[np.reshape(inverse, (-1,))] > 1  # (N,) this row's tuple occurs elsewhere too
    return float(np.mean(shared))
