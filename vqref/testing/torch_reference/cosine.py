"""Torch autograd reference for the l2 normalisation of cosine-similarity codebooks.

Symbols: N vectors, D features.

The forward is ``torch.nn.functional.normalize(x, dim=-1, eps=eps)``, exactly the ``l2norm`` of
vector-quantize-pytorch (eps = 1e-6): ``y = x / max(||x||, eps)``.  The gradient comes from
autograd in float64, so it is an independent check of :func:`vqref.ops.l2norm.l2norm_backward`.
torch is imported inside the function, so importing this module never needs it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["l2norm_reference"]


def l2norm_reference(x: Any, dy: Any, *, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """``y = F.normalize(x, dim=-1, eps=eps)`` and ``dx = (dy . dy/dx)`` by torch autograd.

    Parameters
    ----------
    x : (N, D) or (..., D) host array (converted to float64)
    dy : upstream gradient, the shape of ``x``
    eps : the clamp of the norm

    Returns
    -------
    y : (N, D) float64 numpy array
    dx : (N, D) float64 numpy array
    """
    import torch
    import torch.nn.functional as F

    xt = torch.tensor(np.asarray(x, dtype=np.float64), requires_grad=True)
    y = F.normalize(xt, p=2, dim=-1, eps=eps)
    y.backward(torch.tensor(np.asarray(dy, dtype=np.float64)))
    return y.detach().numpy(), xt.grad.numpy()
