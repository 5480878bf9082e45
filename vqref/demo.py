"""``vqref demo``: the main job.  Train small VQ-VAEs on real images, compare the techniques.

What it does: loads scikit-learn's bundled handwritten digits (1797 images of 8x8 pixels, no
download), holds out a fifth of them, and trains one :class:`vqref.nn.vqvae.VQVAE` per
configuration with Adam, every gradient computed by vqref's hand-written backward passes.
Every configuration starts from the same encoder/decoder weights, sees the same batches in the
same order, and differs from the baseline in one technique only:

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

It writes ``report.md`` and ``report.html`` (a table and three figures), ``results.json`` (all
numbers and curves) and the figures as PNGs into ``--out``, and prints the table.  The numbers
depend only on the options (seed included) and, through rounding, on the numpy build: two
runs on one machine give the same table except the times.

The default model (see :mod:`vqref.nn.vqvae`): encoder MLP 64 -> 256 -> 32, the 32 latent features
cut into T = 4 tokens of d = 8, each token quantized with K = 256 codes, decoder MLP 32 -> 256 -> 64;
400 epochs of 22 batches of 64 images (8800 Adam steps) per configuration.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

__all__ = ["CONFIGS", "main"]

# --------------------------------------------------------------------------------------------
# The configurations
# --------------------------------------------------------------------------------------------

# Shared by every configuration: vector-quantize-pytorch's EMA decay and the VQ-VAE paper's
# commitment weight beta = 0.25.
_DECAY = 0.8
_BETA = 0.25
_ORTHOGONAL_WEIGHT = 1.0
_DEPTHS = 2


def _vq(d: int, K: int, seed: Any, **options: Any):
    from . import VectorQuantize

    return VectorQuantize(d, K, commitment_weight=_BETA, seed=seed, **options)


def _learnable(**extra: Any) -> dict:
    return dict(decay=_DECAY, ema_update=False, learnable_codebook=True, codebook_weight=1.0, **extra)


def _rvq(d: int, K: int, seed: Any, **options: Any):
    from . import ResidualVQ

    return ResidualVQ(dim=d, codebook_size=K, num_quantizers=_DEPTHS, commitment_weight=_BETA, decay=_DECAY, seed=seed, **options)


# name -> (one-line description, factory(d, K, seed) -> quantizer)
CONFIGS: dict[str, tuple[str, Callable[..., Any]]] = {
    "ema": ("STE + EMA codebook (baseline)", lambda d, K, s: _vq(d, K, s, decay=_DECAY)),
    "learnable": ("codebook learned by gradient (codebook + 0.25 commitment loss)", lambda d, K, s: _vq(d, K, s, **_learnable())),
    "kmeans": ("baseline + k-means initialised codebook", lambda d, K, s: _vq(d, K, s, decay=_DECAY, kmeans_init=True)),
    "cosine": ("baseline + cosine-similarity codebook", lambda d, K, s: _vq(d, K, s, decay=_DECAY, use_cosine_sim=True)),
    "orthogonal": (
        f"learnable + orthogonal regulariser (weight {_ORTHOGONAL_WEIGHT:g})",
        lambda d, K, s: _vq(d, K, s, **_learnable(orthogonal_reg_weight=_ORTHOGONAL_WEIGHT)),
    ),
    "rotation": ("baseline with the rotation trick instead of the STE", lambda d, K, s: _vq(d, K, s, decay=_DECAY, rotation_trick=True)),
    "residual": (f"ResidualVQ, {_DEPTHS} depths, one codebook per depth", lambda d, K, s: _rvq(d, K, s)),
    "residual-shared": (f"ResidualVQ, {_DEPTHS} depths, one shared codebook", lambda d, K, s: _rvq(d, K, s, shared_codebook=True)),
}


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------

# The full run (about 2-3 minutes on 2 CPU cores) and the --quick one (a few seconds, for tests).
_DEFAULTS = dict(epochs=400, batch_size=64, codebook_size=256, train_size=None, hidden=256, tokens=4, token_dim=8)
_QUICK = dict(epochs=20, batch_size=32, codebook_size=32, train_size=256, hidden=32, tokens=4, token_dim=4)
_TEST_IMAGES = 360  # held out: a fifth of the 1797 digits


@dataclass
class Settings:
    configs: list[str]
    epochs: int | None
    steps: int | None
    batch_size: int
    codebook_size: int
    train_size: int
    hidden: int
    tokens: int
    token_dim: int
    lr: float
    seed: int
    out: str
    quick: bool
    quiet: bool
    argv: list[str] = field(default_factory=list)  # the options as given, for the report


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return v


def _config_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown configuration(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"choose from {', '.join(CONFIGS)} (comma-separated) or 'all'"
        )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"configuration listed twice in {text!r}")
    return names


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vqref demo",
        description=(
            "Train a small VQ-VAE (hand-written gradients, Adam) on scikit-learn's 8x8 digits once per "
            "quantizer configuration, and write a report (table + figures) comparing held-out "
            "reconstruction error, perplexity and codebook usage."
        ),
        epilog="configurations: " + "; ".join(f"{k}: {v[0]}" for k, v in CONFIGS.items()),
    )
    p.add_argument("--configs", type=_config_list, default=list(CONFIGS), metavar="A,B,...",
                   help="comma-separated configurations to train (default: all eight)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=_positive_int, default=None,
                        help=f"passes over the training images per configuration (default {_DEFAULTS['epochs']})")
    length.add_argument("--steps", type=_positive_int, default=None,
                        help="optimizer steps per configuration (instead of --epochs)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help=f"images per step (default {_DEFAULTS['batch_size']})")
    p.add_argument("--codebook-size", type=_positive_int, default=None, help=f"K, codes per codebook (default {_DEFAULTS['codebook_size']})")
    p.add_argument("--train-size", type=_positive_int, default=None,
                   help=f"training images, at most {1797 - _TEST_IMAGES} (default: all of them); {_TEST_IMAGES} more are held out")
    p.add_argument("--hidden", type=_positive_int, default=None, help=f"hidden units of encoder and decoder (default {_DEFAULTS['hidden']})")
    p.add_argument("--tokens", type=_positive_int, default=None, help=f"T, tokens per image (default {_DEFAULTS['tokens']})")
    p.add_argument("--token-dim", type=_positive_int, default=None, help=f"d, features per token (default {_DEFAULTS['token_dim']})")
    p.add_argument("--lr", type=_positive_float, default=2e-3, help="Adam learning rate (default 2e-3)")
    p.add_argument("--seed", type=int, default=0, help="random seed: data split, weights, batches, codebooks (default 0)")
    p.add_argument("--out", default=os.path.join("reports", "demo"), help="report folder (default reports/demo)")
    p.add_argument("--quick", action="store_true", help="a tiny run of a few seconds (smaller data, model and codebook)")
    p.add_argument("--quiet", action="store_true", help="print only the final table")
    return p


def parse_args(argv: list[str] | None) -> Settings:
    """Parse and validate the options; argparse exits with status 2 and a message on errors."""
    parser = _parser()
    a = parser.parse_args(argv)
    base = _QUICK if a.quick else _DEFAULTS
    pick = lambda name: getattr(a, name) if getattr(a, name) is not None else base[name]  # noqa: E731
    available = 1797 - _TEST_IMAGES
    train_size = pick("train_size") or available
    if train_size > available:
        parser.error(f"--train-size {train_size} is larger than the {available} training images available")
    batch_size = pick("batch_size")
    if batch_size > train_size:
        parser.error(f"--batch-size {batch_size} is larger than --train-size {train_size}")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        parser.error(f"--out {a.out!r} exists and is not a folder")
    if pick("tokens") * pick("token_dim") > 4096:
        parser.error("--tokens x --token-dim must be at most 4096")
    if pick("token_dim") < 2:
        parser.error("--token-dim must be at least 2 (the rotation trick has no rotations in one dimension)")
    epochs = None if a.steps is not None else pick("epochs")
    return Settings(
        configs=a.configs, epochs=epochs, steps=a.steps, batch_size=batch_size,
        codebook_size=pick("codebook_size"), train_size=train_size, hidden=pick("hidden"),
        tokens=pick("tokens"), token_dim=pick("token_dim"), lr=a.lr, seed=a.seed, out=a.out,
        quick=a.quick, quiet=a.quiet, argv=list(sys.argv[1:] if argv is None else argv),
    )


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------


class ProgressBar:
    """A one-line text progress bar on stderr, redrawn in place with a carriage return.

    Drawn only when stderr is a terminal (a log file or a pipe would fill with redraws) and not
    ``quiet``; :meth:`done` then prints the run's summary line, which is also printed (without
    the bar) when stderr is not a terminal.  ``quiet`` silences both.
    """

    def __init__(self, label: str, total: int, *, quiet: bool = False, stream: Any = None, width: int = 24):
        self.label, self.total, self.width = label, max(int(total), 1), width
        self.stream = sys.stderr if stream is None else stream
        self.quiet = quiet
        self.live = not quiet and getattr(self.stream, "isatty", lambda: False)()
        self.t0 = time.perf_counter()
        self._last = 0.0

    def update(self, n: int, info: str = "") -> None:
        if not self.live:
            return
        now = time.perf_counter()
        if n < self.total and now - self._last < 0.1:  # at most ten redraws a second
            return
        self._last = now
        frac = min(n / self.total, 1.0)
        filled = int(round(frac * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {100 * frac:3.0f}% {n}/{self.total} {info} {now - self.t0:5.1f}s\x1b[K")
        self.stream.flush()

    def done(self, summary: str) -> None:
        if self.quiet:
            return
        prefix = "\r\x1b[K" if self.live else ""
        self.stream.write(f"{prefix}{self.label} {summary}\n")
        self.stream.flush()


# --------------------------------------------------------------------------------------------
# Data, training and evaluation
# --------------------------------------------------------------------------------------------


def load_data(seed: int, train_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits scaled to [0, 1]: ``train (train_size, 64)``, ``test (360, 64)`` float32
    and the held-out labels ``(360,)``.

    The split is a seeded permutation; the held-out images are the same for every train size.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # (1797, 64), pixel intensities 0..16
    perm = np.random.default_rng([seed, 0]).permutation(x.shape[0])
    test = x[perm[:_TEST_IMAGES]]
    train = x[perm[_TEST_IMAGES : _TEST_IMAGES + train_size]]
    return train, test, digits.target[perm[:_TEST_IMAGES]]


def _showcase(labels: np.ndarray, n: int = 10) -> np.ndarray:
    """Positions of the first held-out image of each digit 0..9 (then the next ones), ``n`` in all."""
    first = [int(np.flatnonzero(labels == c)[0]) for c in range(10) if np.any(labels == c)]
    rest = [i for i in range(labels.shape[0]) if i not in first]
    return np.asarray((first + rest)[:n])


def code_usage(indices: np.ndarray, K: int, shared: bool) -> list[np.ndarray]:
    """Counts per codebook: one ``(K,)`` array per depth, or one pooled array when shared.

    ``indices`` is ``(N, T)`` for one quantizer, ``(N, T, Q)`` for residual VQ.
    """
    idx = indices if indices.ndim == 3 else indices[..., None]
    if shared:
        return [np.bincount(idx.reshape(-1), minlength=K)]
    return [np.bincount(idx[..., q].reshape(-1), minlength=K) for q in range(idx.shape[-1])]


def perplexity(counts: np.ndarray) -> float:
    """``exp(H(p))`` of the code frequencies: the effective number of codes in use (1..K)."""
    p = counts / max(counts.sum(), 1)
    return float(np.exp(-np.sum(p * np.log(p + 1e-10))))


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


def _evaluate(model: Any, test: np.ndarray, K: int, shared: bool) -> tuple[float, float, float, list, np.ndarray]:
    recon, indices, losses = model.reconstruct(test)
    usage = code_usage(np.asarray(indices), K, shared)
    ppl = float(np.mean([perplexity(c) for c in usage]))
    used = float(np.mean([(c > 0).mean() for c in usage]))
    return float(losses.reconstruction), ppl, used, usage, recon


def train_one(name: str, s: Settings, train: np.ndarray, test: np.ndarray, label: str, show: np.ndarray) -> RunResult:
    """Train configuration ``name``, evaluate it on the held-out images; keep ``test[show]``'s reconstructions."""
    from .nn import Adam
    from .nn.vqvae import VQVAE

    description, factory = CONFIGS[name]
    K = s.codebook_size
    # The same seeds in every configuration: same initial weights, same batches, same codebook
    # draw, so the table compares techniques and not luck.
    quantizer = factory(s.token_dim, K, np.random.default_rng([s.seed, 1]))
    shared = bool(getattr(quantizer, "shared_codebook", False))
    model = VQVAE(quantizer, in_dim=train.shape[1], hidden=s.hidden, num_tokens=s.tokens, rng=np.random.default_rng([s.seed, 2]))
    opt = Adam(model.params, lr=s.lr)
    batches = np.random.default_rng([s.seed, 3])

    per_epoch = train.shape[0] // s.batch_size  # the last partial batch is dropped
    total = s.steps if s.steps is not None else s.epochs * per_epoch
    n_evals = 25
    eval_at = set(np.unique(np.linspace(0, total, n_evals + 1).round().astype(int))[1:].tolist())
    curves: dict[str, list] = {"step": [], "test_mse": [], "perplexity": [], "codes_used": [], "train_loss_step": [], "train_loss": []}
    bar = ProgressBar(label, total, quiet=s.quiet)
    t0 = time.perf_counter()
    step, window = 0, []
    while step < total:
        order = batches.permutation(train.shape[0])
        for b in range(per_epoch):
            xb = train[order[b * s.batch_size : (b + 1) * s.batch_size]]  # (B, 64)
            _, _, losses = model.forward(xb)
            model.backward(1.0)
            # cosine decay of the learning rate from lr to lr/10 over the run
            opt.lr = s.lr * (0.55 + 0.45 * math.cos(math.pi * step / total))
            opt.step(model.grads)
            step += 1
            window.append(float(losses.total))
            if step in eval_at:
                mse, ppl, used, _, _ = _evaluate(model, test, K, shared)
                curves["step"].append(step)
                curves["test_mse"].append(mse)
                curves["perplexity"].append(ppl)
                curves["codes_used"].append(used)
                curves["train_loss_step"].append(step)
                curves["train_loss"].append(float(np.mean(window)))  # mean since the last point
                window = []
            bar.update(step, f"loss {np.mean(window[-20:]) if window else curves['train_loss'][-1]:.4f}")
            if step >= total:
                break
    elapsed = time.perf_counter() - t0
    mse, ppl, used, usage, recon = _evaluate(model, test, K, shared)
    bar.done(f"held-out MSE {mse:.4f}  perplexity {ppl:6.1f}  codes used {100 * used:5.1f}%  {elapsed:5.1f} s")
    return RunResult(
        name=name, description=description, test_mse=mse, perplexity=ppl, codes_used=used, train_time=elapsed,
        steps=total, curves=curves, usage=[c.tolist() for c in usage], recon=np.asarray(recon)[show].tolist(),
    )


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

