"""The model registry: one row per registered model, newest first per (symbol, timeframe), and its lifecycle.

A row is the only way a model becomes visible to inference; it carries the artifact's file name and sha256, and
a JSON manifest with everything needed to reproduce the features and the probabilities (feature spec, label,
class order, prior and shrink weight, training window, library versions).

Lifecycle: every model has a stage. CANDIDATE waits for an operator; SERVING is the one model of its (symbol,
timeframe) that inference uses (the database enforces at most one); REJECTED failed the promotion gate; RETIRED
served before or was cleared away; RESEARCH was trained for research and serves only when pinned by model_id;
SHADOW passed the gate while another model served its market and predicts alongside it until the live test
(`training_service.promotion`) promotes or rejects it.
Every change of stage is written to `model_stage_changes` with its time and reason, in the same transaction as the
change itself.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import sqlalchemy as sa

from shared.drift import DriftModel
from shared.errors import FailedPrecondition, NotFound
from shared.features import FeatureSpec
from shared.labels import FIXED_HORIZON, LabelSpec
from shared.ood import OodModel
from shared.params import ForestParams
from shared.store.db import model_stage_changes as changes_table
from shared.store.db import models as models_table
from shared.store.db import registry_version as version_table

CANDIDATE, SERVING, REJECTED, RETIRED, RESEARCH = "CANDIDATE", "SERVING", "REJECTED", "RETIRED", "RESEARCH"
SHADOW = "SHADOW"
STAGES = (CANDIDATE, SERVING, REJECTED, RETIRED, RESEARCH, SHADOW)
PRODUCTION = "production"  # training purposes
RESEARCH_PURPOSE = "research"
PROMOTION_MODES = ("shadow", "auto", "manual")
PROMOTED_BY_OPERATOR = "promoted by operator"  # the reasons used when an operator gives none
ROLLED_BACK_BY_OPERATOR = "rolled back by operator"
RESEARCH_RETENTION = "research retention"


@dataclass(frozen=True)
class ModelRecord:
    """One registered model. `ood` (the out-of-distribution score's parameters, shared.ood) and `drift` (the decile
    edges and training bin shares of every feature, shared.drift) are fitted on the registered forest's training
    rows; they are None for a model registered before they were stored, which has neither."""

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
    stage: str = CANDIDATE
    stage_reason: str = ""
    ood: OodModel | None = None
    drift: DriftModel | None = None

    @property
    def warmup_bars(self) -> int:
        return self.feature_spec.warmup_bars

    def manifest(self) -> dict:
        """The manifest JSON's content; `ood` and `drift` only when the model has them."""
        out = {
            "feature_spec": self.feature_spec.to_dict(),
            "params": self.params.to_dict(),
            "classes": list(self.classes),
            "prior": list(self.prior),
            "shrink_weight": self.shrink_weight,
            "sklearn_artifact": self.sklearn_artifact,
            "sklearn_sha256": self.sklearn_sha256,
            "versions": self.versions,
            "label_kind": self.label.kind,
        }
        if self.label.volatility_scaled:  # absent for a fixed threshold, as in manifests written before
            out["label_volatility_bars"] = self.label.volatility_bars
            out["label_volatility_multiple"] = self.label.volatility_multiple
        if self.ood is not None:
            out["ood"] = self.ood.to_dict()
        if self.drift is not None:
            out["drift"] = self.drift.to_dict()
        return out


def _row_to_record(row) -> ModelRecord:
    m = json.loads(row.manifest)
    return ModelRecord(
        model_id=row.model_id,
        symbol=row.symbol,
        timeframe=row.timeframe,
        created_at_ms=row.created_at,
        train_start_ms=row.train_start,
        train_end_ms=row.train_end,
        label=LabelSpec(horizon_bars=row.horizon_bars, threshold=row.threshold,
                        kind=m.get("label_kind", FIXED_HORIZON), volatility_bars=m.get("label_volatility_bars", 0),
                        volatility_multiple=m.get("label_volatility_multiple", 0.0)),
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
        stage=row.stage,
        stage_reason=row.stage_reason,
        ood=OodModel.from_dict(m["ood"]) if m.get("ood") is not None else None,
        drift=DriftModel.from_dict(m["drift"]) if m.get("drift") is not None else None,
    )


