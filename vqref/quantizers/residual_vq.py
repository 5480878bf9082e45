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
    dim, num_quantizers : D and Q (Q may be left out when ``codebook_size`` gives one size per depth)
    codebook_size : K per depth (alias ``n_embed``), or a sequence of Q sizes ``(K_0, ..., K_{Q-1})``:
        each depth its own (not with ``shared_codebook``)
    codebook_dim : d, the width of the codes (default dim).  With ``d != dim`` the stack learns
        ``project_in`` (dim -> d), applied once before the first depth, and ``project_out``
        (d -> dim), applied once to the sum of the codes; their gradients are in ``grads``
    quantize_dropout : in training, stop after a random depth ``l*`` uniform in
        ``[quantize_dropout_cutoff_index, Q)`` (SoundStream, arXiv 2107.03312; vector-quantize-pytorch's
        names): the later depths return the index -1, no loss, no EMA statistics, no gradient,
        and the output is the sum of the first ``l* + 1`` codes.  ``quantize_dropout_multiple_of``
        m rounds ``l* + 1`` up to a multiple of m (EnCodec).  One ``l*`` per batch, or with
        ``quantize_dropout_per_sample=True`` (vqref) one per sample (the input's first axis), as
        DAC (arXiv 2306.06546); a depth's commitment term then sums over the rows that reach it
        and divides by all rows.  ``get_output_from_indices`` of the first n depths' indices
        gives the coarser reconstruction
    beam_size, eval_beam_size : encode by beam search of this width in training and in eval
        (vector-quantize-pytorch's names; eval defaults to beam_size; None or 1: greedy), see
        :mod:`vqref.core.beam`.  The codes are constants for the gradient, as greedy ones are
    beam_score : ``"cumulative"`` (vector-quantize-pytorch: the weighted sum of the per-depth errors
        along a path, weights ``beam_score_quantizer_weights``) or ``"error"`` (vqref: the final
        reconstruction error, FAISS's, with a per-row greedy safeguard so it never loses to greedy)
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
        (``r_Q`` formed when first read; see :attr:`vqref.VectorQuantize.last_residuals`)
    stats : the usage of each depth's codes in the last forward (a tuple per key, one entry per
        depth, also for Q = 1): perplexity, usage, used_codes, dead_fraction
    """

    _stacked = True

    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: int | None = None,
        codebook_size: Any = None,
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
