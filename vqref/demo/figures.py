"""The demo report's figures: reconstructions, training curves, codebook usage, rate and distortion.

One set per dataset, as PNGs in the report folder; matplotlib's object API (no pyplot: no global
state, no GUI backend), imported when a figure is drawn.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np

from .runs import Summary

if TYPE_CHECKING:
    from .datasets import Dataset

__all__ = ["figure_files", "figures"]


def figure_files(dataset: str) -> dict[str, str]:
    """The figures' file names for ``dataset`` (the digits' without a prefix)."""
    prefix = "" if dataset == "digits" else f"{dataset}_"
    names = {
        "recon": "reconstructions",
        "curves": "training_curves",
        "usage": "codebook_usage",
        "rate": "rate_distortion",
    }
    return {k: f"{prefix}{v}.png" for k, v in names.items()}


def _colour(i: int) -> tuple:
    """The i-th of 20 distinct colours: tab20's dark shades first, then its light ones."""
    from matplotlib import colormaps

    return colormaps["tab20"].colors[(2 * i) % 20 + (2 * i) // 20 % 2]


def _tile(images: list[np.ndarray], labels: list[str], path: str) -> None:
    """A grid of images (a row per entry of ``images``, each ``(n, P)`` digits or ``(n, S, S, 3)``)
    drawn as one picture, with a one-pixel white gap between tiles."""
    from matplotlib.figure import Figure

    first = np.asarray(images[0])
    side = int(round(math.sqrt(first[0].size))) if first.ndim == 2 else first.shape[1]
    colour = first.ndim == 4
    rows, cols = len(images), first.shape[0]
    grid = np.ones(((rows * (side + 1) + 1), cols * (side + 1) + 1, 3 if colour else 1))
    grid = grid if colour else 0 * grid  # 0 = white with the reversed grey map
    for i, imgs in enumerate(images):
        for j, img in enumerate(np.asarray(imgs)):
            tile = np.clip(img.reshape(side, side, -1), 0, 1)
            grid[1 + (side + 1) * i : (side + 1) * (i + 1), 1 + (side + 1) * j : (side + 1) * (j + 1)] = tile
    scale = 0.5 * side / 8
    width, height = scale * cols + 1.6, scale * rows + 0.2
    fig = Figure(figsize=(width, height), dpi=90)
    ax = fig.add_axes((1.6 / width, 0.02, 1 - 1.65 / width, 0.96))
    ax.imshow(
        grid if colour else grid[..., 0], cmap=None if colour else "gray_r", vmin=0, vmax=1, interpolation="nearest"
    )
    ax.set_xticks([])
    ax.set_yticks((side + 2) / 2 + (side + 1) * np.arange(rows), labels, fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.savefig(path)


def _curves(table: list[Summary], path: str) -> None:
    """Training loss, held-out MSE and perplexity against the step, the mean over seeds."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.4), dpi=80)
    axes = fig.subplots(1, 3)
    for i, s in enumerate(table):
        mean = lambda key: np.mean([r.curves[key] for r in s.results], axis=0)  # noqa: E731
        c, style = s.first.curves, dict(label=s.label, color=_colour(i))
        axes[0].plot(c["train_loss_step"], mean("train_loss"), **style)
        axes[1].plot(c["step"], mean("test_mse"), **style)
        axes[2].plot(c["step"], mean("perplexity"), **style)
    for ax, title in zip(
        axes, ("training loss (recon + quantizer)", "held-out reconstruction MSE", "held-out perplexity")
    ):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[1].tick_params(which="minor", labelsize=6)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=7, frameon=False)
    fig.subplots_adjust(left=0.065, right=0.86, bottom=0.15, top=0.9, wspace=0.3)
    fig.savefig(path)


def _usage(table: list[Summary], path: str) -> None:
    """Histograms of the held-out code counts, codes sorted by use (first seed)."""
    from matplotlib.figure import Figure

    n = len(table)
    ncol = min(4, n)
    nrow = math.ceil(n / ncol)
    fig = Figure(figsize=(2.6 * ncol, 1.9 * nrow), dpi=80)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, s in zip(axes.flat, table):
        r = s.first
        for q, counts in enumerate(r.usage):
            srt = np.sort(np.asarray(counts))[::-1]
            label = f"depth {q + 1}" if len(r.usage) > 1 else None
            ax.stairs(srt, np.arange(srt.size + 1), fill=True, alpha=0.6 if len(r.usage) > 1 else 1.0, label=label)
        ax.set_title(f"{s.label}: {100 * r.codes_used:.0f}% of {r.codebook_size} used", fontsize=8)
        ax.tick_params(labelsize=6)
        if len(r.usage) > 1:
            ax.legend(fontsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("code (sorted by use)", fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("held-out tokens", fontsize=7)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.12 if nrow > 1 else 0.2, top=0.92, hspace=0.5, wspace=0.2)
    fig.savefig(path)


def _series(s: Summary) -> str:
    """The line a point belongs to: one per configuration; residual stacks by their codebook size."""
    return f"{s.run.config} K={s.first.codebook_size}" if s.run.config.startswith("residual") else s.run.config


def _rate(summaries: list[Summary], path: str) -> None:
    """Held-out MSE (mean ± std over seeds) against bits per image; codebook sizes and depths as points."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.5, 4.6), dpi=85)
    ax = fig.add_axes((0.1, 0.11, 0.6, 0.8))
    groups: dict[str, list[Summary]] = {}
    for s in summaries:
        groups.setdefault(_series(s), []).append(s)
    markers = "osD^vP*Xdp<>h"
    for i, (name, group) in enumerate(groups.items()):
        group = sorted(group, key=lambda s: s.first.bits)
        x = [s.first.bits for s in group]
        y = [s.mean("test_mse") for s in group]
        err = [s.std("test_mse") for s in group]
        colour = _colour(i)
        ax.errorbar(x, y, yerr=err, marker=markers[i % len(markers)], ms=4, capsize=2, lw=1, color=colour, label=name)
        for s, xi, yi in zip(group, x, y):
            if len(group) > 1 or not s.run.table:
                depth = f"x{s.first.depths}" if s.first.depths > 1 else ""
                ax.annotate(f"{s.first.codebook_size}{depth}", (xi, yi), textcoords="offset points", xytext=(3, 3),
                            fontsize=6, color=colour)  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("bits per image (tokens x sum over depths of log2 K)", fontsize=8)
    ax.set_ylabel("held-out MSE", fontsize=8)
    ax.set_title("rate and distortion (labels: codes per codebook x depths)", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path)


def figures(data: Dataset, summaries: list[Summary], out: str) -> dict[str, str]:
    """Draw the dataset's four figures into ``out``; returns key -> file name."""
    files = figure_files(data.name)
    table = [s for s in summaries if s.run.table]
    shown = data.test[data.show]
    _tile([shown] + [np.asarray(s.first.recon) for s in table], ["held-out"] + [s.label for s in table],
          os.path.join(out, files["recon"]))  # fmt: skip
    _curves(table, os.path.join(out, files["curves"]))
    _usage(table, os.path.join(out, files["usage"]))
    _rate(summaries, os.path.join(out, files["rate"]))
    return files