def insert_model(conn: sa.Connection, rec: ModelRecord, shadow: bool = False) -> ModelRecord:
    """Insert a model row in its stage (`rec.stage`) inside the caller's transaction, with its first history row;
    returns the record as inserted.

    A SERVING model retires the one serving before it; with `shadow`, it becomes SHADOW instead when its market
    has a serving model (decided under the market's lock, so two registrations cannot both find the market empty)."""
    if rec.stage not in STAGES:
        raise ValueError(f"unknown model stage {rec.stage!r}")
    changed_at = now_ms()
    if rec.stage == SERVING and shadow:
        _lock_market(conn, rec.symbol, rec.timeframe)
        serving = _serving_id(conn, rec.symbol, rec.timeframe)
        if serving is not None:
            rec = replace(rec, stage=SHADOW,
                          stage_reason=f"{rec.stage_reason}; shadows {serving} until live candles decide")
    if rec.stage == SERVING:
        _retire_serving(conn, rec.symbol, rec.timeframe, f"replaced by {rec.model_id}", changed_at)
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
            stage=rec.stage,
            stage_reason=rec.stage_reason,
        )
    )
    _record_change(conn, rec.model_id, rec.symbol, rec.timeframe, rec.stage, rec.stage_reason, changed_at)
    return rec


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


# -- lifecycle -------------------------------------------------------------------------------------------------------


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class StageChange:
    """One row of a model's stage history."""

    model_id: str
    symbol: str
    timeframe: str
    stage: str
    reason: str
    changed_at_ms: int


def gate(metrics: dict[str, float], tolerance: float = 0.0) -> tuple[str, str]:
    """The promotion gate for a new production model: SERVING when its out-of-sample log loss is strictly below the
    prior's times (1 + tolerance) and its forest carries weight after calibration, else REJECTED; the reason gives
    the numbers. A calibration weight of 0 serves the class prior itself, whatever its log loss says."""
    loss, prior = metrics.get("log_loss"), metrics.get("prior_log_loss")
    if loss is None or prior is None or not (math.isfinite(loss) and math.isfinite(prior)):
        return REJECTED, "no out-of-sample log loss to compare with the prior's"
    rule = f"prior {prior:.4f} \u00d7 (1 + {tolerance:g})"
    for name in ("eval_shrink_weight", "shrink_weight"):
        weight = metrics.get(name)
        if weight is not None and not weight > 0:
            return REJECTED, (f"calibration gives the forest weight {weight:g} ({name}): the model is the class "
                              f"prior (out-of-sample log loss {loss:.4f}, {rule})")
    if loss < prior * (1 + tolerance):
        return SERVING, f"out-of-sample log loss {loss:.4f} < {rule}"
    return REJECTED, f"out-of-sample log loss {loss:.4f} >= {rule}"


def registration_stage(purpose: str, metrics: dict[str, float], promotion: str = "auto",
                       tolerance: float = 0.0) -> tuple[str, str]:
    """The stage a newly trained model is registered in, and why (see `gate`)."""
    if purpose == RESEARCH_PURPOSE:
        return RESEARCH, "trained for research; serves only when pinned by model_id"
    if promotion not in PROMOTION_MODES:
        raise ValueError(f"promotion must be one of {', '.join(PROMOTION_MODES)}, got {promotion!r}")
    if promotion == "manual":
        return CANDIDATE, "waits for an operator to promote it (MLSIGNAL_PROMOTION=manual)"
    return gate(metrics, tolerance)


