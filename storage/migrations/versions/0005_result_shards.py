"""Results in shards: a batch's maps in one object, explanation rows of ~150 bytes pointing into it.

New tables ``result_settings`` (what every row of one settings digest shares: model, layer, method
parameters, overlay style, class names) and ``shards`` (one row per shard object). ``explanations`` is
rebuilt: ``settings_id``, plain ``method`` name, ``shard_id`` + ``slot`` instead of object keys. Old rows
cannot be read in the new layout (their maps are separate objects): a database holding some keeps them
in ``explanations_0004``, and ``salient results``/``report``/``export`` for their jobs say so.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    conn = op.get_bind()
    old_rows = conn.execute(sa.text("SELECT count(*) FROM explanations")).scalar()
    if old_rows:
        op.rename_table("explanations", "explanations_0004")
        if conn.dialect.name == "postgresql":  # names PostgreSQL keeps per schema, wanted by the new table
            op.execute("ALTER INDEX explanations_pkey RENAME TO explanations_0004_pkey")
            op.execute("ALTER INDEX ix_explanations_sha256 RENAME TO ix_explanations_0004_sha256")
            op.execute("ALTER SEQUENCE explanations_id_seq RENAME TO explanations_0004_id_seq")
    else:
        op.drop_index("ix_explanations_sha256", table_name="explanations")
        op.drop_table("explanations")
    op.create_table(
        "result_settings",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("digest", sa.String(64), nullable=False, unique=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("layer", sa.String(300), nullable=False),
        sa.Column("methods", sa.JSON(), nullable=False),
        sa.Column("overlay", sa.JSON(), nullable=False),
        sa.Column("class_names", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "shards",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("key", sa.Text(), nullable=False, unique=True),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "explanations",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("sha256", sa.String(64), sa.ForeignKey("images.sha256"), nullable=False),
        sa.Column("settings_id", sa.Integer(), sa.ForeignKey("result_settings.id"), nullable=False),
        sa.Column("method", sa.String(100), nullable=False),
        sa.Column("class_id", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("shard_id", sa.Integer(), sa.ForeignKey("shards.id"), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("extra", sa.JSON(), nullable=True),
        sa.UniqueConstraint("sha256", "settings_id", "method", "class_id"),
    )


def downgrade() -> None:
    raise NotImplementedError("results in shards cannot be turned back into one object per map")
