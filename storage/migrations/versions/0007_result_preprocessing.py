"""The target layer's layout and the preprocessing per settings record.

``result_settings`` gains ``layout`` (how the target layer's output became a B×C×h×w map:
``{"kind": "nchw" | "nhwc" | "tokens", "prefix_tokens": R}``, workers/layouts.py) and ``preprocessing``
(input size, resize, crop, interpolation, mean, std, and the model's declared transform). Both are part of a
result's identity (the settings digest) already; stored here, every record says how its map was made, queued
results included. Nullable: records written before this revision do not know them.

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
    with op.batch_alter_table("result_settings") as settings:
        settings.add_column(sa.Column("layout", sa.JSON(), nullable=True))
        settings.add_column(sa.Column("preprocessing", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("result_settings") as settings:
        settings.drop_column("preprocessing")
        settings.drop_column("layout")
