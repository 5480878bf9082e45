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

Quantize dropout (docs/math.md §11.3) runs a depth on the rows that reach it only: the
depth gathers those rows of its residual, quantizes them, and scatters its codes back (0 for the
other rows, whose residual then stays); its backward is the adjoint, so a row's gradient comes
from the depths it used.  Its commitment term sums over its rows and divides by all N rows.

The Gumbel straight-through and soft estimators (docs/math.md §9) act per depth only: their
gradient goes to the depth's logits, which the total has no counterpart of, so routing ``"sum"``
refuses them.  With the soft estimator ``o_l`` is the soft code ``y_l C_l``, and
``r_{l+1} = r_l - sg[o_l]`` subtracts it, so ``quantized + r_Q = x`` holds in every mode.
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
    estimator_kind,
    quantize_backward,
    quantize_forward,
)
from .rows import put_indices, put_rows, sampling_noise, take_rows
from .stack_driver import orthogonal_code_subsets, usage_stats  # noqa: F401  (their home before)

__all__ = [
    "ResidualOutput",
    "ResidualCache",
    "residual_forward",
    "residual_backward",
    "depth_batches",
    "residual_add_orthogonal",
    "orthogonal_code_subsets",
    "codebook_gradients",
    "usage_stats",
    "GRADIENT_ROUTINGS",
    "StackOutput",
    "residual_stack_forward",
    "residual_stack_backward",
]

GRADIENT_ROUTINGS = ("per_depth", "sum")


class ResidualOutput(NamedTuple):
    quantized: Any  # (N, D) value sum_l c_l
    indices: Array  # (N, Q) int64; -1 where a depth did not run for a row (quantize dropout)
    losses: Any  # (Q,) per-depth losses (0 for a depth no row reached)
    residuals: tuple  # Q + 1 arrays (N, D): r_0 = x, ..., r_Q = x - sum_l c_l
    codes: tuple  # Q arrays (N, D): the chosen (normalised) code at each depth (0 where it did not run)
    commitments: tuple = ()  # Q 0-d arrays: each depth's mse(r^_l, c_l), unweighted
    orthogonals: tuple | None = None  # Q 0-d arrays: each depth's orthogonal regulariser (unweighted)
    diversities: tuple | None = None  # Q 0-d arrays: each depth's codebook diversity loss (unweighted)


class ResidualCache(NamedTuple):
    depths: tuple  # Q QuantizeCache, None for a depth that no row reached
    routing: str
    sum_estimator: EstimatorCache | None  # the estimator on the total, with routing "sum"
    shared: bool
    rows: tuple = ()  # per depth: None (every row) or the LookupCache of the rows that reached it


