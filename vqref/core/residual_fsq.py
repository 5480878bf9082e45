"""Residual finite scalar quantization as one forward/backward pair.

Symbols: N vectors, d = len(levels) channels, dim the input width (d unless projected),
Q depths (num_quantizers), Q' <= Q the depths that run (fewer under quantize dropout).

Residual FSQ stacks FSQ layers as residual VQ stacks codebooks (SoundStream, arXiv 2107.03312,
algorithm 1), with one twist: the grid of depth l is shrunk by ``s_l = L^-l`` per channel, so
that each depth quantizes the error the depths before it left, at its own resolution:

    z = project_in(x)                               (N, d)   optional affine map
    r_0 = softclamp(z) = tanh(z / c) c              (N, d)   optional, c = 1 + 1/(L - 1)
    o_l = s_l FSQ(r_l / s_l)                        (N, d)   symmetric grid, straight-through
    r_{l+1} = r_l - sg[o_l]
    quantized = project_out(sum_l o_l)              (N, dim)

Why ``L^-l``.  On the symmetric grid (arXiv 2411.19842) the L points of a channel are
``2/(L-1)`` apart, so the error a depth leaves is at most ``1/(L-1)`` per channel; the next
depth's grid, shrunk by 1/L, spans ``[-1/L, 1/L]`` -- about that error's range.  With
vector-quantize-pytorch's default hard clamp (``phi = clamp(., -1, 1)`` in the bound), the soft
clamp keeps the input within ``c = 1 + 1/(L-1)``, the first grid's reach plus half a step.

The backward follows the recursion in reverse.  Every residual has identity Jacobian with
respect to r_0 (each ``o_l`` enters the next residual under sg[.]), so the upstream gradient g of
the sum reaches r_0 once per depth, through that depth's chain ``d o_l / d r_l``:

    dr_0 = sum_l (1/s_l) FSQ'^T(s_l g)                (the STE: sum_l phi'(r_l / s_l) * g)
    dz = dr_0 * (1 - tanh^2(z / c))                   the soft clamp's derivative
    dx, dW_in, db_in = project_in's VJP

Depths that quantize dropout skipped contribute nothing and report the index -1.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .. import backend as B
from ..backend import Array
from ..ops.fsq import SoftClampCache, soft_clamp_backward, soft_clamp_forward
from ..ops.linear import LinearCache, linear_backward, linear_forward
from ..ops.linear_fast import affine_backward_blocked, affine_forward_blocked
from .fsq import FSQCache, Projection, fsq_backward, fsq_forward
from .residual import residual_stack_backward, residual_stack_forward

__all__ = [
    "DepthOutput",
    "ResidualFSQOutput",
    "ResidualFSQCache",
    "residual_fsq_forward",
    "residual_fsq_backward",
]


class DepthOutput(NamedTuple):
    quantized: Array  # (N, d) o_l = s_l z_q, the value depth l adds
    indices: Array  # (N,) int64


class DepthCache(NamedTuple):
    fsq: FSQCache
    scale: Array  # (d,) s_l


class ResidualFSQOutput(NamedTuple):
    quantized: Array  # (N, dim)
    indices: Array  # (N, Q) int64; -1 at the depths quantize dropout skipped
    residuals: tuple  # Q' + 1 arrays (N, d): r_0 (after the soft clamp) .. r_Q'
    projected: Array  # (N, d) x after the projection in, before the soft clamp


class ResidualFSQCache(NamedTuple):
    project_in: LinearCache | None
    soft_clamp: SoftClampCache | None
    depths: tuple  # Q' DepthCache
    project_out: LinearCache | None
    has_bias: bool


def residual_fsq_forward(
    x: Array,
    levels: tuple,
    scales: Array,
    *,
    num_active: int | None = None,
    project_in: Projection | None = None,
    project_out: Projection | None = None,
    soft_clamp: Array | None = None,
    hard_clamp: bool = True,
    noise: list | None = None,
    fast: bool = True,
) -> tuple[ResidualFSQOutput, ResidualFSQCache]:
    """Quantize ``x`` residually in ``num_active`` of Q depths.

    Parameters
    ----------
    x : (N, dim) float
    levels : d ints >= 2
    scales : (Q, d) the per-depth scales ``L^-l``, x's dtype
    num_active : Q' in [1, Q], the depths that run (default Q); the rest report the index -1
    project_in, project_out : ``Projection(W, b)`` (dim -> d and d -> dim), or None
    soft_clamp : (d,) c of the soft clamp, or None for none
    hard_clamp : the bound's phi is the clamp (vector-quantize-pytorch's ``bound_hard_clamp``)
    noise : Q' ``(mask, noise)`` pairs for noise dropout (each (N, d)), or None
    fast : numpy: the projections of :mod:`vqref.ops.linear_fast` (blocks of rows on worker
        threads); False, or any other library: :mod:`vqref.ops.linear`, the definition

    Returns
    -------
    out : ResidualFSQOutput(quantized (N, dim), indices (N, Q), residuals, projected (N, d))
    cache : ResidualFSQCache
    """
    xp = B.get_namespace(x)
    N, Q = x.shape[0], scales.shape[0]
    active = Q if num_active is None else num_active
    affine = affine_forward_blocked if fast and B.is_numpy(xp) else linear_forward  # the one-line choice
    in_cache = clamp_cache = out_cache = None
    projected = z = x  # (N, dim)
    if project_in is not None:
        projected, in_cache = affine(x, project_in.W, project_in.b)  # (N, d)
        z = projected
    if soft_clamp is not None:
        z, clamp_cache = soft_clamp_forward(projected, soft_clamp)  # (N, d) within (-c, c)

    def depth(level: int):
        s = scales[level, ...]  # (d,)
        noise_l = None if noise is None else noise[level]

        def run(r: Array) -> tuple[DepthOutput, DepthCache]:
            q, fsq_cache = fsq_forward(r / s, levels, preserve_symmetry=True, hard_clamp=hard_clamp, noise=noise_l)
            return DepthOutput(q.quantized * s, q.indices), DepthCache(fsq_cache, s)  # o_l = s_l z_q

        return run

    stack, caches = residual_stack_forward(z, [depth(level) for level in range(active)])
    total = stack.quantized  # (N, d)
    if project_out is not None:
        total, out_cache = affine(total, project_out.W, project_out.b)  # (N, dim)
    idx = [o.indices for o in stack.depths]
    idx += [xp.full((N,), -1, dtype=xp.int64, device=B.get_device(x))] * (Q - active)  # skipped depths
    has_bias = any(p is not None and p.b is not None for p in (project_in, project_out))
    out = ResidualFSQOutput(total, xp.stack(idx, axis=1), stack.residuals, projected)
    return out, ResidualFSQCache(in_cache, clamp_cache, caches, out_cache, has_bias)


def _depth_backward(dquantized: Array, dloss: Any, cache: DepthCache) -> tuple[Array, None]:
    """The VJP of ``o_l = s_l FSQ(r_l / s_l)`` with respect to ``r_l`` (no loss, no parameters)."""
    dz = fsq_backward(dquantized * cache.scale, cache.fsq)  # through o_l = s_l z_q and FSQ
    return dz / cache.scale, None  # through r_l / s_l


def residual_fsq_backward(dquantized: Array, cache: ResidualFSQCache, *, fast: bool = True) -> tuple[Array, dict]:
    """``dx`` and the projections' gradients for the upstream gradient ``dquantized (N, dim)``.

    ``fast``: numpy: the projections' backward of :mod:`vqref.ops.linear_fast`; False: the definition.

    Returns
    -------
    dx : (N, dim)
    grads : ``{"project_in.W", "project_in.b", "project_out.W", "project_out.b"}`` for the
        projections present (the ``b`` entries only with a bias)
    """
    grads = {}
    affine_backward = affine_backward_blocked if fast and B.is_numpy(B.get_namespace(dquantized)) else linear_backward
    dtotal = dquantized  # (N, d)
    if cache.project_out is not None:
        dtotal, grads["project_out.W"], grads["project_out.b"] = affine_backward(dquantized, cache.project_out)
    Qa = len(cache.depths)
    dz, _ = residual_stack_backward(dtotal, [None] * Qa, cache.depths, _depth_backward)  # (N, d)
    if cache.soft_clamp is not None:
        dz = soft_clamp_backward(dz, cache.soft_clamp)  # (N, d)
    if cache.project_in is None:
        return dz, grads
    dx, grads["project_in.W"], grads["project_in.b"] = affine_backward(dz, cache.project_in)
    if not cache.has_bias:
        grads.pop("project_in.b")
        grads.pop("project_out.b", None)
    return dx, grads
