"""Lookup-free quantization (LFQ, arXiv 2310.05737) and its spherical variant (BSQ, arXiv 2406.07548)
as one forward/backward pair, and the residual stack of LFQs.

Symbols: N tokens, D = dim, C codebooks, d bits per codebook (K = 2^d codes each), s =
codebook_scale, n the tokens that enter the entropy penalty (all, a mask's, or a random subset).

The forward composes the ops of :mod:`vqref.ops.lfq` and :mod:`vqref.ops.entropy`; each
bracketed step is optional:

    1. [h = x W_in + b_in]              (N, C d)   project_in (or the cosine-similarity map)
    2. [h = v tanh(h / v)]              (N, C d)   soft clamp
    3. z = h as (N C, d)                           each codebook's d entries are one row
    4. [z = z R]                        (N C, d)   orthogonal rotation
    5. [u = s z / ||z||]                (N C, d)   spherical (BSQ): onto the sphere of radius s
    6. q = s sign(u), k = bits(u)       (N C, d)   eq. (1)-(2) of ops.lfq; k is (N, C)
    7. [q = s q / ||q||]                           spherical codes: entries +-s / sqrt(d)
    8. o = u + sg[q - u]                           straight through: the value is q
    9. L_ent = penalty(2 u_rows . c)    ()         ops.entropy on the n tokens' rows, tau (numpy:
                                                   ops.entropy_fast, block by block, O(block K) memory)
       [L_ent = softplus(L_ent + offset)]
   10. L_commit = mse(u_rows, sg[q_rows])  ()      only with commitment_loss_weight > 0
   11. aux = w_ent L_ent + w_commit L_commit
   12. [o = o R^T], [y = o W_out + b_out]          back to (N, D)

The backward runs the chain rule through 12, 11, 10, 9, 8, 5, 4, 2, 1 in reverse; the gradient
that reaches u is the sum of three contributions, added where the reader can see them: the
decoder's (through the straight-through step 8, a surrogate), the entropy penalty's and the
commitment's (both true derivatives).  Pure functions: nothing is mutated and nothing is drawn
at random (the caller picks the rows of the penalty).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

from .. import backend as B
from ..backend import Array
from ..ops.entropy import (
    ENTROPY_EPS,
    entropy_penalty_backward,
    entropy_penalty_forward,
    softplus_backward,
    softplus_forward,
)
from ..ops.entropy_fast import BlockedEntropyCache, lfq_entropy_backward_blocked, lfq_entropy_forward_blocked
from ..ops.l2norm import l2norm, l2norm_backward, l2norm_forward
from ..ops.lfq import (
    NORMALIZE_EPS,
    SignSTECache,
    bits_to_indices,
    code_scores_backward,
    code_scores_forward,
    cosine_linear_backward,
    cosine_linear_forward,
    indices_to_bits,
    sign_codebook,
    sign_ste_backward,
    sign_ste_forward,
    soft_clamp_backward,
    soft_clamp_forward,
)
from ..ops.linear import linear_backward, linear_forward
from ..ops.linear_fast import affine_backward_blocked, affine_forward_blocked
from ..ops.lookup import lookup_backward, lookup_forward
from ..ops.losses import commitment_loss_backward, commitment_loss_forward
from .residual import residual_stack_backward, residual_stack_forward

__all__ = [
    "LFQOptions",
    "LFQParams",
    "LFQOutput",
    "LFQCache",
    "lfq_forward",
    "lfq_backward",
    "lfq_codes",
    "ResidualLFQOutput",
    "residual_lfq_forward",
    "residual_lfq_backward",
]


class LFQOptions(NamedTuple):
    num_codebooks: int  # C
    codebook_dim: int  # d
    codebook_scale: float = 1.0  # s
    spherical: bool = False  # step 5 and 7
    soft_clamp: float | None = None  # step 2: the bound v, or None
    entropy_loss_weight: float = 0.1
    commitment_loss_weight: float = 0.0
    diversity_gamma: float = 1.0
    inv_temperature: float = 100.0
    softplus_offset: float | None = None  # step 9: softplus(L_ent + offset), or None
    cosine_scale: float | None = None  # step 1 is the cosine-similarity map with this scale
    fast: bool = True  # numpy: steps 1, 9 and 12 blocked (ops.linear_fast, ops.entropy_fast); False: the definition

    @property
    def code_value(self) -> float:
        """The size of every entry of a code: s, or s / sqrt(d) on the sphere."""
        return self.codebook_scale / math.sqrt(self.codebook_dim) if self.spherical else self.codebook_scale


class LFQParams(NamedTuple):
    project_in_W: Any = None  # (D, C d), or None without projections
    project_in_b: Any = None  # (C d,), or None without bias
    project_out_W: Any = None  # (C d, D)
    project_out_b: Any = None  # (D,)
    rotation: Any = None  # (d, d) orthogonal, or None


class LFQOutput(NamedTuple):
    quantized: Array  # (N, D) the value of the codes, projected out
    indices: Array  # (N, C) int64 in [0, 2^d)
    aux_loss: Array  # () w_ent L_ent + w_commit L_commit
    per_sample_entropy: Array  # () H_sample (0 when no token enters the penalty)
    batch_entropy: Array  # () H_batch
    commitment: Array  # () mse(u, sg[q]) over the loss rows (0 with commitment_loss_weight 0)


class LFQCache(NamedTuple):
    options: LFQOptions
    shape: tuple  # (N, C, d)
    project_in: Any  # LinearCache / CosineLinearCache / None
    has_in_bias: bool
    soft_clamp: Any  # SoftClampCache or None
    rotation: Any  # (d, d) or None
    sphere: Any  # L2NormCache of step 5, or None
    entropy: Any  # (rows LookupCache or None, step 9's cache, SoftplusCache or None) or None
    commitment: Any  # (rows LookupCache or None, MSECache) or None
    project_out: Any  # LinearCache or None
    has_out_bias: bool


def _take_rows(a: Array, rows: Any) -> tuple[Array, Any]:
    """Rows ``a[rows]`` (a gather, :mod:`vqref.ops.lookup`), or ``a`` itself for ``rows=None``."""
    return (a, None) if rows is None else lookup_forward(a, rows)


def _put_rows(da: Array, cache: Any) -> Array:
    """The adjoint of :func:`_take_rows`: each selected row's gradient back in its place."""
    return da if cache is None else lookup_backward(da, cache)