def residual_forward(
    x: Array,
    codebooks: Sequence[Array],
    *,
    routing: str = "per_depth",
    indices: Array = None,
    code_ids: Sequence[Array] | None = None,
    rngs: Sequence[Any] | None = None,
    noise: Sequence[Any] | None = None,
    depth_rows: Sequence[Any] | None = None,
    diversity_groups: Array = None,
    total_rows: int | None = None,
    skip: Sequence[bool] | None = None,
    last_residual: bool = True,
    **quantize_options: Any,
) -> tuple[ResidualOutput, ResidualCache]:
    """Quantize ``x`` residually, one codebook per depth.

    Parameters
    ----------
    x : (N, D) float
    codebooks : Q arrays (K_l, D); pass the same array Q times for a shared codebook
    routing : ``"per_depth"`` (vector-quantize-pytorch) or ``"sum"`` (one estimator on the total)
    indices : optional (N, Q) int, codes to use instead of the nearest ones (gradient checks,
        beam search); entries of rows a depth does not reach are ignored
    code_ids : optional per-depth code subsets for the orthogonal regulariser
    rngs : optional numpy Generators (one per codebook, or one for a shared codebook): each depth
        then samples its codes from ``softmax(l / tau)`` by Gumbel-max, with noise drawn on the
        host from its codebook's generator, depth after depth (nothing is drawn when
        ``sample_codebook_temp`` is 0: the codes are then the nearest ones)
    noise : optional, instead of ``rngs``: Q arrays (N, K_l) of Gumbel noise drawn by the caller
        (:func:`vqref.core.rows.sampling_noise`), or None entries for depths that do not sample
    depth_rows : optional, quantize dropout: per depth None (every row) or a (n_l,) int array of
        the rows that reach depth l, ascending, each depth's a subset of the one before (an
        empty array: no row reaches it; the depth is skipped unless ``skip`` says otherwise).  A row stops at its last depth: its later indices are
        -1, its later codes 0, and its residual stays.  A depth's commitment (and codebook) term
        is ``(1 / (N D)) sum_{rows that reach it} ||r^_l - c_l||^2``, the per-row loss summed
        over the depths each row uses and averaged over all N rows (DAC's quantizer dropout);
        with every row present it is the mean.  A depth no row reaches has loss 0 and no cache.
    diversity_groups : optional (N,) int, each row's position for the diversity loss (see
        :func:`vqref.core.quantize.quantize_forward`); taken per depth for the rows it reaches
    total_rows : the rows the commitment terms average over (default N).  In data-parallel
        training x is one rank's part of a batch of ``total_rows`` rows, and each depth's term is
        this rank's share ``(1 / (total_rows D)) sum_{its rows} ||r^_l - c_l||^2``
    skip : optional, per depth whether it is skipped (no computation, no cache: its loss 0, its
        indices -1).  Default: the depths whose ``depth_rows`` entry is empty.  A data-parallel
        step runs a depth that another rank's rows reach on this rank's none
    last_residual : False leaves the last residual ``r_Q`` out: ``residuals[Q]`` is then None, and
        a caller that needs it forms ``residuals[Q - 1] - codes[Q - 1]`` (a diagnostic that
        nothing here reads: the modules compute it when it is asked for, saving an (N, D) array)
    **quantize_options : passed to every depth's :func:`vqref.core.quantize.quantize_forward`
        (commitment_weight, learnable_codebook, use_cosine_sim, rotation_trick, straight_through,
        sample_codebook_temp, ...)

    Returns
    -------
    out : ResidualOutput(quantized (N, D), indices (N, Q), losses (Q,), residuals, codes)
    cache : ResidualCache
    """
    if routing not in GRADIENT_ROUTINGS:
        raise ValueError(f"routing must be one of {GRADIENT_ROUTINGS}, got {routing!r}")
    xp = B.get_namespace(x, *codebooks)
    Q = len(codebooks)
    N = x.shape[0]
    shared = all(c is codebooks[0] for c in codebooks)
    kind = estimator_kind(
        rotation_trick=quantize_options.get("rotation_trick", False),
        straight_through=quantize_options.get("straight_through", False),
        soft_assignment=quantize_options.get("soft_assignment", False),
    )
    depth_options = dict(quantize_options)
    if routing == "sum":
        if kind not in ("ste", "rotation"):
            raise ValueError(
                f"routing 'sum' puts one STE or rotation trick on the total; the {kind!r} estimator acts per depth"
            )
        depth_options["rotation_trick"] = False  # the estimator sits on the sum instead
    if noise is None and rngs is not None and quantize_options.get("sample_codebook_temp", 1.0) > 0:
        noise = sampling_noise(rngs, N, [c.shape[0] for c in codebooks], like=x)
    depth_rows = [None] * Q if depth_rows is None else list(depth_rows)
    if skip is None:
        skip = [r is not None and r.shape[0] == 0 for r in depth_rows]

    residual = x
    residuals, codes, idx_list, losses, caches, commitments, diversities = [x], [], [], [], [], [], []
    row_caches = []
    total, owned = None, False
    for level in range(Q):
        rows = depth_rows[level]
        if skip[level]:  # no row reaches this depth
            zeros = xp.zeros_like(x)
            codes.append(zeros)
            idx_list.append(xp.full((N,), -1, dtype=xp.int64, device=B.get_device(x)))
            losses.append(xp.zeros((), dtype=x.dtype, device=B.get_device(x)))
            commitments.append(losses[-1])
            diversities.append(None)
            caches.append(None)
            row_caches.append(None)
            residuals.append(residual)
            continue
        r, row_cache = take_rows(residual, rows)  # (n_l, D) the rows that reach this depth
        opts = dict(depth_options)
        averaged = N if total_rows is None else total_rows  # the rows the commitment terms average over
        if rows is not None or averaged != N:  # DAC's normalisation: the sum over these rows, over all rows
            scale = r.shape[0] / max(averaged, 1)
            opts["commitment_weight"] = quantize_options.get("commitment_weight", 1.0) * scale
            if quantize_options.get("codebook_weight") is not None:
                opts["codebook_weight"] = quantize_options["codebook_weight"] * scale
        fixed = None if indices is None else take_rows(indices[:, level], rows)[0]
        groups = None if diversity_groups is None else take_rows(diversity_groups, rows)[0]
        depth_noise = None if noise is None or noise[level] is None else take_rows(noise[level], rows)[0]
        ids = None if code_ids is None else code_ids[level]
        out, cache = quantize_forward(
            r, codebooks[level], indices=fixed, orthogonal_code_ids=ids, noise=depth_noise,
            diversity_groups=groups, **opts,
        )  # fmt: skip
        code = put_rows(out.quantized, row_cache)  # (N, D), 0 for the rows that stopped
        codes.append(code)
        idx_list.append(put_indices(out.indices, rows, N, xp))
        losses.append(out.loss)
        commitments.append(out.commitment)
        diversities.append(out.diversity)
        caches.append(cache)
        row_caches.append(row_cache)
        total, owned = _accumulate(total, code, owned)  # (N, D) sum_l o_l so far
        if level < Q - 1 or last_residual:
            residual = B.difference(residual, code)  # r_{l+1} = r_l - sg[o_l]  (N, D)
        else:  # r_Q left to the caller
            residual = None
        residuals.append(residual)

    if total is None:  # no depth ran (every depth_rows entry empty)
        total = xp.zeros_like(x)
    sum_estimator = None
    if routing == "sum":
        quantized, sum_estimator = estimator_forward(x, total, kind=kind)
    else:
        quantized = total
    present = [d for d in diversities if d is not None]
    out = ResidualOutput(
        quantized,
        xp.stack(idx_list, axis=1),
        xp.stack([xp.asarray(v) for v in losses]),
        tuple(residuals),
        tuple(codes),
        tuple(commitments),
        diversities=None if not present else tuple(xp.zeros_like(present[0]) if d is None else d for d in diversities),
    )
    return out, ResidualCache(tuple(caches), routing, sum_estimator, shared, tuple(row_caches))


