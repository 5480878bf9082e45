"""Which rows a quantizer computes on: the rows a mask keeps, and the depths a quantize dropout runs.

Symbols: N rows (tokens: all leading axes of the input flattened), n rows kept, S samples (the
first axis of the input), Q depths, K codes.

Two options take rows out of a quantizer's computation, and both are decided on the host before
anything is computed, so the rows are host integer arrays:

* **A mask** ``(...)`` of booleans marks the tokens that are present (padding of variable-length
  sequences is False).  The absent rows are left out of everything: the codes, the losses, the EMA
  statistics, the k-means and dead-code samples, the usage statistics.  Taking the kept rows is a
  gather ``x_s = x[rows]`` (:func:`take_rows`, the lookup of :mod:`vqref.ops.lookup` with the
  batch as its table), and putting results back is its adjoint, a scatter into zeros
  (:func:`put_rows`): so an absent row's output is 0 and its gradient is 0.
* **Quantize dropout** (SoundStream, arXiv 2107.03312, §3.2; EnCodec, arXiv 2210.13438) trains a
  residual stack to work with fewer depths: in each training step a random depth ``l*`` is drawn
  uniformly from ``[cutoff, Q)`` and the depths after it do not run, so the output is the sum of
  the first ``l* + 1`` codes.  vector-quantize-pytorch draws one ``l*`` per batch; DAC
  (arXiv 2306.06546) draws one per sample, so that one batch trains every bitrate.  Depth l then
  runs on the rows of the samples with ``l* >= l`` (:func:`depth_rows`), a subset of the rows of
  depth l - 1.  EnCodec's structured variant rounds ``l* + 1`` up to a multiple m.

The gathers and scatters are exact: every value is copied (a scatter into zeros adds each value
to 0 once).  Nothing here synchronises with the device except :func:`kept_rows`, which reads the
mask on the host (a driver step, once per forward).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .. import backend as B
from ..backend import Array
from ..ops.gumbel import gumbel_noise
from ..ops.lookup import LookupCache, lookup_backward, lookup_forward

__all__ = [
    "kept_rows",
    "take_rows",
    "put_rows",
    "scatter_rows",
    "put_indices",
    "dropout_last_depths",
    "depth_rows",
    "sample_of_rows",
    "sampling_noise",
]


def kept_rows(mask: Array) -> np.ndarray:
    """The rows a boolean mask ``(...)`` keeps: host int64 ``(n,)``, ascending, in C order of the
    flattened leading axes (a driver step: the mask is read on the host)."""
    return np.flatnonzero(np.asarray(B.to_numpy(mask)).reshape(-1)).astype(np.int64)


def _device_rows(rows: Any, like: Array) -> Array:
    """Host (or device) integer rows as an int64 array of ``like``'s library and device."""
    if B.is_array(rows) and B.library_name(rows) == B.library_name(like):
        return rows
    xp = B.get_namespace(like)
    return B.from_numpy(np.asarray(B.to_numpy(rows), dtype=np.int64), xp, device=B.get_device(like))


def take_rows(a: Array, rows: Any) -> tuple[Array, Any]:
    """``a[rows]`` along the first axis (a gather) and the cache of its adjoint; ``(a, None)`` for None.

    Parameters
    ----------
    a : (N, ...) array
    rows : None, or (n,) integer rows (host or device), each in [0, N)

    Returns
    -------
    taken : (n, ...)
    cache : LookupCache (rows, N) for :func:`put_rows`, or None
    """
    if rows is None:
        return a, None
    return lookup_forward(a, _device_rows(rows, a))


def put_rows(a: Array, cache: Any) -> Array:
    """The adjoint of :func:`take_rows`: row j of ``a`` to row ``rows[j]`` of an (N, ...) array of
    zeros (a segment sum; each row occurs once, so it is exact); ``a`` itself for None."""
    return a if cache is None else lookup_backward(a, cache)


def scatter_rows(a: Array, rows: Any, num_rows: int) -> tuple[Array, Any]:
    """``out[rows] = a`` into ``num_rows`` rows of zeros, and the cache of the gather that undoes it.

    Parameters
    ----------
    a : (n, ...) values;  rows : (n,) distinct rows or None;  num_rows : N

    Returns
    -------
    out : (N, ...), zeros where no row of ``a`` went;  cache : LookupCache or None
    """
    if rows is None:
        return a, None
    cache = LookupCache(_device_rows(rows, a), int(num_rows))
    return lookup_backward(a, cache), cache