def _entropy_forward(z: Array, o: LFQOptions) -> tuple[Any, tuple]:
    """Step 9 by its definition: the scores ``2 z C^T`` of the n C rows z (n C, d) against all
    K codes, then the penalty of :mod:`vqref.ops.entropy` on them (O(n C K) memory)."""
    xp = B.get_namespace(z)
    C, K = o.num_codebooks, 2**o.codebook_dim
    scores, scores_cache = code_scores_forward(z, value=o.code_value, fast=o.fast)  # (n C, K)
    penalty, pen_cache = entropy_penalty_forward(
        xp.reshape(scores, (-1, C, K)), inv_temperature=o.inv_temperature, diversity_gamma=o.diversity_gamma
    )  # (n, C, K) scores -> three 0-d values
    return penalty, (scores_cache, pen_cache)


def _entropy_backward(dent: Any, cache: tuple) -> Array:
    """``dz`` (n C, d) of :func:`_entropy_forward` for the upstream gradient ``dent``."""
    scores_cache, pen_cache = cache
    dscores = entropy_penalty_backward(dent, pen_cache)  # (n, C, K)
    n, C, K = dscores.shape
    return code_scores_backward(B.get_namespace(dscores).reshape(dscores, (n * C, K)), scores_cache)  # (n C, d)


