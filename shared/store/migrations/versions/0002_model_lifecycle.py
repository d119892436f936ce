"""Model lifecycle: a stage and its reason on every model, and the history of stage changes.

Existing models get stages: the newest model of each (symbol, timeframe) becomes SERVING, the others RETIRED, all with
the reason "migrated". The history records what the old rule (the newest model serves) did: each older model served
from its registration until the next one's, so a rollback after the upgrade brings back the model that served before.
Nothing else changes.

Revision ID: 0002
Revises: 0001
"""
import time

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_SERVING_ONLY = sa.text("stage = 'SERVING'")


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("stage", sa.String(16), nullable=False, server_default="CANDIDATE"))
        batch.add_column(sa.Column("stage_reason", sa.Text, nullable=False, server_default=""))
    op.create_table(
        "model_stage_changes",
        sa.Column("change_id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("model_id", sa.String(64), nullable=False),
        sa.Column("symbol", sa.String(64), nullable=False),
        sa.Column("timeframe", sa.String(8), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("changed_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_model_stage_changes_key", "model_stage_changes", ["symbol", "timeframe", "changed_at"])
    op.create_index("ix_model_stage_changes_model", "model_stage_changes", ["model_id"])

    conn = op.get_bind()
    models = sa.table(
        "models", sa.column("model_id", sa.String), sa.column("symbol", sa.String),
        sa.column("timeframe", sa.String), sa.column("created_at", sa.BigInteger),
        sa.column("stage", sa.String), sa.column("stage_reason", sa.Text),
    )
    changes = sa.table(
        "model_stage_changes", sa.column("model_id", sa.String), sa.column("symbol", sa.String),
        sa.column("timeframe", sa.String), sa.column("stage", sa.String), sa.column("reason", sa.Text),
        sa.column("changed_at", sa.BigInteger),
    )
    rows = conn.execute(
        sa.select(models.c.model_id, models.c.symbol, models.c.timeframe, models.c.created_at).order_by(
            models.c.symbol, models.c.timeframe, models.c.created_at.desc(), models.c.model_id.desc()
        )
    ).all()
    now_ms = int(time.time() * 1000)
    newer: dict[tuple[str, str], int] = {}  # market -> created_at of the next newer model
    history = []
    for model_id, symbol, timeframe, created_at in rows:
        key = (symbol, timeframe)
        retired_at = newer.get(key)
        newer[key] = created_at
        stage = "SERVING" if retired_at is None else "RETIRED"
        conn.execute(
            models.update().where(models.c.model_id == model_id).values(stage=stage, stage_reason="migrated")
        )
        # Until now the newest model served: each older one served from its registration until the next one's,
        # which is what a rollback goes back to.
        row = dict(model_id=model_id, symbol=symbol, timeframe=timeframe)
        if retired_at is None:
            history.append(dict(row, stage="SERVING", reason="migrated", changed_at=now_ms))
        else:
            history.append(dict(row, stage="SERVING", reason="migrated: served while it was the newest model",
                                changed_at=created_at))
            history.append(dict(row, stage="RETIRED", reason="migrated", changed_at=retired_at))
    if history:  # in time order (a retirement before the promotion at the same instant), as ids break ties
        history.sort(key=lambda h: (h["changed_at"], h["stage"] != "RETIRED"))
        conn.execute(changes.insert(), history)
    # At most one SERVING model per market, enforced by the database.
    op.create_index(
        "ux_models_serving", "models", ["symbol", "timeframe"], unique=True,
        sqlite_where=_SERVING_ONLY, postgresql_where=_SERVING_ONLY,
    )


def downgrade() -> None:
    op.drop_index("ux_models_serving", "models")
    op.drop_index("ix_model_stage_changes_model", "model_stage_changes")
    op.drop_index("ix_model_stage_changes_key", "model_stage_changes")
    op.drop_table("model_stage_changes")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("stage_reason")
        batch.drop_column("stage")