def _lock_market(conn: sa.Connection, symbol: str, timeframe: str) -> None:
    """Serialize stage changes of one market until the transaction ends, so two of them never both see the same
    SERVING model: a transaction-scoped advisory lock on PostgreSQL; on SQLite a write, which takes the database's
    write lock before anything is read."""
    if conn.dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(f"mlsignal-models|{symbol}|{timeframe}".encode()).digest()[:8], "big",
                             signed=True)
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
    else:
        conn.execute(models_table.update().where(sa.false()).values(stage=models_table.c.stage))


def _record_change(conn: sa.Connection, model_id: str, symbol: str, timeframe: str, stage: str, reason: str,
                   changed_at: int) -> None:
    version = _bump_version(conn)
    conn.execute(changes_table.insert().values(model_id=model_id, symbol=symbol, timeframe=timeframe, stage=stage,
                                               reason=reason, changed_at=changed_at, version=version))


def _bump_version(conn: sa.Connection) -> int:
    """Inside the caller's transaction: the registry's next version. The row stays locked until the commit (a write
    lock on SQLite, a row lock on PostgreSQL), so versions become visible in the order they were taken."""
    conn.execute(version_table.update().where(version_table.c.id == 1)
                 .values(version=version_table.c.version + 1))
    version = conn.execute(sa.select(version_table.c.version).where(version_table.c.id == 1)).scalar()
    if version is None:
        raise RuntimeError("the registry_version row is missing; run `mlsignal db upgrade`")
    return int(version)


# -- watching the registry -------------------------------------------------------------------------------------------


def version(engine: sa.Engine) -> int:
    """The registry's version: it grows with every change of any model's stage and every model registered."""
    with engine.connect() as conn:
        found = conn.execute(sa.select(version_table.c.version).where(version_table.c.id == 1)).scalar()
    return int(found or 0)


def changed_markets(engine: sa.Engine, after: int, upto: int) -> set[tuple[str, str]]:
    """The (symbol, timeframe) of every market with a change in versions after..upto (an index range scan)."""
    q = (sa.select(changes_table.c.symbol, changes_table.c.timeframe).distinct()
         .where(changes_table.c.version > after, changes_table.c.version <= upto))
    with engine.connect() as conn:
        return {(r.symbol, r.timeframe) for r in conn.execute(q)}


def _set_stage(conn: sa.Connection, model_id: str, symbol: str, timeframe: str, stage: str, reason: str,
               changed_at: int) -> None:
    conn.execute(models_table.update().where(models_table.c.model_id == model_id)
                 .values(stage=stage, stage_reason=reason))
    _record_change(conn, model_id, symbol, timeframe, stage, reason, changed_at)


def _serving_id(conn: sa.Connection, symbol: str, timeframe: str) -> str | None:
    q = sa.select(models_table.c.model_id).where(
        models_table.c.symbol == symbol, models_table.c.timeframe == timeframe, models_table.c.stage == SERVING
    )
    return conn.execute(q).scalar()


def _retire_serving(conn: sa.Connection, symbol: str, timeframe: str, reason: str, changed_at: int) -> str | None:
    """Retire the market's SERVING model, if any; returns its id. Takes the market's lock first."""
    _lock_market(conn, symbol, timeframe)
    current = _serving_id(conn, symbol, timeframe)
    if current is not None:
        _set_stage(conn, current, symbol, timeframe, RETIRED, reason, changed_at)
    return current


#: Called inside promote and rollback, under the market's lock and before any stage changes, with the model that
#: would serve: (model_id, artifact file name, sha256). It raises (FailedPrecondition) to refuse the change.
Verify = Callable[[str, str, str], None]

ROLLED_BACK_TO, ROLLED_BACK_FROM = "rolled back to ", "rolled back from "  # reason prefixes written by `rollback`


