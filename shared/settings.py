"""All configuration, read from MLSIGNAL_* environment variables in this one place.

| variable | default | meaning |
| --- | --- | --- |
| MLSIGNAL_DATABASE_URL | sqlite:///./var/mlsignal.db | SQLAlchemy URL; `postgresql+psycopg://user:pw@host/db` for PostgreSQL |
| MLSIGNAL_MODEL_DIR | ./var/models | where model artifacts are written (training) and read (inference) |
| MLSIGNAL_TRAINING_ADDR | 127.0.0.1:50051 | listen address of mlsignal-training; target of the CLI |
| MLSIGNAL_INFERENCE_ADDR | 127.0.0.1:50052 | listen address of mlsignal-inference; target of the CLI |
| MLSIGNAL_TRAINING_WORKERS | 1 | training jobs that run at once, each in its own process |
| MLSIGNAL_TRAINING_QUEUE_SIZE | 16 | queued jobs accepted before StartTraining answers RESOURCE_EXHAUSTED |
| MLSIGNAL_TRAINING_FIT_JOBS | -1 | cores one forest fit uses (-1: all) |
| MLSIGNAL_MODEL_POLL_SECONDS | 2 | how often inference checks the registry for newer models |
| MLSIGNAL_MODEL_CACHE_SIZE | 32 | models inference keeps in memory |
| MLSIGNAL_MAX_BATCH | 10000 | most candles in one PredictRequest |
| MLSIGNAL_GRACE_SECONDS | 5 | how long a stopping server lets calls finish |
| MLSIGNAL_LOG_LEVEL | INFO | log level |
| MLSIGNAL_LOG_FORMAT | text | `text` or `json` (one object per line) |
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

ENV_PREFIX = "MLSIGNAL_"


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected an integer") from None


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number") from None


def _str(name: str, default: str) -> str:
    raw = os.environ.get(name)
    return default if raw is None or raw == "" else raw


@dataclass(frozen=True)
class Settings:
    database_url: str = "sqlite:///./var/mlsignal.db"
    model_dir: Path = Path("./var/models")
    training_addr: str = "127.0.0.1:50051"
    inference_addr: str = "127.0.0.1:50052"
    training_workers: int = 1
    training_queue_size: int = 16
    training_fit_jobs: int = -1
    model_poll_seconds: float = 2.0
    model_cache_size: int = 32
    max_batch: int = 10_000
    grace_seconds: float = 5.0
    log_level: str = "INFO"
    log_format: str = "text"

    @classmethod
    def from_env(cls) -> "Settings":
        d = cls()
        s = cls(
            database_url=_str("MLSIGNAL_DATABASE_URL", d.database_url),
            model_dir=Path(_str("MLSIGNAL_MODEL_DIR", str(d.model_dir))),
            training_addr=_str("MLSIGNAL_TRAINING_ADDR", d.training_addr),
            inference_addr=_str("MLSIGNAL_INFERENCE_ADDR", d.inference_addr),
            training_workers=_int("MLSIGNAL_TRAINING_WORKERS", d.training_workers),
            training_queue_size=_int("MLSIGNAL_TRAINING_QUEUE_SIZE", d.training_queue_size),
            training_fit_jobs=_int("MLSIGNAL_TRAINING_FIT_JOBS", d.training_fit_jobs),
            model_poll_seconds=_float("MLSIGNAL_MODEL_POLL_SECONDS", d.model_poll_seconds),
            model_cache_size=_int("MLSIGNAL_MODEL_CACHE_SIZE", d.model_cache_size),
            max_batch=_int("MLSIGNAL_MAX_BATCH", d.max_batch),
            grace_seconds=_float("MLSIGNAL_GRACE_SECONDS", d.grace_seconds),
            log_level=_str("MLSIGNAL_LOG_LEVEL", d.log_level).upper(),
            log_format=_str("MLSIGNAL_LOG_FORMAT", d.log_format).lower(),
        )
        s.validate()
        return s

    def validate(self) -> None:
        if self.training_workers < 1:
            raise ValueError("MLSIGNAL_TRAINING_WORKERS must be >= 1")
        if self.training_queue_size < 1:
            raise ValueError("MLSIGNAL_TRAINING_QUEUE_SIZE must be >= 1")
        if self.model_poll_seconds <= 0:
            raise ValueError("MLSIGNAL_MODEL_POLL_SECONDS must be > 0")
        if self.model_cache_size < 1:
            raise ValueError("MLSIGNAL_MODEL_CACHE_SIZE must be >= 1")
        if not 1 <= self.max_batch <= 1_000_000:
            raise ValueError("MLSIGNAL_MAX_BATCH must be between 1 and 1000000")
        if self.log_format not in ("text", "json"):
            raise ValueError("MLSIGNAL_LOG_FORMAT must be 'text' or 'json'")


def known_variables() -> set[str]:
    """Every MLSIGNAL_* variable this module reads."""
    return {ENV_PREFIX + f.name.upper() for f in fields(Settings)}
