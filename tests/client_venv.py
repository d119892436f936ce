"""The client-only virtualenv `.venv-client`: the base install on the oldest supported gRPC stack (`make test`).

Tests that need it take `client_python`. Without it they are skipped locally; under CI (CI=true) the skip is a failure
(tests/conftest.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLIENT_VENV = REPO / ".venv-client"
CLIENT_PYTHON = CLIENT_VENV / "bin" / "python"


def require_client_python() -> Path:
    """The .venv-client interpreter; skip (a failure under CI=true) when the virtualenv is missing."""
    if CLIENT_PYTHON.is_file() and os.access(CLIENT_PYTHON, os.X_OK):
        return CLIENT_PYTHON
    msg = f"{CLIENT_VENV} is missing; `make test` creates it (the client-only install on the oldest gRPC stack)"
    pytest.skip(msg)