def _entropy_blocked_forward(z: Array, o: LFQOptions) -> tuple[Any, BlockedEntropyCache]:
    """Step 9 on numpy, block by block (:mod:`vqref.ops.entropy_fast`): the same numbers to float
    rounding, with O(block K) memory instead of O(n C K)."""
    codebook = sign_codebook(o.codebook_dim, o.code_value, like=z)  # (K, d)
    return lfq_entropy_forward_blocked(z, codebook, num_codebooks=o.num_codebooks, inv_temperature=o.inv_temperature,
                                       diversity_gamma=o.diversity_gamma, eps=ENTROPY_EPS)  # fmt: skip


def _entropy_blocked_backward(dent: Any, cache: BlockedEntropyCache) -> Array:
    return lfq_entropy_backward_blocked(float(dent), cache)  # (n C, d)


def lfq_forward(
    x: Array,
    params: LFQParams,
    options: LFQOptions,
    *,
    entropy_rows: Any = None,
    loss_rows: Any = None,
) -> tuple[LFQOutput, LFQCache]:
    """Quantize ``x`` with C lookup-free codebooks; the steps of the module docstring.

    Parameters
    ----------
    x : (N, D) float
    params : LFQParams, arrays in x's dtype
    options : LFQOptions
    entropy_rows : (n,) int64 token indices in [0, N) whose rows enter the entropy penalty
        (a mask's tokens, or a random subset); None: all N
    loss_rows : (m,) int64 token indices of the commitment loss (a mask's tokens); None: all N

    Returns
    -------
    out : LFQOutput
    cache : LFQCache, what :func:`lfq_backward` needs
    """
    xp = B.get_namespace(x)
    o = options
    N, C, d, s = x.shape[0], o.num_codebooks, o.codebook_dim, o.codebook_scale
    zero = xp.zeros((), dtype=x.dtype, device=B.get_device(x))
    affine = affine_forward_blocked if o.fast and B.is_numpy(xp) else linear_forward  # the one-line choice
    # 1. project in
    h, in_cache = x, None
    if params.project_in_W is not None:
        if o.cosine_scale is not None:
            h, in_cache = cosine_linear_forward(x, params.project_in_W, scale=o.cosine_scale)  # (N, C d)
        else:
            h, in_cache = affine(x, params.project_in_W, params.project_in_b)  # (N, C d)
    # 2. soft clamp
    clamp_cache = None
    if o.soft_clamp is not None:
        h, clamp_cache = soft_clamp_forward(h, value=o.soft_clamp)  # (N, C d)
    # 3.-5. each codebook's entries as a row, rotated, on the sphere
    z = xp.reshape(h, (N * C, d))  # (N C, d)
    if params.rotation is not None:
        z = z @ params.rotation  # (N C, d)
    u, sphere_cache = z, None
    if o.spherical:
        unit, sphere_cache = l2norm_forward(z, eps=NORMALIZE_EPS)  # (N C, d)
        u = unit * s  # (N C, d)
    # 6.-8. the nearest corner, its index, the straight-through output
    q, _ = sign_ste_forward(u, scale=s)  # (N C, d) +-s
    indices = xp.reshape(bits_to_indices(u), (N, C))  # (N, C)
    if o.spherical:
        q = l2norm(q, eps=NORMALIZE_EPS) * s  # (N C, d) +-s / sqrt(d); a constant
    out_rows = q  # the value of u + sg[q - u]
    # 9. the entropy penalty on the chosen tokens' rows
    per_sample = batch = entropy_loss = zero
    ent_cache = None
    u_tokens = xp.reshape(u, (N, C * d))  # (N, C d) one row per token
    if entropy_rows is None or entropy_rows.shape[0] > 0:
        ue, rows_cache = _take_rows(u_tokens, entropy_rows)  # (n, C d)
        n = ue.shape[0]
        blocked = o.fast and B.is_numpy(xp)  # the one-line choice: ops.entropy_fast, O(block K) memory
        penalty, pen_cache = (_entropy_blocked_forward if blocked else _entropy_forward)(
            xp.reshape(ue, (n * C, d)), o
        )  # (n C, d) rows -> three 0-d values
        per_sample, batch, entropy_loss = penalty.per_sample, penalty.batch, penalty.loss
        sp_cache = None
        if o.softplus_offset is not None:
            entropy_loss, sp_cache = softplus_forward(xp.asarray(entropy_loss + o.softplus_offset))  # ()
        ent_cache = (rows_cache, pen_cache, sp_cache)
    # 10. the commitment loss on the loss rows
    commitment, commit_cache = zero, None
    if o.commitment_loss_weight > 0 and (loss_rows is None or loss_rows.shape[0] > 0):
        uc, rows_cache = _take_rows(u_tokens, loss_rows)  # (m, C d)
        qc, _ = _take_rows(xp.reshape(q, (N, C * d)), loss_rows)  # (m, C d)
        commitment, mse_cache = commitment_loss_forward(uc, qc)  # ()
        commit_cache = (rows_cache, mse_cache)
    # 11. the auxiliary loss
    aux = xp.asarray(entropy_loss * o.entropy_loss_weight + commitment * o.commitment_loss_weight)  # ()
    # 12. back to the input space
    if params.rotation is not None:
        out_rows = out_rows @ params.rotation.mT  # (N C, d)
    y = xp.reshape(out_rows, (N, C * d))  # (N, C d)
    out_cache = None
    if params.project_out_W is not None:
        y, out_cache = affine(y, params.project_out_W, params.project_out_b)  # (N, D)
    cache = LFQCache(
        o, (N, C, d), in_cache, params.project_in_b is not None, clamp_cache, params.rotation, sphere_cache,
        ent_cache, commit_cache, out_cache, params.project_out_b is not None,
    )  # fmt: skip
    return LFQOutput(y, indices, aux, per_sample, batch, commitment), cache


