"""`python -m pema_triton ...`: the `pema-triton` command (:mod:`pema_triton.cli`)."""

import sys

from .cli import main

sys.exit(main())
