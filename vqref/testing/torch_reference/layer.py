"""torch reference for the maps around the quantization: mask, projections, heads, quantize dropout.

Written the way vector-quantize-pytorch writes a ``VectorQuantize`` / ``ResidualVQ`` forward, with
the codes held fixed: the kept rows, ``z = x W_in + b_in``, the heads as pieces of z, every depth
``vq_layer_torch`` (its estimator on its residual, ``r_{l+1} = r_l - o_l.detach()``), the pieces
side by side, ``y = o W_out + b_out``, zeros (or x) for the absent rows.  A depth a quantize
dropout stops for some rows runs on the others only, and its loss is the mean over those rows
times their share of all rows (``sum / (N d)``).  Autograd then gives every gradient.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ... import backend as B
from ...backend import Array
from .vq import _np, torch_tensor, vq_layer_torch

__all__ = ["layer_grads"]


def layer_grads(
    x: Array,
    codebooks: Sequence[Any],
    indices: Array,
    dquantized: Array,
    dlosses: Any = 1.0,
    *,
    mask: Array = None,
    projections: dict | None = None,
    heads: int = 1,
    separate: bool = False,
    passthrough: bool = False,
    **options: Any,
):
    """Autograd gradients of ``sum(quantized * dquantized) + sum_l dlosses_l * loss_l``.

    Parameters
    ----------
    x : (N, D)
    codebooks : a stack's Q codebooks (K_l, d); H codebooks with ``separate``; one for shared heads
    indices : (N, Q) for a stack (heads = 1) or (N, H) for heads; -1 where a row (or a depth of a
        row) is not quantized.  A depth whose entries are -1 for some kept rows runs on the others
    dquantized : (N, D);  dlosses : (Q,) or a number (heads: one number, the loss is their mean)
    mask : (N,) bool or None;  projections : dict of W_in (D, E), b_in, W_out (E, D), b_out, or None
    heads, separate : H and a codebook per head;  passthrough : absent rows return x
    options : ``vq_layer_torch``'s (commitment_weight, use_cosine_sim, rotation_trick, ...)

    Returns
    -------
    quantized (N, D), losses (Q,) (heads: (1,)), dx (N, D), dcodebooks (list), dprojections (dict)
    """
    import torch

    xt = torch_tensor(x, True)
    N = xt.shape[0]
    idx = np.asarray(B.to_numpy(indices)).reshape(N, -1)
    keep = np.arange(N) if mask is None else np.flatnonzero(np.asarray(B.to_numpy(mask)).reshape(-1))
    cts = [torch_tensor(c, True) for c in codebooks]
    proj = {k: torch_tensor(v, True) for k, v in (projections or {}).items()}
    z = xt[torch.as_tensor(keep)]  # (n, D)
    if proj:
        z = z @ proj["W_in"] + proj["b_in"]  # (n, E)
    n = z.shape[0]
    if heads > 1:
        pieces = z.reshape(n, heads, -1)  # (n, H, d)
        outs, losses = [], []
        for h in range(heads):
            ct = cts[h if separate else 0]
            k = torch.as_tensor(idx[keep, h], dtype=torch.long)
            out, loss, _ = vq_layer_torch(pieces[:, h, :], ct, k, **options)
            outs.append(out)
            losses.append(loss)
        merged = torch.stack(outs, dim=1).reshape(n, -1)  # (n, H d)
        losses = [torch.stack(losses).mean()]  # the mean over the heads
    else:
        merged, losses = _stack_torch(z, cts, idx[keep], **options)
    y = merged @ proj["W_out"] + proj["b_out"] if proj else merged  # (n, D)
    quantized = torch.zeros((N, y.shape[1]), dtype=y.dtype).index_put((torch.as_tensor(keep),), y)
    if passthrough:
        absent = torch.ones((N, 1), dtype=y.dtype)
        absent[torch.as_tensor(keep)] = 0.0
        quantized = quantized + absent * xt
    dl = np.broadcast_to(np.asarray(B.to_numpy(dlosses), dtype=np.float64), (len(losses),))
    objective = (quantized * torch_tensor(dquantized)).sum() + sum(float(w) * v for w, v in zip(dl, losses))
    objective.backward()
    zeros = lambda t: t.grad if t.grad is not None else torch.zeros_like(t)  # noqa: E731
    return (
        _np(quantized),
        np.array([float(v.detach()) for v in losses]),
        _np(zeros(xt)),
        [_np(zeros(c)) for c in cts],
        {k: _np(zeros(v)) for k, v in proj.items()},
    )


def _stack_torch(z, cts: list, idx: np.ndarray, **options: Any):
    """A residual stack on the rows ``z (n, d)`` with the codes ``idx (n, Q)`` (-1: the row stopped)."""
    import torch

    n = z.shape[0]
    Q = idx.shape[1]
    shared = len(cts) == 1 and Q > 1
    residual, total, losses = z, 0, []
    for level in range(Q):
        rows = np.flatnonzero(idx[:, level] >= 0)
        if rows.size == 0:
            losses.append(torch.zeros((), dtype=z.dtype))
            continue
        r = torch.as_tensor(rows)
        k = torch.as_tensor(idx[rows, level], dtype=torch.long)
        out, loss, _ = vq_layer_torch(residual[r], cts[0 if shared else level], k, **options)
        losses.append(loss * (rows.size / n))  # the sum over these rows, over all n rows
        full = torch.zeros_like(z).index_put((r,), out)
        total = total + full
        residual = residual - full.detach()
    return total, losses
