"""``ResidualVQ``: residual vector quantization in Q depths (SoundStream, RQ-VAE).

Symbols: N tokens, D = dim, K = codebook_size per depth, Q = num_quantizers.

A residual stack is a :class:`vqref.VectorQuantize` with Q depths: each depth quantizes what the
depths before it left over, and the output is the sum of the chosen codes (the algorithm is in
:mod:`vqref.core.residual`; the training step in :mod:`vqref.quantizers.vector_quantize`).  This
class gives it vector-quantize-pytorch's ``ResidualVQ`` signature and outputs: indices
``(..., Q)`` and one loss per depth ``(Q,)``, even for Q = 1.
"""

from __future__ import annotations

from typing import Any

from .vector_quantize import VectorQuantize

__all__ = ["ResidualVQ"]


class ResidualVQ(VectorQuantize):
    """Residual vector quantization (SoundStream, arXiv 2107.03312; RQ-VAE, arXiv 2203.01941).

    ``quantized, indices, losses = rq(x)`` with ``x (..., dim)``, ``indices (..., Q)`` and one loss
    per depth ``losses (Q,)`` (not summed, as in vector-quantize-pytorch); then
    ``dx = rq.backward(dquantized, dlosses=ones(Q))``.

    Parameters
    ----------
    dim, num_quantizers : D and Q
    codebook_size : K per depth (alias ``n_embed``)
    shared_codebook : one codebook for every depth (RQ-VAE).  Its EMA statistics take one step
        per depth within a forward and the codes are recomputed once after the last depth, so
        every depth of a forward sees the same codebook (vector-quantize-pytorch's design).  The
        old statistics therefore decay by ``decay ** Q`` per forward, and the deepest depth's
        statistics weigh the most; with many depths a decay closer to 1 may be wanted.  The
        orthogonal regulariser (``orthogonal_reg_weight``) is then evaluated on the codebook the
        depths quantized with, before that update (as in vector-quantize-pytorch); without a
        shared codebook, each depth's on its codebook after the depth's update
    gradient_routing : ``"per_depth"`` (default, vector-quantize-pytorch: the decoder gradient
        reaches the input once per depth) or ``"sum"`` (RQ-VAE: one estimator on the total);
        see :mod:`vqref.core.residual`
    seed : seed or numpy Generator (each depth gets its own stream, spawned from it)
    **vq_kwargs : every other :class:`VectorQuantize` option, applied at every depth (decay,
        commitment/commitment_weight, kmeans_init, kmeans_iters, use_cosine_sim,
        orthogonal_reg_weight, rotation_trick, threshold_ema_dead_code, stochastic_sample_codes,
        sample_codebook_temp, straight_through, soft_assignment, codebook_diversity_loss_weight,
        codebook_diversity_temperature, dtype, xp, ...).  Each depth samples its codes with its own
        generator; the Gumbel-softmax estimators need ``gradient_routing="per_depth"``

    Attributes
    ----------
    layers : Q read-only :class:`vqref.quantizers.views.CodebookView`, one per depth (the same
        codebook at every depth when shared), as vector-quantize-pytorch's ``rvq.layers``
    last_residuals : the Q + 1 residuals of the last call, ``r_0 = x`` to ``r_Q = x - quantized``
    stats : the usage of each depth's codes in the last forward (a tuple per key, one entry per
        depth, also for Q = 1): perplexity, usage, used_codes, dead_fraction
    """

    _stacked = True

    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: int,
        codebook_size: int | None = None,
        n_embed: int | None = None,
        shared_codebook: bool = False,
        gradient_routing: str = "per_depth",
        seed: Any = None,
        **vq_kwargs: Any,
    ):
        super().__init__(
            dim,
            codebook_size,
            n_embed=n_embed,
            num_quantizers=num_quantizers,
            shared_codebook=shared_codebook,
            gradient_routing=gradient_routing,
            seed=seed,
            **vq_kwargs,
        )

    def backward(self, dquantized: Any, dlosses: Any = 1.0) -> Any:
        """Gradient for the input of the last training forward; codebook gradients in ``self.grads``.

        Parameters
        ----------
        dquantized : (..., dim)
        dlosses : (Q,) array or a number for every depth (default 1.0: the losses are summed)
        """
        return self._backward(dquantized, dlosses, "dlosses")
