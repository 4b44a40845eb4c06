"""Alembic migrations of salient's schema.

``connect`` runs them when it finds an older database (new ones are built at the newest revision).
To add one: change the models in ``storage/database.py``, then
``alembic -c storage/migrations/alembic.ini revision --autogenerate -m "what changed"`` against a
database at the previous revision, review the file, and bump ``SCHEMA_REVISION``.
"""

from __future__ import annotations

from pathlib import Path

FIRST_REVISION = "0001"


def alembic_config(connection=None):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    config.attributes["connection"] = connection
    return config


def upgrade(connection, stamp_first: bool = False) -> None:
    """Migrate the database behind ``connection`` to the newest revision, inside its transaction.

    ``stamp_first``: the tables exist but were made before migrations, i.e. they are the first revision.
    """
    from alembic import command

    config = alembic_config(connection)
    if stamp_first:
        command.stamp(config, FIRST_REVISION)
    command.upgrade(config, "head")


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError("storage/migrations/versions holds no revision")
    return head
