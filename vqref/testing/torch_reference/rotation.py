"""Torch autograd reference for the rotation trick (arXiv 2410.06424), in float64.

Symbols: N vectors, D features.  ``e`` encoder outputs, ``q`` selected codes, both (N, D).

The expression is the paper's, in the O(D) form that vector-quantize-pytorch uses:

    q~ = sg[lambda] * (e - 2 (e.r) r + 2 (e.e^) q^),    r = (e^ + q^)/||e^ + q^||

with e^, q^, r and lambda = ||q||/||e|| detached: the only live path is the explicit ``e``.
Autograd then gives ``de = lambda R^T g``, and ``q`` gets no gradient at all.  This reference
has no guards (vector-quantize-pytorch clamps its denominators at 1e-6): feed it generic rows,
not zero or exactly opposite vectors.

torch is imported inside the function, so importing this module does not need it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["RotationTrickReference", "rotation_trick_reference"]


class RotationTrickReference(NamedTuple):
    out: np.ndarray  # (N, D) value of the expression, q to rounding
    de: np.ndarray  # (N, D) gradient for e
    dq: np.ndarray  # (N, D) gradient for q: zero, every path through q is detached


def rotation_trick_reference(e, q, dout) -> RotationTrickReference:
    """Value and gradients of the rotation trick by torch autograd (float64, CPU).

    Parameters
    ----------
    e, q, dout : (N, D) array-likes (host numpy), converted to float64

    Returns
    -------
    RotationTrickReference(out, de, dq), host float64 arrays
    """
    import torch

    e_t = torch.tensor(np.asarray(e, dtype=np.float64), requires_grad=True)
    q_t = torch.tensor(np.asarray(q, dtype=np.float64), requires_grad=True)
    g_t = torch.tensor(np.asarray(dout, dtype=np.float64))

    e_norm = e_t.norm(dim=1, keepdim=True)  # (N, 1)
    q_norm = q_t.norm(dim=1, keepdim=True)  # (N, 1)
    ehat = (e_t / e_norm).detach()  # (N, D)  sg[e^]
    qhat = (q_t / q_norm).detach()  # (N, D)  sg[q^]
    r = ehat + qhat
    r = r / r.norm(dim=1, keepdim=True)  # (N, D), built from detached pieces
    lam = (q_norm / e_norm).detach()  # (N, 1)  sg[lambda]

    er = (e_t * r).sum(dim=1, keepdim=True)  # (N, 1)
    ee = (e_t * ehat).sum(dim=1, keepdim=True)  # (N, 1)
    out = lam * (e_t - 2 * er * r + 2 * ee * qhat)  # (N, D)
    (out * g_t).sum().backward()

    dq = q_t.grad if q_t.grad is not None else torch.zeros_like(q_t)
    return RotationTrickReference(out.detach().numpy(), e_t.grad.numpy(), dq.numpy())