_HEADER = ("config", "held-out MSE", "perplexity", "codes used", "train time (s)")


def table_rows(results: list[RunResult], K: int) -> list[tuple[str, ...]]:
    return [
        (r.name, f"{r.test_mse:.4f}", f"{r.perplexity:.1f}", f"{100 * r.codes_used:.0f}% of {K}", f"{r.train_time:.1f}")
        for r in results
    ]


def format_table(results: list[RunResult], K: int) -> str:
    """The results as a GitHub-flavoured markdown table (also readable as plain text)."""
    rows = [_HEADER, *table_rows(results, K)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEADER))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 1) + ("-" if i == 0 else ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt(rows[0]), sep, *(fmt(r) for r in rows[1:])])


def _figures(results: list[RunResult], shown: np.ndarray, out: str) -> dict[str, str]:
    """Reconstructions, training curves and usage histograms as PNGs; returns name -> file."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend (Agg)

    files = {}
    n = len(results)
    cols = shown.shape[0]

    # One image for the whole grid (a few hundred small axes would take seconds to draw):
    # the 8x8 digits tiled with a one-pixel white gap, a row per configuration.
    labels = ["held-out"] + [r.name for r in results]
    rows = [shown] + [np.asarray(r.recon) for r in results]
    grid = np.zeros(((n + 1) * 9 + 1, cols * 9 + 1))  # 0 = white with the reversed grey map
    for i, imgs in enumerate(rows):
        for j in range(cols):
            grid[1 + 9 * i : 9 + 9 * i, 1 + 9 * j : 9 + 9 * j] = np.clip(imgs[j].reshape(8, 8), 0, 1)
    fig = Figure(figsize=(0.5 * cols + 1.4, 0.5 * (n + 1) + 0.2), dpi=90)
    ax = fig.add_axes((1.4 / (0.5 * cols + 1.4), 0.02, 1 - 1.45 / (0.5 * cols + 1.4), 0.96))
    ax.imshow(grid, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks(5 + 9 * np.arange(n + 1), labels, fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    files["reconstructions"] = "reconstructions.png"
    fig.savefig(os.path.join(out, files["reconstructions"]))

    fig = Figure(figsize=(12, 3.2), dpi=80)
    axes = fig.subplots(1, 3)
    for r in results:
        c = r.curves
        axes[0].plot(c["train_loss_step"], c["train_loss"], label=r.name)
        axes[1].plot(c["step"], c["test_mse"], label=r.name)
        axes[2].plot(c["step"], c["perplexity"], label=r.name)
    for ax, title in zip(axes, ("training loss (recon + VQ)", "held-out reconstruction MSE", "held-out perplexity")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[:2]:
        ax.set_yscale("log")
        ax.tick_params(which="minor", labelsize=6)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=7, frameon=False)
    fig.subplots_adjust(left=0.065, right=0.885, bottom=0.15, top=0.9, wspace=0.3)
    files["curves"] = "training_curves.png"
    fig.savefig(os.path.join(out, files["curves"]))

    ncol = min(4, n)
    nrow = math.ceil(n / ncol)
    fig = Figure(figsize=(2.6 * ncol, 1.9 * nrow), dpi=80)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, r in zip(axes.flat, results):
        for q, counts in enumerate(r.usage):
            srt = np.sort(np.asarray(counts))[::-1]  # a histogram of counts, codes sorted by use
            label = f"depth {q + 1}" if len(r.usage) > 1 else None
            ax.stairs(srt, np.arange(srt.size + 1), fill=True, alpha=0.6 if len(r.usage) > 1 else 1.0, label=label)
        ax.set_title(f"{r.name}: {100 * r.codes_used:.0f}% used", fontsize=8)
        ax.tick_params(labelsize=6)
        if len(r.usage) > 1:
            ax.legend(fontsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("code (sorted by use)", fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("held-out tokens", fontsize=7)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.12 if nrow > 1 else 0.2, top=0.92, hspace=0.45, wspace=0.2)
    files["usage"] = "codebook_usage.png"
    fig.savefig(os.path.join(out, files["usage"]))
    return files


def _write_report(results: list[RunResult], s: Settings, train: np.ndarray, test: np.ndarray, shown: np.ndarray, total_time: float) -> dict[str, str]:
    os.makedirs(s.out, exist_ok=True)
    files = _figures(results, shown, s.out)
    K = s.codebook_size
    mean_mse = float(np.mean((test - train.mean(axis=0)) ** 2))
    length = f"{s.steps} steps" if s.steps is not None else f"{s.epochs} epochs"
    command = " ".join(["vqref demo", *(shlex.quote(a) for a in s.argv)])
    setup = (
        f"{train.shape[0]} training / {test.shape[0]} held-out digits (8x8, scikit-learn), seed {s.seed}; "
        f"encoder MLP 64-{s.hidden}-{s.tokens * s.token_dim}, {s.tokens} tokens of dim {s.token_dim}, "
        f"K = {K} codes per codebook, decoder MLP {s.tokens * s.token_dim}-{s.hidden}-64 (ReLU); "
        f"Adam lr {s.lr:g} (cosine decay to {s.lr / 10:g}), batch {s.batch_size}, {length} ({results[0].steps if results else 0} steps) per configuration; "
        f"EMA decay {_DECAY}, commitment weight {_BETA}."
    )
    notes = [
        f"Held-out MSE is the mean squared pixel error (pixels in [0, 1]) on the {test.shape[0]} held-out images; "
        f"predicting the mean training image gives {mean_mse:.4f}.",
        f"Perplexity is exp(entropy) of the code frequencies over the {test.shape[0] * s.tokens} held-out tokens "
        "(the effective number of codes in use); codes used is the fraction of the K codes chosen at least once. "
        "Residual VQ: the mean over its codebooks (per depth), or over the pooled depths for the shared codebook.",
        "Every configuration starts from the same weights and sees the same batches; only the quantizer differs.",
    ]
    table = format_table(results, K)
    md = [
        "# vqref demo: VQ-VAEs on scikit-learn's digits",
        "",
        f"`{command}` — training and evaluation took {total_time:.0f} s on {os.cpu_count()} CPU cores "
        f"({platform.python_implementation()} {platform.python_version()}, numpy {np.__version__}).",
        "",
        setup,
        "",
        table,
        "",
        *[f"- {n}" for n in notes],
        "",
        "| config | what it changes |",
        "|---|---|",
        *[f"| {r.name} | {r.description} |" for r in results],
        "",
        "## Reconstructions (top row: held-out images)",
        "",
        f"![reconstructions]({files['reconstructions']})",
        "",
        "## Training curves",
        "",
        f"![training curves]({files['curves']})",
        "",
        "## Codebook usage on the held-out tokens",
        "",
        f"![codebook usage]({files['usage']})",
        "",
    ]
    with open(os.path.join(s.out, "report.md"), "w") as f:
        f.write("\n".join(md))

    rows = table_rows(results, K)
    th = "".join(f"<th>{html.escape(h)}</th>" for h in _HEADER)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>vqref demo</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.2em .6em;text-align:right}}td:first-child{{text-align:left}}</style></head>
<body><h1>vqref demo: VQ-VAEs on scikit-learn's digits</h1>
<p><code>{html.escape(command)}</code> &mdash; training and evaluation took {total_time:.0f} s.</p>
<p>{html.escape(setup)}</p>
<table><tr>{th}</tr>{trs}</table>
<ul>{"".join(f"<li>{html.escape(n)}</li>" for n in notes)}</ul>
<h2>Reconstructions</h2><img src="{files['reconstructions']}" alt="reconstructions">
<h2>Training curves</h2><img src="{files['curves']}" alt="training curves">
<h2>Codebook usage</h2><img src="{files['usage']}" alt="codebook usage">
</body></html>
"""
    with open(os.path.join(s.out, "report.html"), "w") as f:
        f.write(page)

    with open(os.path.join(s.out, "results.json"), "w") as f:
        json.dump(
            {
                "settings": asdict(s),
                "total_time": total_time,
                "mean_image_mse": mean_mse,
                "results": [{k: v for k, v in asdict(r).items() if k != "recon"} for r in results],
            },
            f,
            indent=1,
        )
    return {"report": os.path.join(s.out, "report.md"), **{k: os.path.join(s.out, v) for k, v in files.items()}}


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _single_threaded_blas():
    """Limit BLAS to one thread for the run, when threadpoolctl (a scikit-learn dependency) exists.

    The matrices here are tiny (at most batch x 256), so threads cannot pay off, and when the
    cores are busy OpenBLAS's spinning worker threads slowed a training step about 50-fold in
    our measurements.  One thread also makes the sums, hence the numbers, independent of the
    machine's core count.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings it
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns 0, or exits with status 2 (argparse) on bad options."""
    s = parse_args(argv)
    missing = []
    for module in ("sklearn", "matplotlib"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        print(
            f"vqref demo: needs {' and '.join(missing)} (pip install scikit-learn matplotlib, or `make demo`)",
            file=sys.stderr,
        )
        return 1
    try:
        os.makedirs(s.out, exist_ok=True)
    except OSError as e:
        print(f"vqref demo: cannot create the report folder {s.out!r}: {e}", file=sys.stderr)
        return 1

    t0 = time.perf_counter()
    train, test, labels = load_data(s.seed, s.train_size)
    show = _showcase(labels)
    if not s.quiet:
        length = f"{s.steps} steps" if s.steps is not None else f"{s.epochs} epochs"
        print(
            f"vqref demo: {len(s.configs)} configuration(s), {train.shape[0]} training / {test.shape[0]} held-out digits, "
            f"K = {s.codebook_size}, {length}, seed {s.seed}",
            file=sys.stderr,
        )
    results = []
    width = max(len(n) for n in s.configs)
    with _single_threaded_blas():
        for i, name in enumerate(s.configs):
            label = f"[{i + 1}/{len(s.configs)}] {name:<{width}}"
            results.append(train_one(name, s, train, test, label, show))
    total = time.perf_counter() - t0  # data, training and evaluation
    paths = _write_report(results, s, train, test, test[show], total)
    print(format_table(results, s.codebook_size))
    print(f"\nreport: {paths['report']} (figures in {s.out}); {time.perf_counter() - t0:.0f} s in total")
    return 0
