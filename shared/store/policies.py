"""Retrain policies as stored rows: create or replace, list, delete, and the reads and claims of the policy runner.

A policy retrains one market (symbol, timeframe) every `every_ms` on the last `window_ms` of closed candles
(`training_service.policies` runs them). Several training replicas may share the table: a replica claims a due
policy with one conditional UPDATE that advances `next_run_at` past its due time and takes the lease
(`lease_owner` until `lease_until`) only if nobody advanced it first, so each due time is claimed once. The lease
marks the claim while the replica starts the job; it is released with the outcome, or handed back with the old due
time when the job could not be queued yet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from shared.labels import LabelSpec
from shared.params import ForestParams
from shared.store.db import candles
from shared.store.db import retrain_policies as table
from shared.timeframes import TIMEFRAME_MS, timeframe_ms

#: `last_job_state` values: nothing started yet, a job started whose end is not recorded yet, a recorded end.
NO_JOB = ""
JOB_ACTIVE = ("QUEUED", "RUNNING")


@dataclass(frozen=True)
class RetrainPolicy:
    """A market's retrain policy; the last five fields are kept by the service, not set by a client."""

    symbol: str
    timeframe: str
    every_ms: int
    window_ms: int
    label: LabelSpec = LabelSpec()
    params: ForestParams = field(default_factory=ForestParams)
    paused: bool = False
    cross_validate: bool = False
    next_run_at_ms: int = 0
    last_job_id: str = ""
    last_job_state: str = NO_JOB
    last_outcome: str = ""
    lease_owner: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.symbol, self.timeframe


def label_json(label: LabelSpec) -> str:
    return json.dumps({"horizon_bars": label.horizon_bars, "threshold": label.threshold, "kind": label.kind},
                      sort_keys=True)


def _row(row: sa.Row) -> RetrainPolicy:
    return RetrainPolicy(
        symbol=row.symbol,
        timeframe=row.timeframe,
        every_ms=int(row.every_ms),
        window_ms=int(row.window_ms),
        label=LabelSpec(**json.loads(row.label)),
        params=ForestParams.from_dict(json.loads(row.params)),
        paused=bool(row.paused),
        cross_validate=bool(row.cross_validate),
        next_run_at_ms=int(row.next_run_at),
        last_job_id=row.last_job_id,
        last_job_state=row.last_job_state,
        last_outcome=row.last_outcome,
        lease_owner=row.lease_owner,
    )


def _key(symbol: str, timeframe: str) -> tuple:
    return table.c.symbol == symbol, table.c.timeframe == timeframe


def _upsert(dialect: str):
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise ValueError(f"database dialect {dialect!r} is not supported; use SQLite or PostgreSQL")


def put(engine: sa.Engine, policy: RetrainPolicy, now_ms: int) -> RetrainPolicy:
    """Create or replace the policy of `policy.key`; returns it as stored.

    A new policy is due at `now_ms`. A replaced one keeps its schedule and history (next due time, last job and
    outcome, a lease in progress), except that its next due time comes no later than one new `every` from now."""
    values = {
        "symbol": policy.symbol, "timeframe": policy.timeframe, "every_ms": policy.every_ms,
        "window_ms": policy.window_ms, "label": label_json(policy.label),
        "params": json.dumps(policy.params.to_dict(), sort_keys=True), "paused": policy.paused,
        "cross_validate": policy.cross_validate, "next_run_at": now_ms, "last_job_id": "", "last_job_state": NO_JOB,
        "last_outcome": "", "created_at": now_ms, "updated_at": now_ms,
    }
    latest = now_ms + policy.every_ms
    insert = _upsert(engine.dialect.name).values(**values)
    statement = insert.on_conflict_do_update(
        index_elements=[table.c.symbol, table.c.timeframe],
        set_={
            "every_ms": insert.excluded.every_ms, "window_ms": insert.excluded.window_ms,
            "label": insert.excluded.label, "params": insert.excluded.params, "paused": insert.excluded.paused,
            "cross_validate": insert.excluded.cross_validate,
            "next_run_at": sa.case((table.c.next_run_at > latest, latest), else_=table.c.next_run_at),
            "updated_at": insert.excluded.updated_at,
        },
    )
    with engine.begin() as conn:
        conn.execute(statement)
        row = conn.execute(sa.select(table).where(*_key(policy.symbol, policy.timeframe))).one()
    return _row(row)


def get(engine: sa.Engine, symbol: str, timeframe: str) -> RetrainPolicy | None:
    with engine.connect() as conn:
        row = conn.execute(sa.select(table).where(*_key(symbol, timeframe))).first()
    return _row(row) if row is not None else None


def _order(policies: list[RetrainPolicy]) -> list[RetrainPolicy]:
    return sorted(policies, key=lambda p: (p.symbol, TIMEFRAME_MS.get(p.timeframe, 0), p.timeframe))


def list_policies(engine: sa.Engine, symbol: str = "", timeframe: str = "") -> list[RetrainPolicy]:
    """Every policy (of one symbol and/or timeframe when given), by symbol, then timeframe from short to long."""
    q = sa.select(table)
    if symbol:
        q = q.where(table.c.symbol == symbol)
    if timeframe:
        q = q.where(table.c.timeframe == timeframe)
    with engine.connect() as conn:
        return _order([_row(r) for r in conn.execute(q)])


def delete(engine: sa.Engine, symbol: str, timeframe: str) -> RetrainPolicy | None:
    """Delete a market's policy; returns it as it was, or None when there was none. A job it started keeps running."""
    with engine.begin() as conn:
        row = conn.execute(sa.delete(table).where(*_key(symbol, timeframe)).returning(*table.c)).first()
    return _row(row) if row is not None else None