def depth_batches(cache: ResidualCache) -> list:
    """What each depth quantized, for its state update: per depth ``(x_l, k_l)`` or None.

    ``x_l`` (n_l, D) are the rows that reached depth l as its codebook saw them (the residual,
    l2-normalised for cosine codebooks), ``k_l`` (n_l,) their codes; None for a depth no row
    reached (a quantize dropout).  Both are read from the depth's cache: the first argument of
    its ``mse(r^_l, c_l)`` and the indices of its lookup.
    """
    return [None if d is None else (d.mse.a, d.lookup.indices) for d in cache.depths]


def residual_backward(
    dquantized: Array, dlosses: Array, cache: ResidualCache, *, codebooks: bool = True
) -> tuple[Any, list]:
    """Gradients for the input and every depth's codebook.

    Parameters
    ----------
    dquantized : (N, D) upstream gradient of ``quantized``
    dlosses : (Q,) upstream gradients of the per-depth losses (or a scalar for all)
    cache : ResidualCache
    codebooks : False: the codebooks' gradients are not wanted (a codebook that is not learned);
        each depth skips them (see :func:`vqref.core.quantize.quantize_backward`) and gives None

    Returns
    -------
    dx : (N, D)
    dcodebooks : list of Q arrays (K, D) or None (one per depth; for a shared codebook add them
        up); None for a depth no row reached
    """
    xp = B.get_namespace(dquantized)
    Q = len(cache.depths)
    if B.is_array(dlosses) and dlosses.ndim == 1:
        dl = [dlosses[level] for level in range(Q)]
    else:
        dl = [dlosses] * Q
    rows = cache.rows or (None,) * Q
    if cache.routing == "per_depth":
        # Every depth's estimator passes the decoder gradient to its residual, and every
        # residual has identity Jacobian with respect to x: the contributions add up.
        dx = None
        upstream = [dquantized] * Q
    else:
        # routing "sum": the estimator on the total carries the decoder gradient once; the
        # depths contribute their loss gradients only.
        dx = estimator_backward(dquantized, cache.sum_estimator).dx
        upstream = [xp.zeros_like(dquantized)] * Q
    owned = False  # whether dx is a buffer of this function (then the sum is taken in place)
    dcodebooks = []
    for level, depth in enumerate(cache.depths):
        if depth is None:  # no row reached this depth: nothing to differentiate
            dcodebooks.append(None)
            continue
        dq = upstream[level] if rows[level] is None else xp.take(upstream[level], rows[level].indices, axis=0)
        dr, dcb = quantize_backward(dq, dl[level], depth, codebook=codebooks)  # (n_l, D), (K, D) or None
        dx, owned = _accumulate(dx, put_rows(dr, rows[level]), owned)  # (N, D)
        dcodebooks.append(dcb)
    if dx is None:  # no depth ran
        dx = xp.zeros_like(dquantized)
    elif dx is dquantized:  # a straight-through gradient alone: never hand back the caller's array
        dx = xp.asarray(dx, copy=True)
    return dx, dcodebooks


