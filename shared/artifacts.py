"""Model artifact files: written atomically, verified by sha256 before anything reads them.

The served artifact is an ONNX file (no pickle). The scikit-learn forest is also kept, as a joblib file, for
research and parity checks; it is only ever loaded after its sha256 matches the registry.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


class ArtifactError(Exception):
    """A model file is missing, outside the model directory, or does not match its recorded sha256."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_atomic(path: Path, data: bytes) -> str:
    """Write data to path via a temporary file in the same directory and a rename; returns the sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return sha256_bytes(data)


def resolve_in(model_dir: Path, name: str) -> Path:
    """The path of an artifact name inside model_dir; refuses names that would escape it."""
    base = Path(model_dir).resolve()
    path = (base / name).resolve()
    if path.parent != base:
        raise ArtifactError(f"artifact name {name!r} is not a plain file name inside {base}")
    return path


def read_verified(model_dir: Path, name: str, sha256: str) -> bytes:
    """Bytes of an artifact whose sha256 matches; ArtifactError otherwise (never returns unverified bytes)."""
    path = resolve_in(model_dir, name)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"model file {path} is missing") from None
    actual = sha256_bytes(data)
    if actual != sha256:
        raise ArtifactError(f"model file {path} has sha256 {actual}, the registry expects {sha256}")
    return data
