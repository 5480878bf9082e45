"""The demo's report: tables (markdown and HTML), ``results.json`` and the figures.

Written into the ``--out`` folder by :func:`write_report`, one section per dataset: the results
table (mean ± standard deviation over the seeds), the configurations that spend the same bits
per image, the rate-distortion plot, the claims table (:mod:`vqref.demo.claims`) and three
figures.  matplotlib is imported inside :mod:`vqref.demo.figures` (the object API, no pyplot).
"""

from __future__ import annotations

import html
import json
import os
import platform
import shlex
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np

from .claims import ClaimRow, evaluate_claims
from .figures import figure_files, figures
from .runs import Summary
from .train import BETA, DECAY, TAU_END, TAU_START

if TYPE_CHECKING:  # the command line's options; only for the annotations
    from .cli import Settings
    from .datasets import Dataset

__all__ = ["HEADER", "CLAIMS_HEADER", "report_files", "format_table", "table_rows", "claim_rows", "write_report"]

HEADER = ("config", "held-out MSE", "perplexity", "codes used", "bits / image", "quant. error", "train time (s)")
CLAIMS_HEADER = ("technique", "paper's claim", "measured here (mean ± std over seeds)", "reproduces?", "evidence")


def report_files(datasets: list[str]) -> tuple[str, ...]:
    """Everything :func:`write_report` puts into the report folder (checked writable before training)."""
    return ("report.md", "report.html", "results.json", *(f for d in datasets for f in figure_files(d).values()))


def _pm(values: np.ndarray, fmt: str, scale: float = 1.0) -> str:
    v = np.asarray(values, dtype=np.float64) * scale
    std = float(np.std(v, ddof=1)) if v.size > 1 else 0.0
    return f"{fmt.format(float(np.mean(v)))} ± {fmt.format(std)}"


def table_rows(summaries: list[Summary]) -> list[tuple[str, ...]]:
    """One row of text cells per configuration (the table's, not the rate-distortion extras),
    in the order of :data:`HEADER`: means ± sample standard deviations over the seeds."""
    rows = []
    for s in summaries:
        if not s.run.table:
            continue
        rows.append(
            (
                s.label,
                _pm(s.values("test_mse"), "{:.4f}"),
                _pm(s.values("perplexity"), "{:.1f}"),
                f"{_pm(s.values('codes_used'), '{:.0f}', 100)}% of {s.first.codebook_size}",
                f"{s.first.bits:.0f}",
                _pm(s.values("quantization_error"), "{:.3f}"),
                f"{s.mean('train_time'):.1f}",
            )
        )
    return rows


def _markdown(header: tuple, rows: list[tuple], right: bool = True) -> str:
    """A GitHub-flavoured markdown table; numbers right-aligned and padded to read as plain text
    (``right=False``: left-aligned and not padded, for long text cells)."""
    rows = [header, *rows]
    widths = [max(len(r[i]) for r in rows) if right else 1 for i in range(len(header))]

    def fmt(r: tuple) -> str:
        cells = [c.ljust(w) if i == 0 or not right else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        return "| " + " | ".join(cells) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ("-" if i == 0 or not right else ":") for i, w in enumerate(widths)) + "|"
    if not right:
        sep = "|" + "|".join("---" for _ in header) + "|"
    return "\n".join([fmt(rows[0]), sep, *(fmt(r) for r in rows[1:])])


