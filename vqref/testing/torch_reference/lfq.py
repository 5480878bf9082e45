"""torch references for lookup-free quantization (MAGVIT-v2, arXiv 2310.05737), its spherical
variant (BSQ, arXiv 2406.07548) and residual LFQ.

Symbols: N tokens, dim the input width, C codebooks, d bits per code (K = 2^d codes), s the
codebook scale, tau the inverse temperature, Q depths.

Written from the definition in float64 torch, with ``.detach()`` where the math has sg[.]: the
sign is straight-through (``z + (q - z).detach()``), the commitment loss measures
``mse(z, q.detach())``, the entropy penalty is the softmax of ``2 tau z . c_k`` over the explicit
list of all K codes, with the logarithm clamped at 1e-5.  Inputs are numpy arrays; the functions
return dicts of numpy values and gradients.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ...backend import Array

__all__ = ["sign_codes", "lfq_grads", "residual_lfq_grads"]


def sign_codes(d: int, value: float) -> np.ndarray:
    """All 2^d codes ``(K, d)`` in index order: entry j of code k is ``+value`` when bit d-1-j of k is set."""
    bits = np.array([[(k >> (d - 1 - j)) & 1 for j in range(d)] for k in range(2**d)], dtype=np.float64)
    return value * (2 * bits - 1)


def _entropy(p):
    """``-sum_k p_k log max(p_k, 1e-5)`` over the last axis."""
    return -(p * p.clamp(min=1e-5).log()).sum(-1)


def _penalty(z, *, d: int, value: float, tau: float, gamma: float):
    """``(H_sample, H_batch)`` of rows ``z (n, C, d)`` (or ``(n, d)``) against every code."""
    import torch

    p = torch.softmax(tau * 2 * z @ torch.tensor(sign_codes(d, value)).T, dim=-1)  # (n, [C,] K)
    return _entropy(p).mean(), _entropy(p.mean(0)).mean()


def lfq_grads(
    x: Array, *, C: int, d: int, g: Array, daux: float = 1.0, s: float = 1.0, spherical: bool = False,
    clamp: float | None = None, w_ent: float = 0.1, w_commit: float = 0.0, gamma: float = 1.0, tau: float = 100.0,
    softplus: float | None = None, W_in: Any = None, b_in: Any = None, W_out: Any = None, b_out: Any = None,
    cosine: float | None = None, R: Any = None, rows: Any = None, mask_rows: Any = None,
) -> dict:  # fmt: skip
    """One LFQ layer and the autograd gradients of ``<g, quantized> + daux * aux``.

    Parameters
    ----------
    x : (N, dim)
    C, d, s : codebooks, bits per code, codebook scale
    g : (N, dim) upstream gradient of the output; daux : of the auxiliary loss
    spherical : project each row (and its code) onto the sphere of radius s
    clamp : the soft clamp ``clamp tanh(h / clamp)`` of the projected input, or None
    w_ent, w_commit, gamma, tau : entropy weight, commitment weight, diversity gamma, inverse temperature
    softplus : the offset of ``softplus(L_ent + offset)`` (the exact softplus), or None
    W_in, b_in, W_out, b_out : projections (input-major), or None; ``cosine`` makes the projection
        in ``cosine * normalize(x) @ normalize(W_in, dim=0)`` (no bias)
    R : (d, d) rotation, or None
    rows : token indices of the entropy penalty (None: all)
    mask_rows : token indices of the commitment loss (None: all)

    Returns
    -------
    dict: ``quantized`` (N, dim), ``aux``, ``per``, ``batch`` (floats), and ``d<name>`` for x and
    each projection given (``dx``, ``dW_in``, ...)
    """
    import torch
    import torch.nn.functional as F

    leaves = dict(x=x, W_in=W_in, b_in=b_in, W_out=W_out, b_out=b_out)
    t = {k: None if v is None else torch.tensor(np.asarray(v, dtype=np.float64), requires_grad=True)
         for k, v in leaves.items()}  # fmt: skip
    X = t["x"]
    n_tok = X.shape[0]
    h = X
    if W_in is not None:
        if cosine is not None:
            h = cosine * F.normalize(X, dim=-1) @ F.normalize(t["W_in"], dim=0)
        else:
            h = X @ t["W_in"] + (t["b_in"] if b_in is not None else 0.0)
    if clamp is not None:
        h = clamp * torch.tanh(h / clamp)
    z = h.reshape(n_tok * C, d)
    if R is not None:
        z = z @ torch.tensor(np.asarray(R, dtype=np.float64))
    if spherical:
        z = s * F.normalize(z, dim=-1)
    q = torch.where(z > 0, torch.tensor(s, dtype=z.dtype), torch.tensor(-s, dtype=z.dtype))
    if spherical:
        q = s * F.normalize(q, dim=-1)
    o = z + (q - z).detach()
    v = s / math.sqrt(d) if spherical else s
    zt = z.reshape(n_tok, C, d)
    ze = zt if rows is None else zt[torch.as_tensor(np.asarray(rows))]
    per, batch = _penalty(ze, d=d, value=v, tau=tau, gamma=gamma)
    ent = per - gamma * batch
    if softplus is not None:
        ent = F.softplus(ent + softplus, threshold=1e9)  # the exact softplus
    commit = torch.zeros(())
    if w_commit > 0:
        mr = slice(None) if mask_rows is None else torch.as_tensor(np.asarray(mask_rows))
        commit = F.mse_loss(zt[mr], q.reshape(n_tok, C, d)[mr].detach())
    aux = w_ent * ent + w_commit * commit
    if R is not None:
        o = o @ torch.tensor(np.asarray(R, dtype=np.float64)).T
    y = o.reshape(n_tok, C * d)
    if W_out is not None:
        y = y @ t["W_out"] + t["b_out"]
    ((y * torch.tensor(np.asarray(g, dtype=np.float64))).sum() + daux * aux).backward()
    out = {"quantized": y.detach().numpy(), "aux": aux.item(), "per": per.item(), "batch": batch.item()}
    out.update({"d" + k: v.grad.numpy() for k, v in t.items() if v is not None})
    return out


def residual_lfq_grads(
    x: Array, g: Array, dlosses: Array, *, params: dict, Q: int, d: int, spherical: bool = False,
    clamp: float | None = None, w_commit: float = 0.0, softplus: float | None = None, rotations: Any = None,
    rows: Any = None, tau: float = 100.0,
) -> dict:  # fmt: skip
    """Residual LFQ (depth l: scale ``2^-l``, soft clamp ``clamp 2^-l``, entropy weight 0.1,
    gamma 1) and the autograd gradients of ``<g, quantized> + sum_l dlosses_l loss_l``.

    Parameters
    ----------
    x : (N, dim); g : (N, dim); dlosses : (Q,)
    params : ``{"project_in.W", "project_in.b", "project_out.W", "project_out.b"}`` or ``{}``
    Q, d : depths, bits per depth
    spherical, clamp, w_commit, softplus, tau : as :func:`lfq_grads`, the same at every depth
    rotations : Q (d, d) rotations, or None
    rows : Q arrays of entropy token indices, or None

    Returns
    -------
    dict: ``quantized`` (N, dim), ``losses`` (Q,), ``dx``, and the projections' gradients by name
    """
    import torch
    import torch.nn.functional as F

    X = torch.tensor(np.asarray(x, dtype=np.float64), requires_grad=True)
    P = {k: torch.tensor(np.asarray(v, dtype=np.float64), requires_grad=True) for k, v in params.items()}
    h = X @ P["project_in.W"] + P["project_in.b"] if P else X
    residual, total, losses = h, 0.0, []
    for level in range(Q):
        s = 2.0**-level
        z = residual
        if clamp is not None:
            z = clamp * s * torch.tanh(z / (clamp * s))
        if rotations is not None:
            z = z @ torch.tensor(np.asarray(rotations[level], dtype=np.float64))
        if spherical:
            z = s * F.normalize(z, dim=-1)
        q = torch.where(z > 0, torch.tensor(s, dtype=z.dtype), torch.tensor(-s, dtype=z.dtype))
        if spherical:
            q = s * F.normalize(q, dim=-1)
        o = z + (q - z).detach()
        v = s / math.sqrt(d) if spherical else s
        ze = z if rows is None else z[torch.as_tensor(np.asarray(rows[level]))]
        per, batch = _penalty(ze, d=d, value=v, tau=tau, gamma=1.0)
        ent = per - batch
        if softplus is not None:
            ent = F.softplus(ent + softplus, threshold=1e9)
        loss = 0.1 * ent + (w_commit * F.mse_loss(z, q.detach()) if w_commit > 0 else 0.0)
        if rotations is not None:
            o = o @ torch.tensor(np.asarray(rotations[level], dtype=np.float64)).T
        residual = residual - o.detach()
        total = total + o
        losses.append(loss)
    y = total @ P["project_out.W"] + P["project_out.b"] if P else total
    L = torch.stack(losses)
    (
        (y * torch.tensor(np.asarray(g, dtype=np.float64))).sum() + (L * torch.tensor(np.asarray(dlosses))).sum()
    ).backward()
    out = {"quantized": y.detach().numpy(), "losses": L.detach().numpy(), "dx": X.grad.numpy()}
    out.update({k: v.grad.numpy() for k, v in P.items()})
    return out
