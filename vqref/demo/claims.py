"""Do the techniques do what their papers claim?  The claims table of the demo's report.

One row per technique: the paper's claim (in our words), what this run measured, whether the
claim reproduces at this scale, and, when it does not, the evidence the run holds about why.
Every number in the table is computed here from the run's results; nothing is typed in.

**How a claim is tested.**  A claim compares a configuration A with a baseline B on a metric
(held-out MSE, perplexity, codes used, quantization error) in the direction the paper states.
With one seed, A and B start from the same encoder and decoder weights and see the same batches,
so each seed gives one paired difference ``a_s - b_s``.  A comparison *holds* when the claimed
direction holds for every seed, is *contradicted* when the opposite holds for every seed, and is
*mixed* otherwise.  Some claims allow a margin ("at most 10 % worse"): the paired relative
difference ``(a_s - b_s) / |b_s|`` must then stay within it.  A row reproduces ("yes") when all
its comparisons hold, does not ("no") when all are contradicted, and "partly" in between.

With S seeds, a technique with no effect at all still holds or is contradicted in every seed
with probability ``2^(1-S)`` (1/4 for three seeds), so a "yes" on three seeds is weak evidence;
``--seeds`` raises it.  The table also says *at this scale*: 8x8 digits (or 16x16 patches), a
one-layer MLP (or a small convolutional) encoder, a few thousand steps; the papers train large
image models for hundreds of thousands of steps.

**Evidence.**  When a comparison does not hold, the row shows the paired difference at the first
evaluation of training next to the one at the end (an advantage that fades, or one that has not
arrived yet), and the row's extra comparisons: the rotation trick with a learnable codebook as
well as with the EMA codebook (the paper trains its codebook by gradient), and LFQ and FSQ
against VQ at the other codebook sizes of the rate-distortion runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .runs import Summary

__all__ = ["CLAIMS", "Claim", "Comparison", "ClaimRow", "METRICS", "evaluate_claims", "compare"]

# metric -> (its name in the table, the format of its values)
METRICS = {
    "test_mse": ("held-out MSE", "{:.4f}"),
    "perplexity": ("perplexity", "{:.1f}"),
    "codes_used": ("codes used", "{:.0%}"),
    "quantization_error": ("quantization error", "{:.3f}"),
}


@dataclass(frozen=True)
class Comparison:
    """``config`` against ``baseline`` on ``metric``: ``better`` is "lower" or "higher"; ``margin``
    the relative amount by which A may be worse and still count (0: strictly better)."""

    config: str
    baseline: str
    metric: str
    better: str
    margin: float = 0.0


@dataclass(frozen=True)
class Claim:
    technique: str
    paper: str
    claim: str  # what the paper reports, in our words
    tests: tuple[Comparison, ...]  # the comparisons that decide the verdict (one baseline)
    evidence: tuple[Comparison, ...] = ()  # shown when a test does not hold
    evidence_label: str = ""  # what the evidence comparisons change
    rate_evidence: str | None = None  # a config compared with "ema" at the other codebook sizes


def _both(config: str, baseline: str, *metrics: tuple) -> tuple[Comparison, ...]:
    return tuple(Comparison(config, baseline, *m) for m in metrics)


_USAGE = ("codes_used", "higher")
_MSE = ("test_mse", "lower")

CLAIMS = (
    Claim(
        "k-means init",
        "SoundStream, arXiv 2107.03312",
        "a codebook initialised by k-means on the first batch leaves fewer codes dead: more codes in use and a "
        "lower reconstruction error than random initial codes",
        _both("kmeans", "ema", _USAGE, _MSE),
    ),
    Claim(
        "cosine codebook",
        "ViT-VQGAN, arXiv 2110.04627",
        "l2-normalised tokens and codes (a lookup by cosine similarity) use more of the codebook and reconstruct "
        "better",
        _both("cosine", "ema", _USAGE, _MSE),
    ),
    Claim(
        "orthogonal regulariser",
        "Shin et al., arXiv 2112.00384",
        "penalising the codes' cosine similarities decorrelates them: higher codebook usage and a better "
        "reconstruction than the same learnable codebook without it",
        _both("orthogonal", "learnable", ("perplexity", "higher"), _MSE),
    ),
    Claim(
        "shared residual codebook",
        "RQ-VAE, arXiv 2203.01941",
        "one codebook shared by all residual depths is enough: about the reconstruction of one codebook per depth "
        "(here: at most 10 % higher MSE) with 1/Q of the codebook parameters",
        (Comparison("residual-shared", "residual", "test_mse", "lower", 0.10),),
    ),
    Claim(
        "rotation trick",
        "Fifty et al., arXiv 2410.06424",
        "carrying the gradient through a rotation (and scaling) of the code instead of copying it (the STE) "
        "improves codebook usage, reconstruction and quantization error",
        _both("rotation", "ema", _USAGE, _MSE, ("quantization_error", "lower")),
        _both("rotation-learnable", "learnable", _USAGE, _MSE, ("quantization_error", "lower")),
        "with a learnable codebook (rotation-learnable vs learnable)",
    ),
    Claim(
        "FSQ",
        "Mentzer et al., arXiv 2309.15505",
        "a fixed grid of scalar levels cannot collapse: near-full codebook usage without any auxiliary loss, and "
        "a reconstruction competitive with VQ of the same size (here: at most 10 % higher MSE)",
        _both("fsq", "ema", _USAGE, ("test_mse", "lower", 0.10)),
        rate_evidence="fsq",
    ),
    Claim(
        "LFQ",
        "MAGVIT-v2, arXiv 2310.05737",
        "lookup-free binary codes with an entropy penalty use the whole codebook and reconstruct as well as VQ "
        "(here: at most 10 % higher MSE), the more so as the vocabulary grows",
        _both("lfq", "ema", _USAGE, ("test_mse", "lower", 0.10)),
        rate_evidence="lfq",
    ),
    Claim(
        "Gumbel sampling",
        "Jang et al., arXiv 1611.01144",
        "sampled codes with the straight-through Gumbel-softmax estimator and an annealed temperature train "
        "categorical codes better than the deterministic straight-through estimator: a lower loss",
        _both("gumbel", "learnable", _MSE, _USAGE),
    ),
)


class Outcome(NamedTuple):
    """One comparison over the paired seeds."""

    comparison: Comparison
    a: Summary
    b: Summary
    rel: np.ndarray  # (S,) the paired relative differences (a_s - b_s) / |b_s|
    holds: int  # seeds where the claimed direction holds (within the margin)
    against: int  # seeds where the opposite holds (beyond the margin)

    @property
    def verdict(self) -> str:
        n = self.rel.size
        return "holds" if self.holds == n else "contradicted" if self.against == n else "mixed"

    @property
    def direction(self) -> str:
        """What the claim asks of A: ``lower``, ``higher``, ``at most 10% higher``, ..."""
        c = self.comparison
        if not c.margin:
            return c.better
        return f"at most {c.margin:.0%} {'higher' if c.better == 'lower' else 'lower'}"

    def short(self) -> str:
        """``codes used +58% (higher in 3/3)``: the mean paired relative difference and the seeds."""
        seeds = f"{self.direction} in {self.holds}/{self.rel.size}"
        return f"{METRICS[self.comparison.metric][0]} {np.mean(self.rel):+.0%} ({seeds})"

    def text(self) -> str:
        """``codes used 95% ± 1% vs 60% ± 2%: +58% (higher in 3/3)``, the values mean ± std over seeds."""
        c = self.comparison
        name, fmt = METRICS[c.metric]
        cell = lambda s: f"{fmt.format(s.mean(c.metric))} ± {fmt.format(s.std(c.metric))}"  # noqa: E731
        seeds = f"{self.direction} in {self.holds}/{self.rel.size}"
        return f"{name} {cell(self.a)} vs {cell(self.b)}: {np.mean(self.rel):+.0%} ({seeds})"


def compare(c: Comparison, a: Summary, b: Summary, at: int | None = None) -> Outcome:
    """The paired comparison ``c`` of the summaries ``a`` and ``b`` (the same seeds, in order).

    ``at`` (an index into the training curves) compares the values at that evaluation instead of
    the final ones; only for the metrics that have curves (not the quantization error).
    """
    if at is None:
        av, bv = a.values(c.metric), b.values(c.metric)
    else:
        av = np.asarray([r.curves[c.metric][at] for r in a.results], dtype=np.float64)
        bv = np.asarray([r.curves[c.metric][at] for r in b.results], dtype=np.float64)
    n = min(av.size, bv.size)  # the seeds both ran
    av, bv = av[:n], bv[:n]
    rel = (av - bv) / np.maximum(np.abs(bv), 1e-12)  # (S,)
    sign = -1.0 if c.better == "lower" else 1.0
    holds = int(np.sum(sign * rel > -c.margin))  # better, or worse by less than the margin
    against = int(np.sum(sign * rel < -c.margin)) if c.margin else int(np.sum(sign * rel < 0))
    return Outcome(c, a, b, rel, holds, against)


@dataclass
class ClaimRow:
    claim: Claim
    outcomes: list[Outcome]
    evidence: list[str]

    @property
    def verdict(self) -> str:
        v = {o.verdict for o in self.outcomes}
        return "yes" if v == {"holds"} else "no" if v == {"contradicted"} else "partly"

    def measured(self) -> str:
        """``kmeans vs ema: codes used ...; held-out MSE ...``"""
        c = self.outcomes[0].comparison
        return f"{c.config} vs {c.baseline}: " + "; ".join(o.text() for o in self.outcomes)


def _early_and_late(outcomes: list[Outcome]) -> str | None:
    """The paired differences at the first evaluation and at the end, for the comparisons that
    did not hold and whose metric has training curves (not the quantization error)."""
    failed = [o for o in outcomes if o.verdict != "holds" and o.a.first.curves.get(o.comparison.metric)]
    if not failed:
        return None
    step = failed[0].a.first.curves["step"][0]
    parts = [
        f"{METRICS[o.comparison.metric][0]} {np.mean(compare(o.comparison, o.a, o.b, at=0).rel):+.0%} -> "
        f"{np.mean(o.rel):+.0%}"
        for o in failed
    ]
    return f"first evaluation (step {step}) -> end: " + ", ".join(parts)


def _rate_evidence(config: str, summaries: list[Summary]) -> list[str]:
    """``config`` against ``ema`` at the codebook sizes where both have a rate-distortion run."""
    extra = {(s.run.config, s.run.codebook_size): s for s in summaries if not s.run.table}
    out = []
    for (name, K), s in sorted(extra.items(), key=lambda kv: kv[0][1]):
        base = extra.get(("ema", K))
        if name == config and base is not None:
            o = compare(Comparison(config, "ema", "test_mse", "lower", 0.10), s, base)
            bits = f"{s.first.bits:.0f} and {base.first.bits:.0f} bits/image"
            out.append(f"vs ema at K = {K} ({bits}): {o.short()}")
    return out


def evaluate_claims(summaries: list[Summary]) -> list[ClaimRow]:
    """The rows of :data:`CLAIMS` whose configurations this run trained (one dataset's summaries)."""
    table = {s.run.config: s for s in summaries if s.run.table}
    rows = []
    for claim in CLAIMS:
        if any(c.config not in table or c.baseline not in table for c in claim.tests):
            continue
        outcomes = [compare(c, table[c.config], table[c.baseline]) for c in claim.tests]
        evidence = []
        if any(o.verdict != "holds" for o in outcomes):
            early = _early_and_late(outcomes)
            evidence += [early] if early else []
            extra = [compare(c, table[c.config], table[c.baseline]) for c in claim.evidence
                     if c.config in table and c.baseline in table]  # fmt: skip
            if extra:
                evidence.append(f"{claim.evidence_label}: " + ", ".join(o.short() for o in extra))
            if claim.rate_evidence:
                evidence += _rate_evidence(claim.rate_evidence, summaries)
        rows.append(ClaimRow(claim, outcomes, evidence))
    return rows
