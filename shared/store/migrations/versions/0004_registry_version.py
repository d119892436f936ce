"""Registry version: one counter that every change of the model registry bumps, and each stage change's version.

Inference watches a whole fleet with one read of the counter per poll, and reads only the markets whose changes
carry a newer version.

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "registry_version",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("version", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(table, [{"id": 1, "version": 0}])
    with op.batch_alter_table("model_stage_changes") as batch:
        batch.add_column(sa.Column("version", sa.BigInteger, nullable=True))
    op.create_index("ix_model_stage_changes_version", "model_stage_changes", ["version"])


def downgrade() -> None:
    op.drop_index("ix_model_stage_changes_version", "model_stage_changes")
    with op.batch_alter_table("model_stage_changes") as batch:
        batch.drop_column("version")
    op.drop_table("registry_version")
