"""retry delays, and control-plane replicas sharing one database

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
    with op.batch_alter_table("step_runs") as batch:
        batch.add_column(sa.Column("retry_at", sa.Float()))
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("owner", sa.String()))
        batch.add_column(sa.Column("cancel_requested_at", sa.Float()))
        batch.create_index("ix_runs_owner", ["owner"])
    op.create_table(
        "replicas",
        sa.Column("id", sa.String(), primary_key=True),
        sa.Column("address", sa.String(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("replicas")
    with op.batch_alter_table("runs") as batch:
        batch.drop_index("ix_runs_owner")
        batch.drop_column("cancel_requested_at")
        batch.drop_column("owner")
    with op.batch_alter_table("step_runs") as batch:
        batch.drop_column("retry_at")