def _check_can_serve(conn: sa.Connection, model_id: str, verify: Verify | None) -> None:
    """Under the market's lock: refuse a model whose files research retention deletes (its rows are RETIRED with
    that reason in the same locked transaction that chose the files, which go after its commit), then let `verify`
    check its artifact."""
    row = conn.execute(sa.select(models_table.c.stage, models_table.c.stage_reason, models_table.c.artifact,
                                 models_table.c.sha256).where(models_table.c.model_id == model_id)).first()
    if row is None:
        raise NotFound(f"model_id: no model {model_id!r} in the registry", field="model_id")
    if row.stage == RETIRED and row.stage_reason == RESEARCH_RETENTION:
        raise FailedPrecondition(f"model_id: model {model_id} was retired by research retention and its files "
                                 f"({row.artifact}) deleted; it cannot serve", field="model_id")
    if verify is not None:
        verify(model_id, row.artifact, row.sha256)


def promote(engine: sa.Engine, model_id: str, reason: str = "", verify: Verify | None = None) -> ModelRecord:
    """Make a model of any stage the SERVING one of its market (the one serving before becomes RETIRED).

    An empty reason is recorded as "promoted by operator". Promoting the serving model changes nothing.
    NotFound for an unknown id; FailedPrecondition for a model retired by research retention (its files are
    deleted), or when `verify` refuses its artifact: then nothing changes."""
    reason = reason.strip() or PROMOTED_BY_OPERATOR
    with engine.begin() as conn:
        row = conn.execute(sa.select(models_table.c.symbol, models_table.c.timeframe)
                           .where(models_table.c.model_id == model_id)).first()
        if row is None:
            raise NotFound(f"model_id: no model {model_id!r} in the registry", field="model_id")
        _lock_market(conn, row.symbol, row.timeframe)
        if _serving_id(conn, row.symbol, row.timeframe) != model_id:
            _check_can_serve(conn, model_id, verify)
            at = now_ms()
            _retire_serving(conn, row.symbol, row.timeframe, f"replaced by {model_id}: {reason}", at)
            _set_stage(conn, model_id, row.symbol, row.timeframe, SERVING, reason, at)
    found = get_model(engine, model_id)
    assert found is not None  # rows are never deleted
    return found


def serving_stack(conn: sa.Connection, symbol: str, timeframe: str) -> list[str]:
    """The market's models that served, as a stack replayed from its history in change order: every change to
    SERVING pushes its model (registration, promotion by an operator or by the live test), except a rollback's,
    which pops the model rolled back from. The top is the model serving now (when one does); rollback brings back
    the one below it.

    A rollback's change to SERVING is told apart by the change written just before it in the same transaction:
    the RETIRED change of the model rolled back from, whose reason this module writes as "rolled back to <id>: ..."
    (an operator's reason comes after that prefix, so it cannot imitate one)."""
    c = changes_table.c
    q = (sa.select(c.model_id, c.stage, c.reason)
         .where(c.symbol == symbol, c.timeframe == timeframe,
                sa.or_(c.stage == SERVING,
                       sa.and_(c.stage == RETIRED, c.reason.startswith(ROLLED_BACK_TO, autoescape=True))))
         .order_by(c.change_id))
    stack: list[str] = []
    before: sa.Row | None = None
    for change in conn.execute(q):
        if change.stage == SERVING:
            rolled_back_from = (
                before.model_id
                if before is not None and before.stage == RETIRED
                and before.reason.startswith(f"{ROLLED_BACK_TO}{change.model_id}: ")
                and change.reason.startswith(f"{ROLLED_BACK_FROM}{before.model_id}: ")
                else None
            )
            if rolled_back_from is not None:
                if stack and stack[-1] == rolled_back_from:
                    stack.pop()
                if change.model_id in stack:  # normally the top already
                    del stack[len(stack) - stack[::-1].index(change.model_id):]
                else:
                    stack.append(change.model_id)
            elif not stack or stack[-1] != change.model_id:
                stack.append(change.model_id)
        before = change
    return stack


