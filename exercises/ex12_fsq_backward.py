"""Exercise 12: the backward of finite scalar quantization (FSQ): bound, round, scale.

Symbols: N vectors, d = len(levels) channels; channel j has L_j levels.

The forward.  FSQ (Mentzer et al., arXiv 2309.15505, appendix A.1) has no codebook.  Each
channel is squeezed into a bounded interval, rounded to an integer and scaled into [-1, 1].  With
vector-quantize-pytorch's constants, per channel,

    h = (L - 1)(1 + 1e-3) / 2,    o = 1/2 for even L (else 0),    s = atanh(o / h),    w = L // 2

    z_b = tanh(z + s) h - o          (1) bound: the shift s keeps z = 0 at z_b = 0
    z_r = round(z_b)                 (2) round, with the straight-through estimator
    z_q = z_r / w                    (3) scale: the codes, in [-1, 1]

Your task.  Given ``dcodes = dL/dz_q (N, d)``, return ``dz (N, d)``.  Step (2) has derivative zero
almost everywhere; FSQ passes the gradient straight through it (backward = identity).  The
grader checks against torch autograd with ``.detach()`` on the rounding.

Hints.
* Chain the three steps backwards: (3), then (2), then (1).  Every step acts entry by entry.
* ``d/du tanh(u) = 1 - tanh(u)^2``; where is it evaluated?

Check it: ``vqref grade ex12`` from the repository root.
"""

import math

from array_api_compat import array_namespace


def fsq_constants(levels, like):
    """``(h, o, s, w)``, each (d,), as arrays of ``like``'s namespace and dtype.  Given."""
    xp = array_namespace(like)
    h = [(L - 1) * (1 + 1e-3) / 2 for L in levels]
    o = [0.5 if L % 2 == 0 else 0.0 for L in levels]
    s = [math.atanh(oj / hj) for oj, hj in zip(o, h)]
    w = [float(L // 2) for L in levels]
    return tuple(xp.asarray(c, dtype=like.dtype) for c in (h, o, s, w))


def fsq_forward(z, levels):
    """The codes ``z_q = round(tanh(z + s) h - o) / w``.  z (N, d) -> (N, d).  Given."""
    xp = array_namespace(z)
    h, o, s, w = fsq_constants(levels, z)
    return xp.round(xp.tanh(z + s) * h - o) / w


def fsq_backward(dcodes, z, levels):
    """``dz`` through scale, round (straight through) and bound.

    Parameters
    ----------
    dcodes : (N, d) float
    z : (N, d) float
    levels : tuple of d ints >= 2

    Returns
    -------
    dz : (N, d)
    """
    raise NotImplementedError
