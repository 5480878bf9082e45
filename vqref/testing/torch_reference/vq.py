"""torch references for the VQ-VAE ops: distances, lookup, losses, straight-through, the full layer."""

from __future__ import annotations

import numpy as np

from ... import backend as B
from ...backend import Array

__all__ = [
    "torch_tensor",
    "squared_distance_grads",
    "lookup_grads",
    "mse_grads",
    "rotation_trick_torch",
    "vq_layer_torch",
    "vector_quantize_grads",
]


def torch_tensor(a: Array, requires_grad: bool = False):
    """A float64 CPU torch tensor from any array (via the host)."""
    import torch

    t = torch.tensor(np.asarray(B.to_numpy(a), dtype=np.float64), dtype=torch.float64)
    return t.requires_grad_(requires_grad)


def _np(t) -> np.ndarray:
    return np.zeros(()) if t is None else t.detach().numpy()


def squared_distance_grads(x: Array, codebook: Array, ddist: Array):
    """``d_ik = ||x_i - c_k||^2`` by direct differences; returns (dist, dx, dcodebook)."""
    xt, ct = torch_tensor(x, True), torch_tensor(codebook, True)
    dist = ((xt[:, None, :] - ct[None, :, :]) ** 2).sum(-1)
    dist.backward(torch_tensor(ddist))
    return _np(dist), _np(xt.grad), _np(ct.grad)


def lookup_grads(codebook: Array, indices: Array, dq: Array):
    """``q = C[k]``; returns (q, dcodebook)."""
    import torch

    ct = torch_tensor(codebook, True)
    k = torch.as_tensor(np.asarray(B.to_numpy(indices)), dtype=torch.long)
    q = ct[k]
    q.backward(torch_tensor(dq))
    return _np(q), _np(ct.grad)


def mse_grads(a: Array, b: Array, dloss: float = 1.0, *, detach_a: bool = False, detach_b: bool = False):
    """``mse(a, b)`` (mean over all elements) with optional stop-gradients; returns (loss, da, db)."""
    import torch.nn.functional as F

    at, bt = torch_tensor(a, True), torch_tensor(b, True)
    loss = F.mse_loss(at.detach() if detach_a else at, bt.detach() if detach_b else bt)
    (loss * dloss).backward()
    return (
        float(loss.detach()),
        _np(at.grad) if at.grad is not None else np.zeros_like(_np(at)),
        (_np(bt.grad) if bt.grad is not None else np.zeros_like(_np(bt))),
    )


def rotation_trick_torch(e, q):
    """The rotation trick on torch tensors: value q, gradient ``lambda R^T g`` to ``e`` only.

    ``e^``, ``q^``, ``r = (e^ + q^)/||e^ + q^||`` and ``lambda = ||q||/||e||`` are detached,
    as in the paper and vector-quantize-pytorch.  Generic rows only (no guards).
    """
    import torch.nn.functional as F

    eh = F.normalize(e, dim=-1).detach()
    qh = F.normalize(q, dim=-1).detach()
    r = F.normalize(eh + qh, dim=-1).detach()
    lam = (q.norm(dim=-1, keepdim=True) / e.norm(dim=-1, keepdim=True)).detach()
    dot = lambda a, b: (a * b).sum(-1, keepdim=True)  # noqa: E731
    return lam * (e - 2 * dot(e, r) * r + 2 * dot(e, eh) * qh)


def vq_layer_torch(
    xt,
    ct,
    k,
    *,
    commitment_weight: float = 1.0,
    codebook_weight: float | None = None,
    learnable_codebook: bool = False,
    use_cosine_sim: bool = False,
    rotation_trick: bool = False,
    orthogonal_reg_weight: float = 0.0,
):
    """One VQ layer on torch tensors with codes ``k`` fixed; returns ``(out, loss, q)``.

    Written as vector-quantize-pytorch writes it: ``F.normalize`` for cosine codebooks, the
    straight-through estimator ``x + (q - x).detach()`` (or the rotation trick with the rotation
    detached), ``F.mse_loss`` with ``.detach()`` on the side that must not learn.
    """
    import torch.nn.functional as F

    xh = F.normalize(xt, dim=-1, eps=1e-6) if use_cosine_sim else xt
    ch = F.normalize(ct, dim=-1, eps=1e-6) if use_cosine_sim else ct
    q = ch[k]
    out = rotation_trick_torch(xh, q) if rotation_trick else xh + (q - xh).detach()
    if learnable_codebook and codebook_weight is None:
        loss = commitment_weight * F.mse_loss(xh, q)
    elif learnable_codebook:
        loss = codebook_weight * F.mse_loss(xh.detach(), q) + commitment_weight * F.mse_loss(xh, q.detach())
    else:
        loss = commitment_weight * F.mse_loss(xh, q.detach())
    if orthogonal_reg_weight > 0:
        cn = F.normalize(ct, dim=-1, eps=1e-6)
        n = cn.shape[0]
        loss = loss + orthogonal_reg_weight * (((cn @ cn.t()) ** 2).sum() / n**2 - 1.0 / n)
    return out, loss, q


def vector_quantize_grads(x: Array, codebook: Array, indices: Array, dquantized: Array, dloss: float = 1.0, **options):
    """The whole VQ layer with autograd, codes held fixed at ``indices`` (see :func:`vq_layer_torch`).

    The objective is ``sum(quantized * dquantized) + dloss * loss``.

    Returns
    -------
    (quantized, loss, dx, dcodebook) as numpy arrays (``dcodebook`` zeros when it gets nothing)
    """
    import torch

    xt, ct = torch_tensor(x, True), torch_tensor(codebook, True)
    k = torch.as_tensor(np.asarray(B.to_numpy(indices)), dtype=torch.long)
    out, loss, _ = vq_layer_torch(xt, ct, k, **options)
    objective = (out * torch_tensor(dquantized)).sum() + dloss * loss
    objective.backward()
    dcb = ct.grad if ct.grad is not None else torch.zeros_like(ct)
    return _np(out), float(loss.detach()), _np(xt.grad), _np(dcb)
