"""Training jobs as persisted rows: creation, state transitions, queries, and change notification for watchers."""

from __future__ import annotations

import builtins
import json
import threading
import time
import uuid
from dataclasses import dataclass, field

import sqlalchemy as sa

from shared.features import TRAINING_SPEC
from shared.labels import LabelSpec
from shared.params import ForestParams
from shared.store.db import training_jobs as jobs_table
from shared.store.registry import PRODUCTION
from training_service.evaluation import DEFAULT_CV_FOLDS

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
FINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED})
INTERRUPTED = "interrupted: the training service stopped while the job was running"


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class TrainingRequest:
    """A validated StartTrainingRequest with every default filled in."""

    symbol: str
    timeframe: str
    start_ms: int | None
    end_ms: int | None
    label: LabelSpec = LabelSpec()
    params: ForestParams = ForestParams()
    purpose: str = PRODUCTION  # "production" (passes the promotion gate) or "research" (never serves unless pinned)
    cv_folds: int = DEFAULT_CV_FOLDS  # purged k-fold cross-validation (0: none; the gate does not use it)
    feature_set: str = TRAINING_SPEC.key  # a key of shared.features.TRAINING_SPECS

    def to_json(self) -> str:
        return json.dumps(
            {
                "symbol": self.symbol,
                "timeframe": self.timeframe,
                "start_ms": self.start_ms,
                "end_ms": self.end_ms,
                "label": self.label.to_dict(),
                "params": self.params.to_dict(),
                "purpose": self.purpose,
                "cv_folds": self.cv_folds,
                **({} if self.feature_set == TRAINING_SPEC.key else {"feature_set": self.feature_set}),
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> TrainingRequest:
        d = json.loads(text)
        return cls(
            symbol=d["symbol"],
            timeframe=d["timeframe"],
            start_ms=d["start_ms"],
            end_ms=d["end_ms"],
            label=LabelSpec(**d["label"]),
            params=ForestParams.from_dict(d["params"]),
            purpose=d.get("purpose", PRODUCTION),
            cv_folds=int(d.get("cv_folds", DEFAULT_CV_FOLDS)),
            feature_set=d.get("feature_set", TRAINING_SPEC.key),
        )


@dataclass(frozen=True)
class Job:
    job_id: str
    state: str
    progress: float
    stage: str
    error: str
    model_id: str
    request: TrainingRequest
    created_at_ms: int
    started_at_ms: int | None
    finished_at_ms: int | None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


def _row_to_job(row) -> Job:
    return Job(
        job_id=row.job_id,
        state=row.state,
        progress=row.progress,
        stage=row.stage,
        error=row.error,
        model_id=row.model_id,
        request=TrainingRequest.from_json(row.request),
        created_at_ms=row.created_at,
        started_at_ms=row.started_at,
        finished_at_ms=row.finished_at,
        metrics=json.loads(row.metrics),
    )


class JobStore:
    """All reads and writes of the training_jobs table. Writers notify `changed` so watchers wake up."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine
        self.changed = threading.Condition()

    def _notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    def create(self, request: TrainingRequest) -> Job:
        job_id = uuid.uuid4().hex
        with self.engine.begin() as conn:
            conn.execute(
                jobs_table.insert().values(
                    job_id=job_id,
                    symbol=request.symbol,
                    timeframe=request.timeframe,
                    state=QUEUED,
                    progress=0.0,
                    stage="queued",
                    error="",
                    model_id="",
                    request=request.to_json(),
                    metrics="{}",
                    created_at=now_ms(),
                )
            )
        self._notify()
        return self.get_existing(job_id)

    def get(self, job_id: str) -> Job | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs_table).where(jobs_table.c.job_id == job_id)).first()
        return _row_to_job(row) if row else None

    def get_existing(self, job_id: str) -> Job:
        """A job the caller knows is stored (jobs are never deleted)."""
        job = self.get(job_id)
        if job is None:
            raise LookupError(f"training job {job_id} is not in the store")
        return job

    def list(self, symbol: str = "", timeframe: str = "", states: tuple[str, ...] = (), limit: int = 100) -> list[Job]:
        q = sa.select(jobs_table).order_by(jobs_table.c.created_at.desc(), jobs_table.c.job_id.desc()).limit(limit)
        if symbol:
            q = q.where(jobs_table.c.symbol == symbol)
        if timeframe:
            q = q.where(jobs_table.c.timeframe == timeframe)
        if states:
            q = q.where(jobs_table.c.state.in_(states))
        with self.engine.connect() as conn:
            return [_row_to_job(r) for r in conn.execute(q)]

    def queued_oldest_first(self) -> builtins.list[Job]:  # `list` is a method of this class
        return sorted(self.list(states=(QUEUED,), limit=1_000_000), key=lambda j: (j.created_at_ms, j.job_id))

    def update(self, job_id: str, *, only_from: tuple[str, ...] | None = None, conn=None, **values) -> bool:
        """Update a job; with only_from, only if its state is one of those. Returns whether a row changed."""
        if "metrics" in values:
            values["metrics"] = json.dumps(values["metrics"], sort_keys=True)
        q = jobs_table.update().where(jobs_table.c.job_id == job_id).values(**values)
        if only_from is not None:
            q = q.where(jobs_table.c.state.in_(only_from))
        if conn is not None:
            changed = conn.execute(q).rowcount > 0
        else:
            with self.engine.begin() as c:
                changed = c.execute(q).rowcount > 0
        self._notify()
        return changed

    def fail_interrupted(self) -> int:
        """On start-up: jobs left RUNNING by a previous process can never finish; mark them FAILED."""
        with self.engine.begin() as conn:
            n = conn.execute(
                jobs_table.update()
                .where(jobs_table.c.state == RUNNING)
                .values(state=FAILED, error=INTERRUPTED, stage="interrupted", finished_at=now_ms())
            ).rowcount
        self._notify()
        return n

    def wait_for_change(self, timeout: float) -> None:
        with self.changed:
            self.changed.wait(timeout)
