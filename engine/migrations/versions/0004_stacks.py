"""stacks

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
    components = op.create_table(
        "components",
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("flavor", sa.String(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    stacks = op.create_table(
        "stacks",
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("components", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    settings = op.create_table(
        "settings",
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("value", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.bulk_insert(
        components,
        [
            {"name": "local", "kind": "RUNNER", "flavor": "local", "config": {}, "created_at": 0.0},
            {
                "name": "local-artifacts",
                "kind": "ARTIFACT_STORE",
                "flavor": "local",
                "config": {},
                "created_at": 0.0,
            },
        ],
    )
    op.bulk_insert(
        stacks,
        [
            {
                "name": "default",
                "created_at": 0.0,
                "components": {"RUNNER": "local", "ARTIFACT_STORE": "local-artifacts"},
            }
        ],
    )
    op.bulk_insert(settings, [{"key": "active_stack", "value": "default"}])
    op.execute("UPDATE runs SET stack = 'default' WHERE stack IS NULL")


def downgrade() -> None:
    op.drop_table("settings")
    op.drop_table("stacks")
    op.drop_table("components")
