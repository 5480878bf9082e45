"""Execute the notebooks from a fresh kernel; compare or rewrite their committed outputs.

The notebooks are committed with their outputs so that a reader sees the numbers and plots
without running anything. Those outputs are only worth reading if they are what the code
produces today, so ``tests/test_notebooks.py`` executes every notebook and compares each
committed text output with the fresh one, and this module, run as a script, rewrites the
outputs after a deliberate change::

    python -m tests.refresh_notebooks                       # every notebook
    python -m tests.refresh_notebooks notebooks/06_*.ipynb  # some of them
    make notebooks-refresh                                  # the same, every notebook

What is compared (``text_outputs``), per code cell:

* the text written to stdout and to stderr (each joined over the cell: how the kernel splits a
  stream into several outputs depends on when it flushes);
* the ``text/plain`` form of every result and display (a figure's is ``<Figure size WxH with
  n Axes>``), in order;
* the number of images. Images are not compared pixel by pixel (they differ by matplotlib
  version and backend), but a cell that showed a figure must still show one.

Before comparing, ``normalise`` removes what legitimately differs from run to run:

* memory addresses (``0x7f3a...``) become ``0x?``;
* wall-clock timings ("ran in 9.0 s", "880 steps in 2.1 ms") become "in ? s";
* a line rewritten with carriage returns (progress bars) keeps its final state;
* trailing spaces at the end of lines and trailing blank lines go.

Then ``same_text`` compares two normalised texts. Everything but numbers must be identical, and
numbers are compared exactly, with two exceptions for the size of rounding errors, which
depends on the order of floating-point sums (a refactoring, another BLAS kernel) and not on the
mathematics the notebooks show:

* two numbers both below ``ROUNDOFF = 1e-12`` in magnitude are equal (float64 round-off:
  ``1.78e-16`` against ``1.79e-16``, ``0.0`` against ``5e-17``);
* two numbers both written in scientific notation, which is how the notebooks print error
  sizes (a finite-difference check's ``4.5e-08``), are equal within a factor of ``10``: a wrong
  gradient (``1e-9`` becoming ``1e-1``) still fails.

Every other number must come out the same: the notebooks seed every random choice, and the
kernel runs with one BLAS thread (``kernel_env``), because the number of threads changes how
float32 matrix products round. A number that changes between two runs on one machine is a
missing seed in the notebook, to be fixed there. The committed outputs are those of this
project's machine; another CPU can round float32 products differently, and a training run in a
notebook then ends at slightly different numbers (set ``VQREF_NOTEBOOKS_EXECUTE_ONLY=1`` there
to execute the notebooks without comparing their outputs).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
TIMEOUT_S = 300  # per cell

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")
_TIMING = re.compile(r"\bin \d+(?:\.\d+)? ?(?:s|ms|us|µs)\b")
# a decimal number with an optional fraction and exponent; a leading sign belongs to the number
# unless it follows a word character (the minus of "1-2" is an operator)
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
ROUNDOFF = 1e-12
ERROR_FACTOR = 10.0


def notebooks() -> list[Path]:
    """Every notebook of the repository, in reading order."""
    return sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def kernel_env() -> dict[str, str]:
    """The kernel's environment: the caller's, with matplotlib's file backend, fixed string
    hashing and one BLAS thread (the thread count changes how float32 products round)."""
    one = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {**os.environ, **one, "MPLBACKEND": "Agg", "PYTHONHASHSEED": "0"}


def execute(path: Path, timeout: int = TIMEOUT_S) -> nbformat.NotebookNode:
    """Run ``path`` top to bottom in a new kernel, in the notebook's folder; return the executed copy.

    The committed file is not changed. A cell that raises makes this raise
    ``nbclient.exceptions.CellExecutionError`` with the cell's source and traceback.
    """
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute(env=kernel_env())
    return nb


def normalise(text: str) -> str:
    """Remove what differs between two runs of the same code (see the module docstring)."""
    lines = [line.rsplit("\r", 1)[-1].rstrip() for line in text.split("\n")]
    text = "\n".join(lines).rstrip("\n")
    text = _ADDRESS.sub("0x?", text)
    return _TIMING.sub("in ? s", text)


def _numbers_agree(a: str, b: str) -> bool:
    """Whether two printed numbers are the same number (see the module docstring)."""
    if a == b:
        return True
    x, y = abs(float(a)), abs(float(b))
    if x < ROUNDOFF and y < ROUNDOFF:
        return True
    scientific = "e" in a.lower() and "e" in b.lower()
    return scientific and x > 0 and y > 0 and max(x, y) <= ERROR_FACTOR * min(x, y)


def same_text(committed: str, fresh: str) -> bool:
    """Whether two normalised outputs agree: the same words, the same numbers (module docstring)."""
    if committed == fresh:
        return True
    a, b = _NUMBER.split(committed), _NUMBER.split(fresh)
    if a != b:  # the text around the numbers differs, or the count of numbers
        return False
    return all(_numbers_agree(x, y) for x, y in zip(_NUMBER.findall(committed), _NUMBER.findall(fresh)))


def text_outputs(cell) -> dict[str, object]:
    """What is compared of one code cell's outputs: streams, text/plain forms, image count."""
    streams: dict[str, str] = {"stdout": "", "stderr": ""}
    plain: list[str] = []
    images = 0
    for out in cell.get("outputs", []):
        kind = out["output_type"]
        if kind == "stream":
            streams[out["name"]] += out["text"]
        elif kind in ("execute_result", "display_data"):
            data = out.get("data", {})
            if "text/plain" in data:
                plain.append(normalise(data["text/plain"]))
            images += any(mime.startswith("image/") for mime in data)
        elif kind == "error":
            plain.append(f"{out['ename']}: {out['evalue']}")
    return {
        "stdout": normalise(streams["stdout"]),
        "stderr": normalise(streams["stderr"]),
        "text/plain": plain,
        "images": images,
    }


def differences(committed, fresh) -> list[str]:
    """Human-readable differences between the code cells of two versions of one notebook.

    Returns an empty list when every code cell has the same source and the same text outputs
    (after ``normalise``) and shows as many images.
    """
    old = [c for c in committed.cells if c.cell_type == "code"]
    new = [c for c in fresh.cells if c.cell_type == "code"]
    if len(old) != len(new):
        return [f"{len(old)} code cells committed, {len(new)} executed"]
    found = []
    for number, (a, b) in enumerate(zip(old, new), start=1):
        if a.source != b.source:
            found.append(f"code cell {number}: the source differs")
            continue
        want, got = text_outputs(a), text_outputs(b)
        for key in want:
            if key in ("stdout", "stderr"):
                same = same_text(want[key], got[key])
            elif key == "text/plain":
                same = len(want[key]) == len(got[key]) and all(map(same_text, want[key], got[key]))
            else:
                same = want[key] == got[key]
            if not same:
                found.append(f"code cell {number}, {key}:\n  committed: {want[key]!r}\n  fresh:     {got[key]!r}")
    return found


def refresh(path: Path) -> None:
    """Execute ``path`` and write the fresh outputs into the file (no per-cell timestamps)."""
    nb = execute(path)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nbformat.write(nb, path)


def main(argv: list[str]) -> int:
    paths = [Path(a).resolve() for a in argv] or notebooks()
    for path in paths:
        print(f"executing {path.relative_to(ROOT)}", flush=True)
        refresh(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
