"""The model registry: one row per registered model, newest first per (symbol, timeframe).

A row is the only way a model becomes visible to inference; it carries the artifact's file name and sha256, and
a JSON manifest with everything needed to reproduce the features and the probabilities (feature spec, label,
class order, prior and shrink weight, training window, library versions).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import sqlalchemy as sa

from shared.features import FeatureSpec
from shared.labels import LabelSpec
from shared.params import ForestParams
from shared.store.db import models as models_table


@dataclass(frozen=True)
class ModelRecord:
    model_id: str
    symbol: str
    timeframe: str
    created_at_ms: int
    train_start_ms: int
    train_end_ms: int
    label: LabelSpec
    feature_spec: FeatureSpec
    params: ForestParams
    classes: tuple[str, ...]
    prior: tuple[float, ...]
    shrink_weight: float
    metrics: dict[str, float]
    artifact: str  # ONNX file name inside the model directory
    sha256: str
    sklearn_artifact: str = ""
    sklearn_sha256: str = ""
    job_id: str | None = None
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def warmup_bars(self) -> int:
        return self.feature_spec.warmup_bars

    def manifest(self) -> dict:
        return {
            "feature_spec": self.feature_spec.to_dict(),
            "params": self.params.to_dict(),
            "classes": list(self.classes),
            "prior": list(self.prior),
            "shrink_weight": self.shrink_weight,
            "sklearn_artifact": self.sklearn_artifact,
            "sklearn_sha256": self.sklearn_sha256,
            "versions": self.versions,
        }


def _row_to_record(row) -> ModelRecord:
    m = json.loads(row.manifest)
    return ModelRecord(
        model_id=row.model_id,
        symbol=row.symbol,
        timeframe=row.timeframe,
        created_at_ms=row.created_at,
        train_start_ms=row.train_start,
        train_end_ms=row.train_end,
        label=LabelSpec(horizon_bars=row.horizon_bars, threshold=row.threshold),
        feature_spec=FeatureSpec.from_dict(m["feature_spec"]),
        params=ForestParams.from_dict(m["params"]),
        classes=tuple(m["classes"]),
        prior=tuple(m["prior"]),
        shrink_weight=float(m["shrink_weight"]),
        metrics=json.loads(row.metrics),
        artifact=row.artifact,
        sha256=row.sha256,
        sklearn_artifact=m.get("sklearn_artifact", ""),
        sklearn_sha256=m.get("sklearn_sha256", ""),
        job_id=row.job_id,
        versions=m.get("versions", {}),
    )


def insert_model(conn: sa.Connection, rec: ModelRecord) -> None:
    """Insert a model row inside the caller's transaction."""
    conn.execute(
        models_table.insert().values(
            model_id=rec.model_id,
            symbol=rec.symbol,
            timeframe=rec.timeframe,
            created_at=rec.created_at_ms,
            train_start=rec.train_start_ms,
            train_end=rec.train_end_ms,
            horizon_bars=rec.label.horizon_bars,
            threshold=rec.label.threshold,
            warmup_bars=rec.warmup_bars,
            manifest=json.dumps(rec.manifest(), sort_keys=True),
            metrics=json.dumps(rec.metrics, sort_keys=True),
            artifact=rec.artifact,
            sha256=rec.sha256,
            job_id=rec.job_id,
        )
    )


_NEWEST_FIRST = (models_table.c.created_at.desc(), models_table.c.model_id.desc())


def list_models(
    engine: sa.Engine, symbol: str = "", timeframe: str = "", limit: int | None = None
) -> list[ModelRecord]:
    q = sa.select(models_table).order_by(*_NEWEST_FIRST)
    if symbol:
        q = q.where(models_table.c.symbol == symbol)
    if timeframe:
        q = q.where(models_table.c.timeframe == timeframe)
    if limit:
        q = q.limit(limit)
    with engine.connect() as conn:
        return [_row_to_record(r) for r in conn.execute(q)]


def newest_model(engine: sa.Engine, symbol: str, timeframe: str) -> ModelRecord | None:
    found = list_models(engine, symbol, timeframe, limit=1)
    return found[0] if found else None


def newest_model_id(engine: sa.Engine, symbol: str, timeframe: str) -> str | None:
    """Cheap poll for hot reload: only the id of the newest model."""
    q = (
        sa.select(models_table.c.model_id)
        .where(models_table.c.symbol == symbol, models_table.c.timeframe == timeframe)
        .order_by(*_NEWEST_FIRST)
        .limit(1)
    )
    with engine.connect() as conn:
        return conn.execute(q).scalar()


def get_model(engine: sa.Engine, model_id: str) -> ModelRecord | None:
    with engine.connect() as conn:
        row = conn.execute(sa.select(models_table).where(models_table.c.model_id == model_id)).first()
    return _row_to_record(row) if row else None


# -- light, bounded reads for inference ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRow:
    """One registry row as stored, before its manifest is parsed: enough to order, compare and locate a model.

    `fingerprint` is the sha256 of every stored column, so it changes whenever the row does. `record()` parses the
    row; it raises when the row cannot be read (for example a manifest written by a newer version).
    """

    model_id: str
    symbol: str
    timeframe: str
    created_at_ms: int
    warmup_bars: int
    artifact: str
    sha256: str
    fingerprint: str
    row: sa.Row = field(repr=False, compare=False)

    def record(self) -> ModelRecord:
        return _row_to_record(self.row)


@dataclass(frozen=True)
class MarketModels:
    rows: list[ModelRow]  # newest first, at most the limit asked for
    max_warmup_bars: int  # the largest warm-up of any model registered for the market (0 when there is none)


def _model_row(row: sa.Row) -> ModelRow:
    content = json.dumps([[k, v] for k, v in row._mapping.items()], default=str, sort_keys=True)
    return ModelRow(
        model_id=row.model_id, symbol=row.symbol, timeframe=row.timeframe, created_at_ms=int(row.created_at),
        warmup_bars=int(row.warmup_bars), artifact=row.artifact, sha256=row.sha256,
        fingerprint=hashlib.sha256(content.encode()).hexdigest(), row=row,
    )


def market_models(
    engine: sa.Engine, symbol: str, timeframe: str, limit: int, offset: int = 0, since_ms: int | None = None
) -> MarketModels:
    """At most `limit` rows of one market, newest first (from `offset`; only rows created at or after `since_ms`
    when given), unparsed, plus the largest warm-up over all its rows. `limit=0` reads only the warm-up."""
    key = (models_table.c.symbol == symbol, models_table.c.timeframe == timeframe)
    with engine.connect() as conn:
        warmup = conn.execute(sa.select(sa.func.max(models_table.c.warmup_bars)).where(*key)).scalar()
        rows: list[ModelRow] = []
        if limit > 0:
            q = sa.select(models_table).where(*key)
            if since_ms is not None:
                q = q.where(models_table.c.created_at >= since_ms)
            q = q.order_by(*_NEWEST_FIRST).limit(limit).offset(offset)
            rows = [_model_row(r) for r in conn.execute(q)]
    return MarketModels(rows, int(warmup or 0))


def model_row(engine: sa.Engine, model_id: str) -> ModelRow | None:
    """The unparsed row of one model, or None."""
    with engine.connect() as conn:
        row = conn.execute(sa.select(models_table).where(models_table.c.model_id == model_id)).first()
    return _model_row(row) if row else None
