"""Metrics of quantizer codes (reporting functions: they run on the host).

:func:`collision_rate` -- how often whole code tuples (semantic IDs) are shared between rows.
"""

from __future__ import annotations

import numpy as np

from . import backend as B
from .backend import Array
from .validation import as_array

__all__ = ["collision_rate"]


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
