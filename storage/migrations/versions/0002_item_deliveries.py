"""Items count their deliveries (poison images fail past a limit); index for per-job status scans.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("items", sa.Column("deliveries", sa.Integer(), nullable=False, server_default="0"))
    op.create_index("ix_items_job_status", "items", ["job_id", "status"])


def downgrade() -> None:
    op.drop_index("ix_items_job_status", "items")
    with op.batch_alter_table("items") as batch:
        batch.drop_column("deliveries")
