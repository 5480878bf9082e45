"""Beam search against greedy residual encoding on real data: the bitrate-quality curve.

Symbols: N rows, D features, K codes per level, Q levels (depths), b beam width.

Data: scikit-learn's bundled handwritten digits (1797 x 64, pixel values 0..16; nothing is
downloaded).  For every seed the rows are shuffled and split into a training part and a
held-out part; a :class:`vqref.cluster.ResidualClustering` with ``Q_max`` levels of K codes is
fitted (greedily, level by level) on the training part.  Its first q codebooks are exactly the
codebooks a q-level fit with the same seed would have, so one fit serves every q = 1..Q_max.
The held-out rows are then encoded with the first q codebooks, greedily (b = 1) and by beam
search (:func:`vqref.core.beam.residual_encode_beam`, score ``"error"``), and the mean squared
error per entry of the reconstruction is recorded.  A q-level code costs ``q log2 K`` bits, so
MSE against q is the bitrate-quality curve.

:func:`bitrate_quality` returns the curve as arrays (for a notebook to plot);
``python -m benchmarks.beam`` prints it as a table: the median over the seeds of the MSE, and the
median of the per-seed relative gains ``1 - MSE_b / MSE_greedy``.  Also reported: the share of
rows on which the plain beam search (before the greedy safeguard) reconstructs worse than greedy.

Usage, from the repository's root::

    python -m benchmarks.beam [--levels 6] [--codebook-size 16] [--beams 1,4,16] [--seeds 0,1,2,3,4]
                              [--iters 20] [--score error|cumulative]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

if __package__ in (None, ""):  # run as a script (python benchmarks/beam.py): make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vqref.cluster import ResidualClustering  # noqa: E402
from vqref.core.beam import residual_encode_beam  # noqa: E402

__all__ = ["bitrate_quality", "digits", "main"]


def digits() -> np.ndarray:
    """scikit-learn's bundled digits as float64, (1797, 64)."""
    from sklearn.datasets import load_digits

    return np.asarray(load_digits().data, dtype=np.float64)


def bitrate_quality(
    X: np.ndarray,
    *,
    levels: int = 6,
    codebook_size: int = 16,
    beam_sizes: Sequence[int] = (1, 4, 16),
    seeds: Sequence[int] = (0, 1, 2),
    held_out: float = 1 / 3,
    iters: int = 20,
    score: str = "error",
) -> dict[str, Any]:
    """Held-out reconstruction MSE against the number of levels, greedy and beam search.

    Parameters
    ----------
    X : (N, D) float data
    levels : Q_max, the largest number of levels
    codebook_size : K, codes per level
    beam_sizes : the widths b to compare; 1 is greedy
    seeds : one shuffle, split and fit per seed
    held_out : the fraction of rows encoded (the rest fits the codebooks)
    iters : Lloyd iterations per level
    score : the beam's score, ``"error"`` (with the greedy safeguard) or vector-quantize-pytorch's
        ``"cumulative"`` (see :mod:`vqref.core.beam`)

    Returns
    -------
    dict of numpy arrays
        ``levels`` (Q_max,) 1..Q_max; ``bits`` (Q_max,) ``q log2 K`` per row;
        ``mse`` (len(beam_sizes), len(seeds), Q_max) the MSE per entry for every width, seed
        and q; ``search_worse`` (same shape) the share of rows where the plain search did worse
        than greedy (with ``score="cumulative"`` those rows keep the worse code); ``beam_sizes``
        (len(beam_sizes),).
    """
    X = np.asarray(X, dtype=np.float64)
    N, D = X.shape
    n_test = max(1, int(round(N * held_out)))
    mse = np.zeros((len(beam_sizes), len(seeds), levels))
    worse = np.zeros_like(mse)
    for s, seed in enumerate(seeds):
        order = np.random.default_rng(seed).permutation(N)
        test, train = X[order[:n_test]], X[order[n_test:]]
        rc = ResidualClustering(levels, codebook_size, iters=iters, seed=seed).fit(train)
        codebooks = [rc.cluster_centers_[level] for level in range(levels)]
        for q in range(1, levels + 1):
            for i, b in enumerate(beam_sizes):
                enc = residual_encode_beam(test, codebooks[:q], b, score=score)
                mse[i, s, q - 1] = float(np.mean(enc.errors)) / D
                worse[i, s, q - 1] = float(np.mean(enc.search_errors > enc.greedy_errors))
    return {
        "levels": np.arange(1, levels + 1),
        "bits": np.arange(1, levels + 1) * np.log2(codebook_size),
        "mse": mse,
        "search_worse": worse,
        "beam_sizes": np.asarray(beam_sizes),
    }


def table(curve: dict[str, Any]) -> str:
    """The curve as a markdown table: median MSE over seeds, and the median relative gain over greedy."""
    widths = [int(b) for b in curve["beam_sizes"]]
    greedy = widths.index(1) if 1 in widths else None
    head = ["levels", "bits"] + [f"MSE b={b}" if b > 1 else "MSE greedy" for b in widths]
    if greedy is not None:
        head += [f"gain b={b}" for b in widths if b > 1] + [f"search worse b={b}" for b in widths if b > 1]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    med = np.median(curve["mse"], axis=1)  # (B, Q)
    for q, (level, bits) in enumerate(zip(curve["levels"], curve["bits"])):
        row = [str(int(level)), f"{bits:.0f}"] + [f"{med[i, q]:.4f}" for i in range(len(widths))]
        if greedy is not None:
            base = curve["mse"][greedy, :, q]  # (seeds,)
            for i, b in enumerate(widths):
                if b > 1:
                    row.append(f"{100 * np.median(1 - curve['mse'][i, :, q] / base):.1f} %")
            for i, b in enumerate(widths):
                if b > 1:
                    row.append(f"{100 * np.median(curve['search_worse'][i, :, q]):.1f} %")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--levels", type=int, default=6)
    p.add_argument("--codebook-size", type=int, default=16)
    p.add_argument("--beams", type=_int_list, default=[1, 4, 16])
    p.add_argument("--seeds", type=_int_list, default=[0, 1, 2, 3, 4])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--score", choices=("error", "cumulative"), default="error")
    args = p.parse_args(argv)
    X = digits()
    curve = bitrate_quality(
        X,
        levels=args.levels,
        codebook_size=args.codebook_size,
        beam_sizes=args.beams,
        seeds=args.seeds,
        iters=args.iters,
        score=args.score,
    )
    print(
        f"digits {X.shape[0]} x {X.shape[1]}, K = {args.codebook_size}, held-out third, "
        f"median over seeds {args.seeds}, score {args.score!r}; MSE per entry (pixel values 0..16)"
    )
    print(table(curve))
    return curve


if __name__ == "__main__":
    main()
