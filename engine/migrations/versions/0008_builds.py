"""builds of environments (images, virtualenvs) and the runs that used them

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "builds",
        sa.Column("key", sa.String(), primary_key=True),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("build_digest", sa.String(), nullable=False),
        sa.Column("material", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("holder", sa.String(), nullable=False, server_default=""),
        sa.Column("expires_at", sa.Float(), nullable=False, server_default="0"),
        sa.Column("reference", sa.String(), nullable=False, server_default=""),
        sa.Column("image_id", sa.String(), nullable=False, server_default=""),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("duration_seconds", sa.Float(), nullable=False, server_default="0"),
        sa.Column("source", sa.String(), nullable=False, server_default=""),
        sa.Column("pushed_to", sa.String(), nullable=False, server_default=""),
        sa.Column("error", sa.String(), nullable=False, server_default=""),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("last_used_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_builds_last_used_at", "builds", ["last_used_at"])
    op.create_table(
        "build_runs",
        sa.Column("key", sa.String(), primary_key=True),
        sa.Column("run_id", sa.String(), primary_key=True),
        sa.Column("used_at", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("build_runs")
    op.drop_index("ix_builds_last_used_at", "builds")
    op.drop_table("builds")
