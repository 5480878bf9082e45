"""Vector quantization as a pure function: nearest code, gradient estimator, losses.

Symbols: N vectors, D features, K codes; M = N * D.

Forward (VQ-VAE, arXiv 1711.00937; optional pieces from later papers):

    x^     = l2(x)  if cosine else x              (N, D)  ViT-VQGAN's l2-normalised lookup
    C^     = l2(C)  if cosine else C              (K, D)
    k_i    = argmin_k ||x^_i - c^_k||^2           (N,)    (argmax of x^ . c^ for cosine)
    q      = C^[k]                                (N, D)
    out    = STE(x^, q)  or  rotation(x^, q)      (N, D)  value q, surrogate gradient
    loss   = beta * mse(x^, sg[q])                         commitment
           [+ w_cb * mse(sg[x^], q)]                       codebook term, learnable codebook
           [+ w_orth * orth(C)]                            orthogonal regulariser

With a learnable codebook and no separate ``codebook_weight``, the loss is
vector-quantize-pytorch's single term ``beta * mse(x^, q)`` whose gradient reaches both sides.

Backward: the gradient estimator carries ``dout`` to ``x^``; each loss term adds its share;
the lookup's adjoint (a segment sum) collects the codebook gradient; the l2 normalisations (if
any) are differentiated last.  The indices are constants throughout (the argmin has no
gradient).  The functions return the cache explicitly; they keep no state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .. import backend as B
from ..backend import Array
from ..ops.distance import nearest_code
from ..ops.l2norm import l2norm_backward, l2norm_forward
from ..ops.lookup import LookupCache, lookup_backward, lookup_forward
from ..ops.losses import MSECache, mse_backward, mse_forward
from ..ops.orthogonal import orthogonal_loss_backward, orthogonal_loss_forward
from ..ops.rotation import rotation_trick_backward, rotation_trick_forward
from ..ops.straight_through import straight_through_backward, straight_through_forward

__all__ = [
    "QuantizeOutput",
    "QuantizeCache",
    "quantize_forward",
    "quantize_backward",
    "estimator_forward",
    "estimator_backward",
    "add_orthogonal_term",
    "EstimatorCache",
]


class QuantizeOutput(NamedTuple):
    quantized: Any  # (N, D), value = the selected (normalised) codes
    indices: Array  # (N,) int64
    loss: Any  # 0-d, the weighted total
    commitment: Any  # 0-d, mse(x^, q) (unweighted; equals the codebook term's value)
    orthogonal: Any  # 0-d or None, the orthogonal regulariser (unweighted)


class EstimatorCache(NamedTuple):
    kind: str  # "ste" | "rotation"
    inner: Any  # the estimator op's own cache (STECache or RotationCache)


class QuantizeCache(NamedTuple):
    x_norm: Any  # l2norm cache of the input, or None (Euclidean)
    c_norm: Any  # l2norm cache of the codebook, or None
    lookup: LookupCache
    estimator: EstimatorCache
    mse: MSECache  # mse(x^, q), shared by the commitment and codebook terms
    commitment_weight: float
    codebook_weight: float  # 0 when the codebook gets no gradient from the losses
    orthogonal: Any  # orthogonal-loss cache, or None (see add_orthogonal_term)
    orthogonal_weight: float


def estimator_forward(x: Array, q: Array, *, rotation_trick: bool = False) -> tuple[Array, EstimatorCache]:
    """The gradient estimator: value ``q``, surrogate gradient to ``x``.

    Parameters
    ----------
    x : (N, D) the vectors the gradient goes to
    q : (N, D) their codes (the value)
    rotation_trick : the rotation trick (arXiv 2410.06424) instead of the straight-through estimator

    Returns
    -------
    out : (N, D), equal to ``q``
    cache : EstimatorCache(kind, inner) for :func:`estimator_backward`
    """
    if rotation_trick:
        out, inner = rotation_trick_forward(x, q)
        return out, EstimatorCache("rotation", inner)
    out, inner = straight_through_forward(x, q)
    return out, EstimatorCache("ste", inner)


def estimator_backward(dout: Array, cache: EstimatorCache) -> Array:
    """``dx``: ``dout`` (straight-through) or ``lambda R^T dout`` (rotation trick); surrogates."""
    if cache.kind == "rotation":
        return rotation_trick_backward(dout, cache.inner)
    return straight_through_backward(dout, cache.inner)


def add_orthogonal_term(
    cache: QuantizeCache, codebook: Array, *, weight: float, code_ids: Any = None
) -> tuple[Array, QuantizeCache]:
    """The orthogonal regulariser ``orth(codebook)``, with its gradient joined to a quantization's backward.

    The orthogonal regulariser (arXiv 2112.00384) is a loss on the codebook parameter, not on the
    quantization: it may be evaluated on another value of the codebook than the one the
    assignment used.  A quantizer module with an EMA codebook evaluates it on the codebook after
    this step's update (vector-quantize-pytorch's order), so that its gradient belongs to the
    codebook an optimizer will step.  :func:`quantize_forward` calls this function on its own
    codebook when given ``orthogonal_reg_weight > 0``.  The caller adds ``weight * orth`` to the
    loss.

    Parameters
    ----------
    cache : QuantizeCache from :func:`quantize_forward` (without a regulariser)
    codebook : (K, D), the codebook value the regulariser is evaluated on (raw, not normalised)
    weight : w > 0
    code_ids : optional (n,) int, the codes the regulariser sees (default: all K)

    Returns
    -------
    orth : 0-d, the unweighted value
    cache : with the regulariser's cache and weight; :func:`quantize_backward` adds the gradient
        of ``weight * orth`` at ``codebook`` (its step 4)
    """
    orth, orth_cache = orthogonal_loss_forward(codebook, code_ids=code_ids)  # ()
    return orth, cache._replace(orthogonal=orth_cache, orthogonal_weight=float(weight))


def quantize_forward(
    x: Array,
    codebook: Array,
    *,
    commitment_weight: float = 1.0,
    codebook_weight: float | None = None,
    learnable_codebook: bool = False,
    use_cosine_sim: bool = False,
    rotation_trick: bool = False,
    orthogonal_reg_weight: float = 0.0,
    orthogonal_code_ids: Any = None,
    indices: Array = None,
    chunk_size: int | None = None,
) -> tuple[QuantizeOutput, QuantizeCache]:
    """Quantize ``x`` with ``codebook``; return the outputs and what the backward needs.

    Parameters
    ----------
    x : (N, D) float
    codebook : (K, D) float, same dtype and namespace as x
    commitment_weight : beta >= 0, the commitment loss weight
    codebook_weight : with ``learnable_codebook``, the weight of the separate codebook term
        ``mse(sg[x^], q)`` (VQ-VAE paper: 1 with beta = 0.25).  ``None`` gives
        vector-quantize-pytorch's single term ``beta * mse(x^, q)`` (gradient to both sides).
    learnable_codebook : whether the losses send a gradient to the codebook
    use_cosine_sim : l2-normalise inputs and codes, assign by cosine similarity
    rotation_trick : use the rotation trick (arXiv 2410.06424) instead of the STE
    orthogonal_reg_weight : weight of the orthogonal regulariser on the codebook (>= 0)
    orthogonal_code_ids : optional (n,) int, the codes the regulariser sees (default: all)
    indices : optional (N,) int, use these codes instead of the nearest ones (to hold the
        assignment fixed in gradient checks)
    chunk_size : rows per chunk of the nearest-code search

    Returns
    -------
    out : QuantizeOutput(quantized (N, D), indices (N,), loss (), commitment (), orthogonal ())
    cache : QuantizeCache
    """
    xp = B.get_namespace(x, codebook)
    x_norm = c_norm = None
    xh, ch = x, codebook
    if use_cosine_sim:
        xh, x_norm = l2norm_forward(x)  # (N, D) unit rows
        ch, c_norm = l2norm_forward(codebook)  # (K, D) unit rows
    if indices is None:
        indices = nearest_code(xh, ch, metric="dot" if use_cosine_sim else "euclidean", chunk_size=chunk_size)
    q, lookup_cache = lookup_forward(ch, indices)  # (N, D)

    quantized, est_cache = estimator_forward(xh, q, rotation_trick=rotation_trick)

    # mse(x^, q) has one value; the weights below decide where its gradient goes.
    commit, mse_cache = mse_forward(xh, q)  # ()
    if learnable_codebook:
        cb_weight = commitment_weight if codebook_weight is None else codebook_weight
    else:
        cb_weight = 0.0
    weight = commitment_weight + cb_weight if codebook_weight is not None else commitment_weight
    loss = xp.asarray(weight * commit)  # () a 0-d array on every backend (numpy makes a scalar)

    cache = QuantizeCache(
        x_norm, c_norm, lookup_cache, est_cache, mse_cache, float(commitment_weight), float(cb_weight), None, 0.0
    )
    orth = None
    if orthogonal_reg_weight > 0:
        orth, cache = add_orthogonal_term(cache, codebook, weight=orthogonal_reg_weight, code_ids=orthogonal_code_ids)
        loss = xp.asarray(loss + orthogonal_reg_weight * orth)
    return QuantizeOutput(quantized, indices, loss, commit, orth), cache


def quantize_backward(dquantized: Array, dloss: Array, cache: QuantizeCache) -> tuple[Any, Any]:
    """Gradients for the input and the codebook.

    Parameters
    ----------
    dquantized : (N, D) float, upstream gradient of ``quantized``
    dloss : scalar or 0-d array, upstream gradient of ``loss``
    cache : QuantizeCache from :func:`quantize_forward`

    Returns
    -------
    dx : (N, D)
    dcodebook : (K, D), or ``None`` when no term reaches the codebook
    """
    # 1. The estimator carries the decoder's gradient to x^ (STE: unchanged; rotation: lambda R^T g).
    dxh = estimator_backward(dquantized, cache.estimator)  # (N, D)

    # 2. The losses: d mse(x^, q) = +(2/M)(x^ - q) for x^ and the opposite for q.  The
    #    commitment weight routes it to x^, the codebook weight to q.
    dmse_dxh, dmse_dq = mse_backward(dloss, cache.mse)
    dxh = dxh + cache.commitment_weight * dmse_dxh  # (N, D)
    dch = None
    if cache.codebook_weight:
        dch = lookup_backward(cache.codebook_weight * dmse_dq, cache.lookup)  # (K, D)

    # 3. Undo the l2 normalisations (cosine codebooks).
    if cache.x_norm is not None:
        dx = l2norm_backward(dxh, cache.x_norm)
        dcodebook = None if dch is None else l2norm_backward(dch, cache.c_norm)
    else:
        dx, dcodebook = dxh, dch

    # 4. The orthogonal regulariser acts on the raw codebook.
    if cache.orthogonal is not None:
        dorth = orthogonal_loss_backward(cache.orthogonal_weight * dloss, cache.orthogonal)  # (K, D)
        dcodebook = dorth if dcodebook is None else dcodebook + dorth
    return dx, dcodebook
