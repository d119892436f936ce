"""Retrain policies: one row per market that the training service retrains on a schedule, with the lease a replica
holds while it starts a policy's job.

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "retrain_policies",
        sa.Column("symbol", sa.String(64), primary_key=True),
        sa.Column("timeframe", sa.String(8), primary_key=True),
        sa.Column("every_ms", sa.BigInteger, nullable=False),
        sa.Column("window_ms", sa.BigInteger, nullable=False),
        sa.Column("label", sa.Text, nullable=False),
        sa.Column("params", sa.Text, nullable=False),
        sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("next_run_at", sa.BigInteger, nullable=False),
        sa.Column("last_job_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("last_job_state", sa.String(16), nullable=False, server_default=""),
        sa.Column("last_outcome", sa.Text, nullable=False, server_default=""),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_until", sa.BigInteger, nullable=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_retrain_policies_due", "retrain_policies", ["next_run_at"])


def downgrade() -> None:
    op.drop_index("ix_retrain_policies_due", "retrain_policies")
    op.drop_table("retrain_policies")
