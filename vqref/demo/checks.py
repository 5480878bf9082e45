"""What ``vqref demo`` checks before it trains: memory, dependencies, the report folder.

Each check answers with a reason to stop (or a number), so that the command line can refuse a
run in one line before minutes of training are spent, instead of failing afterwards.
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING

from .report import report_files
from .train import PIXELS, TEST_IMAGES

if TYPE_CHECKING:
    from .cli import Settings

__all__ = ["check_report_folder", "gib", "memory_needed", "missing_dependencies", "physical_memory"]

# module -> the package that brings it (all in the `demo` extra: pip install -e ".[demo]")
NEEDS = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm"}

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
    moments; the codebooks (Q depths for the residual configurations; 4K codes and Q + 1 depths
    in the rate-distortion runs) with their statistics;
    the blocks of token-to-code distances (the nearest-code search works in row chunks of at
    most 2^24 scores); the orthogonal regulariser's (K, K) matrices.  It is only used to refuse
    sizes that cannot fit, before anything is trained.
    """
    from ..ops.distance import default_chunk_size

    latent = s.tokens * s.token_dim
    weights = (PIXELS + 1) * s.hidden + (s.hidden + 1) * latent + (latent + 1) * s.hidden + (s.hidden + 1) * PIXELS
    rows = max(s.batch_size, TEST_IMAGES)  # images at once: a batch, or the held-out set in an evaluation
    model = _PER_WEIGHT * weights + 6 * 8 * rows * s.hidden  # and the activations
    # the largest codebooks: 4K codes and one depth more in the rate-distortion runs
    K = s.codebook_size * (4 if s.rate != "none" else 1)
    depths = s.depths + (s.rate != "none") if any(c.startswith("residual") for c in s.configs) else 1
    block = K * min(rows * s.tokens, default_chunk_size(K, s.token_dim))  # (rows, K) distances
    codes = _PER_CODE_VALUE * K * s.token_dim * depths + _PER_SCORE * block
    if "orthogonal" in s.configs:
        codes += _PER_GRAM * s.codebook_size**2
    return _BASE + model + codes, "hidden" if model > codes else "codebook_size"


def physical_memory() -> int | None:
    """The machine's memory in bytes, where the system says (POSIX); otherwise None."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - Windows
        return None


def gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB" if n < 2**40 else f"{n / 2**40:.3g} TiB"


def missing_dependencies() -> str | None:
    """Why the demo's dependencies cannot be imported, or None when they can."""
    missing, broken = [], []
    for module, package in NEEDS.items():
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
        except Exception as e:  # noqa: BLE001 - a broken install or environment raises anything
            broken.append(f"importing {module} failed ({type(e).__name__}: {e}); check its installation and settings")
    if missing:
        return (
            f'needs {" and ".join(missing)} (pip install -e ".[demo]" from a checkout, '
            f"pip install {' '.join(NEEDS.values())}, or `make demo`)"
        )
    return broken[0] if broken else None


def check_report_folder(out: str, datasets: list[str]) -> str | None:
    """Create the report folder and try writing into it, before any training; None when it works.

    A report that cannot be written after minutes of training would lose the results.
    """
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        return f"cannot create the report folder {out!r}: {e.strerror or e}; choose another --out"
    for name in report_files(datasets):
        path = os.path.join(out, name)
        if os.path.lexists(path) and not (os.path.isfile(path) and os.access(path, os.W_OK)):
            return f"cannot write {path!r} (it is not a writable file); remove it or choose another --out"
    try:
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        return f"cannot write into the report folder {out!r}: {e.strerror or e}; choose another --out"
    return None
