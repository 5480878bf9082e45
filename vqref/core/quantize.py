"""Vector quantization as a pure function: nearest (or sampled) code, gradient estimator, losses.

Symbols: N vectors, D features, K codes; M = N * D; tau the sampling temperature.

Forward (VQ-VAE, arXiv 1711.00937; optional pieces from later papers):

    x^     = l2(x)  if cosine else x              (N, D)  ViT-VQGAN's l2-normalised lookup
    C^     = l2(C)  if cosine else C              (K, D)
    l      = -||x^ - c^|| or x^ . c^             (N, K)  logits, only where a soft path needs them
    k_i    = argmin_k ||x^_i - c^_k||^2           (N,)    (argmax of x^ . c^ for cosine), or with
             argmax_k (l_ik / tau + g_ik)                 Gumbel noise g: a sample of softmax(l_i / tau)
    q      = C^[k]                                (N, D)
    out    = estimator(x^, q)                     (N, D)  one of four, chosen in estimator_forward:
             "ste"       value q, dx^ = dout                          (VQ-VAE)
             "rotation"  value q, dx^ = lambda R^T dout               (arXiv 2410.06424)
             "gumbel"    value q, gradient through y = softmax(l/tau + g)   straight-through
                         Gumbel-softmax (arXiv 1611.01144), a surrogate
             "soft"      value y C^ with y = softmax(l / tau), its true derivative
    loss   = beta * mse(x^, sg[q])                         commitment
           [+ w_cb * mse(sg[x^], q)]                       codebook term, learnable codebook
           [+ w_div * diversity(l)]                        codebook diversity loss
           [+ w_orth * orth(C)]                            orthogonal regulariser

With a learnable codebook and no separate ``codebook_weight``, the loss is
vector-quantize-pytorch's single term ``beta * mse(x^, q)`` whose gradient reaches both sides.
The losses do not depend on the estimator: the commitment term always measures the hard code q.

Backward: the estimator carries ``dout`` to ``x^`` (STE, rotation trick) or to the logits and
the codebook (Gumbel straight-through, soft); each loss term adds its share; the logits'
gradient reaches ``x^`` and ``C^`` through the distances; the lookup's adjoint (a segment sum)
collects the codebook gradient; the l2 normalisations (if any) are differentiated last.  The
indices are constants throughout (neither the argmin nor the sample has a gradient).  The
functions return the cache explicitly; they keep no state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .. import backend as B
from ..backend import Array
from ..ops.distance import nearest_code
from ..ops.gumbel import (
    EntropyCache,
    SoftmaxCache,
    clamped_entropy_backward,
    clamped_entropy_forward,
    code_logits_backward,
    code_logits_forward,
    diversity_loss_backward,
    diversity_loss_forward,
    gumbel_max_sample,
    gumbel_softmax_backward,
    gumbel_softmax_forward,
    sample_codes,
    soft_assignment_backward,
    soft_assignment_forward,
    softmax_backward,
    softmax_forward,
    straight_through_gumbel_backward,
    straight_through_gumbel_forward,
)
from ..ops.l2norm import l2norm_backward, l2norm_forward
from ..ops.lookup import LookupCache, lookup_forward
from ..ops.losses import MSECache, codebook_loss_backward_codes, commitment_loss_backward_added, mse_forward
from ..ops.orthogonal import orthogonal_loss_backward, orthogonal_loss_forward
from ..ops.rotation import rotation_trick_backward, rotation_trick_forward
from ..ops.straight_through import straight_through_backward, straight_through_forward

__all__ = [
    "ESTIMATORS",
    "QuantizeOutput",
    "QuantizeCache",
    "quantize_forward",
    "quantize_backward",
    "estimator_kind",
    "estimator_forward",
    "estimator_backward",
    "add_orthogonal_term",
    "EstimatorCache",
    "EstimatorGrads",
    "GroupedDiversityCache",
    "grouped_diversity_forward",
    "grouped_diversity_backward",
]

ESTIMATORS = ("ste", "rotation", "gumbel", "soft")


class QuantizeOutput(NamedTuple):
    quantized: Any  # (N, D), value = the selected (normalised) codes; the soft codes y C^ for "soft"
    indices: Array  # (N,) int64
    loss: Any  # 0-d, the weighted total
    commitment: Any  # 0-d, mse(x^, q) (unweighted; equals the codebook term's value)
    orthogonal: Any  # 0-d or None, the orthogonal regulariser (unweighted)
    diversity: Any = None  # 0-d or None, the codebook diversity loss (unweighted)


class EstimatorCache(NamedTuple):
    kind: str  # one of ESTIMATORS
    inner: Any  # the estimator op's own cache (STECache, RotationCache or AssignmentCache)
    relaxed: Any = None  # "gumbel"/"soft": the GumbelSoftmaxCache of y, the way to the logits


class EstimatorGrads(NamedTuple):
    dx: Any  # (N, D) the gradient reaching x directly (STE, rotation trick), else None
    dlogits: Any  # (N, K) reaching the logits through y (Gumbel straight-through, soft), else None
    dcodebook: Any  # (K, D) reaching the codebook directly (z^T dout or y^T dout), else None


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
    logits: Any = None  # LogitsCache, or None when no soft path was taken
    diversity: Any = None  # DiversityCache, or None
    diversity_weight: float = 0.0
    codebook: Any = None  # (K, D) C^, the (normalised) codebook of the lookup


def estimator_kind(
    *, rotation_trick: bool = False, straight_through: bool = False, soft_assignment: bool = False
) -> str:
    """The estimator the three flags select (``"ste"`` when none is set; more than one is an error)."""
    chosen = [
        k for k, on in (("rotation", rotation_trick), ("gumbel", straight_through), ("soft", soft_assignment)) if on
    ]
    if len(chosen) > 1:
        raise ValueError(
            "rotation_trick, straight_through and soft_assignment are different gradient estimators; set at most one"
        )
    return chosen[0] if chosen else "ste"


def estimator_forward(
    x: Array, q: Array, *, kind: str = "ste", codebook: Array = None, indices: Array = None, relaxed: Any = None
) -> tuple[Array, EstimatorCache]:
    """The gradient estimator: the output, and how its gradient goes back.

    Parameters
    ----------
    x : (N, D) the vectors (the gradient goes to them, or to their logits)
    q : (N, D) their codes ``codebook[indices]``
    kind : ``"ste"`` (straight-through, arXiv 1711.00937), ``"rotation"`` (arXiv 2410.06424),
        ``"gumbel"`` (straight-through Gumbel-softmax, arXiv 1611.01144) or ``"soft"``
    codebook : (K, D), for ``"gumbel"`` and ``"soft"``
    indices : (N,) int, for ``"gumbel"``
    relaxed : ``(y, GumbelSoftmaxCache)`` from :func:`vqref.ops.gumbel.gumbel_softmax_forward`,
        for ``"gumbel"`` and ``"soft"``

    Returns
    -------
    out : (N, D), equal to ``q`` (``y C`` for ``"soft"``)
    cache : EstimatorCache for :func:`estimator_backward`
    """
    if kind == "rotation":
        out, inner = rotation_trick_forward(x, q)
        return out, EstimatorCache(kind, inner)
    if kind == "gumbel":
        out, inner = straight_through_gumbel_forward(codebook, indices)  # the value q, bit for bit
        return out, EstimatorCache(kind, inner, relaxed[1])
    if kind == "soft":
        out, inner = soft_assignment_forward(relaxed[0], codebook)  # (N, D) y C
        return out, EstimatorCache(kind, inner, relaxed[1])
    if kind != "ste":
        raise ValueError(f"kind must be one of {ESTIMATORS}, got {kind!r}")
    out, inner = straight_through_forward(x, q)
    return out, EstimatorCache(kind, inner)


def estimator_backward(dout: Array, cache: EstimatorCache, *, codebook: bool = True) -> EstimatorGrads:
    """Where ``dout`` goes, by estimator:

    * ``"ste"``: ``dx = dout``; ``"rotation"``: ``dx = lambda R^T dout`` (surrogates);
    * ``"gumbel"``: ``z C`` is differentiated exactly (``dz = dout C^T``, ``dC = z^T dout``) and
      ``dz`` is used as the gradient of the soft sample y (the surrogate step), which the softmax
      carries to the logits;
    * ``"soft"``: ``y C`` differentiated exactly (``dy = dout C^T``, ``dC = y^T dout``), y to the
      logits: the true derivative.

    ``codebook=False``: the soft estimator skips its ``dC`` product (the others' are cheap).
    """
    if cache.kind == "rotation":
        return EstimatorGrads(rotation_trick_backward(dout, cache.inner), None, None)
    if cache.kind == "gumbel":
        dz, dcodebook = straight_through_gumbel_backward(dout, cache.inner)  # (N, K), (K, D)
        return EstimatorGrads(None, gumbel_softmax_backward(dz, cache.relaxed), dcodebook)  # dy := dz
    if cache.kind == "soft":
        dy, dcodebook = soft_assignment_backward(dout, cache.inner, codebook=codebook)  # (N, K), (K, D) or None
        return EstimatorGrads(None, gumbel_softmax_backward(dy, cache.relaxed), dcodebook)
    return EstimatorGrads(straight_through_backward(dout, cache.inner), None, None)


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
        of ``weight * orth`` at ``codebook`` (its step 6)
    """
    orth, orth_cache = orthogonal_loss_forward(codebook, code_ids=code_ids)  # ()
    return orth, cache._replace(orthogonal=orth_cache, orthogonal_weight=float(weight))


class GroupedDiversityCache(NamedTuple):
    softmax: SoftmaxCache  # p = softmax(T l)  (N, K)
    entropy: EntropyCache  # of pbar  (P, K)
    groups: Array  # (N,) int, the position of each row
    counts: Array  # (P,) float, rows per position (0 for an absent one)
    present: Array  # 0-d float, P', the number of positions that have rows (at least 1)
    inverse_temperature: float  # T


def grouped_diversity_forward(
    logits: Array, groups: Array, num_groups: int, *, inverse_temperature: float = 100.0, comm: Any = None
) -> tuple[Array, GroupedDiversityCache]:
    """The codebook diversity loss over the rows that are present, each at its own position.

    :func:`vqref.ops.gumbel.diversity_loss_forward` groups row i with position ``i mod P``, which
    needs every position's rows.  When a mask (or a quantize dropout) leaves some rows out, the
    remaining rows carry their position explicitly, and each position averages only its own:

        p_i    = softmax(T l_i)                                    (N, K)
        pbar_n = (1 / B_n) sum_{i : g_i = n} p_i,   B_n = #{i : g_i = n}      (P, K)
        L      = -(1 / P') sum_{n : B_n > 0} H(pbar_n),   P' = #{n : B_n > 0}

    With ``g_i = i mod P`` and every position full this is the op's loss.  A position without
    rows has ``pbar_n = 0`` and ``H(0) = 0`` (the clamped entropy), so it adds nothing; with no
    row at all, ``L = 0`` (P' is taken as 1), never 0/0.

    Parameters
    ----------
    logits : (N, K)
    groups : (N,) int in [0, P), the position of each row
    num_groups : P
    inverse_temperature : T >= 0
    comm : communicator (``None``: one process): the rows are this rank's, and the sums and
        counts of every position are added over the ranks, so every rank gets the loss of the
        whole batch and its rows' share of the gradient (each row's own)

    Returns
    -------
    loss : 0-d
    cache : GroupedDiversityCache
    """
    xp = B.get_namespace(logits, groups)
    T = float(inverse_temperature)
    p, sm = softmax_forward(_shifted(logits) * T)  # (N, K)
    counts = xp.astype(B.bincount(groups, num_groups), p.dtype)  # (P,) B_n
    sums = B.segment_sum(p, groups, num_groups)  # (P, K)
    if comm is not None:  # every rank's rows at each position
        counts, sums = comm.allreduce_sum(counts), comm.allreduce_sum(sums)
    pbar = sums / xp.clip(counts, min=1.0)[:, None]  # (P, K)
    h, ent = clamped_entropy_forward(pbar)  # (P,)
    present = xp.clip(xp.sum(xp.astype(counts > 0, p.dtype)), min=1.0)  # () P'
    loss = -xp.sum(h) / present  # () the absent positions have h = 0
    return xp.asarray(loss), GroupedDiversityCache(sm, ent, groups, counts, present, T)


def _shifted(logits: Array) -> Array:
    """``l - max_k l``: the softmax is unchanged and no exponential overflows."""
    xp = B.get_namespace(logits)
    return logits - xp.max(logits, axis=-1, keepdims=True)  # (N, K)


def grouped_diversity_backward(dloss: Array, cache: GroupedDiversityCache) -> Array:
    """Gradient of :func:`grouped_diversity_forward` for the logits, step by step in reverse:

        dh     = -dloss / P'                               (P,)
        dpbar  = clamped_entropy_backward(dh)              (P, K)
        dp_i   = dpbar_{g_i} / B_{g_i}                     (N, K)  the mean's adjoint, a gather
        dl     = T softmax_backward(dp)                    (N, K)

    Returns
    -------
    dlogits : (N, K)
    """
    xp = B.get_namespace(cache.softmax.p)
    P = cache.counts.shape[0]
    dh = xp.zeros((P,), dtype=cache.softmax.p.dtype, device=B.get_device(cache.softmax.p)) - dloss / cache.present
    dpbar = clamped_entropy_backward(dh, cache.entropy) / xp.clip(cache.counts, min=1.0)[:, None]  # (P, K)
    dp = xp.take(dpbar, cache.groups, axis=0)  # (N, K)
    return cache.inverse_temperature * softmax_backward(dp, cache.softmax)


def quantize_forward(
    x: Array,
    codebook: Array,
    *,
    commitment_weight: float = 1.0,
    codebook_weight: float | None = None,
    learnable_codebook: bool = False,
    use_cosine_sim: bool = False,
    rotation_trick: bool = False,
    straight_through: bool = False,
    soft_assignment: bool = False,
    sample_codebook_temp: float = 1.0,
    noise: Array = None,
    codebook_diversity_loss_weight: float = 0.0,
    codebook_diversity_temperature: float = 100.0,
    diversity_positions: int = 1,
    diversity_groups: Array = None,
    diversity_comm: Any = None,
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
    learnable_codebook : whether the commitment loss sends a gradient to the codebook
    use_cosine_sim : l2-normalise inputs and codes, assign by cosine similarity
    rotation_trick : the rotation trick (arXiv 2410.06424) instead of the STE
    straight_through : the straight-through Gumbel-softmax estimator instead of the STE
    soft_assignment : output the soft codes ``softmax(l / tau) C^`` (true derivative)
    sample_codebook_temp : tau > 0 of the soft paths (the noise's sampling and y)
    noise : optional (N, K) Gumbel noise (:func:`vqref.ops.gumbel.gumbel_noise`): the codes are
        then sampled by Gumbel-max from ``softmax(l / tau)`` instead of taken nearest, and the
        straight-through estimator's y is perturbed by the same noise
    codebook_diversity_loss_weight : w_div >= 0 of the diversity loss on the logits
    codebook_diversity_temperature : its inverse temperature T
    diversity_positions : P, the diversity loss's groups (see
        :func:`vqref.ops.gumbel.diversity_loss_forward`)
    diversity_groups : optional (N,) int in [0, P), each row's position, for rows that are not
        the full ``(B, P)`` grid (a mask or a quantize dropout left some out); the loss is then
        :func:`grouped_diversity_forward`
    diversity_comm : communicator of :func:`grouped_diversity_forward` (data-parallel training;
        with ``diversity_groups``)
    orthogonal_reg_weight : weight of the orthogonal regulariser on the codebook (>= 0)
    orthogonal_code_ids : optional (n,) int, the codes the regulariser sees (default: all)
    indices : optional (N,) int, use these codes instead of the nearest or sampled ones (to hold
        the assignment fixed in gradient checks)
    chunk_size : rows per chunk of the nearest-code search

    Returns
    -------
    out : QuantizeOutput(quantized (N, D), indices (N,), loss (), commitment (), orthogonal (),
        diversity ())
    cache : QuantizeCache

    Notes
    -----
    The soft paths (``straight_through``, ``soft_assignment``, the diversity loss) need all N x K
    logits; the plain nearest-code search never forms them, nor does a sample whose logits no soft
    path needs (:func:`vqref.ops.gumbel.sample_codes`).
    """
    xp = B.get_namespace(x, codebook)
    kind = estimator_kind(rotation_trick=rotation_trick, straight_through=straight_through,
                          soft_assignment=soft_assignment)  # fmt: skip
    if kind == "soft" and noise is not None:
        raise ValueError("the soft estimator does not sample: pass no noise with soft_assignment")
    x_norm = c_norm = None
    xh, ch = x, codebook
    if use_cosine_sim:
        xh, x_norm = l2norm_forward(x)  # (N, D) unit rows
        ch, c_norm = l2norm_forward(codebook)  # (K, D) unit rows
    logits = logits_cache = None
    metric = "dot" if use_cosine_sim else "euclidean"
    if kind in ("gumbel", "soft") or codebook_diversity_loss_weight > 0:  # a soft path needs the logits
        logits, logits_cache = code_logits_forward(xh, ch, metric=metric)  # (N, K)
    if indices is None and noise is not None:  # (N,) a sample; without logits, no (N, K) array but the noise
        tau = sample_codebook_temp
        if logits is None:
            indices = sample_codes(xh, ch, noise, temperature=tau, metric=metric)
        else:
            indices = gumbel_max_sample(logits, noise, temperature=tau)
    if indices is None:  # the search returns the lookup's codes ch[k] too (fetched in the same pass)
        indices, q = nearest_code(xh, ch, metric=metric, chunk_size=chunk_size, return_codes=True)
        lookup_cache = LookupCache(indices, ch.shape[0])
    else:
        q, lookup_cache = lookup_forward(ch, indices)  # (N, D)

    relaxed = None
    if kind in ("gumbel", "soft"):
        relaxed = gumbel_softmax_forward(logits, temperature=sample_codebook_temp, noise=noise)  # y (N, K), cache
    quantized, est_cache = estimator_forward(xh, q, kind=kind, codebook=ch, indices=indices, relaxed=relaxed)

    # mse(x^, q) has one value; the weights below decide where its gradient goes.
    commit, mse_cache = mse_forward(xh, q)  # ()
    if learnable_codebook:
        cb_weight = commitment_weight if codebook_weight is None else codebook_weight
    else:
        cb_weight = 0.0
    weight = commitment_weight + cb_weight if codebook_weight is not None else commitment_weight
    loss = xp.asarray(weight * commit)  # () a 0-d array on every backend (numpy makes a scalar)

    diversity = diversity_cache = None
    if codebook_diversity_loss_weight > 0:
        if diversity_groups is None:
            diversity, diversity_cache = diversity_loss_forward(
                logits, inverse_temperature=codebook_diversity_temperature, positions=diversity_positions
            )  # ()
        else:
            diversity, diversity_cache = grouped_diversity_forward(
                logits,
                diversity_groups,
                diversity_positions,
                inverse_temperature=codebook_diversity_temperature,
                comm=diversity_comm,
            )  # ()
        loss = xp.asarray(loss + codebook_diversity_loss_weight * diversity)

    cache = QuantizeCache(
        x_norm, c_norm, lookup_cache, est_cache, mse_cache, float(commitment_weight), float(cb_weight), None, 0.0,
        logits_cache, diversity_cache, float(codebook_diversity_loss_weight), ch,
    )  # fmt: skip
    orth = None
    if orthogonal_reg_weight > 0:
        orth, cache = add_orthogonal_term(cache, codebook, weight=orthogonal_reg_weight, code_ids=orthogonal_code_ids)
        loss = xp.asarray(loss + orthogonal_reg_weight * orth)
    return QuantizeOutput(quantized, indices, loss, commit, orth, diversity), cache


def _plus(a: Any, b: Any) -> Any:
    """``a + b`` where either may be None (a term that did not contribute)."""
    return b if a is None else a if b is None else a + b


def quantize_backward(
    dquantized: Array, dloss: Array, cache: QuantizeCache, *, codebook: bool = True
) -> tuple[Any, Any]:
    """Gradients for the input and the codebook.

    Parameters
    ----------
    dquantized : (N, D) float, upstream gradient of ``quantized``
    dloss : scalar or 0-d array, upstream gradient of ``loss``
    cache : QuantizeCache from :func:`quantize_forward`
    codebook : False: the caller does not want the codebook's gradient (its codebook is not
        learned: EMA, or frozen); it is not computed and ``dcodebook`` is None.  dx is the same:
        the codebook's terms never reach it.  Saves the (K x N)(N x D) product of the logits'
        backward on the soft paths.

    Returns
    -------
    dx : (N, D)
    dcodebook : (K, D), or ``None`` when no term reaches the codebook (or ``codebook`` is False)
    """
    # 1. The estimator carries the decoder's gradient to x^ (STE: unchanged; rotation: lambda R^T g),
    #    or to the logits and the codebook (Gumbel straight-through, soft).
    est = estimator_backward(dquantized, cache.estimator, codebook=codebook)
    dxh = est.dx if est.dx is not None else B.get_namespace(dquantized).zeros_like(dquantized)  # (N, D)
    dch, dlogits = est.dcodebook, est.dlogits  # (K, D) or None, (N, K) or None
    own = dxh is not dquantized  # dxh is a buffer of this backward: the steps below may write it

    # 2. The losses: d mse(x^, q) = +(2/M)(x^ - q) for x^ and the opposite for q.  The
    #    commitment weight routes it to x^, the codebook weight to q (through the lookup's
    #    adjoint); each weight scales the scalar dloss, and a term of weight 0 is skipped.
    if cache.commitment_weight:  # dxh + commitment_loss_backward(w dloss), one (N, D) pass
        dxh = commitment_loss_backward_added(dxh, cache.commitment_weight * dloss, cache.mse, in_place=own)
        own = True
    if cache.codebook_weight and codebook:  # lookup_backward(codebook_loss_backward(w dloss)), no (N, D) array
        dcodes = codebook_loss_backward_codes(cache.codebook_weight * dloss, cache.mse, cache.lookup.indices,
                                              cache.codebook)  # fmt: skip
        dch = _plus(dch, dcodes)  # (K, D)

    # 3. The diversity loss acts on the logits.
    if cache.diversity is not None:
        grouped = isinstance(cache.diversity, GroupedDiversityCache)
        backward = grouped_diversity_backward if grouped else diversity_loss_backward
        dlogits = _plus(dlogits, backward(cache.diversity_weight * dloss, cache.diversity))  # (N, K)

    # 4. The logits' gradient reaches x^ and C^ through the distances (or dot products).
    if dlogits is not None:
        dxh_logits, dch_logits = code_logits_backward(dlogits, cache.logits, codebook=codebook)  # (N, D), (K, D)
        dxh, own = dxh + dxh_logits, True
        dch = _plus(dch, dch_logits)

    # 5. Undo the l2 normalisations (cosine codebooks).
    if cache.x_norm is not None:
        dx = l2norm_backward(dxh, cache.x_norm, in_place=own)
        dcodebook = None if dch is None or not codebook else l2norm_backward(dch, cache.c_norm)
    else:
        dx, dcodebook = dxh, dch

    # 6. The orthogonal regulariser acts on the raw codebook.
    if not codebook:
        return dx, None
    if cache.orthogonal is not None:
        dorth = orthogonal_loss_backward(cache.orthogonal_weight * dloss, cache.orthogonal)  # (K, D)
        dcodebook = _plus(dcodebook, dorth)
    return dx, dcodebook
