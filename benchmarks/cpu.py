"""The CPU benchmarks: the same as ``vqref bench`` (see vqref/bench.py), runnable from a checkout.

    python benchmarks/cpu.py [--quick] [--only NAME[,NAME]] [--reps R] [--threads T] [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vqref.bench import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
