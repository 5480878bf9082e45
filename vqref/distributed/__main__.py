"""``mpiexec -n 2 python -m vqref.distributed``: the selftest on every rank of ``MPI.COMM_WORLD``."""

import sys

from .selftest import main

sys.exit(main())
