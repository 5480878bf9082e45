"""Finite scalar quantization (FSQ, arXiv 2309.15505) as one forward/backward pair.

Symbols: N vectors, d = len(levels) channels.

The forward composes the three steps of :mod:`vqref.ops.fsq` and reads off the index of each
code in the implicit codebook:

    1. z_b = bound(z)               (N, d)   tanh bound, equation (1)
    2. z_r = round(z_b)             (N, d)   integers, straight-through gradient, equation (2)
    3. z_q = z_r / w                (N, d)   grid points in [-1, 1], equation (3)
    4. index = sum_j k_j b_j        (N,)     mixed radix, no gradient

and the backward runs the chain rule through steps 3, 2, 1 in reverse:

    dz = h (1 - t^2) * (dz_q / w)

which is the bound's true derivative times the scale, through the straight-through surrogate of
the rounding.  Pure functions: nothing is mutated, there is no state.
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import Array
from ..ops.fsq import (
    BoundCache,
    RoundSTECache,
    ScaleCache,
    bound_backward,
    bound_forward,
    codes_to_indices,
    round_ste_backward,
    round_ste_forward,
    scale_backward,
    scale_forward,
)

__all__ = ["FSQOutput", "FSQCache", "fsq_forward", "fsq_backward"]


class FSQOutput(NamedTuple):
    quantized: Array  # (N, d) grid points in [-1, 1], z's dtype
    indices: Array  # (N,) int64 in [0, prod(levels))


class FSQCache(NamedTuple):
    bound: BoundCache  # step 1
    round: RoundSTECache  # step 2
    scale: ScaleCache  # step 3


def fsq_forward(z: Array, levels: tuple) -> tuple[FSQOutput, FSQCache]:
    """Quantize each channel of ``z`` to its grid of ``levels[j]`` values.

    Parameters
    ----------
    z : (N, d) float, d = len(levels)
    levels : d ints >= 2

    Returns
    -------
    out : FSQOutput(quantized (N, d), indices (N,))
    cache : FSQCache, what :func:`fsq_backward` needs
    """
    bounded, bound_cache = bound_forward(z, levels)  # (N, d)
    rounded, round_cache = round_ste_forward(bounded)  # (N, d) integers
    quantized, scale_cache = scale_forward(rounded, levels)  # (N, d) in [-1, 1]
    indices = codes_to_indices(quantized, levels)  # (N,) no gradient
    return FSQOutput(quantized, indices), FSQCache(bound_cache, round_cache, scale_cache)


def fsq_backward(dquantized: Array, cache: FSQCache) -> Array:
    """``dz`` for the upstream gradient ``dquantized`` (N, d); a surrogate (the rounding's STE).

    Returns
    -------
    dz : (N, d), dquantized's dtype
    """
    drounded = scale_backward(dquantized, cache.scale)  # 3. dz_r = dz_q / w
    dbounded = round_ste_backward(drounded, cache.round)  # 2. straight through
    return bound_backward(dbounded, cache.bound)  # 1. dz = dz_b * h (1 - t^2)