def _accumulate(total: Any, term: Array, owned: bool) -> tuple[Array, bool]:
    """``total + term`` (``term`` when total is None), and whether the result is a buffer that
    the caller's loop allocated: the first sum allocates one, and every later term is added into
    it in place (the same numbers as ``total + term``; the arrays summed are never written)."""
    if total is None:
        return term, False
    if owned:
        return B.add_into(total, term), True  # (N, D) total += term, in the buffer the previous sum allocated
    return total + term, True


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
    update, or the assignment's codebook for a shared one), ``code_ids[l]`` its code subset.  A
    depth that did not run (a quantize dropout), or whose subset is empty (the active codes of a
    batch without rows), has no term: its ``orth_l`` is reported as 0.

    Returns
    -------
    out : with ``losses[l] + weight * orth_l``
    cache : with every depth's regulariser cache (its gradient joins that depth's codebook gradient)
    """
    xp = B.get_namespace(out.losses)
    depths, orths = [], []
    for level, depth in enumerate(cache.depths):
        ids = None if code_ids is None else code_ids[level]
        if depth is None or (ids is not None and ids.shape[0] == 0):
            depths.append(depth)
            orths.append(xp.zeros((), dtype=out.losses.dtype, device=B.get_device(out.losses)))
            continue
        orth, depth = add_orthogonal_term(depth, codebooks[level], weight=weight, code_ids=ids)
        depths.append(depth)
        orths.append(orth)
    out = out._replace(losses=out.losses + weight * xp.stack(orths), orthogonals=tuple(orths))  # (Q,)
    return out, cache._replace(depths=tuple(depths))


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


# ---------------------------------------------------------------- the recursion for any quantizer


class StackOutput(NamedTuple):
    quantized: Array  # (N, D) sum_l q_l
    depths: tuple  # Q outputs of the depth functions
    residuals: tuple  # Q + 1 arrays (N, D): r_0 = x, ..., r_Q = x - quantized


def residual_stack_forward(x: Array, depths: Sequence[Any]) -> tuple[StackOutput, tuple]:
    """The residual recursion with any quantizer at each depth (residual LFQ, residual FSQ).

    ``depths[l]`` is a function ``r_l -> (out_l, cache_l)`` whose ``out_l.quantized`` (N, D) is the
    value of depth l's codes; then ``r_{l+1} = r_l - out_l.quantized`` (the code itself: the
    residual sees it as a constant) and the output is ``sum_l out_l.quantized``.

    Parameters
    ----------
    x : (N, D) float
    depths : Q callables

    Returns
    -------
    out : StackOutput(quantized (N, D), the Q depth outputs, the Q + 1 residuals)
    caches : the Q depth caches, for :func:`residual_stack_backward`
    """
    residual, total = x, None
    residuals, outs, caches = [x], [], []
    for depth in depths:
        out, cache = depth(residual)
        outs.append(out)
        caches.append(cache)
        total = out.quantized if total is None else total + out.quantized  # (N, D)
        residual = residual - out.quantized  # r_{l+1} = r_l - sg[q_l]  (N, D)
        residuals.append(residual)
    return StackOutput(total, tuple(outs), tuple(residuals)), tuple(caches)


def residual_stack_backward(
    dquantized: Array, dlosses: Sequence[Any], caches: Sequence[Any], depth_backward: Any
) -> tuple[Array, list]:
    """``dx`` of :func:`residual_stack_forward` with every depth routing its own gradient.

    Every residual has identity Jacobian with respect to x (``r_{l+1} = r_l - sg[q_l]``), and
    every depth's estimator passes the output's gradient to its residual; so
    ``dx = sum_l dr_l`` with ``(dr_l, extra_l) = depth_backward(dquantized, dlosses[l], caches[l])``
    (with the straight-through estimator the decoder's gradient reaches x once per depth, as in
    vector-quantize-pytorch).

    Returns
    -------
    dx : (N, D)
    extras : the Q second results of ``depth_backward`` (e.g. each depth's parameter gradients)
    """
    dx, extras = None, []
    for dl, cache in zip(dlosses, caches):
        dr, extra = depth_backward(dquantized, dl, cache)
        dx = dr if dx is None else dx + dr  # (N, D)
        extras.append(extra)
    return dx, extras
