"""Solution 12: the backward of finite scalar quantization.

Symbols: N vectors, d channels.

Backwards through the three steps, entry by entry:

    (3) z_q = z_r / w                 dz_r = dz_q / w
    (2) z_r = round(z_b), STE         dz_b = dz_r              (a surrogate: round' = 0 a.e.)
    (1) z_b = tanh(z + s) h - o       dz   = dz_b * h (1 - tanh(z + s)^2)

so ``dz = dcodes * h (1 - t^2) / w`` with ``t = tanh(z + s)``.  For even L the shift s matters:
the derivative is taken at ``z + s``, not at z.
"""

import math

from array_api_compat import array_namespace


def fsq_constants(levels, like):
    """``(h, o, s, w)``, each (d,), as arrays of ``like``'s namespace and dtype."""
    xp = array_namespace(like)
    h = [(L - 1) * (1 + 1e-3) / 2 for L in levels]
    o = [0.5 if L % 2 == 0 else 0.0 for L in levels]
    s = [math.atanh(oj / hj) for oj, hj in zip(o, h)]
    w = [float(L // 2) for L in levels]
    return tuple(xp.asarray(c, dtype=like.dtype) for c in (h, o, s, w))


def fsq_forward(z, levels):
    """The codes ``z_q = round(tanh(z + s) h - o) / w``."""
    xp = array_namespace(z)
    h, o, s, w = fsq_constants(levels, z)
    return xp.round(xp.tanh(z + s) * h - o) / w


def fsq_backward(dcodes, z, levels):
    """``dz = dcodes * h (1 - tanh(z + s)^2) / w``.

    Parameters
    ----------
    dcodes, z : (N, d) float
    levels : tuple of d ints

    Returns
    -------
    dz : (N, d)
    """
    xp = array_namespace(dcodes, z)
    h, _, s, w = fsq_constants(levels, z)
    t = xp.tanh(z + s)  # (N, d)
    dz_r = dcodes / w  # (N, d) step (3)
    dz_b = dz_r  # (N, d) step (2), straight through
    return dz_b * (h * (1.0 - t * t))  # (N, d) step (1)
