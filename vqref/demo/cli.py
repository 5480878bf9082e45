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
import difflib
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from .report import REPORT_FILES, format_table, write_report
from .train import (
    CONFIGS,
    DEPTHS,
    DIGITS,
    PIXELS,
    TEST_IMAGES,
    RunResult,
    TrainingDiverged,
    TrainSettings,
    build_model,
    load_data,
    showcase,
    total_steps,
    train_one,
)

__all__ = ["Settings", "main", "memory_needed", "parse_args", "progress_bar"]

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


def _integer(minimum: int, what: str):
    """An argparse type: an integer >= ``minimum`` (``what`` names it in the message)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {v}")
        return v

    return parse


_positive_int = _integer(1, "positive")
_seed = _integer(0, "non-negative")


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
    if "all" in names:
        raise argparse.ArgumentTypeError(
            f"'all' already means every configuration; give 'all' alone or a list of names, not both ({text!r})"
        )
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        close = [m for n in unknown for m in difflib.get_close_matches(n.lower(), CONFIGS, n=1)]
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise argparse.ArgumentTypeError(
            f"unknown configuration(s) {', '.join(map(repr, unknown)) or '(none given)'}{hint}; "
            f"choose from {', '.join(CONFIGS)} (comma-separated) or 'all'"
        )
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"configuration {', '.join(map(repr, twice))} listed twice in {text!r}")
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
        "--seed", type=_seed, default=0, help="random seed: data split, weights, batches, codebooks (default 0)"
    )
    p.add_argument("--out", default=os.path.join("reports", "demo"), help="report folder (default reports/demo)")
    p.add_argument(
        "--quick", action="store_true", help="a tiny run of a few seconds (smaller data, model and codebook)"
    )
    p.add_argument("--quiet", action="store_true", help="print only the final table")
    return p


def parse_args(argv: list[str] | None) -> Settings:
    """Parse and validate the options; argparse exits with status 2 and a message on errors.

    Beyond each option's own check: the sizes must fit together and into this machine's memory
    (:func:`memory_needed`), and every chosen configuration's model is built once, so that an
    option one quantizer cannot take (``--token-dim 1`` for the rotation trick) is refused here,
    by name, and not after the runs before it have trained.
    """
    parser = _parser()
    a = parser.parse_args(argv)
    base = _QUICK if a.quick else _DEFAULTS
    pick = lambda name: getattr(a, name) if getattr(a, name) is not None else base[name]  # noqa: E731

    def option(name: str) -> str:
        """``--name value`` as given, or where a default came from (the user did not type it)."""
        flag = "--" + name.replace("_", "-")
        if getattr(a, name) is not None:
            return f"{flag} {getattr(a, name)}"
        return f"the {'--quick ' if a.quick else ''}default {flag} {base[name]}"

    available = DIGITS - TEST_IMAGES
    train_size = pick("train_size") or available
    if train_size > available:
        parser.error(f"--train-size {train_size} is larger than the {available} training images available")
    batch_size = pick("batch_size")
    if batch_size > train_size:
        where = f"the {available} training images" if a.train_size is None and not a.quick else option("train_size")
        parser.error(f"{option('batch_size')} is larger than {where}; give --batch-size {train_size} or less")
    if not a.out.strip():
        parser.error("--out is empty; give the report folder (default reports/demo)")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        parser.error(f"--out {a.out!r} exists and is not a folder")
    latent = pick("tokens") * pick("token_dim")
    if latent > 4096:
        parser.error(
            f"{option('tokens')} x {option('token_dim')} = {latent} latent features; the demo allows at most 4096"
        )
    epochs = None if a.steps is not None else pick("epochs")
    s = Settings(
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
    need, culprit = memory_needed(s)
    have = _physical_memory()
    if have is not None and need > have:
        parser.error(
            f"these sizes need about {_gib(need)} of memory, more than this machine's {_gib(have)}; "
            f"{option(culprit)} is the largest part: choose a smaller one"
        )
    for name in s.configs:
        try:
            build_model(name, s.training())
        except (ValueError, TypeError) as e:
            parser.error(
                f"configuration {name!r} cannot be built with these options ({e}); change them or leave it out"
            )
        except MemoryError:
            parser.error(f"configuration {name!r} does not fit into memory with these sizes; choose smaller ones")
    return s


# --------------------------------------------------------------------------------------------
# What the options cost
# --------------------------------------------------------------------------------------------

# Bytes per number, measured as peak memory on --steps 2 runs (see memory_needed) and rounded up.
_PER_WEIGHT = 80  # float64 draw, float32 weight, gradient, Adam's two moments, copies
_PER_CODE_VALUE = 64  # codebook, EMA statistics, gradient and moments, copies
_PER_SCORE = 12  # a (rows, K) block of distances and the argmin's temporaries
_PER_GRAM = 8  # the orthogonal regulariser's (K, K) products
_BASE = 160 << 20  # Python, numpy, the data


def memory_needed(s: Settings) -> tuple[int, str]:
    """About how many bytes a run with these options holds at its peak, and the option that
    weighs most (``"hidden"`` or ``"codebook_size"``).

    An estimate, measured rather than derived (peak resident memory of two-step runs with one
    size made large at a time): the encoder and decoder weights with their gradients and Adam
    moments; the codebooks (two depths for the residual configurations) with their statistics;
    the blocks of token-to-code distances (the nearest-code search works in row chunks of at
    most 2^24 scores); the orthogonal regulariser's (K, K) matrices.  It is only used to refuse
    sizes that cannot fit, before anything is trained.
    """
    from ..ops.distance import default_chunk_size

    latent = s.tokens * s.token_dim
    weights = (PIXELS + 1) * s.hidden + (s.hidden + 1) * latent + (latent + 1) * s.hidden + (s.hidden + 1) * PIXELS
    rows = max(s.batch_size, TEST_IMAGES)  # images at once: a batch, or the held-out set in an evaluation
    model = _PER_WEIGHT * weights + 6 * 8 * rows * s.hidden  # and the activations
    K, depths = s.codebook_size, DEPTHS if any(c.startswith("residual") for c in s.configs) else 1
    block = K * min(rows * s.tokens, default_chunk_size(K, s.token_dim))  # (rows, K) distances
    codes = _PER_CODE_VALUE * K * s.token_dim * depths + _PER_SCORE * block
    if "orthogonal" in s.configs:
        codes += _PER_GRAM * K * K
    return _BASE + model + codes, "hidden" if model > codes else "codebook_size"


def _physical_memory() -> int | None:
    """The machine's memory in bytes, where the system says (POSIX); otherwise None."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - Windows
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB" if n < 2**40 else f"{n / 2**40:.3g} TiB"


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
    """Run the demo.  Returns 0; 1 when the run or its surroundings fail (a dependency missing,
    the report folder not writable, training diverged, memory ran out); 130 when interrupted;
    or exits with status 2 (argparse) on bad options.  Every failure is one line on stderr
    saying what to change, never a traceback."""
    s = parse_args(argv)
    try:
        return _run(s)
    except KeyboardInterrupt:
        return _fail("interrupted", status=130)
    except TrainingDiverged as e:
        return _fail(f"{e}; lower --lr (it is {s.lr:g})")
    except MemoryError as e:
        return _fail(f"out of memory ({e or 'no detail'}); choose a smaller --codebook-size, --hidden or --batch-size")
    except (ValueError, TypeError, OSError) as e:
        return _fail(str(e) or type(e).__name__)


