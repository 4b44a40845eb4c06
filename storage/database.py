"""Metadata schema and the few writes every part of salient shares.

Idempotency lives here: unique constraints plus insert-or-ignore make a rerun or a redelivered
message a no-op instead of a duplicate row.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any, Iterable

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    # listing (items still being added) -> running -> finished | cancelled
    status: Mapped[str] = mapped_column(String(16), default="listing")
    settings: Mapped[dict] = mapped_column(JSON)
    # Set by the worker side once it has resolved the model and layer; explanations carry the same digest.
    settings_digest: Mapped[str | None] = mapped_column(String(64))
    total: Mapped[int] = mapped_column(Integer, default=0)
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Item(Base):
    """One submitted image URI of one job; ends exactly once as done, failed or skipped."""

    __tablename__ = "items"
    __table_args__ = (UniqueConstraint("job_id", "uri"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending|done|failed|skipped
    error: Mapped[str | None] = mapped_column(Text)
    seconds: Mapped[float | None] = mapped_column(Float)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Image(Base):
    __tablename__ = "images"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Explanation(Base):
    __tablename__ = "explanations"
    __table_args__ = (UniqueConstraint("sha256", "settings_digest", "method", "class_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sha256: Mapped[str] = mapped_column(ForeignKey("images.sha256"), index=True)
    settings_digest: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(200))
    method: Mapped[str] = mapped_column(String(100))
    layer: Mapped[str] = mapped_column(String(300))
    class_id: Mapped[int] = mapped_column(Integer)
    class_name: Mapped[str] = mapped_column(String(300))
    score: Mapped[float] = mapped_column(Float)
    rank: Mapped[int] = mapped_column(Integer)
    map_key: Mapped[str] = mapped_column(Text)
    overlay_key: Mapped[str] = mapped_column(Text)
    extra: Mapped[dict] = mapped_column(JSON, default=dict)
    seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def connect(url: str) -> Engine:
    """Engine with the schema created; SQLite gets WAL so readers never block the writer."""
    if url.startswith("sqlite:///"):
        from pathlib import Path

        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    Base.metadata.create_all(engine)
    return engine


def insert_ignore(engine: Engine, table, rows: list[dict[str, Any]]):
    """INSERT ... ON CONFLICT DO NOTHING for the dialects salient supports."""
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    return dialect.insert(table).values(rows).on_conflict_do_nothing()


def create_job(engine: Engine, settings: dict, name: str | None = None) -> str:
    job_id = str(uuid.uuid4())
    with engine.begin() as conn:
        conn.execute(Job.__table__.insert().values(id=job_id, name=name, settings=settings, created_at=utcnow()))
    return job_id


def add_items(engine: Engine, job_id: str, uris: Iterable[str]) -> int:
    """Record URIs as pending items (duplicates ignored); returns how many new items."""
    added = 0
    batch: list[dict] = []

    def flush() -> int:
        if not batch:
            return 0
        with engine.begin() as conn:
            n = conn.execute(insert_ignore(engine, Item.__table__, batch)).rowcount
            conn.execute(update(Job).where(Job.id == job_id).values(total=Job.total + n))
        batch.clear()
        return n

    for uri in uris:
        batch.append({"job_id": job_id, "uri": uri, "status": "pending", "updated_at": utcnow()})
        if len(batch) >= 1000:
            added += flush()
    added += flush()
    return added


def finish_item(
    conn, item_id: int, job_id: str, status: str, *, sha256: str | None = None,
    error: str | None = None, seconds: float | None = None,
) -> bool:
    """Move a pending item to its final status once; returns False if it had already ended.

    The conditional UPDATE is what makes "exactly once" hold under redelivery: only the first
    finisher changes the row and bumps the job counter.
    """
    res = conn.execute(
        update(Item)
        .where(Item.id == item_id, Item.status == "pending")
        .values(status=status, sha256=sha256, error=error, seconds=seconds, updated_at=utcnow())
    )
    if res.rowcount != 1:
        return False
    counter = getattr(Job, status)
    conn.execute(update(Job).where(Job.id == job_id).values({counter: counter + 1}))
    _finish_job_if_complete(conn, job_id)
    return True


def _finish_job_if_complete(conn, job_id: str) -> None:
    conn.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running", Job.done + Job.failed + Job.skipped >= Job.total)
        .values(status="finished", finished_at=utcnow())
    )


def close_listing(engine: Engine, job_id: str) -> None:
    """All items are recorded: from now on the job finishes when its last item ends."""
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id, Job.status == "listing").values(status="running"))
        _finish_job_if_complete(conn, job_id)


def already_explained(conn, sha256: str, settings_digest: str) -> bool:
    return conn.execute(
        select(Explanation.id).where(Explanation.sha256 == sha256, Explanation.settings_digest == settings_digest).limit(1)
    ).first() is not None
