"""The prediction journal's markets: a version per market, so inference replicas sharing the database score with the
candles and pending predictions any of them journaled, and the newest candle received per market.

A market with journaled candles gets its row here, with the newest of them; any other at its next journal batch.

Revision ID: 0007
Revises: 0006
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "live_markets",
        sa.Column("symbol", sa.String(64), primary_key=True),
        sa.Column("timeframe", sa.String(8), primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("last_candle_ms", sa.BigInteger, nullable=True),
    )
    op.execute("INSERT INTO live_markets (symbol, timeframe, version, last_candle_ms) "
               "SELECT symbol, timeframe, 1, MAX(open_time) FROM live_candles GROUP BY symbol, timeframe")


def downgrade() -> None:
    op.drop_table("live_markets")
