"""What the demo measures on the held-out images after (and during) training.

Symbols: N held-out images, T tokens per image, d token dim, K codes per codebook, Q residual
depths; z the encoder's tokens, zq the quantizer's output for them.

* held-out reconstruction MSE, ``mean((recon - x)^2)`` over all pixels;
* perplexity ``exp(H(p))`` of the code frequencies p (the effective number of codes in use) and
  the fraction of the K codes used at least once, per codebook;
* the relative quantization error ``sum ||z - zq||^2 / sum ||z||^2``;
* bits per image, ``T * sum over depths of log2 K``: what the indices of one image cost.

Everything here reads the model and changes nothing (evaluation-mode forwards).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import FSQ, LFQ
from ..nn.vqvae import adapt_quantizer
from ..quantizers import Quantizer

__all__ = [
    "base_quantizer",
    "bits_per_image",
    "code_usage",
    "depths_of",
    "evaluate",
    "perplexity",
    "quantization_error",
    "tokens_per_image",
]


def base_quantizer(quantizer: Any) -> Any:
    """The vqref quantizer inside the demo's wrappers (an adapter, an annealing wrapper), or itself."""
    while not isinstance(quantizer, Quantizer):
        quantizer = quantizer.quantizer  # QuantizerAdapter and AnnealedQuantizer keep it here
    return quantizer


def depths_of(quantizer: Any) -> int:
    """Q, the residual depths of a quantizer (1 for a single one)."""
    return int(getattr(base_quantizer(quantizer), "num_quantizers", 1))


def tokens_per_image(model: Any, x: np.ndarray) -> int:
    """T: the MLP model's ``num_tokens``, or the convolutional model's grid of tokens for ``x``'s images."""
    if hasattr(model, "num_tokens"):
        return int(model.num_tokens)
    return math.prod(model.grid_shape(x.shape[1], x.shape[2]))


def bits_per_image(quantizer: Any, tokens: int) -> float:
    """``T * sum over depths (and codebook groups) of log2(codes)``: the bits of one image's indices.

    VectorQuantize and ResidualVQ: ``log2 K`` per depth; FSQ: ``log2 prod(levels)`` per group of
    channels; LFQ: ``log2 K``, its number of bits, per group.
    """
    q = base_quantizer(quantizer)
    per_token = math.log2(q.codebook_size) if q.codebook_size > 1 else 0.0
    groups = q.num_codebooks if isinstance(q, (FSQ, LFQ)) else 1
    return tokens * per_token * depths_of(q) * groups


def code_usage(indices: np.ndarray, K: int, shared: bool) -> list[np.ndarray]:
    """Counts per codebook: one ``(K,)`` array per depth, or one pooled array when shared.

    ``indices`` is ``(N, T)`` for one quantizer, ``(N, T, Q)`` for residual VQ.
    """
    idx = indices if indices.ndim == 3 else indices[..., None]  # (N, T, Q)
    if shared:
        return [np.bincount(idx.reshape(-1), minlength=K)]
    return [np.bincount(idx[..., q].reshape(-1), minlength=K) for q in range(idx.shape[-1])]


def perplexity(counts: np.ndarray) -> float:
    """``exp(H(p))`` of the code frequencies: the effective number of codes in use (1..K)."""
    p = counts / max(counts.sum(), 1)
    return float(np.exp(-np.sum(p * np.log(p + 1e-10))))


def quantization_error(model: Any, x: np.ndarray) -> float:
    """``sum ||z - zq||^2 / sum ||z||^2`` over the tokens of ``x``: how far the quantizer moves
    the encoder's output, relative to its size (an evaluation forward; nothing changes).

    For FSQ and LFQ ``zq`` is the output after the projection back to d: the difference the
    decoder sees.  The rotation trick's paper (arXiv 2410.06424) reports this error.
    """
    mode = model.training
    model.eval()
    try:
        z, _ = model.encoder.apply(x)  # (N, T*d), or (N, H', W', d) for the convolutional model
        tokens = np.reshape(z, (z.shape[0], -1, model.token_dim))  # (N, T, d)
        zq, _, _ = adapt_quantizer(model.quantizer)(tokens)  # (N, T, d)
    finally:
        model.train(mode)
    return float(np.sum((tokens - zq) ** 2) / max(float(np.sum(tokens**2)), 1e-30))


def evaluate(model: Any, test: np.ndarray) -> tuple[float, float, float, list, np.ndarray]:
    """Held-out reconstruction MSE, perplexity, fraction of codes used, per-codebook counts and
    the reconstructions (``test``'s shape).

    Residual VQ: perplexity and codes used are means over its codebooks (per depth), or over the
    pooled depths for the shared codebook.
    """
    q = base_quantizer(model.quantizer)
    K, Q, shared = q.codebook_size, depths_of(q), bool(getattr(q, "shared_codebook", False))
    recon, indices, losses = model.reconstruct(test)
    idx = np.asarray(indices)  # (N, T[, Q]); (N, H', W'[, Q]) for the convolutional model
    usage = code_usage(idx.reshape((idx.shape[0], -1) + ((Q,) if Q > 1 else ())), K, shared)
    ppl = float(np.mean([perplexity(c) for c in usage]))
    used = float(np.mean([(c > 0).mean() for c in usage]))
    return float(losses.reconstruction), ppl, used, usage, recon
