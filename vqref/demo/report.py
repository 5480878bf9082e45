"""The demo's report: the results table (markdown and HTML), ``results.json`` and three figures.

Written into the ``--out`` folder by :func:`write_report`; the numbers come from
:func:`vqref.demo.train.train_one`.  matplotlib is imported inside :func:`figures` (the object
API, no pyplot: no global state, no GUI backend).
"""

from __future__ import annotations

import html
import json
import math
import os
import platform
import shlex
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np

from .train import BETA, DECAY, RunResult

if TYPE_CHECKING:  # the command line's options; only for the annotations
    from .cli import Settings

__all__ = ["HEADER", "REPORT_FILES", "figures", "format_table", "table_rows", "write_report"]

HEADER = ("config", "held-out MSE", "perplexity", "codes used", "train time (s)")

# Everything write_report puts into the report folder (the command line checks, before training,
# that it can write them).
FIGURES = {"reconstructions": "reconstructions.png", "curves": "training_curves.png", "usage": "codebook_usage.png"}
REPORT_FILES = ("report.md", "report.html", "results.json", *FIGURES.values())


def table_rows(results: list[RunResult], K: int) -> list[tuple[str, ...]]:
    """One row of text cells per run, in the order of :data:`HEADER`."""
    return [
        (r.name, f"{r.test_mse:.4f}", f"{r.perplexity:.1f}", f"{100 * r.codes_used:.0f}% of {K}", f"{r.train_time:.1f}")
        for r in results
    ]


def format_table(results: list[RunResult], K: int) -> str:
    """The results as a GitHub-flavoured markdown table (also readable as plain text)."""
    rows = [HEADER, *table_rows(results, K)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    fmt = lambda r: (
        "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
    )  # noqa: E731
    sep = "|" + "|".join("-" * (w + 1) + ("-" if i == 0 else ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt(rows[0]), sep, *(fmt(r) for r in rows[1:])])


def figures(results: list[RunResult], shown: np.ndarray, out: str) -> dict[str, str]:
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
    files["reconstructions"] = FIGURES["reconstructions"]
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
    files["curves"] = FIGURES["curves"]
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
    files["usage"] = FIGURES["usage"]
    fig.savefig(os.path.join(out, files["usage"]))
    return files


def write_report(
    results: list[RunResult], s: Settings, train: np.ndarray, test: np.ndarray, shown: np.ndarray, total_time: float
) -> dict[str, str]:
    """Write ``report.md``, ``report.html``, ``results.json`` and the figures into ``s.out``.

    ``shown`` holds the held-out images whose reconstructions the runs kept ``(n, 64)``;
    ``total_time`` is the seconds spent on data, training and evaluation.  Returns the paths
    written: ``"report"`` and one per figure.
    """
    os.makedirs(s.out, exist_ok=True)
    files = figures(results, shown, s.out)
    K = s.codebook_size
    mean_mse = float(np.mean((test - train.mean(axis=0)) ** 2))
    length = f"{s.steps} steps" if s.steps is not None else f"{s.epochs} epochs"
    command = " ".join(["vqref demo", *(shlex.quote(a) for a in s.argv)])
    setup = (
        f"{train.shape[0]} training / {test.shape[0]} held-out digits (8x8, scikit-learn), seed {s.seed}; "
        f"encoder MLP 64-{s.hidden}-{s.tokens * s.token_dim}, {s.tokens} tokens of dim {s.token_dim}, "
        f"K = {K} codes per codebook, decoder MLP {s.tokens * s.token_dim}-{s.hidden}-64 (ReLU); "
        f"Adam lr {s.lr:g} (cosine decay to {s.lr / 10:g}), batch {s.batch_size}, {length} ({results[0].steps if results else 0} steps) per configuration; "
        f"EMA decay {DECAY}, commitment weight {BETA}."
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
    with open(os.path.join(s.out, "report.md"), "w", encoding="utf-8", errors="backslashreplace") as f:
        f.write("\n".join(md))

    rows = table_rows(results, K)
    th = "".join(f"<th>{html.escape(h)}</th>" for h in HEADER)
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
<h2>Reconstructions</h2><img src="{files["reconstructions"]}" alt="reconstructions">
<h2>Training curves</h2><img src="{files["curves"]}" alt="training curves">
<h2>Codebook usage</h2><img src="{files["usage"]}" alt="codebook usage">
</body></html>
"""
    with open(os.path.join(s.out, "report.html"), "w", encoding="utf-8", errors="backslashreplace") as f:
        f.write(page)

    with open(os.path.join(s.out, "results.json"), "w", encoding="utf-8") as f:
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
