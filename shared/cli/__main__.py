"""`python -m shared.cli` runs the `mlsignal` CLI."""

import sys

from shared.cli import main

sys.exit(main())
