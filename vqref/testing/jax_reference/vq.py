"""JAX references for the VQ-VAE ops and the whole VQ layer, written from the equations.

Symbols: N vectors, D features, K codes; M = N * D; ``sg[.]`` is ``jax.lax.stop_gradient``.

Each function is the forward of one piece of VQ-VAE (van den Oord et al., arXiv 1711.00937)
exactly as the paper and docs/math.md write it.  JAX differentiates it; nothing here is a
derivative written by hand, so :func:`vqref.testing.jax_reference.vjp` applied to these
functions is an oracle independent of vqref's backward passes:

    squared distance   d_ik = ||x_i - c_k||^2                   (direct differences, no expansion)
    lookup             q_i = c_{k_i}                             (a gather; JAX scatter-adds back)
    mean squared error mse(a, b) = (1/M) sum (a - b)^2
    commitment loss    mse(x, sg[q])                             (arXiv 1711.00937 eq. 3, third term)
    codebook loss      mse(sg[x], q)                             (eq. 3, second term)
    straight-through   z_q = z + sg[q - z]                       (section 3.1; value q, Jacobian I)

:func:`vq_layer` composes them into vqref's quantizer with the codes held fixed (the argmin is
piecewise constant and has no gradient), with any of its four estimators (the straight-through
Gumbel-softmax and the soft code from :mod:`.gumbel`) and its loss terms.  JAX functions in,
JAX arrays out; integer indices may be numpy arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .cosine import l2norm
from .gumbel import code_logits, diversity_loss, grouped_diversity_loss, gumbel_softmax, straight_through_gumbel_code
from .gumbel import soft_assignment as soft_code
from .orthogonal import orthogonal_loss
from .rotation import rotation_trick

__all__ = [
    "squared_distance",
    "lookup",
    "mse",
    "commitment_loss",
    "codebook_loss",
    "straight_through",
    "estimator",
    "vq_layer",
]

sg = jax.lax.stop_gradient


def squared_distance(x, codebook):
    """``d_ik = sum_j (x_ij - c_kj)^2``: every difference formed, (N, K, D), then summed.

    Parameters
    ----------
    x : (N, D)
    codebook : (K, D)

    Returns
    -------
    dist : (N, K)
    """
    diff = x[:, None, :] - codebook[None, :, :]  # (N, K, D)
    return jnp.sum(diff * diff, axis=-1)  # (N, K)


def lookup(codebook, indices):
    """``q_i = c_{k_i}``: rows of the codebook, ``indices`` (N,) int held fixed; returns (N, D)."""
    return jnp.take(codebook, jnp.asarray(indices), axis=0)  # (N, D)


def mse(a, b):
    """``(1/M) sum (a - b)^2`` over all M elements (``F.mse_loss``'s mean); a 0-d array."""
    diff = a - b  # (N, D)
    return jnp.sum(diff * diff) / diff.size


def commitment_loss(x, q):
    """``mse(x, sg[q])``: only the encoder output ``x`` (N, D) gets a gradient."""
    return mse(x, sg(q))


def codebook_loss(x, q):
    """``mse(sg[x], q)``: only the selected codes ``q`` (N, D) get a gradient."""
    return mse(sg(x), q)


def straight_through(z, q):
    """``z + sg[q - z]``: the value of ``q``, the identity Jacobian for ``z``, nothing for ``q``."""
    return z + sg(q - z)


def estimator(x, q, *, rotation: bool = False):
    """The gradient estimator of a quantizer: :func:`straight_through`, or the rotation trick
    (:func:`vqref.testing.jax_reference.rotation.rotation_trick`) when ``rotation``."""
    return rotation_trick(x, q) if rotation else straight_through(x, q)


def vq_layer(
    x,
    codebook,
    indices,
    *,
    commitment_weight: float = 1.0,
    codebook_weight: float | None = None,
    learnable_codebook: bool = False,
    use_cosine_sim: bool = False,
    rotation_trick: bool = False,
    straight_through: bool = False,
    soft_assignment: bool = False,
    sample_codebook_temp: float = 1.0,
    noise=None,
    codebook_diversity_loss_weight: float = 0.0,
    codebook_diversity_temperature: float = 100.0,
    diversity_positions: int = 1,
    diversity_groups=None,
    orthogonal_reg_weight: float = 0.0,
    orthogonal_code_ids=None,
):
    """One vector-quantization layer with the codes held at ``indices``: ``(quantized, loss)``.

    The forward of vqref's quantizer (docs/math.md sections 1, 4, 5, 6, 9)::

        x^ = l2(x), C^ = l2(C)  with use_cosine_sim, else x, C
        q  = C^[k]
        l  = logits(x^, C^)                                          (only for the soft paths)
        quantized = x^ + sg[q - x^]                                  STE
                  = sg[lambda R] x^                                  rotation trick
                  = (z + y - sg[y]) C^,  y = softmax(l/tau + g)      straight-through Gumbel-softmax
                  = y C^,                y = softmax(l/tau)          soft code
        loss = beta mse(x^, sg[q])                                   codebook not learnable
             = beta mse(x^, q)                                       learnable, one term
             = w_cb mse(sg[x^], q) + beta mse(x^, sg[q])             learnable, codebook_weight = w_cb
             [+ w_div diversity(l)]                                  codebook diversity loss
             [+ w_orth orth(C, code subset)]                         orthogonal regulariser on the raw C

    Parameters
    ----------
    x : (N, D)
    codebook : (K, D)
    indices : (N,) int, the codes (held fixed)
    noise : (N, K) Gumbel noise of the straight-through estimator's y (a constant), or None
    diversity_groups : (N,) host ints, each row's position for the diversity loss (then the
        positions are ``range(diversity_positions)``), or None (row i at position ``i mod P``)
    commitment_weight, codebook_weight, learnable_codebook, use_cosine_sim, rotation_trick,
    straight_through, soft_assignment, sample_codebook_temp, codebook_diversity_loss_weight,
    codebook_diversity_temperature, diversity_positions, orthogonal_reg_weight,
    orthogonal_code_ids : as :func:`vqref.core.quantize.quantize_forward`

    Returns
    -------
    quantized : (N, D)
    loss : 0-d
    """
    xh = l2norm(x) if use_cosine_sim else x  # (N, D)
    ch = l2norm(codebook) if use_cosine_sim else codebook  # (K, D)
    q = lookup(ch, indices)  # (N, D)
    metric = "dot" if use_cosine_sim else "euclidean"
    soft = straight_through or soft_assignment or codebook_diversity_loss_weight > 0
    logits = code_logits(xh, ch, metric=metric) if soft else None  # (N, K)
    if straight_through:
        y = gumbel_softmax(logits, temperature=sample_codebook_temp, noise=noise)  # (N, K)
        quantized = straight_through_gumbel_code(y, ch, indices)
    elif soft_assignment:
        quantized = soft_code(gumbel_softmax(logits, temperature=sample_codebook_temp), ch)  # y C^
    else:
        quantized = estimator(xh, q, rotation=rotation_trick)  # (N, D)
    if not learnable_codebook:
        loss = commitment_weight * commitment_loss(xh, q)
    elif codebook_weight is None:
        loss = commitment_weight * mse(xh, q)
    else:
        loss = codebook_weight * codebook_loss(xh, q) + commitment_weight * commitment_loss(xh, q)
    if codebook_diversity_loss_weight > 0:
        T = codebook_diversity_temperature
        if diversity_groups is None:
            diversity = diversity_loss(logits, inverse_temperature=T, positions=diversity_positions)
        else:
            diversity = grouped_diversity_loss(logits, diversity_groups, diversity_positions, inverse_temperature=T)
        loss = loss + codebook_diversity_loss_weight * diversity
    if orthogonal_reg_weight > 0:
        loss = loss + orthogonal_reg_weight * orthogonal_loss(codebook, code_ids=orthogonal_code_ids)
    return quantized, loss
