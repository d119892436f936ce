"""Live outcome monitoring: the prediction journal (candles received, predictions pending) and live scores.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "live_candles",
        sa.Column("symbol", sa.String(64), primary_key=True),
        sa.Column("timeframe", sa.String(8), primary_key=True),
        sa.Column("open_time", sa.BigInteger, primary_key=True),
        sa.Column("close", sa.Float(53), nullable=False),
        sa.Column("received_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "live_predictions",
        sa.Column("model_id", sa.String(64), primary_key=True),
        sa.Column("open_time", sa.BigInteger, primary_key=True),
        sa.Column("symbol", sa.String(64), nullable=False),
        sa.Column("timeframe", sa.String(8), nullable=False),
        sa.Column("p_down", sa.Float(53), nullable=False),
        sa.Column("p_range", sa.Float(53), nullable=False),
        sa.Column("p_up", sa.Float(53), nullable=False),
        sa.Column("served_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_live_predictions_market", "live_predictions", ["symbol", "timeframe", "open_time"])
    op.create_index("ix_live_predictions_served", "live_predictions", ["served_at"])
    op.create_table(
        "live_scores",
        sa.Column("model_id", sa.String(64), primary_key=True),
        sa.Column("open_time", sa.BigInteger, primary_key=True),
        sa.Column("symbol", sa.String(64), nullable=False),
        sa.Column("timeframe", sa.String(8), nullable=False),
        sa.Column("label", sa.SmallInteger, nullable=False),
        sa.Column("p_down", sa.Float(53), nullable=False),
        sa.Column("p_range", sa.Float(53), nullable=False),
        sa.Column("p_up", sa.Float(53), nullable=False),
        sa.Column("loss", sa.Float(53), nullable=False),
        sa.Column("prior_loss", sa.Float(53), nullable=False),
        sa.Column("brier", sa.Float(53), nullable=False),
        sa.Column("scored_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_live_scores_scored", "live_scores", ["scored_at"])


def downgrade() -> None:
    op.drop_index("ix_live_scores_scored", "live_scores")
    op.drop_table("live_scores")
    op.drop_index("ix_live_predictions_served", "live_predictions")
    op.drop_index("ix_live_predictions_market", "live_predictions")
    op.drop_table("live_predictions")
    op.drop_table("live_candles")