# -- the runner ------------------------------------------------------------------------------------------------------


def next_due(due_ms: int, every_ms: int, now_ms: int) -> int:
    """The first due time after `now_ms` on the schedule `due_ms + k * every_ms`: however many due times passed
    meanwhile (a service that was down), the policy runs once for them."""
    if due_ms > now_ms:
        return due_ms
    return due_ms + every_ms * ((now_ms - due_ms) // every_ms + 1)


def _abandoned(now_ms: int):
    """A claim whose lease expired without being released: the replica that claimed it stopped before it recorded
    a job, so the due time it took is still owed."""
    return sa.and_(table.c.lease_owner.is_not(None), table.c.lease_until <= now_ms)


def due(engine: sa.Engine, now_ms: int, limit: int = 1000) -> list[RetrainPolicy]:
    """Unpaused policies due at `now_ms` whose lease is free or expired, and abandoned claims (see `_abandoned`),
    the longest due first."""
    q = (
        sa.select(table)
        .where(sa.or_(table.c.next_run_at <= now_ms, _abandoned(now_ms)), table.c.paused == sa.false(),
               sa.or_(table.c.lease_until.is_(None), table.c.lease_until <= now_ms))
        .order_by(table.c.next_run_at, table.c.symbol, table.c.timeframe)
        .limit(limit)
    )
    with engine.connect() as conn:
        return [_row(r) for r in conn.execute(q)]


def due_count(engine: sa.Engine, now_ms: int) -> int:
    """Unpaused policies due at `now_ms` (claimed or not)."""
    q = sa.select(sa.func.count()).where(table.c.next_run_at <= now_ms, table.c.paused == sa.false())
    with engine.connect() as conn:
        return int(conn.execute(q).scalar_one())


def claim(engine: sa.Engine, policy: RetrainPolicy, owner: str, now_ms: int, lease_ms: int) -> RetrainPolicy | None:
    """Claim a due policy as read by `due`: advance its next due time past `now_ms` and take the lease, in one
    conditional UPDATE that only matches while the row is still as read: due (or an abandoned claim, whose due time
    was already advanced and stays), unpaused and not leased. Returns the claimed policy (its new `next_run_at_ms`),
    or None when another replica (or a change of the policy) came first. On PostgreSQL a concurrent claim waits for
    the row lock and then finds `next_run_at` or the lease changed."""
    new_next = next_due(policy.next_run_at_ms, policy.every_ms, now_ms)
    owner_as_read = (table.c.lease_owner.is_(None) if policy.lease_owner is None
                     else table.c.lease_owner == policy.lease_owner)
    q = (
        sa.update(table)
        .where(*_key(policy.symbol, policy.timeframe), table.c.next_run_at == policy.next_run_at_ms,
               sa.or_(table.c.next_run_at <= now_ms, _abandoned(now_ms)), owner_as_read,
               table.c.every_ms == policy.every_ms, table.c.paused == sa.false(),
               sa.or_(table.c.lease_until.is_(None), table.c.lease_until <= now_ms))
        .values(next_run_at=new_next, lease_owner=owner, lease_until=now_ms + lease_ms)
    )
    with engine.begin() as conn:
        if conn.execute(q).rowcount != 1:
            return None
    return replace(policy, next_run_at_ms=new_next, lease_owner=owner)


def release(engine: sa.Engine, policy: RetrainPolicy, owner: str, now_ms: int, *, next_run_at_ms: int | None = None,
            **values: str) -> bool:
    """Release the lease `owner` holds on a policy, writing `values` (last_job_id, last_job_state, last_outcome) and,
    when given, putting `next_run_at_ms` back (a claim handed back). False when the lease was no longer ours (it
    expired and another replica took the policy) or the policy was deleted."""
    changes: dict = {"lease_owner": None, "lease_until": None, "updated_at": now_ms, **values}
    if next_run_at_ms is not None:
        changes["next_run_at"] = next_run_at_ms
    q = sa.update(table).where(*_key(policy.symbol, policy.timeframe), table.c.lease_owner == owner).values(**changes)
    with engine.begin() as conn:
        return conn.execute(q).rowcount == 1


def awaiting_outcome(engine: sa.Engine) -> list[RetrainPolicy]:
    """Policies whose last job's end is not recorded yet."""
    q = sa.select(table).where(table.c.last_job_state.in_(JOB_ACTIVE))
    with engine.connect() as conn:
        return _order([_row(r) for r in conn.execute(q)])


def record_outcome(engine: sa.Engine, policy: RetrainPolicy, state: str, outcome: str, now_ms: int) -> bool:
    """Record the end of the policy's last job, once: only while the row still names that job as not ended (so of
    two replicas that see the job end, one records it). Returns whether this call recorded it."""
    q = (
        sa.update(table)
        .where(*_key(policy.symbol, policy.timeframe), table.c.last_job_id == policy.last_job_id,
               table.c.last_job_state.in_(JOB_ACTIVE))
        .values(last_job_state=state, last_outcome=outcome, updated_at=now_ms)
    )
    with engine.begin() as conn:
        return conn.execute(q).rowcount == 1


def newest_closed_candle(engine: sa.Engine, symbol: str, timeframe: str, now_ms: int) -> int | None:
    """Open time of the market's newest stored candle that closed at or before `now_ms`, or None."""
    c = candles.c
    q = sa.select(sa.func.max(c.open_time)).where(c.symbol == symbol, c.timeframe == timeframe,
                                                  c.open_time <= now_ms - timeframe_ms(timeframe))
    with engine.connect() as conn:
        value = conn.execute(q).scalar()
    return int(value) if value is not None else None
