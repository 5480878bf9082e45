"""``python -m vqref.demo [options]``: the same as ``vqref demo`` (see :mod:`vqref.demo.cli`)."""

from .cli import main

raise SystemExit(main())
