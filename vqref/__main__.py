"""``python -m vqref ...`` runs the command-line interface (see :mod:`vqref.cli`)."""

from .cli import main

raise SystemExit(main())
