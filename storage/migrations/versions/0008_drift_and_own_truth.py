"""Schedules that watch for drift, and localisation metrics measured against each job's own ground truth.

``schedules`` gain ``drift_thresholds`` (``{"min_spearman": ..., "max_changed": ...}`` when each run is to be
compared with the previous finished one, else null), ``baseline_job_id`` (that previous finished run) and
``drift`` (the last comparison's summary and whether it crossed a threshold).

``items`` and ``explanations`` gain ``truth_digest``: 64 bits of the sha256 of an item's boxes and mask (null
without either), on an explanation row the ground truth its ``energy_in_box``, ``pointing_game`` and
``localization_iou`` were measured against. ``item_metrics`` holds those three for an item whose ground truth
differs from the one of the shared row it reuses (a rerun with other boxes): one row per item, method and class,
only where the two differ.

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
    with op.batch_alter_table("schedules") as schedules:
        schedules.add_column(sa.Column("drift_thresholds", sa.JSON(), nullable=True))
        schedules.add_column(sa.Column("baseline_job_id", sa.String(36), nullable=True))
        schedules.add_column(sa.Column("drift", sa.JSON(), nullable=True))
    with op.batch_alter_table("items") as items:
        items.add_column(sa.Column("truth_digest", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("explanations") as explanations:
        explanations.add_column(sa.Column("truth_digest", sa.BigInteger(), nullable=True))
    op.create_table(
        "item_metrics",
        sa.Column("item_id", sa.Integer(), sa.ForeignKey("items.id"), primary_key=True),
        sa.Column("method", sa.String(100), primary_key=True),
        sa.Column("class_id", sa.Integer(), primary_key=True),
        sa.Column("energy_in_box", sa.Float(), nullable=True),
        sa.Column("pointing_game", sa.Integer(), nullable=True),
        sa.Column("localization_iou", sa.Float(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("item_metrics")
    with op.batch_alter_table("explanations") as explanations:
        explanations.drop_column("truth_digest")
    with op.batch_alter_table("items") as items:
        items.drop_column("truth_digest")
    with op.batch_alter_table("schedules") as schedules:
        for name in ("drift", "baseline_job_id", "drift_thresholds"):
            schedules.drop_column(name)