def rollback(engine: sa.Engine, symbol: str, timeframe: str, reason: str = "",
             verify: Verify | None = None) -> ModelRecord:
    """Retire the market's SERVING model and make the one that served before it SERVING again. Rollbacks walk
    back: after A, B, C were promoted in turn, a rollback brings back B, a second one A (see `serving_stack`).

    An empty reason is recorded as "rolled back by operator". FailedPrecondition when nothing serves, when nothing
    served before, or when `verify` refuses the artifact of the model it would bring back: then nothing changes."""
    reason = reason.strip() or ROLLED_BACK_BY_OPERATOR
    with engine.begin() as conn:
        _lock_market(conn, symbol, timeframe)
        current = _serving_id(conn, symbol, timeframe)
        if current is None:
            raise FailedPrecondition(f"no model is serving {symbol} {timeframe}: there is nothing to roll back",
                                     field="symbol")
        stack = serving_stack(conn, symbol, timeframe)
        if not stack or stack[-1] != current:
            stack.append(current)
        if len(stack) < 2:
            raise FailedPrecondition(f"no model served {symbol} {timeframe} before {current}: there is nothing to "
                                     "roll back to", field="symbol")
        previous = stack[-2]
        _check_can_serve(conn, previous, verify)
        at = now_ms()
        _set_stage(conn, current, symbol, timeframe, RETIRED, f"{ROLLED_BACK_TO}{previous}: {reason}", at)
        _set_stage(conn, previous, symbol, timeframe, SERVING, f"{ROLLED_BACK_FROM}{current}: {reason}", at)
    found = get_model(engine, previous)
    assert found is not None
    return found


def retire_old_research(conn: sa.Connection, symbol: str, timeframe: str, keep: int,
                        created_before_ms: int | None = None) -> list[str]:
    """Inside the caller's transaction: retire the market's RESEARCH models beyond the newest `keep` (only those
    created before `created_before_ms` when given, so a running walk-forward keeps the models it still has to
    predict with), with the reason "research retention"; returns the names of their artifact files, for the caller
    to delete after the commit."""
    _lock_market(conn, symbol, timeframe)
    q = (
        sa.select(models_table.c.model_id, models_table.c.artifact, models_table.c.manifest,
                  models_table.c.created_at)
        .where(models_table.c.symbol == symbol, models_table.c.timeframe == timeframe,
               models_table.c.stage == RESEARCH)
        .order_by(*_NEWEST_FIRST)
        .offset(max(keep, 0))
    )
    files: list[str] = []
    at = now_ms()
    for model_id, artifact, manifest, created_at in conn.execute(q).all():
        if created_before_ms is not None and created_at >= created_before_ms:
            continue
        _set_stage(conn, model_id, symbol, timeframe, RETIRED, RESEARCH_RETENTION, at)
        files.append(artifact)
        try:
            sklearn_artifact = json.loads(manifest).get("sklearn_artifact", "")
        except ValueError:
            sklearn_artifact = ""
        if sklearn_artifact:
            files.append(sklearn_artifact)
    return files


def serving_model(engine: sa.Engine, symbol: str, timeframe: str) -> ModelRecord | None:
    """The market's SERVING model, or None."""
    found = serving_row(engine, symbol, timeframe)
    return found.record() if found is not None else None


def serving_row(engine: sa.Engine, symbol: str, timeframe: str) -> ModelRow | None:
    """The unparsed row of the market's SERVING model, or None."""
    q = sa.select(models_table).where(
        models_table.c.symbol == symbol, models_table.c.timeframe == timeframe, models_table.c.stage == SERVING
    )
    with engine.connect() as conn:
        row = conn.execute(q).first()
    return _model_row(row) if row else None


def stage_history(engine: sa.Engine, symbol: str = "", timeframe: str = "", model_id: str = "",
                  limit: int | None = None) -> list[StageChange]:
    """Stage changes in the order they were made (by change id, so two in the same millisecond, or after the clock
    stepped back, keep their order), oldest first (the newest `limit` when given), optionally of one market or one
    model."""
    q = sa.select(changes_table)
    if symbol:
        q = q.where(changes_table.c.symbol == symbol)
    if timeframe:
        q = q.where(changes_table.c.timeframe == timeframe)
    if model_id:
        q = q.where(changes_table.c.model_id == model_id)
    q = q.order_by(changes_table.c.change_id.desc())  # the order they were made in, whatever the clock said
    if limit:
        q = q.limit(limit)
    with engine.connect() as conn:
        rows = conn.execute(q).all()
    return [StageChange(r.model_id, r.symbol, r.timeframe, r.stage, r.reason, int(r.changed_at))
            for r in reversed(rows)]


