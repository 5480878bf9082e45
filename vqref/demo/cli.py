"""``vqref demo``: the main job.  Train small VQ-VAEs on real images, compare the techniques.

The command line around :mod:`vqref.demo.train` (the training loop and the configurations),
:mod:`vqref.demo.runs` (which runs, in how many processes) and :mod:`vqref.demo.report` (the
report folder): options, a progress bar per run (tqdm, drawn only on a terminal and with one
process), and the order of the work.

It writes ``report.md`` and ``report.html`` (tables and figures), ``results.json`` (every run's
numbers and curves) and the figures as PNGs into ``--out``, and prints the results table.  The
numbers depend only on the options (seeds included) and, through rounding, on the numpy build:
two runs on one machine give the same tables except the times, with any ``--jobs``.

The default run: every configuration on the digits with 3 seeds, and the extra runs of the
rate-distortion plot (54 runs); the MLP model 64 -> 256 -> 32, the 32 latent features cut into
T = 4 tokens of d = 8, K = 256 codes, decoder 32 -> 256 -> 64; 60 epochs of 22 batches of 64
images (1320 Adam steps) per run, in one worker process per CPU core.  On the project's 2-core
machine ``time make demo`` took 4 min 11 s (490 s of CPU time; 7 min 12 s while other jobs kept
about 1.5 of the cores busy).  A step costs about 5-6 ms, almost all of it Python overhead (the
matrices are tiny), so the time grows linearly with ``--epochs`` and ``--seeds``.  ``--full``:
150 epochs, 5 seeds, more rate-distortion points, and the photographs as well (210 runs, about
40 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

from .checks import check_report_folder, gib, memory_needed, missing_dependencies, physical_memory
from .datasets import DATASETS, load_dataset, make_model
from .report import format_table, write_report
from .runs import Run, default_jobs, execute, plan, single_threaded_blas, summarise, train_run
from .train import (
    CONFIGS,
    DEPTHS,
    DIGITS,
    TEST_IMAGES,
    RunResult,
    TrainingDiverged,
    TrainSettings,
    total_steps,
)

__all__ = ["Settings", "main", "memory_needed", "parse_args", "progress_bar"]

# The default run (about 4 minutes on 2 idle CPU cores, see the module notes), --full (about
# nine times longer), and --quick (a second or two per run, for tests).  The photographs'
# convolutional model has its own sizes (photo_*); --steps applies to both data, --epochs to the
# digits only.
_DEFAULTS = dict(epochs=60, batch_size=64, codebook_size=256, train_size=None, hidden=256, tokens=4, token_dim=8,
                 seeds=3, data="digits", rate="default", evals=25,
                 photo_hidden=32, photo_batch=64, photo_steps=400)  # fmt: skip
_FULL = dict(_DEFAULTS, epochs=150, seeds=5, data="digits,photos", rate="full")
_QUICK = dict(epochs=10, batch_size=32, codebook_size=32, train_size=256, hidden=32, tokens=4, token_dim=4,
              seeds=2, data="digits", rate="default", evals=10,
              photo_hidden=8, photo_batch=16, photo_steps=8)  # fmt: skip
_PHOTO_QUICK = (256, 128)  # training and held-out patches of a --quick photos run


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
    seeds: list[int] = field(default_factory=lambda: [0])  # the runs' seeds: --seed, --seed + 1, ...
    data: list[str] = field(default_factory=lambda: ["digits"])
    rate: str = "default"  # the extra rate-distortion runs: none, default, full
    jobs: int = 1  # worker processes
    full: bool = False
    depths: int = DEPTHS  # Q of the residual configurations
    photo_hidden: int = 32
    photo_batch: int = 64
    photo_steps: int = 400
    evals: int = 25  # held-out evaluations per run (the training curves' points)
    argv: list[str] = field(default_factory=list)  # the options as given, for the report

    def batch_for(self, dataset: str) -> int:
        return self.batch_size if dataset == "digits" else self.photo_batch

    def training(self, dataset: str = "digits") -> TrainSettings:
        """What one training run on ``dataset`` needs (its seed, K and Q come from the run)."""
        if dataset == "digits":
            return TrainSettings(
                codebook_size=self.codebook_size, hidden=self.hidden, tokens=self.tokens, token_dim=self.token_dim,
                batch_size=self.batch_size, lr=self.lr, seed=self.seeds[0], epochs=self.epochs, steps=self.steps,
                depths=self.depths, evals=self.evals,
            )  # fmt: skip
        return TrainSettings(
            codebook_size=self.codebook_size, hidden=self.photo_hidden, tokens=0, token_dim=self.token_dim,
            batch_size=self.photo_batch, lr=self.lr, seed=self.seeds[0], steps=self.steps or self.photo_steps,
            depths=self.depths, evals=min(self.evals, 10),  # an evaluation of the patches costs ~20 steps
        )  # fmt: skip

    def sizes_for(self, dataset: str) -> tuple:
        """``(train_size, test_size)`` of :func:`vqref.demo.datasets.load_dataset`."""
        if dataset == "digits":
            return (self.train_size, None)
        return _PHOTO_QUICK if self.quick else (None, None)


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


def _data_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in DATASETS]
    if bad or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"expected {' or '.join(DATASETS)} (or both, comma-separated, once each), got {text!r}"
        )
    return names


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vqref demo",
        description=(
            "Train small VQ-VAEs (hand-written gradients, Adam) on scikit-learn's 8x8 digits (and patches of its "
            "two photographs) once per quantizer configuration and seed, and write a report: held-out "
            "reconstruction error, codebook usage, a rate-distortion plot and a table of the papers' claims."
        ),
        epilog="configurations: " + "; ".join(f"{k}: {v.description}" for k, v in CONFIGS.items()),
    )
    add = p.add_argument
    add("--configs", type=_config_list, default=list(CONFIGS), metavar="A,B,...",
        help=f"comma-separated configurations to train (default: all {len(CONFIGS)})")  # fmt: skip
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=_positive_int, default=None,
                        help=f"passes over the training digits per run (default {_DEFAULTS['epochs']}; "
                             f"--full {_FULL['epochs']})")  # fmt: skip
    length.add_argument("--steps", type=_positive_int, default=None,
                        help=f"optimizer steps per run, for both data (default: --epochs for the digits, "
                             f"{_DEFAULTS['photo_steps']} for the photos)")  # fmt: skip
    add("--batch-size", type=_positive_int, default=None, help=f"digits per step (default {_DEFAULTS['batch_size']})")
    add("--codebook-size", type=_positive_int, default=None,
        help=f"K, codes per codebook (default {_DEFAULTS['codebook_size']}; FSQ and LFQ take the nearest size "
             "they can make)")  # fmt: skip
    add("--train-size", type=_positive_int, default=None,
        help=f"training digits, at most {DIGITS - TEST_IMAGES} (default: all of them); {TEST_IMAGES} more are "
             "held out")  # fmt: skip
    add("--hidden", type=_positive_int, default=None,
        help=f"hidden units of the digits' encoder and decoder (default {_DEFAULTS['hidden']})")  # fmt: skip
    add("--tokens", type=_positive_int, default=None, help=f"T, tokens per digit (default {_DEFAULTS['tokens']})")
    add(
        "--token-dim",
        type=_positive_int,
        default=None,
        help=f"d, features per token (default {_DEFAULTS['token_dim']})",
    )
    add("--lr", type=_positive_float, default=2e-3, help="Adam learning rate (default 2e-3)")
    add("--seed", type=_seed, default=0,
        help="the first seed (default 0): it draws the digits' held-out split, and run i trains with seed "
             "--seed + i (weights, codebooks, batches)")  # fmt: skip
    add("--seeds", type=_positive_int, default=None,
        help=f"seeds per configuration (default {_DEFAULTS['seeds']}; --full {_FULL['seeds']})")  # fmt: skip
    add("--data", type=_data_list, default=None, metavar="digits,photos",
        help="the data: digits (default), photos (16x16 patches of scikit-learn's photographs, a convolutional "
             "model), or both (--full)")  # fmt: skip
    add(
        "--rate",
        choices=("none", "default", "full"),
        default=None,
        help="extra runs of the rate-distortion plot: other codebook sizes and depths (default: default; --full: full)",
    )
    add(
        "--jobs",
        type=_positive_int,
        default=None,
        help="worker processes (default: the CPU cores, at most the number of runs); 1 trains in this process",
    )
    add("--out", default=os.path.join("reports", "demo"), help="report folder (default reports/demo)")
    add("--full", action="store_true", help="the long version: more epochs and seeds, the photographs too")
    add("--quick", action="store_true", help="a tiny run (smaller data, model and codebook; for tests)")
    add("--quiet", action="store_true", help="print only the final table")
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
    if a.quick and a.full:
        parser.error("--quick and --full contradict each other; give one of them")
    base = _QUICK if a.quick else _FULL if a.full else _DEFAULTS
    pick = lambda name: getattr(a, name) if getattr(a, name) is not None else base[name]  # noqa: E731
    preset = "--quick " if a.quick else "--full " if a.full else ""

    def option(name: str) -> str:
        """``--name value`` as given, or where a default came from (the user did not type it)."""
        flag = "--" + name.replace("_", "-")
        if getattr(a, name) is not None:
            return f"{flag} {getattr(a, name)}"
        return f"the {preset}default {flag} {base[name]}"

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
    data = a.data if a.data is not None else _data_list(base["data"])
    s = Settings(
        configs=a.configs, epochs=None if a.steps is not None else pick("epochs"), steps=a.steps,
        batch_size=batch_size, codebook_size=pick("codebook_size"), train_size=train_size, hidden=pick("hidden"),
        tokens=pick("tokens"), token_dim=pick("token_dim"), lr=a.lr, seed=a.seed, out=a.out, quick=a.quick,
        quiet=a.quiet, seeds=list(range(a.seed, a.seed + pick("seeds"))), data=data, rate=pick("rate"),
        full=a.full, photo_hidden=base["photo_hidden"], photo_batch=base["photo_batch"],
        photo_steps=base["photo_steps"], evals=base["evals"], argv=list(sys.argv[1:] if argv is None else argv),
    )  # fmt: skip
    need, culprit = memory_needed(s)
    have = physical_memory()
    if have is not None and need > have:
        parser.error(
            f"these sizes need about {gib(need)} of memory, more than this machine's {gib(have)}; "
            f"{option(culprit)} is the largest part: choose a smaller one"
        )
    runs = _plan(s)
    s.jobs = a.jobs if a.jobs is not None else default_jobs(len(runs))
    if have is not None:  # each worker holds one run
        s.jobs = max(1, min(s.jobs, have // need))
    for run in {(r.dataset, r.config, r.codebook_size, r.depths): r for r in runs}.values():
        try:
            make_model(run.dataset, run.config, replace(s.training(run.dataset), codebook_size=run.codebook_size,
                                                        depths=run.depths))  # fmt: skip
        except (ValueError, TypeError) as e:
            parser.error(
                f"configuration {run.config!r} cannot be built with these options ({e}); change them or leave it out"
            )
        except MemoryError:
            parser.error(f"configuration {run.config!r} does not fit into memory with these sizes; choose smaller ones")
    return s


def _plan(s: Settings) -> list[Run]:
    """The runs of these options (:func:`vqref.demo.runs.plan`); the photos get the default
    rate-distortion points even with ``--rate full`` (their runs are the expensive ones)."""
    runs = []
    for data in s.data:
        rate = s.rate if data == "digits" or s.rate == "none" else "default"
        runs += plan([data], s.configs, s.seeds, s.codebook_size, s.depths, rate=rate)
    return runs


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


def _summary_line(label: str, r: RunResult) -> str:
    return (
        f"{label} held-out MSE {r.test_mse:.4f}  perplexity {r.perplexity:6.1f}  "
        f"codes used {100 * r.codes_used:5.1f}%  {r.train_time:5.1f} s"
    )


def _label(i: int, n: int, run: Run, width: int) -> str:
    return f"[{i + 1}/{n}] {run.dataset} {run.label:<{width}} seed {run.seed}"


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


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


def _run(s: Settings) -> int:
    """The work of :func:`main` once the options are valid: checks, data, training, report."""
    problem = missing_dependencies() or check_report_folder(s.out, s.data)
    if problem:
        return _fail(problem)

    t0 = time.perf_counter()
    datasets = {name: load_dataset(name, s.seed, *s.sizes_for(name)) for name in s.data}
    runs = _plan(s)
    if not s.quiet:
        length = {"digits": f"{s.epochs} epochs" if s.steps is None else f"{s.steps} steps"}
        length["photos"] = f"{s.training('photos').steps} steps"
        sizes = ", ".join(
            f"{d.train.shape[0]} training / {d.test.shape[0]} held-out {d.name} ({length[d.name]})"
            for d in datasets.values()
        )
        print(
            f"vqref demo: {len(runs)} runs ({len(s.configs)} configuration(s) x {len(s.seeds)} seed(s) and "
            f"{sum(not r.table for r in runs)} rate-distortion runs) in {s.jobs} process(es); {sizes}; "
            f"K = {s.codebook_size}, seeds {s.seeds[0]}..{s.seeds[-1]}",
            file=sys.stderr,
        )
    width = max(len(r.label) for r in runs)

    def serial(i: int, run: Run) -> RunResult:
        """One run in this process, under a progress bar."""
        steps = total_steps(s.training(run.dataset), datasets[run.dataset].train.shape[0])
        with progress_bar(_label(i, len(runs), run, width), steps, quiet=s.quiet) as bar:

            def progress(step: int, loss: float) -> None:
                bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)
                bar.update(step - bar.n)

            settings, sizes = s.training(run.dataset), s.sizes_for(run.dataset)
            return train_run(run, settings, s.seed, sizes, progress=None if bar.disable else progress)

    def done(i: int, run: Run, r: RunResult) -> None:
        if not s.quiet:
            print(_summary_line(_label(i, len(runs), run, width), r), file=sys.stderr, flush=True)

    with single_threaded_blas():
        results = execute(
            runs,
            lambda run: s.training(run.dataset),
            s.seed,
            lambda run: s.sizes_for(run.dataset),
            jobs=s.jobs,
            serial=serial,
            done=done,
        )
    total = time.perf_counter() - t0  # data, training and evaluation
    sections = []
    for name, data in datasets.items():
        picked = [(run, r) for run, r in zip(runs, results) if run.dataset == name]
        sections.append((data, summarise([p[0] for p in picked], [p[1] for p in picked])))
    try:
        paths = write_report(sections, s, total)
    except OSError as e:
        return _fail(f"training finished but the report could not be written into {s.out!r}: {e}")
    for data, summaries in sections:
        print(("" if len(sections) == 1 else f"{data.name}:\n") + format_table(summaries))
    _echo(f"\nreport: {paths['report']} (figures in {s.out}); {time.perf_counter() - t0:.0f} s in total")
    return 0