def lfq_backward(dquantized: Array, daux: Any, cache: LFQCache) -> tuple[Array, dict]:
    """Gradients of ``<dquantized, quantized> + daux * aux`` for the input and the parameters.

    Parameters
    ----------
    dquantized : (N, D) upstream gradient of the output
    daux : a number or 0-d array, the upstream gradient of the auxiliary loss
    cache : LFQCache

    Returns
    -------
    dx : (N, D)
    grads : ``{"project_in_W", "project_in_b", "project_out_W", "project_out_b"}``, the entries of
        the parameters the forward used (none without projections)
    """
    xp = B.get_namespace(dquantized)
    o = cache.options
    N, C, d = cache.shape
    grads = {}
    affine_backward = affine_backward_blocked if o.fast and B.is_numpy(xp) else linear_backward  # the one-line choice
    # 12. project out, rotate back
    dy = dquantized  # (N, D)
    if cache.project_out is not None:
        dy, grads["project_out_W"], db = affine_backward(dy, cache.project_out)  # (N, C d)
        if cache.has_out_bias:
            grads["project_out_b"] = db
    drows = xp.reshape(dy, (N * C, d))  # (N C, d)
    if cache.rotation is not None:
        drows = drows @ cache.rotation  # (N C, d)  o R^T -> d o = d(o R^T) R
    # 8. the decoder's share: straight through to u (a surrogate)
    du = sign_ste_backward(drows, SignSTECache())  # (N C, d)
    du_tokens = xp.zeros((N, C * d), dtype=dquantized.dtype, device=B.get_device(dquantized))
    # 9. the entropy penalty's share (a true derivative)
    if cache.entropy is not None:
        rows_cache, pen_cache, sp_cache = cache.entropy
        dent = daux * o.entropy_loss_weight
        if sp_cache is not None:
            dent = softplus_backward(dent, sp_cache)  # softplus'(L_ent + offset)
        blocked = isinstance(pen_cache, BlockedEntropyCache)  # the forward's choice
        due = (_entropy_blocked_backward if blocked else _entropy_backward)(dent, pen_cache)  # (n C, d)
        n = due.shape[0] // C
        du_tokens = du_tokens + _put_rows(xp.reshape(due, (n, C * d)), rows_cache)  # (N, C d)
    # 10. the commitment's share (a true derivative)
    if cache.commitment is not None:
        rows_cache, mse_cache = cache.commitment
        duc = commitment_loss_backward(daux * o.commitment_loss_weight, mse_cache)  # (m, C d)
        du_tokens = du_tokens + _put_rows(duc, rows_cache)  # (N, C d)
    du = du + xp.reshape(du_tokens, (N * C, d))  # (N C, d) the three shares together
    # 5. through the sphere
    dz = du
    if cache.sphere is not None:
        dz = l2norm_backward(du * o.codebook_scale, cache.sphere)  # (N C, d)
    # 4. through the rotation
    if cache.rotation is not None:
        dz = dz @ cache.rotation.mT  # (N C, d)  z R -> dz = d(z R) R^T
    dh = xp.reshape(dz, (N, C * d))  # (N, C d)
    # 2. through the soft clamp
    if cache.soft_clamp is not None:
        dh = soft_clamp_backward(dh, cache.soft_clamp)
    # 1. through the projection in
    dx = dh
    if cache.project_in is not None:
        if o.cosine_scale is not None:
            dx, grads["project_in_W"] = cosine_linear_backward(dh, cache.project_in)
        else:
            dx, grads["project_in_W"], db = affine_backward(dh, cache.project_in)
            if cache.has_in_bias:
                grads["project_in_b"] = db
    return dx, grads