def _fail(message: str, status: int = 1) -> int:
    """Print ``vqref demo: message`` as one line on stderr; return ``status``."""
    print("vqref demo: " + " ".join(message.split()), file=sys.stderr, flush=True)
    return status


def _echo(text: str) -> None:
    """``print`` to stdout that shows what its encoding cannot (a path in a foreign script, bytes
    that are not UTF-8) as escapes instead of failing after the work is done."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    print(text.encode(encoding, "backslashreplace").decode(encoding), flush=True)


def _missing_dependencies() -> str | None:
    """Why the demo's dependencies cannot be imported, or None when they can."""
    missing, broken = [], []
    for module, package in _NEEDS.items():
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
        except Exception as e:  # noqa: BLE001 - a broken install or environment raises anything
            broken.append(f"importing {module} failed ({type(e).__name__}: {e}); check its installation and settings")
    if missing:
        return (
            f'needs {" and ".join(missing)} (pip install -e ".[demo]" from a checkout, '
            f"pip install {' '.join(_NEEDS.values())}, or `make demo`)"
        )
    return broken[0] if broken else None


def _check_report_folder(out: str) -> str | None:
    """Create the report folder and try writing into it, before any training; None when it works.

    A report that cannot be written after minutes of training would lose the results.
    """
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        return f"cannot create the report folder {out!r}: {e.strerror or e}; choose another --out"
    for name in REPORT_FILES:
        path = os.path.join(out, name)
        if os.path.lexists(path) and not (os.path.isfile(path) and os.access(path, os.W_OK)):
            return f"cannot write {path!r} (it is not a writable file); remove it or choose another --out"
    try:
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        return f"cannot write into the report folder {out!r}: {e.strerror or e}; choose another --out"
    return None


def _run(s: Settings) -> int:
    """The work of :func:`main` once the options are valid: checks, data, training, report."""
    problem = _missing_dependencies() or _check_report_folder(s.out)
    if problem:
        return _fail(problem)

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
    try:
        paths = write_report(results, s, train, test, test[show], total)
    except OSError as e:
        return _fail(f"training finished but the report could not be written into {s.out!r}: {e}")
    print(format_table(results, s.codebook_size))
    _echo(f"\nreport: {paths['report']} (figures in {s.out}); {time.perf_counter() - t0:.0f} s in total")
    return 0
