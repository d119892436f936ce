"""The client-only virtualenv `.venv-client`: the base install on the oldest supported gRPC stack (`make test`).

Tests that need it take `client_python`. Without it they are skipped locally, but fail on CI (CI=true), where every
check must run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLIENT_VENV = REPO / ".venv-client"
CLIENT_PYTHON = CLIENT_VENV / "bin" / "python"


def require_client_python() -> Path:
    """The .venv-client interpreter; skip (fail under CI=true) when the virtualenv is missing."""
    if CLIENT_PYTHON.is_file() and os.access(CLIENT_PYTHON, os.X_OK):
        return CLIENT_PYTHON
    msg = f"{CLIENT_VENV} is missing; `make test` creates it (the client-only install on the oldest gRPC stack)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg + "; CI=true requires the compatibility checks to run")
    pytest.skip(msg)