def lfq_codes(indices: Array, params: LFQParams, options: LFQOptions, *, dtype: Any, project_out: bool = True) -> Array:
    """The output a token with these indices gets: steps 6, 7 and 12 from the indices.

    Parameters
    ----------
    indices : (M, C) integer in [0, 2^d)
    params : LFQParams (the rotation and the projection out are used)
    options : LFQOptions
    dtype : the float dtype of the codes
    project_out : apply the projection out (False: the codes in the quantizer's space)

    Returns
    -------
    codes : (M, D) with ``project_out`` (and projections), else (M, C d)
    """
    xp = B.get_namespace(indices)
    M, C = indices.shape
    d, s = options.codebook_dim, options.codebook_scale
    q = (2 * xp.astype(indices_to_bits(xp.reshape(indices, (M * C,)), d), dtype) - 1) * s  # (M C, d) +-s
    if options.spherical:
        q = l2norm(q, eps=NORMALIZE_EPS) * s  # (M C, d)
    if params.rotation is not None:
        q = q @ xp.astype(params.rotation, dtype).mT  # (M C, d)
    y = xp.reshape(q, (M, C * d))  # (M, C d)
    if project_out and params.project_out_W is not None:
        b = params.project_out_b
        y = linear_forward(y, xp.astype(params.project_out_W, dtype), None if b is None else xp.astype(b, dtype))[0]
    return y


# ---------------------------------------------------------------- the residual stack


class ResidualLFQOutput(NamedTuple):
    quantized: Array  # (N, D) projected sum of the depths' codes
    indices: Array  # (N, Q) int64
    losses: Array  # (Q,) every depth's aux loss
    depths: tuple  # Q LFQOutput, each in the quantizers' space (N, d)
    residuals: tuple  # Q + 1 arrays (N, d)


class ResidualLFQCache(NamedTuple):
    project_in: Any  # LinearCache or None
    depths: tuple  # Q LFQCache
    project_out: Any  # LinearCache or None


