"""The ``vqref`` command line: ``vqref demo``, ``vqref grade``.

Each command lives in its own module with its own ``main(argv) -> int``; bad options print a
clear message and exit with a non-zero status.  (The benchmarks are not part of the installed
package: ``make bench`` or ``python -m benchmarks.bench`` from a checkout.)
"""

from __future__ import annotations

import sys

__all__ = ["main"]


COMMANDS = {
    "demo": ("vqref.demo", "the main job: train small VQ-VAEs on real data and write a report"),
    "grade": ("vqref.testing.graders", "grade your solutions to the exercises in exercises/ (vqref grade --help)"),
}

# Commands that left the package, and where they went (said instead of "unknown command").
MOVED = {
    "bench": "the benchmarks live in the repository, not the package: `make bench` or `python -m benchmarks.bench`"
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``vqref COMMAND [options]`` to ``COMMAND``'s own ``main(argv)``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<7} {help_}" for name, (_, help_) in COMMANDS.items()]
        text = "usage: vqref {" + ",".join(COMMANDS) + "} [options]\n\ncommands:\n" + "\n".join(lines)
        if not argv:
            print("vqref: which command?\n" + text, file=sys.stderr)
            return 2
        if argv[0] not in ("-h", "--help"):
            why = f"{argv[0]!r} moved: {MOVED[argv[0]]}" if argv[0] in MOVED else f"unknown command {argv[0]!r}"
            print(f"vqref: {why}\n" + text, file=sys.stderr)
            return 2
        print(text)
        return 0
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