def newest_production_model(engine: sa.Engine, symbol: str, timeframe: str) -> ModelRecord | None:
    """The market's newest model trained for production, whatever its stage now (a research model is registered
    RESEARCH, so its history holds that stage), or None."""
    research = sa.select(changes_table.c.model_id).where(changes_table.c.stage == RESEARCH)
    q = (
        sa.select(models_table)
        .where(models_table.c.symbol == symbol, models_table.c.timeframe == timeframe,
               models_table.c.stage != RESEARCH, models_table.c.model_id.not_in(research))
        .order_by(*_NEWEST_FIRST)
        .limit(1)
    )
    with engine.connect() as conn:
        row = conn.execute(q).first()
    return _row_to_record(row) if row else None


def serving_models(engine: sa.Engine) -> list[tuple[str, str, str, int]]:
    """(symbol, timeframe, model_id, created_at_ms) of every SERVING model."""
    c = models_table.c
    q = sa.select(c.symbol, c.timeframe, c.model_id, c.created_at).where(c.stage == SERVING)
    with engine.connect() as conn:
        return [(s, tf, m, int(created)) for s, tf, m, created in conn.execute(q)]


# -- shadows -----------------------------------------------------------------------------------------------------------


def shadow_rows(engine: sa.Engine, symbol: str, timeframe: str) -> list[ModelRow]:
    """The market's SHADOW models, unparsed, oldest first."""
    q = (sa.select(models_table)
         .where(models_table.c.symbol == symbol, models_table.c.timeframe == timeframe,
                models_table.c.stage == SHADOW)
         .order_by(models_table.c.created_at, models_table.c.model_id))
    with engine.connect() as conn:
        return [_model_row(r) for r in conn.execute(q)]


def markets_with_shadows(engine: sa.Engine) -> list[tuple[str, str]]:
    """Every (symbol, timeframe) with at least one SHADOW model."""
    q = sa.select(models_table.c.symbol, models_table.c.timeframe).where(models_table.c.stage == SHADOW).distinct()
    with engine.connect() as conn:
        return sorted((r.symbol, r.timeframe) for r in conn.execute(q))


def settle_shadow(engine: sa.Engine, shadow_id: str, serving_id: str, promote_it: bool, reason: str) -> bool:
    """Apply the live test's decision on a shadow: make it SERVING (the serving model becomes RETIRED) or REJECTED.

    Only while the shadow is still SHADOW and `serving_id` still serves its market (checked under the market's
    lock, so two replicas deciding at once apply it once); returns whether it was applied."""
    with engine.begin() as conn:
        row = conn.execute(sa.select(models_table.c.symbol, models_table.c.timeframe, models_table.c.stage)
                           .where(models_table.c.model_id == shadow_id)).first()
        if row is None:
            return False
        _lock_market(conn, row.symbol, row.timeframe)
        stage = conn.execute(sa.select(models_table.c.stage).where(models_table.c.model_id == shadow_id)).scalar()
        if stage != SHADOW or _serving_id(conn, row.symbol, row.timeframe) != serving_id:
            return False
        at = now_ms()
        if promote_it:
            _set_stage(conn, serving_id, row.symbol, row.timeframe, RETIRED, f"replaced by {shadow_id}: {reason}", at)
            _set_stage(conn, shadow_id, row.symbol, row.timeframe, SERVING, reason, at)
        else:
            _set_stage(conn, shadow_id, row.symbol, row.timeframe, REJECTED, reason, at)
    return True
