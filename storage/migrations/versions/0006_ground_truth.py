"""Ground truth per item and localisation metrics per explanation.

``items`` gain ``truth`` (the manifest's ``label``, ``boxes``, ``mask`` as given), ``label`` (the class id the
worker resolved it to) and ``predicted`` (the model's top-1 class). ``explanations`` gain the metric columns
``border_energy``, ``energy_in_box``, ``pointing_game`` and ``localization_iou``: plain nullable columns, so a job
without ground truth pays one float per row and audits summarise them in SQL.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("items") as items:
        items.add_column(sa.Column("truth", sa.JSON(), nullable=True))
        items.add_column(sa.Column("label", sa.Integer(), nullable=True))
        items.add_column(sa.Column("predicted", sa.Integer(), nullable=True))
    with op.batch_alter_table("explanations") as explanations:
        explanations.add_column(sa.Column("border_energy", sa.Float(), nullable=True))
        explanations.add_column(sa.Column("energy_in_box", sa.Float(), nullable=True))
        explanations.add_column(sa.Column("pointing_game", sa.Integer(), nullable=True))
        explanations.add_column(sa.Column("localization_iou", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("explanations") as explanations:
        for name in ("localization_iou", "pointing_game", "energy_in_box", "border_energy"):
            explanations.drop_column(name)
    with op.batch_alter_table("items") as items:
        for name in ("predicted", "label", "truth"):
            items.drop_column(name)
