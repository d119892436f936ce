"""Initial schema: candles, funding rates, open interest, training jobs, models.

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "candles",
        sa.Column("symbol", sa.String(64), primary_key=True),
        sa.Column("timeframe", sa.String(8), primary_key=True),
        sa.Column("open_time", sa.BigInteger, primary_key=True),
        sa.Column("open", sa.Float(53), nullable=False),
        sa.Column("high", sa.Float(53), nullable=False),
        sa.Column("low", sa.Float(53), nullable=False),
        sa.Column("close", sa.Float(53), nullable=False),
        sa.Column("volume", sa.Float(53), nullable=False),
    )
    for name in ("funding_rates", "open_interest"):
        op.create_table(
            name,
            sa.Column("symbol", sa.String(64), primary_key=True),
            sa.Column("time", sa.BigInteger, primary_key=True),
            sa.Column("value", sa.Float(53), nullable=False),
        )
    op.create_table(
        "training_jobs",
        sa.Column("job_id", sa.String(64), primary_key=True),
        sa.Column("symbol", sa.String(64), nullable=False),
        sa.Column("timeframe", sa.String(8), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("progress", sa.Float(53), nullable=False),
        sa.Column("stage", sa.String(32), nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("model_id", sa.String(64), nullable=False),
        sa.Column("request", sa.Text, nullable=False),
        sa.Column("metrics", sa.Text, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("started_at", sa.BigInteger, nullable=True),
        sa.Column("finished_at", sa.BigInteger, nullable=True),
    )
    op.create_index("ix_training_jobs_created", "training_jobs", ["created_at"])
    op.create_table(
        "models",
        sa.Column("model_id", sa.String(64), primary_key=True),
        sa.Column("symbol", sa.String(64), nullable=False),
        sa.Column("timeframe", sa.String(8), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("train_start", sa.BigInteger, nullable=False),
        sa.Column("train_end", sa.BigInteger, nullable=False),
        sa.Column("horizon_bars", sa.Integer, nullable=False),
        sa.Column("threshold", sa.Float(53), nullable=False),
        sa.Column("warmup_bars", sa.Integer, nullable=False),
        sa.Column("manifest", sa.Text, nullable=False),
        sa.Column("metrics", sa.Text, nullable=False),
        sa.Column("artifact", sa.String(255), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("job_id", sa.String(64), nullable=True),
    )
    op.create_index("ix_models_key_created", "models", ["symbol", "timeframe", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_models_key_created", "models")
    op.drop_table("models")
    op.drop_index("ix_training_jobs_created", "training_jobs")
    op.drop_table("training_jobs")
    op.drop_table("open_interest")
    op.drop_table("funding_rates")
    op.drop_table("candles")
