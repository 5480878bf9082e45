"""torch references for :mod:`vqref.nn`: MLP gradients by autograd, and steps of torch's optimizers.

Parameters are passed as mappings in vqref's layout, ``{"0.W": (Din, Dout), "0.b": (Dout,),
"1.W": ...}`` (``W`` input-major, so the layer is ``x @ W + b``), as numpy arrays or anything
``vqref.backend.to_numpy`` accepts.  Everything is computed in float64 on the CPU and returned
as numpy arrays.  torch is imported inside the functions only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ... import backend as B
from ...backend import Array

__all__ = ["mlp_mse_grads", "mlp_vjp", "adam_steps", "sgd_steps"]


def _tensor(a: Array, requires_grad: bool = False):
    import torch

    t = torch.tensor(np.asarray(B.to_numpy(a), dtype=np.float64), dtype=torch.float64)
    return t.requires_grad_(requires_grad)


def _layer_count(params: Mapping[str, Any]) -> int:
    L = 0
    while f"{L}.W" in params:
        L += 1
    if L == 0 or len(params) != 2 * L:
        raise ValueError(f"expected parameters named 0.W, 0.b, 1.W, ..., got {sorted(params)}")
    return L


def _mlp(xt, pt: dict, L: int, activation: str):
    import torch

    act = {"relu": torch.relu, "tanh": torch.tanh}[activation]
    h = xt
    for i in range(L):
        h = h @ pt[f"{i}.W"] + pt[f"{i}.b"]
        if i < L - 1:
            h = act(h)
    return h


def mlp_vjp(x: Array, params: Mapping[str, Any], dout: Array, *, activation: str = "relu"):
    """The MLP with autograd, differentiated against an upstream gradient ``dout``.

    Returns
    -------
    out : (N, Dout), dx : (N, Din), grads : dict name -> gradient of ``<dout, out>``
    """
    L = _layer_count(params)
    xt = _tensor(x, True)
    pt = {k: _tensor(v, True) for k, v in params.items()}
    out = _mlp(xt, pt, L, activation)
    out.backward(_tensor(dout))
    return out.detach().numpy(), xt.grad.numpy(), {k: t.grad.numpy() for k, t in pt.items()}


def mlp_mse_grads(x: Array, target: Array, params: Mapping[str, Any], *, activation: str = "relu"):
    """``loss = F.mse_loss(MLP(x), target)`` and its gradients by autograd.

    Returns
    -------
    loss : float, dx : (N, Din), grads : dict name -> dloss/dparam
    """
    import torch.nn.functional as F

    L = _layer_count(params)
    xt = _tensor(x, True)
    pt = {k: _tensor(v, True) for k, v in params.items()}
    loss = F.mse_loss(_mlp(xt, pt, L, activation), _tensor(target))
    loss.backward()
    return float(loss.detach()), xt.grad.numpy(), {k: t.grad.numpy() for k, t in pt.items()}


def _run(make_opt, params: Mapping[str, Any], grads_seq: Sequence[Mapping[str, Any]]) -> list[dict]:
    import torch

    names = list(params)
    pt = {k: _tensor(params[k], True) for k in names}
    opt = make_opt([pt[k] for k in names])
    history = []
    for grads in grads_seq:
        # A name absent from this step's gradients gets .grad = None: torch then skips it.
        for k in names:
            pt[k].grad = _tensor(grads[k]) if k in grads else None
        with torch.no_grad():
            opt.step()
        history.append({k: pt[k].detach().numpy().copy() for k in names})
    return history


def adam_steps(
    params: Mapping[str, Any],
    grads_seq: Sequence[Mapping[str, Any]],
    *,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> list[dict]:
    """Run ``torch.optim.Adam`` over the given gradients, one step per entry of ``grads_seq``.

    Returns the parameters after every step: a list of dicts name -> numpy array.
    """
    import torch

    return _run(
        lambda ps: torch.optim.Adam(ps, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False),
        params,
        grads_seq,
    )


def sgd_steps(
    params: Mapping[str, Any],
    grads_seq: Sequence[Mapping[str, Any]],
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> list[dict]:
    """Run ``torch.optim.SGD`` over the given gradients; the parameters after every step."""
    import torch

    return _run(
        lambda ps: torch.optim.SGD(ps, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=False),
        params,
        grads_seq,
    )
