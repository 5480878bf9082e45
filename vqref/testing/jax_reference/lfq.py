"""JAX references for lookup-free quantization (LFQ, MAGVIT-v2, arXiv 2310.05737), its spherical
variant (BSQ, arXiv 2406.07548) and residual LFQ.

Symbols: N tokens, dim the input width, C codebooks, d bits per code (K = 2^d codes), s the
codebook scale, v the size of a code's entries (s, or s / sqrt(d) on the sphere), tau the
inverse temperature, Q residual depths; ``sg[.]`` is ``jax.lax.stop_gradient``.

The codes are the corners of a cube, listed in index order: code k has entry j equal to
``+v`` when bit ``d-1-j`` of k is set (the first entry is the most significant bit), else ``-v``.

    soft clamp      h = a tanh(h / a)
    sign            q = z + sg[s sign(z) - z]        sign(0) = -1; the straight-through surrogate
    scores          score_k = ||z||^2 + ||c_k||^2 - ||z - c_k||^2        (= 2 z . c_k)
    cosine map      y = scale l2(x) l2(W's columns)                      (CosineSimLinear)

The scores are written from the distances they stand for (vqref uses the product ``2 z . c``,
or a table built bit by bit); the softmax drops the per-row constant either way.

**The layer**, each bracket optional (vqref.core.lfq's order)::

    h = [x W_in + b_in | cosine map]      [h = a tanh(h / a)]
    z = rows of d (N C, d)                [z = z R]       [u = s l2(z), else u = z]
    q = s sign(u)  [q = s l2(q)]          o = u + sg[q - u]
    L_ent = penalty(scores(u rows of the entropy tokens) / with v)   [softplus(L_ent + offset)]
    L_commit = mse(u, sg[q]) over the loss tokens
    aux = w_ent L_ent + w_commit L_commit
    quantized = [o R^T] as (N, C d)  [W_out, b_out]

**Residual LFQ**: ``r_0 = x W_in + b_in``, depth l an LFQ of one codebook with scale ``2^-l``
(and soft clamp ``a 2^-l``) on ``r_l``, ``r_{l+1} = r_l - sg[o_l]``, output ``W_out`` of the sum.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .cosine import l2norm
from .entropy import entropy_penalty, softplus

__all__ = ["soft_clamp", "sign_ste", "corners", "code_scores", "cosine_linear", "lfq", "residual_lfq"]

sg = jax.lax.stop_gradient
NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's eps, which vector-quantize-pytorch's LFQ uses


def soft_clamp(z, value: float):
    """``value * tanh(z / value)``, elementwise."""
    return value * jnp.tanh(z / value)


def sign_ste(z, scale: float = 1.0):
    """``z + sg[q - z]`` with ``q = +scale`` where ``z > 0`` and ``-scale`` elsewhere; (N, d)."""
    q = jnp.where(z > 0, scale, -scale)  # (N, d)
    return z + sg(q - z)


def corners(d: int, value: float) -> np.ndarray:
    """All 2^d codes ``(K, d)`` in index order (host float64): the product of ``{-v, +v}`` d times,
    the first entry varying slowest (the most significant bit)."""
    return np.array(list(itertools.product((-value, value), repeat=d)), dtype=np.float64)


def code_scores(z, value: float):
    """``score_k = ||z||^2 + ||c_k||^2 - ||z - c_k||^2`` for every code; (N, d) -> (N, K)."""
    c = corners(z.shape[-1], value)  # (K, d)
    diff = z[:, None, :] - c[None, :, :]  # (N, K, d)
    return jnp.sum(z * z, axis=-1, keepdims=True) + np.sum(c * c, axis=-1) - jnp.sum(diff * diff, axis=-1)


def cosine_linear(x, W, scale: float):
    """``scale * l2(x) l2(W^T)^T``: x (N, Din), W (Din, Dout) with unit columns; returns (N, Dout)."""
    return scale * (l2norm(x, eps=NORMALIZE_EPS) @ l2norm(W.T, eps=NORMALIZE_EPS).T)


def _select(a, rows):
    """Rows ``a[rows]`` (a gather with fixed indices), or all of ``a`` for ``rows=None``."""
    return a if rows is None else jnp.take(a, jnp.asarray(rows), axis=0)


def lfq(
    x,
    W_in=None,
    b_in=None,
    W_out=None,
    b_out=None,
    *,
    num_codebooks: int,
    codebook_dim: int,
    codebook_scale: float = 1.0,
    spherical: bool = False,
    soft_clamp_value: float | None = None,
    entropy_loss_weight: float = 0.1,
    commitment_loss_weight: float = 0.0,
    diversity_gamma: float = 1.0,
    inv_temperature: float = 100.0,
    softplus_offset: float | None = None,
    cosine_scale: float | None = None,
    rotation=None,
    entropy_rows=None,
    loss_rows=None,
):
    """``(quantized (N, dim), aux ())`` of one LFQ layer (the module docstring's steps).

    Parameters
    ----------
    x : (N, dim)
    W_in, b_in, W_out, b_out : the projections (W_in (dim, C d), ...), or None
    num_codebooks, codebook_dim, codebook_scale, spherical, soft_clamp_value,
    entropy_loss_weight, commitment_loss_weight, diversity_gamma, inv_temperature,
    softplus_offset, cosine_scale : as :class:`vqref.core.lfq.LFQOptions`
    rotation : (d, d) orthogonal R (a constant), or None
    entropy_rows : (n,) int token indices of the entropy penalty (None: all; empty: no penalty)
    loss_rows : (m,) int token indices of the commitment loss (None: all)
    """
    N, C, d, s = x.shape[0], num_codebooks, codebook_dim, codebook_scale
    h = x
    if W_in is not None:
        h = cosine_linear(x, W_in, cosine_scale) if cosine_scale is not None else x @ W_in
        if b_in is not None:
            h = h + b_in
    if soft_clamp_value is not None:
        h = soft_clamp(h, soft_clamp_value)
    z = jnp.reshape(h, (N * C, d))  # (N C, d)
    R = None if rotation is None else jnp.asarray(rotation)
    if R is not None:
        z = z @ R
    u = s * l2norm(z, eps=NORMALIZE_EPS) if spherical else z  # (N C, d)
    q = jnp.where(u > 0, s, -s)  # (N C, d) the nearest corner
    if spherical:
        q = s * l2norm(q, eps=NORMALIZE_EPS)
    o = u + sg(q - u)  # (N C, d) the value of q, the gradient straight through to u
    u_tok, q_tok = jnp.reshape(u, (N, C * d)), jnp.reshape(q, (N, C * d))  # one row per token
    aux = 0.0
    # the penalty enters aux with its weight; with weight 0 it changes neither aux nor a gradient
    if entropy_loss_weight != 0 and (entropy_rows is None or len(entropy_rows)):
        ue = jnp.reshape(_select(u_tok, entropy_rows), (-1, d))  # (n C, d)
        v = s / math.sqrt(d) if spherical else s
        scores = jnp.reshape(code_scores(ue, v), (-1, C, 2**d))  # (n, C, K)
        ent, _, _ = entropy_penalty(scores, inv_temperature=inv_temperature, diversity_gamma=diversity_gamma)
        if softplus_offset is not None:
            ent = softplus(ent + softplus_offset)
        aux = aux + entropy_loss_weight * ent
    if commitment_loss_weight > 0 and (loss_rows is None or len(loss_rows)):
        diff = _select(u_tok, loss_rows) - sg(_select(q_tok, loss_rows))  # (m, C d)
        aux = aux + commitment_loss_weight * jnp.mean(diff * diff)
    if R is not None:
        o = o @ R.T
    y = jnp.reshape(o, (N, C * d))  # (N, C d)
    if W_out is not None:
        y = y @ W_out + (0.0 if b_out is None else b_out)
    return y, jnp.asarray(aux, dtype=x.dtype)


def residual_lfq(
    x,
    W_in=None,
    b_in=None,
    W_out=None,
    b_out=None,
    *,
    num_quantizers: int,
    codebook_dim: int,
    soft_clamp_value: float | None = None,
    rotations: Sequence | None = None,
    entropy_rows: Sequence | None = None,
    **depth_options,
):
    """``(quantized (N, dim), losses (Q,))`` of residual LFQ: depth l has scale ``2^-l``.

    Parameters
    ----------
    x : (N, dim)
    W_in, b_in, W_out, b_out : the stack's projections (dim -> d -> dim), or None
    num_quantizers : Q
    codebook_dim : d
    soft_clamp_value : a, depth l clamps at ``a 2^-l``; or None
    rotations : Q (d, d) rotations, or None
    entropy_rows : Q token index arrays (or None each), or None
    depth_options : the remaining :func:`lfq` options, the same at every depth (spherical,
        entropy_loss_weight, commitment_loss_weight, diversity_gamma, inv_temperature,
        softplus_offset, loss_rows)
    """
    r = x if W_in is None else x @ W_in + (0.0 if b_in is None else b_in)  # (N, d)
    total, losses = 0.0, []
    for level in range(num_quantizers):
        scale = 2.0**-level
        o, loss = lfq(
            r, num_codebooks=1, codebook_dim=codebook_dim, codebook_scale=scale,
            soft_clamp_value=None if soft_clamp_value is None else soft_clamp_value * scale,
            rotation=None if rotations is None else rotations[level],
            entropy_rows=None if entropy_rows is None else entropy_rows[level], **depth_options,
        )  # fmt: skip
        r = r - sg(o)
        total = total + o
        losses.append(loss)
    y = total if W_out is None else total @ W_out + (0.0 if b_out is None else b_out)
    return y, jnp.stack(losses)
