"""`python -m mlsignal.cli` runs the `mlsignal` CLI."""

import sys

from mlsignal.cli import main

sys.exit(main())
