"""leases on attempts (the durable queue), and the code a run executes

Revision ID: 0006
Revises: 0005
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_ATTEMPT_COLUMNS: tuple[tuple[str, Any], ...] = (
    ("pool", sa.String()),
    ("holder", sa.String()),
    ("handle", sa.String()),
    ("leased_at", sa.Float()),
    ("lease_expires_at", sa.Float()),
    ("queue_deadline", sa.Float()),
    ("close_deadline", sa.Float()),
)
_RUN_COLUMNS: tuple[tuple[str, Any], ...] = (
    ("code_archive", sa.String()),
    ("git_commit", sa.String()),
    ("git_dirty", sa.Boolean()),
)


def upgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        for name, type_ in _ATTEMPT_COLUMNS:
            batch.add_column(sa.Column(name, type_))
        batch.add_column(sa.Column("log_batch", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("runs") as batch:
        for name, type_ in _RUN_COLUMNS:
            batch.add_column(sa.Column(name, type_))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        for name, _ in _RUN_COLUMNS:
            batch.drop_column(name)
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("log_batch")
        for name, _ in reversed(_ATTEMPT_COLUMNS):
            batch.drop_column(name)
