"""torch references for finite scalar quantization: the two grids, the FSQ layer, residual FSQ.

Symbols: M rows of d = len(levels) channels, N tokens, C codebooks, dim the input width, Q depths.

Written from the equations of :mod:`vqref.ops.fsq` (Mentzer et al., arXiv 2309.15505, appendix
A.1; the symmetric grid of Zhao et al., arXiv 2411.19842), with ``.detach()`` where the math has
sg[.]: the rounding and the floor are straight-through, ``b + (round(b) - b).detach()``.  The
rows function takes and returns torch tensors (so a caller can differentiate it); the layer
and the residual stack take numpy arrays and return numpy results and gradients, in float64.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...backend import Array

__all__ = ["fsq_rows_torch", "fsq_layer_grads", "residual_fsq_grads"]


def fsq_rows_torch(z: Any, levels: tuple, *, symmetric: bool = False, hard: bool = False, noise: Any = None):
    """FSQ of torch rows ``z (M, d)``: bound, straight-through rounding, scale [, noise dropout].

    Parameters
    ----------
    z : (M, d) torch tensor
    levels : d ints
    symmetric : the symmetric grid ``v = (L-1)(phi(z)+1)/2 + 1/2``, ``floor``, ``k 2/(L-1) - 1``;
        else the paper's ``phi(z + s) h - o``, ``round``, ``/ (L // 2)``
    hard : phi is ``clamp(., -1, 1)`` (torch's clamp: slope 1 at both ends) instead of tanh
    noise : ``(mask (M, d) bool, noise (M, d))`` of noise dropout, or None

    Returns
    -------
    codes : (M, d) torch tensor
    """
    import torch

    L = torch.tensor(levels, dtype=z.dtype)
    phi = (lambda u: u.clamp(-1.0, 1.0)) if hard else torch.tanh
    if symmetric:
        v = (L - 1) * (phi(z) + 1) / 2 + 0.5
        q = (v + (torch.floor(v) - v).detach()) * (2 / (L - 1)) - 1
    else:
        half_l = (L - 1) * (1 + 1e-3) / 2
        offset = (torch.remainder(L, 2) == 0).to(z.dtype) * 0.5
        shift = offset / half_l if hard else torch.atanh(offset / half_l)
        b = phi(z + shift) * half_l - offset
        q = (b + (torch.round(b) - b).detach()) / torch.floor(L / 2)
    if noise is not None:
        mask, n = (torch.as_tensor(np.asarray(a)) for a in noise)
        q = torch.where(mask, q + n.to(z.dtype), q).clamp(-1.0, 1.0)
    return q


def _leaf(a: Any):
    """A float64 leaf tensor that requires grad, or None."""
    import torch

    return None if a is None else torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=True)


def fsq_layer_grads(
    x: Array,
    levels: tuple,
    g: Array,
    *,
    C: int = 1,
    W_in: Any = None,
    b_in: Any = None,
    W_out: Any = None,
    b_out: Any = None,
    R: Any = None,
    **kw: Any,
):
    """The FSQ layer (projections, C codebooks, rotation) and its autograd gradients.

    Parameters
    ----------
    x : (N, dim)
    levels : d ints
    g : (N, dim) the upstream gradient of the output
    C : codebooks
    W_in, b_in, W_out, b_out : the projections (input-major ``(dim, C d)`` and ``(C d, dim)``), or None
    R : (d, d) rotation (a constant), applied as ``z R`` before and ``q R^T`` after the quantizer
    kw : :func:`fsq_rows_torch`'s options (symmetric, hard, noise on the (N C, d) rows)

    Returns
    -------
    quantized : (N, dim); dx : (N, dim); grads : ``{"project_in.W", ...}`` of the projections given
    """
    import torch

    xt, Wi, bi, Wo, bo = _leaf(x), _leaf(W_in), _leaf(b_in), _leaf(W_out), _leaf(b_out)
    z = xt if Wi is None else xt @ Wi + (0 if bi is None else bi)
    rows = z.reshape(-1, len(levels))
    Rt = None if R is None else torch.tensor(np.asarray(R, dtype=np.float64))
    if Rt is not None:
        rows = rows @ Rt
    q = fsq_rows_torch(rows, levels, **kw)
    if Rt is not None:
        q = q @ Rt.T
    q = q.reshape(x.shape[0], -1)
    out = q if Wo is None else q @ Wo + (0 if bo is None else bo)
    (out * torch.tensor(np.asarray(g, dtype=np.float64))).sum().backward()
    names = {"project_in.W": Wi, "project_in.b": bi, "project_out.W": Wo, "project_out.b": bo}
    return out.detach().numpy(), xt.grad.numpy(), {k: v.grad.numpy() for k, v in names.items() if v is not None}


def residual_fsq_grads(
    x: Array,
    g: Array,
    levels: tuple,
    Q: int,
    *,
    state: dict,
    soft: Any = None,
    hard: bool = True,
    active: int | None = None,
    noise: Any = None,
):
    """Residual FSQ (symmetric grid, depth l scaled by ``L^-l``) and its autograd gradients.

    ``r_0 = tanh(z / c) c`` (with ``soft = c``), ``o_l = s_l FSQ(r_l / s_l)``,
    ``r_{l+1} = r_l - o_l.detach()``, output ``(sum_l o_l) W_out + b_out``.

    Parameters
    ----------
    x : (N, dim); g : (N, dim) the upstream gradient
    levels : d ints; Q : depths
    state : ``{"project_in.W", "project_in.b", "project_out.W", "project_out.b"}`` or ``{}``
    soft : (d,) c of the soft clamp, or None
    hard : the bound's phi is the clamp
    active : the depths that run (default Q)
    noise : one ``(mask, noise)`` per active depth, or None

    Returns
    -------
    quantized : (N, dim); dx : (N, dim); grads : the projections' gradients, by state name
    """
    import torch

    params = {k: _leaf(v) for k, v in state.items()}
    xt = _leaf(x)
    L = torch.tensor(levels, dtype=torch.float64)
    z = xt @ params["project_in.W"] + params["project_in.b"] if params else xt
    if soft is not None:
        c = torch.tensor(np.asarray(soft, dtype=np.float64))
        z = torch.tanh(z / c) * c
    residual, total = z, 0
    for level in range(Q if active is None else active):
        s = L ** (-level)
        depth_noise = None if noise is None else noise[level]
        q = fsq_rows_torch(residual / s, levels, symmetric=True, hard=hard, noise=depth_noise) * s
        residual = residual - q.detach()
        total = total + q
    out = total @ params["project_out.W"] + params["project_out.b"] if params else total
    (out * torch.tensor(np.asarray(g, dtype=np.float64))).sum().backward()
    return out.detach().numpy(), xt.grad.numpy(), {k: v.grad.numpy() for k, v in params.items()}
