"""The demo's training loop: one small VQ-VAE per quantizer configuration, on real images.

This file is the part of ``vqref demo`` worth reading on its own: the data, the eight
quantizer configurations, the Adam loop and the evaluation.  The command line lives in
:mod:`vqref.demo.cli`, the report (markdown, HTML, JSON, figures) in :mod:`vqref.demo.report`.

The data are scikit-learn's bundled handwritten digits (1797 images of 8x8 pixels, no
download); a fifth of them is held out.  Every configuration starts from the same
encoder/decoder weights, sees the same batches in the same order, and differs from the
baseline in one technique only:

===================  ========================================================================
``ema``              baseline: straight-through estimator, EMA codebook, random initial codes
``learnable``        codebook trained by gradient (VQ-VAE paper loss: codebook + 0.25 commitment)
``kmeans``           baseline + codebook initialised by k-means on the first batch
``cosine``           baseline + l2-normalised tokens and codes (cosine-similarity lookup)
``orthogonal``       ``learnable`` + the orthogonal regulariser on the codebook
``rotation``         baseline with the rotation trick in place of the straight-through estimator
``residual``         baseline quantizer applied residually in 2 depths (one codebook per depth)
``residual-shared``  ``residual`` with one codebook shared by both depths
===================  ========================================================================

Symbols: N images (B in a batch), 64 pixels per image, T tokens per image of d features each,
K codes per codebook, Q residual depths.

The model (see :mod:`vqref.nn.vqvae`): encoder MLP 64 -> hidden -> T*d, the latent cut into T
tokens of d features, each token quantized with K codes, decoder MLP T*d -> hidden -> 64.
Every gradient is computed by vqref's hand-written backward passes; there is no autograd.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .. import ResidualVQ, VectorQuantize
from ..nn import VQVAE, Adam

__all__ = [
    "CONFIGS",
    "DIGITS",
    "TEST_IMAGES",
    "RunResult",
    "TrainSettings",
    "TrainingDiverged",
    "build_model",
    "code_usage",
    "evaluate",
    "load_data",
    "perplexity",
    "showcase",
    "total_steps",
    "train_one",
]

# --------------------------------------------------------------------------------------------
# The configurations
# --------------------------------------------------------------------------------------------

# Shared by every configuration: vector-quantize-pytorch's EMA decay and the VQ-VAE paper's
# commitment weight beta = 0.25.
DECAY = 0.8
BETA = 0.25
ORTHOGONAL_WEIGHT = 1.0
DEPTHS = 2


def _vq(d: int, K: int, seed: Any, **options: Any):
    return VectorQuantize(d, K, commitment_weight=BETA, seed=seed, **options)


def _learnable(**extra: Any) -> dict:
    return dict(decay=DECAY, ema_update=False, learnable_codebook=True, codebook_weight=1.0, **extra)


def _rvq(d: int, K: int, seed: Any, **options: Any):
    return ResidualVQ(
        dim=d, codebook_size=K, num_quantizers=DEPTHS, commitment_weight=BETA, decay=DECAY, seed=seed, **options
    )


# name -> (one-line description, factory(d, K, seed) -> quantizer)
CONFIGS: dict[str, tuple[str, Callable[..., Any]]] = {
    "ema": ("STE + EMA codebook (baseline)", lambda d, K, s: _vq(d, K, s, decay=DECAY)),
    "learnable": (
        "codebook learned by gradient (codebook + 0.25 commitment loss)",
        lambda d, K, s: _vq(d, K, s, **_learnable()),
    ),
    "kmeans": ("baseline + k-means initialised codebook", lambda d, K, s: _vq(d, K, s, decay=DECAY, kmeans_init=True)),
    "cosine": ("baseline + cosine-similarity codebook", lambda d, K, s: _vq(d, K, s, decay=DECAY, use_cosine_sim=True)),
    "orthogonal": (
        f"learnable + orthogonal regulariser (weight {ORTHOGONAL_WEIGHT:g})",
        lambda d, K, s: _vq(d, K, s, **_learnable(orthogonal_reg_weight=ORTHOGONAL_WEIGHT)),
    ),
    "rotation": (
        "baseline with the rotation trick instead of the STE",
        lambda d, K, s: _vq(d, K, s, decay=DECAY, rotation_trick=True),
    ),
    "residual": (f"ResidualVQ, {DEPTHS} depths, one codebook per depth", lambda d, K, s: _rvq(d, K, s)),
    "residual-shared": (
        f"ResidualVQ, {DEPTHS} depths, one shared codebook",
        lambda d, K, s: _rvq(d, K, s, shared_codebook=True),
    ),
}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

DIGITS = 1797  # images in scikit-learn's digits
TEST_IMAGES = 360  # held out: a fifth of them
PIXELS = 64  # 8x8 per image


def load_data(seed: int, train_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits scaled to [0, 1]: ``train (train_size, 64)``, ``test (360, 64)`` float32
    and the held-out labels ``(360,)``.

    The split is a seeded permutation; the held-out images are the same for every train size.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # (1797, 64), pixel intensities 0..16
    perm = np.random.default_rng([seed, 0]).permutation(x.shape[0])
    test = x[perm[:TEST_IMAGES]]
    train = x[perm[TEST_IMAGES : TEST_IMAGES + train_size]]
    return train, test, digits.target[perm[:TEST_IMAGES]]


def showcase(labels: np.ndarray, n: int = 10) -> np.ndarray:
    """Positions of the first held-out image of each digit 0..9 (then the next ones), ``n`` in all."""
    first = [int(np.flatnonzero(labels == c)[0]) for c in range(10) if np.any(labels == c)]
    rest = [i for i in range(labels.shape[0]) if i not in first]
    return np.asarray((first + rest)[:n])


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


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


def evaluate(model: Any, test: np.ndarray, K: int, shared: bool) -> tuple[float, float, float, list, np.ndarray]:
    """Held-out reconstruction MSE, perplexity, fraction of codes used, per-codebook counts and
    the reconstructions ``(N, 64)``.

    Residual VQ: perplexity and codes used are means over its codebooks (per depth), or over the
    pooled depths for the shared codebook.
    """
    recon, indices, losses = model.reconstruct(test)
    usage = code_usage(np.asarray(indices), K, shared)
    ppl = float(np.mean([perplexity(c) for c in usage]))
    used = float(np.mean([(c > 0).mean() for c in usage]))
    return float(losses.reconstruction), ppl, used, usage, recon


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSettings:
    """What one training run needs: model size, optimizer, length (``epochs`` or ``steps``), seed."""

    codebook_size: int  # K
    hidden: int  # hidden units of encoder and decoder
    tokens: int  # T
    token_dim: int  # d
    batch_size: int  # B
    lr: float  # Adam's initial learning rate (cosine decay to lr / 10)
    seed: int
    epochs: int | None = None
    steps: int | None = None  # instead of epochs


@dataclass
class RunResult:
    name: str
    description: str
    test_mse: float
    perplexity: float
    codes_used: float  # fraction of the K codes chosen by at least one held-out token
    train_time: float  # seconds, training loop and periodic evaluations
    steps: int
    curves: dict = field(default_factory=dict)  # step, test_mse, perplexity, codes_used, train_loss
    usage: list = field(default_factory=list)  # per codebook, counts on the held-out tokens
    recon: list = field(default_factory=list)  # reconstructions of the showcase held-out images


class TrainingDiverged(RuntimeError):
    """A run whose loss, or whose parameters after an update, stopped being finite.

    Too large a learning rate is the usual cause: Adam's steps overshoot, the activations and
    the loss grow without bound, and eventually an update would write infinities into a weight
    (vqref's parameters refuse them).  ``epoch`` counts from 1; ``loss`` is the last loss seen.
    """

    def __init__(self, name: str, epoch: int, loss: float, reason: str = ""):
        self.name, self.epoch, self.loss = name, epoch, loss
        detail = f"; {reason}" if reason else ""
        super().__init__(f"training diverged at epoch {epoch} of config {name} (loss = {loss:.4g}{detail})")


def total_steps(s: TrainSettings, train_size: int) -> int:
    """Optimizer steps of one run: ``s.steps``, or ``s.epochs`` full batches per epoch."""
    per_epoch = train_size // s.batch_size  # the last partial batch is dropped
    return s.steps if s.steps is not None else s.epochs * per_epoch


def build_model(name: str, s: TrainSettings, in_dim: int = PIXELS) -> VQVAE:
    """Configuration ``name``'s VQ-VAE before training: ``in_dim -> hidden -> T*d`` and back.

    The same seeds in every configuration: same initial weights, same codebook draw (and
    :func:`train_one` draws the same batches), so the table compares techniques and not luck.
    """
    quantizer = CONFIGS[name][1](s.token_dim, s.codebook_size, np.random.default_rng([s.seed, 1]))
    return VQVAE(quantizer, in_dim=in_dim, hidden=s.hidden, num_tokens=s.tokens, rng=np.random.default_rng([s.seed, 2]))


def _train_step(model: VQVAE, opt: Adam, xb: np.ndarray, lr: float, name: str, epoch: int) -> float:
    """One training step on the batch ``xb``: forward, backward, an Adam update with learning rate
    ``lr``.  Returns the step's loss.

    Raises :class:`TrainingDiverged` when the loss is not finite, or when vqref refuses the step:
    the data and the options were checked before training, so what it refuses here is a number
    that is no longer finite (an update that would make a weight infinite, a latent grown past
    the float range).
    """
    loss = math.nan
    try:
        _, _, losses = model.forward(xb)
        loss = float(losses.total)
        if math.isfinite(loss):
            model.backward(1.0)
            opt.lr = lr
            opt.step(model.grads)
            return loss
    except ValueError as e:
        raise TrainingDiverged(name, epoch, loss, f"vqref refused the step: {e}") from e
    raise TrainingDiverged(name, epoch, loss)


def train_one(
    name: str,
    s: TrainSettings,
    train: np.ndarray,
    test: np.ndarray,
    show: np.ndarray,
    progress: Callable[[int, float], None] | None = None,
) -> RunResult:
    """Train configuration ``name``, evaluate it on the held-out images; keep ``test[show]``'s reconstructions.

    ``progress(step, loss)``, when given, is called after every step with the mean training loss
    of the last (at most 20) steps; the command line draws its progress bar with it.
    """
    description = CONFIGS[name][0]
    K = s.codebook_size
    model = build_model(name, s, in_dim=train.shape[1])
    shared = bool(getattr(model.quantizer, "shared_codebook", False))
    opt = Adam(model.params, lr=s.lr)
    batches = np.random.default_rng([s.seed, 3])

    per_epoch = train.shape[0] // s.batch_size  # the last partial batch is dropped
    total = total_steps(s, train.shape[0])
    n_evals = 25
    eval_at = set(np.unique(np.linspace(0, total, n_evals + 1).round().astype(int))[1:].tolist())
    curves: dict[str, list] = {
        "step": [],
        "test_mse": [],
        "perplexity": [],
        "codes_used": [],
        "train_loss_step": [],
        "train_loss": [],
    }
    t0 = time.perf_counter()
    step, window = 0, []
    # _train_step reports a diverging run itself, so numpy's overflow warnings on the way there
    # would only say the same thing less clearly.
    with np.errstate(over="ignore", invalid="ignore"):
        while step < total:
            order = batches.permutation(train.shape[0])
            for b in range(per_epoch):
                xb = train[order[b * s.batch_size : (b + 1) * s.batch_size]]  # (B, 64)
                # cosine decay of the learning rate from lr to lr/10 over the run
                lr = s.lr * (0.55 + 0.45 * math.cos(math.pi * step / total))
                window.append(_train_step(model, opt, xb, lr, name, epoch=step // per_epoch + 1))
                step += 1
                if step in eval_at:
                    mse, ppl, used, _, _ = evaluate(model, test, K, shared)
                    curves["step"].append(step)
                    curves["test_mse"].append(mse)
                    curves["perplexity"].append(ppl)
                    curves["codes_used"].append(used)
                    curves["train_loss_step"].append(step)
                    curves["train_loss"].append(float(np.mean(window)))  # mean since the last point
                    window = []
                if progress is not None:
                    progress(step, float(np.mean(window[-20:])) if window else curves["train_loss"][-1])
                if step >= total:
                    break
    elapsed = time.perf_counter() - t0
    mse, ppl, used, usage, recon = evaluate(model, test, K, shared)
    return RunResult(
        name=name,
        description=description,
        test_mse=mse,
        perplexity=ppl,
        codes_used=used,
        train_time=elapsed,
        steps=total,
        curves=curves,
        usage=[c.tolist() for c in usage],
        recon=np.asarray(recon)[show].tolist(),
    )
