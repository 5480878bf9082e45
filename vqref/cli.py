"""The ``vqref`` command line: ``vqref demo``, ``vqref bench``.

Each command lives in its own module with its own ``main(argv) -> int``; bad options print a
clear message and exit with a non-zero status.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


COMMANDS = {
    "demo": ("vqref.demo", "the main job: train small VQ-VAEs on real data and write a report"),
    "bench": ("vqref.bench", "benchmarks against vector-quantize-pytorch, numpy, scikit-learn"),
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``vqref COMMAND [options]`` to ``COMMAND``'s own ``main(argv)``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<7} {help_}" for name, (_, help_) in COMMANDS.items()]
        text = "usage: vqref {" + ",".join(COMMANDS) + "} [options]\n\ncommands:\n" + "\n".join(lines)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"vqref: unknown command {argv[0]!r}\n" + text, file=sys.stderr)
            return 2
        print(text)
        return 0 if argv else 2
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
