"""torch reference for residual VQ: the two gradient-routing patterns, codes held fixed.

``routing="per_depth"`` is vector-quantize-pytorch's code pattern (docs/math.md §2.4, pattern P3): every depth
applies its estimator to its residual, ``r_{l+1} = r_l - o_l.detach()``, and the output is the
sum of the estimator outputs.  ``routing="sum"`` is RQ-VAE's (P1): one straight-through (or
rotation) on the total, ``x + (sum_l q_l - x).detach()``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ... import backend as B
from ...backend import Array
from .vq import _np, rotation_trick_torch, torch_tensor, vq_layer_torch

__all__ = ["residual_vq_grads"]


def residual_vq_grads(
    x: Array,
    codebooks: Sequence[Any],
    indices: Array,
    dquantized: Array,
    dlosses: Array = 1.0,
    *,
    routing: str = "per_depth",
    shared: bool = False,
    **options: Any,
):
    """Autograd gradients of ``sum(quantized * dquantized) + sum_l dlosses_l * loss_l``.

    Parameters
    ----------
    x : (N, D)
    codebooks : Q arrays (K, D); with ``shared`` only the first is used, at every depth
    indices : (N, Q) codes held fixed
    options : per-depth layer options (see ``vq_layer_torch``)

    Returns
    -------
    quantized (N, D), losses (Q,), dx (N, D), dcodebooks: list of (K, D) (one when shared)
    """
    import torch

    idx = np.asarray(B.to_numpy(indices))
    Q = idx.shape[1]
    xt = torch_tensor(x, True)
    cts = [torch_tensor(codebooks[0], True)] if shared else [torch_tensor(c, True) for c in codebooks]
    dl = np.broadcast_to(np.asarray(B.to_numpy(dlosses), dtype=np.float64), (Q,))
    rotation = options.pop("rotation_trick", False)
    residual, total_out, total_q, objective = xt, 0, 0, 0
    for level in range(Q):
        ct = cts[0 if shared else level]
        k = torch.as_tensor(idx[:, level], dtype=torch.long)
        out, loss, q = vq_layer_torch(residual, ct, k, rotation_trick=rotation and routing == "per_depth", **options)
        objective = objective + float(dl[level]) * loss
        total_out = total_out + out
        total_q = total_q + q
        residual = residual - out.detach()
        if level == 0:
            losses = [loss]
        else:
            losses.append(loss)
    if routing == "per_depth":
        quantized = total_out
    elif rotation:
        quantized = rotation_trick_torch(xt, total_q.detach())
    else:
        quantized = xt + (total_q - xt).detach()
    objective = objective + (quantized * torch_tensor(dquantized)).sum()
    objective.backward()
    grads = [c.grad if c.grad is not None else torch.zeros_like(c) for c in cts]
    return _np(quantized), np.array([float(v.detach()) for v in losses]), _np(xt.grad), [_np(g) for g in grads]
