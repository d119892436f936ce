"""Retrain policies choose whether each retrain also runs the purged k-fold cross-validation (off by default: the
offline gate decides on the held-back test slice either way, and the five extra fits would more than double the
cost of a scheduled retrain).

Revision ID: 0006
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("retrain_policies") as batch:
        batch.add_column(sa.Column("cross_validate", sa.Boolean, nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("retrain_policies") as batch:
        batch.drop_column("cross_validate")