def put_indices(indices: Array, rows: Any, num_rows: int, xp: Any) -> Array:
    """Integer ``indices (n,)`` or ``(n, Q)`` of some rows as ``(N,)`` or ``(N, Q)``, -1 for the
    rows that are not among them."""
    if rows is None:
        return indices
    # shifted by one, so that the missing rows (the zeros of the scatter) come out as -1; each
    # row occurs once, so the float sum is exact
    shifted = xp.astype(indices + 1, xp.float64)  # (n,) or (n, Q)
    return xp.astype(B.segment_sum(shifted, _device_rows(rows, indices), num_rows), xp.int64) - 1


def dropout_last_depths(
    rng: np.random.Generator, num_samples: int, num_depths: int, *, cutoff: int, multiple_of: int, per_sample: bool
) -> np.ndarray:
    """The last depth ``l*`` each sample uses in a training step with quantize dropout.

    ``l*`` is uniform on ``[cutoff, Q)`` (``Generator.integers``), then, with ``multiple_of`` m > 1,
    ``l* + 1`` is rounded up to a multiple of m (EnCodec's structured dropout) and capped at Q:
    ``l* = min(m ceil((l* + 1) / m), Q) - 1``.  Per batch (vector-quantize-pytorch): one draw for
    every sample.  Per sample (DAC): S independent draws, in sample order.

    Returns
    -------
    last : (S,) host int64 in [cutoff, Q)
    """
    count = num_samples if per_sample else 1
    drawn = rng.integers(cutoff, num_depths, size=count)  # (S,) or (1,)
    if multiple_of > 1:
        drawn = np.minimum(np.ceil((drawn + 1) / multiple_of).astype(np.int64) * multiple_of, num_depths) - 1
    return np.broadcast_to(drawn, (num_samples,)).astype(np.int64)


def sample_of_rows(lead: tuple, rows: Any = None) -> np.ndarray:
    """The sample (index along the first axis) of each row of an input with leading shape ``lead``.

    Returns host int64 ``(N,)`` (or ``(n,)`` for the given host ``rows``); an input without
    leading axes is one sample.
    """
    N = math.prod(lead)
    per = N // lead[0] if lead and lead[0] > 0 else max(N, 1)
    sample = np.arange(N, dtype=np.int64) // max(per, 1)
    return sample if rows is None else sample[np.asarray(rows, dtype=np.int64)]


def depth_rows(last_depth: np.ndarray, num_depths: int) -> list:
    """Per depth, the rows that reach it: None (all of them) or host int64 ``(n_l,)``, ascending.

    Parameters
    ----------
    last_depth : (n,) host int, each row's last depth (its sample's ``l*``)
    num_depths : Q

    Returns
    -------
    Q entries; depth l keeps the rows with ``last_depth >= l`` (an empty array when none does)
    """
    out = []
    for level in range(num_depths):
        reach = last_depth >= level  # (n,)
        out.append(None if bool(np.all(reach)) else np.flatnonzero(reach).astype(np.int64))
    return out


def sampling_noise(rngs: Sequence[Any], num_rows: int, sizes: Sequence[int], *, like: Array, rows: Any = None) -> list:
    """Gumbel noise for the Q depths of a stack: Q arrays (N, K_l), drawn on the host.

    Depth after depth from its codebook's generator (``rngs[l]``, or ``rngs[0]`` for a shared
    codebook), as :func:`vqref.core.residual.residual_forward` draws it from ``rngs``.  ``rows``:
    the noise is drawn for ``num_rows`` rows (the whole batch: the rows a mask leaves out too, or
    every rank's in a data-parallel step) and only these rows (host ints) are kept, so that a
    row's noise does not depend on which other rows are present.
    """
    out = []
    for level, K in enumerate(sizes):
        gen = rngs[0 if len(rngs) == 1 else level]
        g = gumbel_noise((num_rows, K), gen, like=like)  # (num_rows, K)
        out.append(g if rows is None else take_rows(g, rows)[0])
    return out