def _html_table(header: tuple, rows: list[tuple]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{trs}</table>"


def format_table(summaries: list[Summary]) -> str:
    """The results as a markdown table."""
    return _markdown(HEADER, table_rows(summaries))


def claim_rows(rows: list[ClaimRow]) -> list[tuple[str, ...]]:
    """The claims table's text cells, in the order of :data:`CLAIMS_HEADER`."""
    return [
        (
            r.claim.technique,
            f"{r.claim.claim} ({r.claim.paper})",
            r.measured(),
            r.verdict,
            "; ".join(r.evidence) if r.evidence else "-",
        )
        for r in rows
    ]


def same_bits(summaries: list[Summary]) -> list[str]:
    """One line per number of bits per image that several configurations spend, best MSE first."""
    groups: dict[int, list[Summary]] = {}
    for s in summaries:
        groups.setdefault(round(s.first.bits), []).append(s)
    lines = []
    for bits, group in sorted(groups.items()):
        if len(group) > 1:
            ranked = sorted(group, key=lambda s: s.mean("test_mse"))
            lines.append(f"{bits} bits: " + ", ".join(f"{s.label} {s.mean('test_mse'):.4f}" for s in ranked))
    return lines


def _setup(s: Settings, data: Dataset, summaries: list[Summary]) -> str:
    r = summaries[0].first if summaries else None
    steps = r.steps if r else 0
    seeds = ", ".join(str(x) for x in s.seeds)
    if data.name == "digits":
        model = (
            f"encoder MLP 64-{s.hidden}-{s.tokens * s.token_dim}, {s.tokens} tokens of dim {s.token_dim}, "
            f"decoder MLP {s.tokens * s.token_dim}-{s.hidden}-64 (ReLU)"
        )
    else:
        model = (
            f"convolutional encoder (4x4 stride 2 twice, {s.photo_hidden} channels) to a 4x4 grid of 16 tokens of "
            f"dim {s.token_dim}, transposed-convolution decoder"
        )
    return (
        f"{data.description}; {model}; K = {s.codebook_size} codes per codebook (FSQ: the nearest grid, LFQ: the "
        f"nearest power of two), Q = {s.depths} residual depths; Adam lr {s.lr:g} (cosine decay to {s.lr / 10:g}), "
        f"batch {s.batch_for(data.name)}, {steps} steps per run; EMA decay {DECAY}, commitment weight {BETA}; "
        f"Gumbel temperature {TAU_START:g} -> {TAU_END:g}; seeds {seeds} (weights, codebooks, batches)."
    )


def _notes(data: Dataset, s: Settings) -> list[str]:
    mean_mse = float(np.mean((data.test - data.train.mean(axis=0)) ** 2))
    return [
        f"Each cell is the mean ± the sample standard deviation over {len(s.seeds)} seed(s); results.json holds "
        "every seed's numbers (and their minimum and maximum follow from them).",
        f"Held-out MSE is the mean squared pixel error (pixels in [0, 1]) on the {data.test.shape[0]} held-out "
        f"images; predicting the mean training image gives {mean_mse:.4f}.",
        "Perplexity is exp(entropy) of the code frequencies over the held-out tokens (the effective number of "
        "codes in use); codes used is the fraction of the codebook chosen at least once (residual VQ: the mean "
        "over its codebooks, or over the pooled depths for the shared codebook).",
        "Bits / image = tokens x sum over depths of log2(codes). Quant. error = sum |z - zq|^2 / sum |z|^2 over "
        "the held-out tokens (for FSQ and LFQ after the projection back to the token dimension).",
        "With one seed, every configuration starts from the same weights and sees the same batches; only the "
        "quantizer differs. A claim 'reproduces' when its direction holds for every seed, paired.",
    ]


def _section(s: Settings, data: Dataset, summaries: list[Summary], files: dict) -> tuple[list[str], str, dict]:
    """The markdown lines, the HTML and the JSON of one dataset."""
    claims = evaluate_claims(summaries)
    table, notes, bits = table_rows(summaries), _notes(data, s), same_bits(summaries)
    title = "Digits (8x8, MLP VQ-VAE)" if data.name == "digits" else "Photographs (16x16 patches, convolutional VQ-VAE)"
    md = [f"## {title}", "", _setup(s, data, summaries), "", _markdown(HEADER, table), ""]
    md += [f"- {n}" for n in notes] + ["", "| config | what it changes |", "|---|---|"]
    md += [f"| {x.label} | {x.first.description} |" for x in summaries if x.run.table] + [""]
    md += ["### Rate and distortion", "", "Configurations that spend the same bits per image (held-out MSE):", ""]
    md += [f"- {line}" for line in bits] + ["", f"![rate-distortion]({files['rate']})", ""]
    if claims:
        md += [
            "### Do the techniques do what their papers claim?",
            "",
            _markdown(CLAIMS_HEADER, claim_rows(claims), False),
        ]
    md += [
        "",
        "### Reconstructions (top row: held-out images; first seed)",
        "",
        f"![reconstructions]({files['recon']})",
    ]
    md += ["", "### Training curves (mean over seeds)", "", f"![training curves]({files['curves']})"]
    md += ["", "### Codebook usage on the held-out tokens (first seed)", "", f"![codebook usage]({files['usage']})", ""]
    page = (
        f"<h2>{html.escape(title)}</h2><p>{html.escape(_setup(s, data, summaries))}</p>{_html_table(HEADER, table)}"
        f"<ul>{''.join(f'<li>{html.escape(n)}</li>' for n in notes)}</ul><h3>Rate and distortion</h3>"
        f"<ul>{''.join(f'<li>{html.escape(b)}</li>' for b in bits)}</ul>"
        f'<img src="{files["rate"]}" alt="rate-distortion">'
        + (f"<h3>Claims</h3>{_html_table(CLAIMS_HEADER, claim_rows(claims))}" if claims else "")
        + f'<h3>Reconstructions</h3><img src="{files["recon"]}" alt="reconstructions">'
        f'<h3>Training curves</h3><img src="{files["curves"]}" alt="training curves">'
        f'<h3>Codebook usage</h3><img src="{files["usage"]}" alt="codebook usage">'
    )
    blob = {
        "description": data.description,
        "mean_image_mse": float(np.mean((data.test - data.train.mean(axis=0)) ** 2)),
        "summaries": [
            {
                "label": x.label,
                "run": asdict(x.run) | {"seed": None},
                **{
                    m: {
                        "mean": x.mean(m),
                        "std": x.std(m),
                        "min": float(np.min(x.values(m))),
                        "max": float(np.max(x.values(m))),
                    }
                    for m in ("test_mse", "perplexity", "codes_used", "quantization_error", "train_time")
                },
            }  # fmt: skip
            for x in summaries
        ],
        "claims": [dict(zip(CLAIMS_HEADER, row)) for row in claim_rows(claims)],
        "results": [{k: v for k, v in asdict(r).items() if k != "recon"} for x in summaries for r in x.results],
    }
    return md, page, blob


def write_report(sections: list[tuple[Dataset, list[Summary]]], s: Settings, total_time: float) -> dict[str, str]:
    """Write ``report.md``, ``report.html``, ``results.json`` and the figures into ``s.out``.

    ``sections`` holds each dataset with its summaries; ``total_time`` is the seconds spent on
    data, training and evaluation.  Returns the paths written: ``"report"`` and the figures.
    """
    os.makedirs(s.out, exist_ok=True)
    command = " ".join(["vqref demo", *(shlex.quote(a) for a in s.argv)])
    md = [
        "# vqref demo: VQ-VAEs on real images, technique by technique",
        "",
        f"`{command}` — training and evaluation took {total_time:.0f} s on {os.cpu_count()} CPU cores with "
        f"{s.jobs} worker process(es) ({platform.python_implementation()} {platform.python_version()}, numpy "
        f"{np.__version__}).",
        "",
    ]
    pages, blobs, paths = [], {}, {}
    for data, summaries in sections:
        files = figures(data, summaries, s.out)
        paths.update({f"{data.name}.{k}": os.path.join(s.out, v) for k, v in files.items()})
        lines, page, blob = _section(s, data, summaries, files)
        md += lines
        pages.append(page)
        blobs[data.name] = blob
    with open(os.path.join(s.out, "report.md"), "w", encoding="utf-8", errors="backslashreplace") as f:
        f.write("\n".join(md))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>vqref demo</title>
<style>body{{font-family:sans-serif;max-width:72em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.2em .6em;text-align:right;vertical-align:top}}td:first-child{{text-align:left}}
img{{max-width:100%}}</style></head>
<body><h1>vqref demo: VQ-VAEs on real images, technique by technique</h1>
<p><code>{html.escape(command)}</code> &mdash; training and evaluation took {total_time:.0f} s.</p>
{"".join(pages)}
</body></html>
"""
    with open(os.path.join(s.out, "report.html"), "w", encoding="utf-8", errors="backslashreplace") as f:
        f.write(page)
    with open(os.path.join(s.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"settings": asdict(s), "total_time": total_time, "datasets": blobs}, f, indent=1)
    return {"report": os.path.join(s.out, "report.md"), **paths}
