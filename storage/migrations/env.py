"""Alembic environment: runs on the connection ``storage.migrations.upgrade`` hands over, or, from the
``alembic`` command line, on the database of the salient settings (SALIENT_DATABASE_URL)."""

from alembic import context
from sqlalchemy import create_engine

from salient_maps.storage.database import Base, normalize_url
from salient_maps.storage.settings import Settings


def run(connection) -> None:
    # render_as_batch: SQLite cannot ALTER most things; Alembic copies the table instead.
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    with create_engine(normalize_url(Settings().resolved_database_url)).begin() as connection:
        run(connection)
