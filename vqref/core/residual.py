"""Residual vector quantization as a pure function (SoundStream arXiv 2107.03312; RQ-VAE arXiv 2203.01941).

Symbols: N vectors, D features, K codes per depth, Q depths.

Each depth quantizes what the depths before it left over:

    r_0 = x
    (o_l, k_l, loss_l) = VQ_l(r_l)               o_l has the value of the code c_l = C_l[k_l]
    r_{l+1} = r_l - sg[o_l]                      the residual sees the code as a constant
    quantized = sum_l o_l                        value sum_l c_l = x - r_Q

The residual recursion is a hierarchical clustering: depth 0 finds coarse clusters, each later
depth clusters the errors of the ones before.  The tuple ``(k_0, ..., k_{Q-1})`` is a row's code.

Gradient routing (docs/math.md §2.4).  Because ``r_{l+1} = r_l - sg[o_l]``, every residual has
identity Jacobian with respect to x.  How the decoder's gradient g reaches x depends on where
the estimator sits:

* ``"per_depth"`` (vector-quantize-pytorch, the default): each depth applies its estimator to its
  own residual and the output is the sum of the estimator outputs, so
  ``dx = sum_l J_l^T g + sum_l dloss_l (2 beta / M)(r_l - c_l)`` with ``J_l = I`` for the STE:
  the decoder's gradient reaches the encoder **once per depth** (Q g with the STE; with the
  rotation trick ``sum_l lambda_l R_l^T g``).
* ``"sum"`` (RQ-VAE's code): one estimator on the total, ``quantized = x + sg[sum_l c_l - x]``
  (or the rotation trick from x to the sum), so the decoder's gradient reaches x once.

The commitment terms reach x through every residual in both cases.  With a shared codebook,
its gradient is the sum of the per-depth scatter-adds.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

from .. import backend as B
from ..backend import Array
from .quantize import (
    EstimatorCache,
    add_orthogonal_term,
    estimator_backward,
    estimator_forward,
    quantize_backward,
    quantize_forward,
)

__all__ = [
    "ResidualOutput",
    "ResidualCache",
    "residual_forward",
    "residual_backward",
    "residual_add_orthogonal",
    "orthogonal_code_subsets",
    "codebook_gradients",
    "GRADIENT_ROUTINGS",
]

GRADIENT_ROUTINGS = ("per_depth", "sum")


class ResidualOutput(NamedTuple):
    quantized: Any  # (N, D) value sum_l c_l
    indices: Array  # (N, Q) int64
    losses: Any  # (Q,) per-depth losses
    residuals: tuple  # Q + 1 arrays (N, D): r_0 = x, ..., r_Q = x - sum_l c_l
    codes: tuple  # Q arrays (N, D): the chosen (normalised) code at each depth
    commitments: tuple = ()  # Q 0-d arrays: each depth's mse(r^_l, c_l), unweighted
    orthogonals: tuple | None = None  # Q 0-d arrays: each depth's orthogonal regulariser (unweighted)


class ResidualCache(NamedTuple):
    depths: tuple  # Q QuantizeCache
    routing: str
    sum_estimator: EstimatorCache | None  # the estimator on the total, with routing "sum"
    shared: bool


def residual_forward(
    x: Array,
    codebooks: Sequence[Array],
    *,
    routing: str = "per_depth",
    indices: Array = None,
    code_ids: Sequence[Array] | None = None,
    **quantize_options: Any,
) -> tuple[ResidualOutput, ResidualCache]:
    """Quantize ``x`` residually, one codebook per depth.

    Parameters
    ----------
    x : (N, D) float
    codebooks : Q arrays (K, D); pass the same array Q times for a shared codebook
    routing : ``"per_depth"`` (vector-quantize-pytorch) or ``"sum"`` (one estimator on the total)
    indices : optional (N, Q) int, codes to use instead of the nearest ones (gradient checks)
    code_ids : optional per-depth code subsets for the orthogonal regulariser
    **quantize_options : passed to every depth's :func:`vqref.core.quantize.quantize_forward`
        (commitment_weight, learnable_codebook, use_cosine_sim, rotation_trick, ...)

    Returns
    -------
    out : ResidualOutput(quantized (N, D), indices (N, Q), losses (Q,), residuals, codes)
    cache : ResidualCache
    """
    if routing not in GRADIENT_ROUTINGS:
        raise ValueError(f"routing must be one of {GRADIENT_ROUTINGS}, got {routing!r}")
    xp = B.get_namespace(x, *codebooks)
    Q = len(codebooks)
    shared = all(c is codebooks[0] for c in codebooks)
    rotation = bool(quantize_options.get("rotation_trick", False))
    depth_options = dict(quantize_options)
    if routing == "sum":
        depth_options["rotation_trick"] = False  # the estimator sits on the sum instead

    residual = x
    residuals, codes, idx_list, losses, caches, commitments = [x], [], [], [], [], []
    total = None
    for level in range(Q):
        fixed = None if indices is None else indices[:, level]
        ids = None if code_ids is None else code_ids[level]
        out, cache = quantize_forward(
            residual, codebooks[level], indices=fixed, orthogonal_code_ids=ids, **depth_options
        )
        codes.append(out.quantized)
        idx_list.append(out.indices)
        losses.append(out.loss)
        commitments.append(out.commitment)
        caches.append(cache)
        total = out.quantized if total is None else total + out.quantized  # (N, D)
        residual = residual - out.quantized  # r_{l+1} = r_l - sg[o_l]  (N, D)
        residuals.append(residual)

    sum_estimator = None
    if routing == "sum":
        quantized, sum_estimator = estimator_forward(x, total, rotation_trick=rotation)
    else:
        quantized = total
    out = ResidualOutput(
        quantized,
        xp.stack(idx_list, axis=1),
        xp.stack([xp.asarray(v) for v in losses]),
        tuple(residuals),
        tuple(codes),
        tuple(commitments),
    )
    return out, ResidualCache(tuple(caches), routing, sum_estimator, shared)


def residual_backward(dquantized: Array, dlosses: Array, cache: ResidualCache) -> tuple[Any, list]:
    """Gradients for the input and every depth's codebook.

    Parameters
    ----------
    dquantized : (N, D) upstream gradient of ``quantized``
    dlosses : (Q,) upstream gradients of the per-depth losses (or a scalar for all)
    cache : ResidualCache

    Returns
    -------
    dx : (N, D)
    dcodebooks : list of Q arrays (K, D) or None (one per depth; for a shared codebook add them up)
    """
    xp = B.get_namespace(dquantized)
    Q = len(cache.depths)
    if B.is_array(dlosses) and dlosses.ndim == 1:
        dl = [dlosses[level] for level in range(Q)]
    else:
        dl = [dlosses] * Q
    if cache.routing == "per_depth":
        # Every depth's estimator passes the decoder gradient to its residual, and every
        # residual has identity Jacobian with respect to x: the contributions add up.
        dx = None
        dcodebooks = []
        for level, depth in enumerate(cache.depths):
            dr, dcb = quantize_backward(dquantized, dl[level], depth)
            dx = dr if dx is None else dx + dr
            dcodebooks.append(dcb)
        return dx, dcodebooks
    # routing "sum": the estimator on the total carries the decoder gradient once; the depths
    # contribute their loss gradients only.
    dx = estimator_backward(dquantized, cache.sum_estimator)
    zeros = xp.zeros_like(dquantized)
    dcodebooks = []
    for level, depth in enumerate(cache.depths):
        dr, dcb = quantize_backward(zeros, dl[level], depth)
        dx = dx + dr
        dcodebooks.append(dcb)
    return dx, dcodebooks


def residual_add_orthogonal(
    out: ResidualOutput,
    cache: ResidualCache,
    codebooks: Sequence[Array],
    *,
    weight: float,
    code_ids: Sequence[Array] | None = None,
) -> tuple[ResidualOutput, ResidualCache]:
    """Add each depth's orthogonal regulariser ``weight * orth(C_l)`` to its loss.

    The per-depth form of :func:`vqref.core.quantize.add_orthogonal_term`: ``codebooks[l]`` is the
    codebook value depth l's term is evaluated on (for a quantizer module: after this step's EMA
    update, or the assignment's codebook for a shared one), ``code_ids[l]`` its code subset.

    Returns
    -------
    out : with ``losses[l] + weight * orth_l``
    cache : with every depth's regulariser cache (its gradient joins that depth's codebook gradient)
    """
    xp = B.get_namespace(out.losses)
    depths, orths = [], []
    for level, depth in enumerate(cache.depths):
        ids = None if code_ids is None else code_ids[level]
        orth, depth = add_orthogonal_term(depth, codebooks[level], weight=weight, code_ids=ids)
        depths.append(depth)
        orths.append(orth)
    out = out._replace(losses=out.losses + weight * xp.stack(orths), orthogonals=tuple(orths))  # (Q,)
    return out, cache._replace(depths=tuple(depths))


def orthogonal_code_subsets(
    indices: Array, num_codes: int, *, active_only: bool, max_codes: int | None, rngs: Sequence[Any]
) -> list | None:
    """Per depth, the codes the orthogonal regulariser sees (``None``: all K at every depth).

    ``active_only``: the codes depth l used in ``indices[:, l]``; ``max_codes``: at most that
    many, drawn at random from depth l's generator (``rngs[l]``, or ``rngs[0]`` for a shared
    codebook).  See :func:`vqref.ops.orthogonal.select_codes`.  A driver step: the used codes are
    read on the host.

    Parameters
    ----------
    indices : (N, Q) int, this forward's codes
    num_codes : K
    """
    from ..ops.orthogonal import select_codes

    if not active_only and max_codes is None:
        return None
    ids = []
    for level in range(indices.shape[1]):
        used = indices[:, level] if active_only else None
        gen = rngs[0 if len(rngs) == 1 else level]
        pick = select_codes(num_codes, used_indices=used, max_codes=max_codes, rng=gen)
        ids.append(B.from_numpy(pick, B.get_namespace(indices), device=B.get_device(indices)))
    return ids


def codebook_gradients(dcodebooks: Sequence[Any], *, shared: bool) -> list:
    """The gradient of each codebook from the per-depth ones of :func:`residual_backward`.

    Separate codebooks: depth l's gradient, or ``None`` when nothing reached it.  A shared
    codebook: the sum over depths (each depth scattered into the same codebook).
    """
    if not shared:
        return list(dcodebooks)
    total = None
    for g in dcodebooks:
        if g is not None:
            total = g if total is None else total + g  # (K, D)
    return [total]
