"""Torch autograd reference for the orthogonal codebook regulariser.

Symbols: K codes, D features, H codebooks (heads), n codes taking part.

``form="vqp"`` is vector-quantize-pytorch's ``orthogonal_loss_fn`` written out (normalise with
``F.normalize``, eps = 1e-6; cosine-similarity Gram matrix; sum of squares over ``H n^2`` minus
``1/n``), including its subset step ``codebook[:, ids]``.  ``form="frobenius"`` is the
``||G - I||_F^2 / n^2`` form of the TE-VQGAN code (Shin et al., arXiv 2112.00384).  The gradient
is autograd's, in float64.  torch is imported inside the function.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["orthogonal_loss_reference"]


def orthogonal_loss_reference(
    codebook: Any,
    dloss: float = 1.0,
    *,
    code_ids: Any = None,
    eps: float = 1e-6,
    form: str = "vqp",
) -> tuple[float, np.ndarray]:
    """The orthogonal loss and its codebook gradient for upstream gradient ``dloss``.

    Parameters
    ----------
    codebook : (K, D) or (H, K, D) host array (converted to float64)
    dloss : upstream gradient of the scalar loss
    code_ids : optional (n,) host int array, the codes taking part (repeats allowed)
    eps : the normalisation clamp
    form : ``"vqp"`` (sum G^2 / (H n^2) - 1/n) or ``"frobenius"`` (||G - I||^2 / (H n^2))

    Returns
    -------
    loss : float
    dcodebook : float64 numpy array, the shape of ``codebook``
    """
    import torch
    import torch.nn.functional as F

    if form not in ("vqp", "frobenius"):
        raise ValueError(f"form must be 'vqp' or 'frobenius', got {form!r}")
    host = np.asarray(codebook, dtype=np.float64)
    leaf = torch.tensor(host, requires_grad=True)
    t = leaf[None] if host.ndim == 2 else leaf  # (H, K, D)
    if code_ids is not None:
        t = t[:, torch.as_tensor(np.asarray(code_ids, dtype=np.int64))]  # (H, n, D)
    h, n = t.shape[:2]
    normed = F.normalize(t, p=2, dim=-1, eps=eps)
    gram = torch.einsum("hid,hjd->hij", normed, normed)  # (H, n, n)
    if form == "vqp":
        loss = (gram**2).sum() / (h * n**2) - 1.0 / n
    else:
        eye = torch.eye(n, dtype=gram.dtype)
        loss = ((gram - eye) ** 2).sum() / (h * n**2)
    loss.backward(torch.tensor(float(dloss), dtype=torch.float64))
    return float(loss.detach()), leaf.grad.numpy()
