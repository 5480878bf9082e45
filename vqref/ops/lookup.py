"""Code lookup ``q = C[k]`` and its adjoint, the scatter-add of gradients into the codebook.

Symbols: N vectors, D features, K codes.

The lookup is a gather: ``q_i = c_{k_i}``, i.e. ``q = E C`` with the one-hot matrix
``E_ik = [k_i = k]``.  Its backward is the transpose ``dC = E^T dq``: every code collects the
gradients of all the rows that selected it, ``dc_k = sum_{i : k_i = k} dq_i``.  Codes that no row
selected get exactly zero.  The scatter is a segment sum, never ``dC[k] += dq`` (numpy keeps
only one of the repeated indices; cupy leaves it undefined).
"""

from __future__ import annotations

from typing import NamedTuple

from .. import backend as B
from ..backend import Array

__all__ = ["LookupCache", "lookup_forward", "lookup_backward"]


class LookupCache(NamedTuple):
    indices: Array  # (N,) int, the selected codes
    num_codes: int  # K, so the gradient has the codebook's shape


def lookup_forward(codebook: Array, indices: Array) -> tuple[Array, LookupCache]:
    """Gather the selected codes.

    Parameters
    ----------
    codebook : (K, D) float
    indices : (N,) int in ``[0, K)``

    Returns
    -------
    q : (N, D), ``q[i] = codebook[indices[i]]`` (bit-exact copies of code rows)
    cache : LookupCache(indices, K)
    """
    xp = B.get_namespace(codebook, indices)
    q = xp.take(codebook, indices, axis=0)  # (N, D)
    return q, LookupCache(indices, codebook.shape[0])


def lookup_backward(dq: Array, cache: LookupCache) -> Array:
    """``dcodebook = E^T dq``: sum the rows of ``dq`` per selected code.

    Parameters
    ----------
    dq : (N, D) float
    cache : LookupCache

    Returns
    -------
    dcodebook : (K, D), zero rows for codes that were not selected
    """
    return B.segment_sum(dq, cache.indices, cache.num_codes)  # (K, D)
