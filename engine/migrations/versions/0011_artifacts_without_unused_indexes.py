"""artifacts lose their indexes on run_id and digest: no query reads through them, and every
step's commit wrote their pages (three of its artifact's five)

Revision ID: 0011
Revises: 0010
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("artifacts") as batch:
        batch.drop_index("ix_artifacts_run_id")
        batch.drop_index("ix_artifacts_digest")


def downgrade() -> None:
    with op.batch_alter_table("artifacts") as batch:
        batch.create_index("ix_artifacts_digest", ["digest"], unique=False)
        batch.create_index("ix_artifacts_run_id", ["run_id"], unique=False)
