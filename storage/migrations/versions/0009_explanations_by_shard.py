"""An index on ``explanations.shard_id``: ``salient gc`` asks which shards no explanation names, and deleting a
shard's row makes the database check the foreign key from ``explanations``; without the index both read the whole
table (at 10^8 rows, once per orphan), with it each is one lookup.

Revision ID: 0009
Revises: 0008
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_explanations_shard_id", "explanations", ["shard_id"])


def downgrade() -> None:
    op.drop_index("ix_explanations_shard_id", table_name="explanations")
