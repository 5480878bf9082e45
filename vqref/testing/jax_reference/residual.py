"""JAX reference for residual vector quantization (SoundStream arXiv 2107.03312; RQ-VAE arXiv 2203.01941).

Symbols: N vectors, D features, K codes per depth, Q depths; ``sg[.]`` is ``jax.lax.stop_gradient``.

The recursion, each depth a :func:`vqref.testing.jax_reference.vq.vq_layer` with its codes held fixed:

    r_0 = x,     (o_l, loss_l) = VQ_l(r_l),     r_{l+1} = r_l - sg[o_l]

and the two places the gradient estimator can sit (docs/math.md section 2.4):

    routing "per_depth"  quantized = sum_l o_l                    (vector-quantize-pytorch)
    routing "sum"        quantized = est(x, sg[sum_l o_l])        (RQ-VAE: one estimator on the total)

A shared codebook is one array used at every depth: JAX adds its per-depth gradients by itself.

:func:`residual_stack` is the same recursion for any quantizer at each depth (residual FSQ and
residual LFQ are built on it in vqref): ``depths[l](r_l) -> (o_l, loss_l)``, the output
``sum_l o_l`` and the losses stacked.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from .vq import estimator, vq_layer

__all__ = ["residual_vq", "residual_stack"]

sg = jax.lax.stop_gradient


def residual_vq(
    x,
    codebooks: Sequence,
    indices,
    *,
    routing: str = "per_depth",
    code_ids: Sequence | None = None,
    noises: Sequence | None = None,
    **layer_options,
):
    """``(quantized (N, D), losses (Q,))`` of residual VQ with the codes ``indices`` (N, Q) fixed.

    Parameters
    ----------
    x : (N, D)
    codebooks : Q arrays (K, D); for a shared codebook pass the same array Q times (or one
        array: it is then used at every depth)
    indices : (N, Q) int
    routing : ``"per_depth"`` or ``"sum"``
    code_ids : optional per-depth code subsets of the orthogonal regulariser
    noises : optional per-depth Gumbel noise (N, K) of the straight-through Gumbel estimator
    layer_options : the options of :func:`vq_layer` (commitment_weight, learnable_codebook,
        use_cosine_sim, rotation_trick, orthogonal_reg_weight, ...), the same at every depth
    """
    if routing not in ("per_depth", "sum"):
        raise ValueError(f"routing must be 'per_depth' or 'sum', got {routing!r}")
    Q = indices.shape[1]
    rotation = layer_options.pop("rotation_trick", False)
    residual, outs, losses = x, [], []
    for level in range(Q):
        C = codebooks[0] if len(codebooks) == 1 else codebooks[level]
        ids = None if code_ids is None else code_ids[level]
        # with routing "sum" a depth's estimator output is only read through sg[.]: any estimator will do
        o, loss = vq_layer(
            residual, C, indices[:, level], rotation_trick=rotation and routing == "per_depth",
            orthogonal_code_ids=ids, noise=None if noises is None else noises[level], **layer_options,
        )  # fmt: skip
        outs.append(o)
        losses.append(loss)
        residual = residual - sg(o)  # (N, D) r_{l+1}
    total = sum(outs[1:], outs[0])  # (N, D)
    quantized = total if routing == "per_depth" else estimator(x, sg(total), rotation=rotation)
    return quantized, jnp.stack(losses)


def residual_stack(x, depths: Sequence):
    """``(quantized (N, D), losses (Q,))`` of the residual recursion with any quantizer per depth.

    ``depths[l]`` maps the residual ``r_l`` (N, D) to ``(o_l (N, D), loss_l ())``; then
    ``r_{l+1} = r_l - sg[o_l]``, and the output is ``sum_l o_l``.
    """
    residual, total, losses = x, 0.0, []
    for depth in depths:
        o, loss = depth(residual)
        residual = residual - sg(o)  # (N, D)
        total = total + o
        losses.append(loss)
    return total, jnp.stack(losses)
