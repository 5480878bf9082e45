"""The demo's training loop: one small VQ-VAE per quantizer configuration and seed, on real images.

This file is the part of ``vqref demo`` worth reading on its own: the data, the quantizer
configurations and the Adam loop.  What a run measures is :mod:`vqref.demo.evaluation`; which
runs are made (seeds, the extra runs of the rate-distortion plot) :mod:`vqref.demo.runs`; the
photographs and their convolutional model :mod:`vqref.demo.datasets`; the command line
:mod:`vqref.demo.cli`; the report :mod:`vqref.demo.report` and :mod:`vqref.demo.claims`.

The data are scikit-learn's bundled handwritten digits (1797 images of 8x8 pixels, no
download); a fifth of them is held out, the same fifth for every run of a command.  With one
seed, every configuration starts from the same encoder/decoder weights and sees the same
batches in the same order; it differs from the baseline in the quantizer only:

=====================  ======================================================================
``ema``                baseline: straight-through estimator, EMA codebook, random initial codes
``learnable``          codebook trained by gradient (VQ-VAE paper loss: codebook + 0.25 commitment)
``kmeans``             baseline + codebook initialised by k-means on the first batch
``cosine``             baseline + l2-normalised tokens and codes (cosine-similarity lookup)
``orthogonal``         ``learnable`` + the orthogonal regulariser on the codebook
``rotation``           baseline with the rotation trick in place of the straight-through estimator
``rotation-learnable`` ``learnable`` with the rotation trick (the rotation trick's paper trains
                       its codebook by gradient; the claims table compares both settings)
``residual``           baseline quantizer applied residually in Q = 2 depths (a codebook per depth)
``residual-shared``    ``residual`` with one codebook shared by the depths
``fsq``                finite scalar quantization: no codebook, a grid of prod(levels) ~ K points
``lfq``                lookup-free quantization: the 2^b sign patterns of b = log2 K bits
``gumbel``             ``learnable`` with codes sampled by Gumbel-max and the straight-through
                       Gumbel-softmax estimator, the temperature annealed over training
=====================  ======================================================================

Symbols: N images (B in a batch), P pixels per image, T tokens per image of d features each,
K codes per codebook, Q residual depths, tau the Gumbel temperature.

The model (see :mod:`vqref.nn.vqvae`): encoder MLP P -> hidden -> T*d, the latent cut into T
tokens of d features, each token quantized, decoder MLP T*d -> hidden -> P.  Every gradient is
computed by vqref's hand-written backward passes; there is no autograd.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import numpy as np

from .. import FSQ, LFQ, ResidualVQ, VectorQuantize
from ..nn import VQVAE, Adam
from .evaluation import bits_per_image, depths_of, evaluate, quantization_error, tokens_per_image

__all__ = [
    "CONFIGS",
    "DIGITS",
    "TEST_IMAGES",
    "Config",
    "RunResult",
    "TrainSettings",
    "TrainingDiverged",
    "build_model",
    "build_quantizer",
    "AnnealedQuantizer",
    "fsq_levels",
    "gumbel_temperature",
    "lfq_codebook_size",
    "load_data",
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
# The Gumbel temperature falls geometrically from TAU_START to TAU_END over the run (see
# gumbel_temperature).  It divides the logits, minus the token-to-code distances, so it must be
# small next to their gaps: between a token's nearest and second-nearest code, a median of about
# 0.006 at initialisation and 0.07 after 300 steps in this model's latent space.  DALL-E's range
# 1 -> 1/16 (arXiv 2102.12092), made for logits that are free encoder outputs, samples codes
# almost uniformly here: the codes carry no information and the decoder learns the mean image.
TAU_START, TAU_END = 0.03, 0.003

# arXiv 2309.15505 (section 4.1) recommends these levels for these implicit codebook sizes.
FSQ_PAPER_LEVELS = {
    2**8: (8, 6, 5),
    2**10: (8, 5, 5, 5),
    2**12: (7, 5, 5, 5, 5),
    2**14: (8, 8, 8, 6, 5),
    2**16: (8, 8, 8, 5, 5, 5),
}


def fsq_levels(K: int) -> list[int]:
    """FSQ levels whose grid has about ``K`` points: the paper's levels for the sizes it lists,
    otherwise ``n = round(log6 K)`` channels of ``a = floor(K^(1/n))`` or ``a + 1`` levels (at
    least 3, the paper's grid refuses 2), the mix whose product is closest to K in log scale.

    ``fsq_levels(256) == [8, 6, 5]`` (240 codes), ``fsq_levels(16) == [4, 4]``, ``fsq_levels(64) == [8, 8]``.
    """
    if K in FSQ_PAPER_LEVELS:
        return list(FSQ_PAPER_LEVELS[K])
    n = max(1, round(math.log(max(K, 2)) / math.log(6)))  # about six levels per channel
    a = max(3, int(K ** (1 / n) + 1e-9))
    mixes = [[a + 1] * j + [a] * (n - j) for j in range(n + 1)]  # j channels get one level more
    return min(mixes, key=lambda levels: abs(math.log(math.prod(levels) / K)))


def lfq_codebook_size(K: int) -> int:
    """``K`` rounded to a power of two in log scale (LFQ's codes are the 2^b sign patterns), at least 2."""
    return 2 ** max(1, round(math.log2(max(K, 1))))


def gumbel_temperature(step: int, total: int) -> float:
    """The Gumbel temperature of training step ``step`` (0-based) of ``total``:
    ``tau = TAU_START * (TAU_END / TAU_START) ** (step / total)``, a geometric decay by a factor
    of 10 (0.03 -> 0.003): soft, exploring samples early, nearly the nearest code at the end."""
    return TAU_START * (TAU_END / TAU_START) ** (step / max(total, 1))


class Config(NamedTuple):
    description: str
    build: Callable[..., Any]  # (d, K, Q, seed) -> quantizer with dim d, about K codes, Q depths
    anneal: bool = False  # Gumbel: each training step passes gumbel_temperature(step, total)


def _vq(d: int, K: int, seed: Any, **options: Any):
    return VectorQuantize(d, K, commitment_weight=BETA, seed=seed, **options)


def _learnable(**extra: Any) -> dict:
    return dict(decay=DECAY, ema_update=False, learnable_codebook=True, codebook_weight=1.0, **extra)


def _rvq(d: int, K: int, Q: int, seed: Any, **options: Any):
    return ResidualVQ(
        dim=d, codebook_size=K, num_quantizers=Q, commitment_weight=BETA, decay=DECAY, seed=seed, **options
    )


_GUMBEL = dict(stochastic_sample_codes=True, straight_through=True, sample_codebook_temp=TAU_START)

CONFIGS: dict[str, Config] = {
    "ema": Config("STE + EMA codebook (baseline)", lambda d, K, Q, s: _vq(d, K, s, decay=DECAY)),
    "learnable": Config(
        "codebook learned by gradient (codebook + 0.25 commitment loss)",
        lambda d, K, Q, s: _vq(d, K, s, **_learnable()),
    ),
    "kmeans": Config(
        "baseline + k-means initialised codebook", lambda d, K, Q, s: _vq(d, K, s, decay=DECAY, kmeans_init=True)
    ),
    "cosine": Config(
        "baseline + cosine-similarity codebook", lambda d, K, Q, s: _vq(d, K, s, decay=DECAY, use_cosine_sim=True)
    ),
    "orthogonal": Config(
        f"learnable + orthogonal regulariser (weight {ORTHOGONAL_WEIGHT:g})",
        lambda d, K, Q, s: _vq(d, K, s, **_learnable(orthogonal_reg_weight=ORTHOGONAL_WEIGHT)),
    ),
    "rotation": Config(
        "baseline with the rotation trick instead of the STE",
        lambda d, K, Q, s: _vq(d, K, s, decay=DECAY, rotation_trick=True),
    ),
    "rotation-learnable": Config(
        "learnable with the rotation trick instead of the STE",
        lambda d, K, Q, s: _vq(d, K, s, **_learnable(rotation_trick=True)),
    ),
    "residual": Config("ResidualVQ, Q depths, one codebook per depth", lambda d, K, Q, s: _rvq(d, K, Q, s)),
    "residual-shared": Config(
        "ResidualVQ, Q depths, one shared codebook", lambda d, K, Q, s: _rvq(d, K, Q, s, shared_codebook=True)
    ),
    "fsq": Config(
        "FSQ, levels with prod ~ K (fsq_levels), projections d -> len(levels) -> d",
        lambda d, K, Q, s: FSQ(fsq_levels(K), dim=d, seed=s),
    ),
    "lfq": Config(
        "LFQ, log2 K bits per token (K rounded to a power of 2), entropy loss weight 0.1",
        lambda d, K, Q, s: LFQ(dim=d, codebook_size=lfq_codebook_size(K), seed=s),
    ),
    "gumbel": Config(
        f"learnable + straight-through Gumbel-softmax, tau {TAU_START:g} -> {TAU_END:g} (geometric)",
        lambda d, K, Q, s: _vq(d, K, s, **_learnable(**_GUMBEL)),
        anneal=True,
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
# Training
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSettings:
    """What one training run needs: model size, optimizer, length (``epochs`` or ``steps``), seed."""

    codebook_size: int  # K
    hidden: int  # hidden units of encoder and decoder (channels of the convolutional model)
    tokens: int  # T (the MLP model; the convolutional model has one token per 4x4 pixels)
    token_dim: int  # d
    batch_size: int  # B
    lr: float  # Adam's initial learning rate (cosine decay to lr / 10)
    seed: int  # weights, codebooks, batches (the data split is the caller's)
    epochs: int | None = None
    steps: int | None = None  # instead of epochs
    depths: int = DEPTHS  # Q, for the residual configurations
    evals: int = 25  # held-out evaluations during the run (the points of the training curves)


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
    seed: int = 0
    codebook_size: int = 0  # the quantizer's codes per codebook (FSQ: prod(levels), LFQ: 2^b)
    depths: int = 1  # Q for residual quantizers, else 1
    bits: float = 0.0  # bits_per_image
    quantization_error: float = 0.0  # quantization_error on the held-out images


class TrainingDiverged(RuntimeError):
    """A run whose loss, or whose parameters after an update, stopped being finite.

    Too large a learning rate is the usual cause: Adam's steps overshoot, the activations and
    the loss grow without bound, and eventually an update would write infinities into a weight
    (vqref's parameters refuse them).  ``epoch`` counts from 1; ``loss`` is the last loss seen.
    """

    def __init__(self, name: str, epoch: int, loss: float, reason: str = ""):
        self.name, self.epoch, self.loss, self.reason = name, epoch, loss, reason
        detail = f"; {reason}" if reason else ""
        super().__init__(f"training diverged at epoch {epoch} of config {name} (loss = {loss:.4g}{detail})")

    def __reduce__(self):  # rebuilt from its arguments when it crosses a process boundary
        return (type(self), (self.name, self.epoch, self.loss, self.reason))


def total_steps(s: TrainSettings, train_size: int) -> int:
    """Optimizer steps of one run: ``s.steps``, or ``s.epochs`` full batches per epoch."""
    per_epoch = train_size // s.batch_size  # the last partial batch is dropped
    return s.steps if s.steps is not None else s.epochs * per_epoch


def build_quantizer(name: str, s: TrainSettings) -> Any:
    """Configuration ``name``'s quantizer for these settings, its draws seeded by ``s.seed``."""
    return CONFIGS[name].build(s.token_dim, s.codebook_size, s.depths, np.random.default_rng([s.seed, 1]))


def build_model(name: str, s: TrainSettings, in_dim: int = PIXELS) -> VQVAE:
    """Configuration ``name``'s VQ-VAE before training: ``in_dim -> hidden -> T*d`` and back.

    The same seeds in every configuration: same initial weights, same codebook draw (and
    :func:`train_one` draws the same batches), so the table compares techniques and not luck.
    """
    quantizer = build_quantizer(name, s)
    return VQVAE(quantizer, in_dim=in_dim, hidden=s.hidden, num_tokens=s.tokens, rng=np.random.default_rng([s.seed, 2]))


class AnnealedQuantizer:
    """A Gumbel-sampling :class:`vqref.VectorQuantize` for a model whose forward passes no
    temperature: each call uses ``sample_codebook_temp=self.temperature``, which the training
    loop sets before the step.  (:class:`vqref.nn.VQVAE`'s forward takes the temperature itself;
    :class:`vqref.nn.ConvVQVAE`'s does not.)  Everything else is the quantizer's own.
    """

    def __init__(self, quantizer: Any, temperature: float = TAU_START):
        self.quantizer = quantizer
        self.temperature = float(temperature)

    def __call__(self, tokens: Any):
        return self.quantizer(tokens, sample_codebook_temp=self.temperature)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "quantizer":  # private, or not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.quantizer, name)

    def train(self, mode: bool = True) -> "AnnealedQuantizer":
        self.quantizer.train(mode)
        return self

    def eval(self) -> "AnnealedQuantizer":
        return self.train(False)


def _forward(model: Any, xb: np.ndarray, tau: float | None) -> Any:
    """The model's training forward, with the Gumbel temperature ``tau`` of this step when not None."""
    if tau is None:
        return model.forward(xb)
    if isinstance(model.quantizer, AnnealedQuantizer):
        model.quantizer.temperature = tau  # the convolutional model: through the wrapper
        return model.forward(xb)
    return model.forward(xb, sample_codebook_temp=tau)  # the per-call temperature


def _train_step(model: Any, opt: Adam, xb: np.ndarray, lr: float, tau: float | None, name: str, epoch: int) -> float:
    """One training step on the batch ``xb``: forward (with the Gumbel temperature ``tau`` when
    not None), backward, an Adam update with learning rate ``lr``.  Returns the step's loss.

    Raises :class:`TrainingDiverged` when the loss is not finite, or when vqref refuses the step:
    the data and the options were checked before training, so what it refuses here is a number
    that is no longer finite (an update that would make a weight infinite, a latent grown past
    the float range).
    """
    loss = math.nan
    try:
        _, _, losses = _forward(model, xb, tau)
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
    model: Any = None,
) -> RunResult:
    """Train configuration ``name``, evaluate it on the held-out images; keep ``test[show]``'s reconstructions.

    ``progress(step, loss)``, when given, is called after every step with the mean training loss
    of the last (at most 20) steps; the command line draws its progress bar with it.  ``model``
    (default: :func:`build_model`) is the untrained model, for other data and architectures.
    """
    config = CONFIGS[name]
    model = build_model(name, s, in_dim=train.shape[1]) if model is None else model
    quantizer = model.quantizer
    opt = Adam(model.params, lr=s.lr)
    batches = np.random.default_rng([s.seed, 3])

    per_epoch = train.shape[0] // s.batch_size  # the last partial batch is dropped
    total = total_steps(s, train.shape[0])
    eval_at = set(np.unique(np.linspace(0, total, s.evals + 1).round().astype(int))[1:].tolist())
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
                xb = train[order[b * s.batch_size : (b + 1) * s.batch_size]]  # (B, P)
                # cosine decay of the learning rate from lr to lr/10 over the run
                lr = s.lr * (0.55 + 0.45 * math.cos(math.pi * step / total))
                tau = gumbel_temperature(step, total) if config.anneal else None
                window.append(_train_step(model, opt, xb, lr, tau, name, epoch=step // per_epoch + 1))
                step += 1
                if step in eval_at:
                    mse, ppl, used, _, _ = evaluate(model, test)
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
    mse, ppl, used, usage, recon = evaluate(model, test)
    return RunResult(
        name=name,
        description=config.description,
        test_mse=mse,
        perplexity=ppl,
        codes_used=used,
        train_time=elapsed,
        steps=total,
        curves=curves,
        usage=[c.tolist() for c in usage],
        recon=np.asarray(recon)[show].tolist(),
        seed=s.seed,
        codebook_size=int(quantizer.codebook_size),
        depths=depths_of(quantizer),
        bits=bits_per_image(quantizer, tokens_per_image(model, test)),
        quantization_error=quantization_error(model, test),
    )