def residual_lfq_forward(
    x: Array,
    params: LFQParams,
    depth_params: Sequence[LFQParams],
    depth_options: Sequence[LFQOptions],
    *,
    entropy_rows: Sequence[Any] | None = None,
    loss_rows: Any = None,
) -> tuple[ResidualLFQOutput, ResidualLFQCache]:
    """Residual LFQ: project in, Q LFQs on the residuals (:func:`residual_stack_forward`), project out.

    Depth l quantizes ``r_l`` with its own options (vector-quantize-pytorch halves the scale at
    every depth, ``s_l = 2^-l``) and ``r_{l+1} = r_l - q_l``.

    Parameters
    ----------
    x : (N, D) float
    params : LFQParams with the stack's projections (or none), no rotation
    depth_params : Q LFQParams, each with at most a rotation
    depth_options : Q LFQOptions (one codebook each)
    entropy_rows : Q arrays of token indices (or None each), or None for all tokens at every depth
    loss_rows : token indices of the commitment losses, or None

    Returns
    -------
    out : ResidualLFQOutput; cache : ResidualLFQCache
    """
    xp = B.get_namespace(x)
    Q = len(depth_options)
    rows = [None] * Q if entropy_rows is None else list(entropy_rows)
    fast = all(o.fast for o in depth_options) and B.is_numpy(xp)
    affine = affine_forward_blocked if fast else linear_forward  # the one-line choice, as the depths'
    h, in_cache = x, None
    if params.project_in_W is not None:
        h, in_cache = affine(x, params.project_in_W, params.project_in_b)  # (N, d)
    depth_fns = [
        (lambda r, lp=lp, lo=lo, er=er: lfq_forward(r, lp, lo, entropy_rows=er, loss_rows=loss_rows))
        for lp, lo, er in zip(depth_params, depth_options, rows)
    ]
    stack, caches = residual_stack_forward(h, depth_fns)
    y, out_cache = stack.quantized, None
    if params.project_out_W is not None:
        y, out_cache = affine(y, params.project_out_W, params.project_out_b)  # (N, D)
    out = ResidualLFQOutput(
        y,
        xp.concat([dep.indices for dep in stack.depths], axis=1),  # (N, Q)
        xp.stack([dep.aux_loss for dep in stack.depths]),  # (Q,)
        stack.depths,
        stack.residuals,
    )
    return out, ResidualLFQCache(in_cache, caches, out_cache)


def residual_lfq_backward(dquantized: Array, dlosses: Any, cache: ResidualLFQCache) -> tuple[Array, dict]:
    """Gradients of ``<dquantized, quantized> + sum_l dlosses_l losses_l``.

    Every depth's straight-through step passes the decoder's gradient to its residual, and every
    residual has identity Jacobian with respect to the projected input (``r_{l+1} = r_l - sg[q_l]``),
    so the decoder's gradient reaches it once per depth, plus every depth's loss gradient.

    Parameters
    ----------
    dquantized : (N, D)
    dlosses : (Q,) array, or a number for every depth

    Returns
    -------
    dx : (N, D); grads : ``{"project_in_W", "project_in_b", "project_out_W", "project_out_b"}``
    """
    grads = {}
    fast = all(c.options.fast for c in cache.depths) and B.is_numpy(B.get_namespace(dquantized))
    affine_backward = affine_backward_blocked if fast else linear_backward  # the one-line choice, as the forward's
    dy = dquantized
    if cache.project_out is not None:
        dy, grads["project_out_W"], grads["project_out_b"] = affine_backward(dy, cache.project_out)
    Q = len(cache.depths)
    dl = [dlosses[level] for level in range(Q)] if B.is_array(dlosses) and dlosses.ndim == 1 else [dlosses] * Q
    dh, _ = residual_stack_backward(dy, dl, cache.depths, lfq_backward)
    dx = dh
    if cache.project_in is not None:
        dx, grads["project_in_W"], grads["project_in_b"] = affine_backward(dh, cache.project_in)
    return dx, grads
