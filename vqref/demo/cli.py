"""``vqref demo``: the main job.  Train small VQ-VAEs on real images, compare the techniques.

The command line around :mod:`vqref.demo.train` (the training loop and the eight
configurations) and :mod:`vqref.demo.report` (the report folder): options, a progress bar per
run (tqdm, drawn only on a terminal), the BLAS thread limit, and the order of the work.

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
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from .report import format_table, write_report
from .train import CONFIGS, DIGITS, TEST_IMAGES, RunResult, TrainSettings, load_data, showcase, total_steps, train_one

__all__ = ["Settings", "main", "parse_args", "progress_bar"]

# The full run (about 2-3 minutes on 2 CPU cores) and the --quick one (a few seconds, for tests).
_DEFAULTS = dict(epochs=400, batch_size=64, codebook_size=256, train_size=None, hidden=256, tokens=4, token_dim=8)
_QUICK = dict(epochs=20, batch_size=32, codebook_size=32, train_size=256, hidden=32, tokens=4, token_dim=4)

# module -> the package that brings it (all in the `demo` extra: pip install -e ".[demo]")
_NEEDS = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm"}


@dataclass
class Settings:
    """The options, validated (what ``results.json`` records under ``settings``)."""

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

    def training(self) -> TrainSettings:
        """The part of the options that one training run needs."""
        return TrainSettings(
            codebook_size=self.codebook_size,
            hidden=self.hidden,
            tokens=self.tokens,
            token_dim=self.token_dim,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=self.seed,
            epochs=self.epochs,
            steps=self.steps,
        )


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


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
    p.add_argument(
        "--configs",
        type=_config_list,
        default=list(CONFIGS),
        metavar="A,B,...",
        help="comma-separated configurations to train (default: all eight)",
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help=f"passes over the training images per configuration (default {_DEFAULTS['epochs']})",
    )
    length.add_argument(
        "--steps", type=_positive_int, default=None, help="optimizer steps per configuration (instead of --epochs)"
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=None, help=f"images per step (default {_DEFAULTS['batch_size']})"
    )
    p.add_argument(
        "--codebook-size",
        type=_positive_int,
        default=None,
        help=f"K, codes per codebook (default {_DEFAULTS['codebook_size']})",
    )
    p.add_argument(
        "--train-size",
        type=_positive_int,
        default=None,
        help=f"training images, at most {DIGITS - TEST_IMAGES} (default: all of them); {TEST_IMAGES} more are held out",
    )
    p.add_argument(
        "--hidden",
        type=_positive_int,
        default=None,
        help=f"hidden units of encoder and decoder (default {_DEFAULTS['hidden']})",
    )
    p.add_argument(
        "--tokens", type=_positive_int, default=None, help=f"T, tokens per image (default {_DEFAULTS['tokens']})"
    )
    p.add_argument(
        "--token-dim",
        type=_positive_int,
        default=None,
        help=f"d, features per token (default {_DEFAULTS['token_dim']})",
    )
    p.add_argument("--lr", type=_positive_float, default=2e-3, help="Adam learning rate (default 2e-3)")
    p.add_argument(
        "--seed", type=int, default=0, help="random seed: data split, weights, batches, codebooks (default 0)"
    )
    p.add_argument("--out", default=os.path.join("reports", "demo"), help="report folder (default reports/demo)")
    p.add_argument(
        "--quick", action="store_true", help="a tiny run of a few seconds (smaller data, model and codebook)"
    )
    p.add_argument("--quiet", action="store_true", help="print only the final table")
    return p


def parse_args(argv: list[str] | None) -> Settings:
    """Parse and validate the options; argparse exits with status 2 and a message on errors."""
    parser = _parser()
    a = parser.parse_args(argv)
    base = _QUICK if a.quick else _DEFAULTS
    pick = lambda name: getattr(a, name) if getattr(a, name) is not None else base[name]  # noqa: E731
    available = DIGITS - TEST_IMAGES
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
        configs=a.configs,
        epochs=epochs,
        steps=a.steps,
        batch_size=batch_size,
        codebook_size=pick("codebook_size"),
        train_size=train_size,
        hidden=pick("hidden"),
        tokens=pick("tokens"),
        token_dim=pick("token_dim"),
        lr=a.lr,
        seed=a.seed,
        out=a.out,
        quick=a.quick,
        quiet=a.quiet,
        argv=list(sys.argv[1:] if argv is None else argv),
    )


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------


def progress_bar(label: str, total: int, *, quiet: bool = False, stream: TextIO | None = None) -> Any:
    """A tqdm bar for one training run on ``stream`` (default stderr).

    Drawn only when the stream is a terminal (a log file or a pipe would fill with redraws) and
    not ``quiet``; otherwise the bar is disabled and draws nothing.  ``leave=False``: closing it
    clears the line, for the run's summary line to take its place.
    """
    from tqdm import tqdm

    stream = sys.stderr if stream is None else stream
    live = not quiet and getattr(stream, "isatty", lambda: False)()
    return tqdm(total=total, desc=label, file=stream, disable=not live, leave=False, unit="step", mininterval=0.1)


def _train_with_progress(name: str, label: str, s: Settings, train: Any, test: Any, show: Any) -> RunResult:
    """:func:`train_one` under a progress bar, then the run's summary line on stderr (unless quiet)."""
    settings = s.training()
    with progress_bar(label, total_steps(settings, train.shape[0]), quiet=s.quiet) as bar:

        def progress(step: int, loss: float) -> None:
            bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)
            bar.update(step - bar.n)

        r = train_one(name, settings, train, test, show, progress=None if bar.disable else progress)
    if not s.quiet:
        print(
            f"{label} held-out MSE {r.test_mse:.4f}  perplexity {r.perplexity:6.1f}  "
            f"codes used {100 * r.codes_used:5.1f}%  {r.train_time:5.1f} s",
            file=sys.stderr,
            flush=True,
        )
    return r


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
    """Run the demo; returns 0, or 1 when a dependency or the report folder is missing, or exits
    with status 2 (argparse) on bad options."""
    s = parse_args(argv)
    missing = []
    for module, package in _NEEDS.items():
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        print(
            f'vqref demo: needs {" and ".join(missing)} (pip install -e ".[demo]" from a checkout, '
            f"pip install {' '.join(_NEEDS.values())}, or `make demo`)",
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
    show = showcase(labels)
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
            results.append(_train_with_progress(name, label, s, train, test, show))
    total = time.perf_counter() - t0  # data, training and evaluation
    paths = write_report(results, s, train, test, test[show], total)
    print(format_table(results, s.codebook_size))
    print(f"\nreport: {paths['report']} (figures in {s.out}); {time.perf_counter() - t0:.0f} s in total")
    return 0
