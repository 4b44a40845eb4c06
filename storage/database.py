"""Metadata schema and the few writes every part of salient shares.

Idempotency lives here: unique constraints plus insert-or-ignore make a rerun or a redelivered
message a no-op instead of a duplicate row. Job counters are only ever changed by single UPDATE
statements (``done = done + 1``) while the job row is locked, so many workers writing at once on
PostgreSQL lose no update. The schema is versioned with Alembic (``storage/migrations``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: no lock (the race it prevents needs two processes creating one database at once)
    fcntl = None  # type: ignore[assignment]

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    bindparam,
    case,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .sources import Entry, truth_digest


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    # listing (items still being added) -> running -> finished; cancelled at any point (finished_at set
    # once its last item has ended)
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
    __table_args__ = (UniqueConstraint("job_id", "uri"), Index("ix_items_job_status", "job_id", "status"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending|done|failed|skipped
    error: Mapped[str | None] = mapped_column(Text)
    seconds: Mapped[float | None] = mapped_column(Float)
    # Times a worker started explaining it; an image that keeps killing workers fails past a limit.
    deliveries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The manifest's ground truth as given (label, boxes, mask), the class id the worker resolved the label to,
    # and the model's top-1 class: an audit's accuracy is one SQL query.
    truth: Mapped[dict | None] = mapped_column(JSON)
    label: Mapped[int | None] = mapped_column(Integer)
    predicted: Mapped[int | None] = mapped_column(Integer)
    # Which boxes and mask (storage/ground_truth.py), so a shared explanation measured against others is not reused.
    truth_digest: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Image(Base):
    __tablename__ = "images"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ResultSettings(Base):
    """What every explanation made under one settings digest shares, stored once instead of on each row."""

    __tablename__ = "result_settings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    model: Mapped[str] = mapped_column(String(200))
    layer: Mapped[str] = mapped_column(String(300))
    methods: Mapped[dict] = mapped_column(JSON)  # method name -> its parameters
    overlay: Mapped[dict] = mapped_column(JSON)  # the overlay style (see storage.overlays.OverlayStyle)
    class_names: Mapped[list] = mapped_column(JSON)  # the model's, by class id
    # How the target layer's output became a B×C×h×w map (workers/layouts.py) and how an image became the
    # model's input (input size, resize, crop, interpolation, mean, std); None on records made before 0007.
    layout: Mapped[dict | None] = mapped_column(JSON)
    preprocessing: Mapped[dict | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Shard(Base):
    """One object holding a batch's maps and thumbnails (storage/shards.py); rows point into it."""

    __tablename__ = "shards"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(Text, unique=True)
    images: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Explanation(Base):
    """One map: an image's target class under one method. Its map is slot ``slot`` of its shard; the
    model, layer, parameters and class names are its settings' (``ResultSettings``)."""

    __tablename__ = "explanations"
    # by shard: ``salient gc`` finds the shards no row names, and a shard row's delete checks its foreign key
    __table_args__ = (UniqueConstraint("sha256", "settings_id", "method", "class_id"),
                      Index("ix_explanations_shard_id", "shard_id"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sha256: Mapped[str] = mapped_column(ForeignKey("images.sha256"))
    settings_id: Mapped[int] = mapped_column(ForeignKey("result_settings.id"))
    method: Mapped[str] = mapped_column(String(100))  # the plain name: gradcam, saliency, scorecam, ...
    class_id: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)
    rank: Mapped[int] = mapped_column(Integer)
    shard_id: Mapped[int] = mapped_column(ForeignKey("shards.id"))
    slot: Mapped[int] = mapped_column(Integer)
    # faithfulness metrics and localisation, only when asked for
    extra: Mapped[dict | None] = mapped_column(JSON)
    # Localisation metrics (workers/localization_metrics.py): columns, so audits summarise them in SQL.
    border_energy: Mapped[float | None] = mapped_column(Float)
    energy_in_box: Mapped[float | None] = mapped_column(Float)
    pointing_game: Mapped[int | None] = mapped_column(Integer)
    localization_iou: Mapped[float | None] = mapped_column(Float)
    # The boxes and mask energy_in_box, pointing_game and localization_iou were measured against (Item.truth_digest)
    truth_digest: Mapped[int | None] = mapped_column(BigInteger)


class ItemMetrics(Base):
    """The ground-truth metrics of an item whose boxes or mask differ from those its shared explanation row was
    measured against (a rerun with other boxes): only such items have rows here (storage/ground_truth.py)."""

    __tablename__ = "item_metrics"
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), primary_key=True)
    method: Mapped[str] = mapped_column(String(100), primary_key=True)
    class_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    energy_in_box: Mapped[float | None] = mapped_column(Float)
    pointing_game: Mapped[int | None] = mapped_column(Integer)
    localization_iou: Mapped[float | None] = mapped_column(Float)


class ClassVisualization(Base):
    """An image synthesised to maximise one class's score (``salient visualize-class``)."""

    __tablename__ = "class_visualizations"
    __table_args__ = (UniqueConstraint("model", "class_id", "params_digest"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(200))
    class_id: Mapped[int] = mapped_column(Integer)
    class_name: Mapped[str] = mapped_column(String(300))
    params: Mapped[dict] = mapped_column(JSON)
    params_digest: Mapped[str] = mapped_column(String(64))
    image_key: Mapped[str] = mapped_column(Text)
    initial_score: Mapped[float] = mapped_column(Float)
    final_score: Mapped[float] = mapped_column(Float)
    seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Schedule(Base):
    """A recurring incremental job (``salient schedule add``), fired by ``salient beat``."""

    __tablename__ = "schedules"
    __table_args__ = (UniqueConstraint("name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str | None] = mapped_column(String(200))
    cron: Mapped[str] = mapped_column(String(100))
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    sources: Mapped[list] = mapped_column(JSON)
    # build_spec's keyword arguments: the spec is rebuilt at every run, so a changed weights file is noticed
    options: Mapped[dict] = mapped_column(JSON)
    chunk: Mapped[int | None] = mapped_column(Integer)
    # Also the lock: a beat fires a run only when its conditional UPDATE of this column hits the row.
    next_run_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    last_run_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_job_id: Mapped[str | None] = mapped_column(String(36))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # With ``--compare-previous``: each finished run is compared with the previous finished one (the baseline);
    # ``drift`` keeps the last comparison's summary and whether it crossed a threshold (producer/drift.py).
    drift_thresholds: Mapped[dict | None] = mapped_column(JSON)
    baseline_job_id: Mapped[str | None] = mapped_column(String(36))
    drift: Mapped[dict | None] = mapped_column(JSON)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


# The newest revision in storage/migrations/versions; a new database is built from the models and
# stamped with it (tests/test_migrations.py checks that the migrations build the same schema).
SCHEMA_REVISION = "0009"
_SCHEMA_LOCK_ID = 0x5A11E47  # PostgreSQL advisory lock: one process at a time creates or migrates
_alembic_version = Table("alembic_version", MetaData(), Column("version_num", String(32), primary_key=True))


def normalize_url(url: str) -> str:
    """``postgres://`` and ``postgresql://`` use psycopg 3 (the driver salient installs)."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def connect(url: str) -> Engine:
    """Engine with the schema at ``SCHEMA_REVISION``; SQLite gets WAL so readers never block the writer."""
    url = normalize_url(url)
    database_file = None
    if url.startswith("sqlite:///") and ":memory:" not in url:
        database_file = Path(url.removeprefix("sqlite:///").split("?", 1)[0])
        database_file.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    with _sqlite_schema_lock(database_file):
        ensure_schema(engine)
    return engine


@contextlib.contextmanager
def _sqlite_schema_lock(database_file: Path | None) -> Iterator[None]:
    """One process at a time checks, creates or migrates a SQLite database's schema (PostgreSQL has its advisory
    lock): two ``salient run``s starting on a new data folder both found no tables, and the second's CREATE TABLE
    failed, or it took the first's half-made tables for a database older than migrations. An flock on a file
    beside the database: SQLite's own locks are POSIX locks on the database file, which closing any other
    descriptor of that file in the process would drop."""
    if database_file is None or fcntl is None:
        yield
        return
    with open(database_file.with_name(database_file.name + ".schema-lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def schema_revision(conn) -> str | None:
    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(select(_alembic_version.c.version_num)).scalar()


def ensure_schema(engine: Engine) -> str:
    """Create a new database at the newest revision or migrate an older one; returns the revision.

    Runs at every ``connect``; when the schema is current it costs one catalog query and one select,
    and Alembic is imported only when there is something to migrate.
    """
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":  # many workers may start at once
            conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _SCHEMA_LOCK_ID})
        current = schema_revision(conn)
        if current == SCHEMA_REVISION:
            return current
        if current is None and not inspect(conn).has_table("jobs"):
            Base.metadata.create_all(conn)
            _alembic_version.create(conn)
            conn.execute(_alembic_version.insert().values(version_num=SCHEMA_REVISION))
            return SCHEMA_REVISION
        from .migrations import upgrade

        # A database made before migrations existed holds the first revision's tables.
        upgrade(conn, stamp_first=current is None)
        return SCHEMA_REVISION


def conflict_insert(bind, table):
    """An INSERT that takes ON CONFLICT clauses, in the dialect of ``bind`` (an engine or connection):
    PostgreSQL's or SQLite's, the two salient supports."""
    return (postgresql if bind.dialect.name == "postgresql" else sqlite).insert(table)


def insert_ignore(engine: Engine, table, rows: list[dict[str, Any]]):
    """INSERT ... ON CONFLICT DO NOTHING for the dialects salient supports."""
    return conflict_insert(engine, table).values(rows).on_conflict_do_nothing()


def create_job(engine: Engine, settings: dict, name: str | None = None, settings_digest: str | None = None) -> str:
    """``settings_digest``: when the caller already resolved the model (``salient run``), else the worker records it."""
    job_id = str(uuid.uuid4())
    with engine.begin() as conn:
        conn.execute(insert(Job).values(id=job_id, name=name, settings=settings, settings_digest=settings_digest,
                                        created_at=utcnow()))
    return job_id


def _item_row(job_id: str, entry: str | Entry) -> dict:
    """A new item's row: pending, or failed at once with the reason its ground truth is unusable."""
    if isinstance(entry, str):
        entry = Entry(entry)
    failed = entry.problem is not None
    return {"job_id": job_id, "uri": entry.uri, "status": "failed" if failed else "pending", "error": entry.problem,
            "truth": entry.truth, "truth_digest": truth_digest(entry.truth),
            "updated_at": utcnow()}


_ITEM_COLUMNS = ["job_id", "uri", "status", "error", "truth", "truth_digest", "updated_at"]


def _insert_items(conn, rows: list[dict]) -> list:
    """Insert-or-ignore item rows (``_item_row``); returns the new ones' (id, uri, status). The statement's text is
    the same for every page, so nothing is compiled per page (a page's 1,000-row VALUES took SQLAlchemy 0.25 s of
    the producer's CPU to compile, this 0.02): on PostgreSQL the rows are one JSON parameter unpacked by
    ``json_to_recordset``, elsewhere an executemany."""
    if conn.dialect.name == "postgresql":
        rows_json = json.dumps([{**row, "updated_at": row["updated_at"].isoformat()} for row in rows])
        return conn.execute(_items_insert_postgres(conn.dialect), {"rows": rows_json}).all()
    return conn.execute(_items_insert_sqlite(), rows).all()


@functools.cache
def _items_insert_postgres(dialect):
    items, columns = Item.__table__, ", ".join(_ITEM_COLUMNS)
    return text(
        f"INSERT INTO {items.name} ({columns}) SELECT {columns} FROM json_to_recordset(CAST(:rows AS json)) "
        f"AS r({_recordset(dialect, items, _ITEM_COLUMNS)}) ON CONFLICT DO NOTHING "
        f"RETURNING {items.name}.id, {items.name}.uri, {items.name}.status"
    ).columns(Item.id, Item.uri, Item.status)


@functools.cache
def _items_insert_sqlite():
    # No ground truth is SQL NULL, as the recordset makes it (JSON's default would store the JSON value null).
    return (sqlite.insert(Item).values(truth=bindparam("truth", type_=JSON(none_as_null=True)))
            .on_conflict_do_nothing().returning(Item.id, Item.uri, Item.status))


def add_items(engine: Engine, job_id: str, entries: Iterable[str | Entry]) -> int:
    """Record URIs or manifest entries (``storage.sources.Entry``: ground truth kept with the item; one with a
    ``problem`` fails now with it as the reason) as items, duplicates ignored; returns how many new items."""
    return sum(len(page) for page in _recorded(engine, job_id, entries, 1000, pending_only=False))


def finish_item(
    conn, item_id: int, job_id: str, status: str, *, sha256: str | None = None,
    error: str | None = None, seconds: float | None = None,
) -> bool:
    """Move a pending item to its final status once; returns False if it had already ended."""
    return bool(finish_items(conn, [ItemEnd(item_id, job_id, status, sha256, error, seconds)]))


@dataclass
class ItemEnd:
    id: int
    job_id: str
    status: str  # done | failed | skipped
    sha256: str | None = None
    error: str | None = None
    seconds: float | None = None
    label: int | None = None  # the ground-truth class id the label resolved to
    predicted: int | None = None  # the model's top-1 class


STATUSES = ("done", "failed", "skipped")


def finish_items(conn, ends: list[ItemEnd]) -> set[int]:
    """End pending items once each; returns the ids this call ended (the others had ended already).

    One conditional UPDATE of the items, whose counts per job move the job counters: on PostgreSQL in the
    same statement (a data-modifying CTE, the ends one JSON parameter), elsewhere per-item values by CASE
    and one UPDATE per job. Only the first finisher changes an item's row, so counters move exactly once
    however often a batch is redone.
    """
    if not ends:
        return set()
    if conn.dialect.name == "postgresql":
        return _finish_items_postgres(conn, ends)
    ids = sorted({e.id for e in ends})

    def per_item(attr: str):
        values = {e.id: getattr(e, attr) for e in ends if getattr(e, attr) is not None}
        return case(values, value=Item.id, else_=None) if values else None

    statuses = {e.status for e in ends}
    status = next(iter(statuses)) if len(statuses) == 1 else case({e.id: e.status for e in ends}, value=Item.id)
    ending = (update(Item).where(Item.id.in_(ids), Item.status == "pending")
              .values(status=status, sha256=per_item("sha256"), error=per_item("error"), seconds=per_item("seconds"),
                      label=per_item("label"), predicted=per_item("predicted"), updated_at=utcnow())
              .returning(Item.id, Item.job_id, Item.status))
    counted: dict[str, Counter] = {}
    ended_ids: set[int] = set()
    for row in conn.execute(ending).all():
        ended_ids.add(row.id)
        counted.setdefault(row.job_id, Counter())[row.status] += 1
    for job_id in sorted(counted):
        conn.execute(update(Job).where(Job.id == job_id).values(_counted(Job, dict(counted[job_id]))))
    return ended_ids


_END_COLUMNS = ("id", "status", "sha256", "error", "seconds", "label", "predicted")


def _finish_items_postgres(conn, ends: list[ItemEnd]) -> set[int]:
    """The ends as one JSON parameter unpacked by ``json_to_recordset``: the statement is the same for every
    batch, built and compiled once (per-item CASEs of a batch's 32 ends took 6.9 ms of client CPU, this 1.0)."""
    ends_json = json.dumps([{c: _json_number(getattr(e, c)) for c in _END_COLUMNS} for e in ends])
    return set(conn.execute(_finish_statement_postgres(conn.dialect), {"now": utcnow(), "ends": ends_json}).scalars())


@functools.cache
def _finish_statement_postgres(dialect):
    items = Item.__table__
    ending = text(
        f"UPDATE {items.name} SET {', '.join(f'{c} = e.{c}' for c in _END_COLUMNS[1:])}, updated_at = :now "
        f"FROM json_to_recordset(CAST(:ends AS json)) AS e({_recordset(dialect, items, list(_END_COLUMNS))}) "
        f"WHERE {items.name}.id = e.id AND {items.name}.status = 'pending' "
        f"RETURNING {items.name}.id, {items.name}.job_id, {items.name}.status"
    ).columns(Item.id, Item.job_id, Item.status)
    ended = ending.cte("ended")
    counts = (select(ended.c.job_id, *(func.count().filter(ended.c.status == s).label(s) for s in STATUSES))
              .group_by(ended.c.job_id).cte("counts"))
    bump = (update(Job).where(Job.id == counts.c.job_id)
            .values(_counted(Job, {s: counts.c[s] for s in STATUSES}, bindparam("now")))
            .returning(Job.id).cte("bumped"))
    return select(ended.c.id).add_cte(bump)


def _counted(job, counts: dict, now=None) -> dict:
    """A job's counters moved by ``counts`` (status -> how many, numbers or SQL) and, when that completes it,
    the finish at ``now`` (default: this moment), in one SET: its right-hand sides read the row as it was."""
    n = sum(counts.values())
    complete = and_(job.status.in_(("running", "cancelled")), job.finished_at.is_(None),
                    job.done + job.failed + job.skipped + n >= job.total)
    return {**{getattr(job, status): getattr(job, status) + k for status, k in counts.items()},
            job.status: case((and_(complete, job.status == "running"), "finished"), else_=job.status),
            job.finished_at: case((complete, utcnow() if now is None else now), else_=job.finished_at)}


def result_settings_id(conn, row: dict) -> int:
    """The id of the ``result_settings`` row of ``row["digest"]``, inserted if new: one statement."""
    stmt = conflict_insert(conn, ResultSettings).values(row)
    return conn.execute(stmt.on_conflict_do_update(index_elements=[ResultSettings.digest],
                                                   set_={"digest": stmt.excluded.digest})
                        .returning(ResultSettings.id)).scalar_one()


def store_shard_rows(conn, shard_key: str, images: list[dict], explanations: list[dict]) -> None:
    """A batch's images and its explanations (every column but ``shard_id``: they name the shard by its key, whose
    row ``record_shard`` made before the upload), each insert-or-ignore, so a redone batch adds nothing.
    PostgreSQL: one statement (a data-modifying CTE; foreign keys are checked at its end); elsewhere two."""
    now = utcnow()
    if conn.dialect.name == "postgresql":
        _store_shard_rows_postgres(conn, shard_key, now, images, explanations)
        return
    # executemany of one cached statement each: a multi-row VALUES is compiled anew for every batch (~1 ms of
    # CPU per image here)
    shard_id = select(Shard.id).where(Shard.key == shard_key).scalar_subquery()
    conn.execute(sqlite.insert(Image).on_conflict_do_nothing(), [{**image, "created_at": now} for image in images])
    conn.execute(sqlite.insert(Explanation).values(shard_id=shard_id).on_conflict_do_nothing(), explanations)


def _recordset(dialect, table, columns: list[str]) -> str:
    return ", ".join(f"{name} {table.c[name].type.compile(dialect=dialect)}" for name in columns)


def _json_number(value):
    """A float as ``json_to_recordset`` reads it: NaN and the infinities as strings float8 parses."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _store_shard_rows_postgres(conn, shard_key: str, now, images: list[dict], explanations: list[dict]) -> None:
    """The rows as two JSON parameters unpacked by ``json_to_recordset``: the statement's text depends only on the
    columns, so it costs the client no compiling per batch (a multi-row VALUES of a batch's rows took SQLAlchemy
    ~100 ms to compile, each time)."""
    image_columns = ["sha256", "width", "height"]
    row_columns = sorted({name for r in explanations for name in r})
    images_table, rows_table = (Base.metadata.tables[model.__tablename__] for model in (Image, Explanation))
    # A JSON column's None stays JSON null, as SQLAlchemy's JSON type stores it (the recordset would make it NULL).
    selected = [f"COALESCE({name}, 'null'::json)" if isinstance(rows_table.c[name].type, JSON) else name
                for name in row_columns]
    statement = text(
        f"WITH new_images AS (INSERT INTO {images_table.name} ({', '.join(image_columns)}, created_at) "
        f"SELECT {', '.join(image_columns)}, :now FROM json_to_recordset(CAST(:images AS json)) "
        f"AS i({_recordset(conn.dialect, images_table, image_columns)}) ON CONFLICT DO NOTHING RETURNING sha256) "
        f"INSERT INTO {rows_table.name} ({', '.join(row_columns)}, shard_id) "
        f"SELECT {', '.join(selected)}, (SELECT id FROM {Shard.__tablename__} WHERE key = :key) "
        f"FROM json_to_recordset(CAST(:rows AS json)) AS r({_recordset(conn.dialect, rows_table, row_columns)}) "
        "ON CONFLICT DO NOTHING")
    conn.execute(statement, {
        "now": now, "key": shard_key,
        "images": json.dumps([{c: image[c] for c in image_columns} for image in images]),
        "rows": json.dumps([{c: _json_number(r.get(c)) for c in row_columns} for r in explanations])})


def _finish_job_if_complete(conn, job_id: str) -> None:
    # A cancelled job keeps its status and gets its finished_at once the items in flight have ended.
    conn.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(("running", "cancelled")), Job.finished_at.is_(None),
               Job.done + Job.failed + Job.skipped >= Job.total)
        .values(status=case((Job.status == "running", "finished"), else_=Job.status), finished_at=utcnow())
    )


def close_listing(engine: Engine, job_id: str) -> tuple[int, int] | None:
    """All items are recorded: from now on the job finishes when its last item ends (now, if all have ended).
    One statement; returns the job's (total, failed), None when there is no such job."""
    complete = and_(Job.finished_at.is_(None), Job.done + Job.failed + Job.skipped >= Job.total)
    with engine.begin() as conn:
        row = conn.execute(update(Job).where(Job.id == job_id).values(
            status=case((and_(complete, Job.status.in_(("listing", "running"))), "finished"),
                        (Job.status == "listing", "running"), else_=Job.status),
            finished_at=case((and_(complete, Job.status.in_(("listing", "running", "cancelled"))), utcnow()),
                             else_=Job.finished_at),
        ).returning(Job.total, Job.failed)).one_or_none()
    return None if row is None else (row.total, row.failed)


def _settings_id(settings_digest: str):
    return select(ResultSettings.id).where(ResultSettings.digest == settings_digest).scalar_subquery()


def already_explained(conn, sha256: str, settings_digest: str) -> bool:
    return bool(explained_among(conn, [sha256], settings_digest))


def explained_among(conn, sha256s: Iterable[str], settings_digest: str) -> set[str]:
    """Which of these images already have results under these settings: one query for a whole batch."""
    wanted = sorted(set(sha256s))
    if not wanted:
        return set()
    return set(conn.execute(
        select(Explanation.sha256).distinct()
        .where(Explanation.sha256.in_(wanted), Explanation.settings_id == _settings_id(settings_digest))
    ).scalars())


LEGACY_EXPLANATIONS = "explanations_0004"


def legacy_explanations(conn, settings_digest: str | None) -> int:
    """How many results of these settings exist only in the layout before shards (schema 0004: one object
    per map and overlay), kept by migration 0005 in table ``explanations_0004``."""
    if not settings_digest or not inspect(conn).has_table(LEGACY_EXPLANATIONS):
        return 0
    return conn.execute(text(f"SELECT count(*) FROM {LEGACY_EXPLANATIONS} WHERE settings_digest = :d"),
                        {"d": settings_digest}).scalar()


def record_items(engine: Engine, job_id: str, entries: Iterable[str | Entry],
                 page: int = 1000) -> Iterator[list[tuple[int, str]]]:
    """Record URIs or manifest entries as items (see ``add_items``), a page at a time, yielding each page's *new*
    pending ``(item id, uri)`` rows.

    Duplicates (within the job) come back from the database as ignored rows, so the caller never
    keeps a set of seen URIs: memory stays flat for any number of URIs.
    """
    return _recorded(engine, job_id, entries, page, pending_only=True)


def _recorded(engine: Engine, job_id: str, entries: Iterable[str | Entry], page: int,
              pending_only: bool) -> Iterator[list[tuple[int, str]]]:
    """Insert item rows a page at a time (duplicates within the job ignored), counting the new ones into the job
    (those failed by their entry's problem into ``failed`` too); yields each page's new ``(id, uri)`` rows."""
    batch: list[dict] = []

    def flush() -> list[tuple[int, str]]:
        with engine.begin() as conn:
            new = _insert_items(conn, batch)
            failed = sum(row.status == "failed" for row in new)
            conn.execute(update(Job).where(Job.id == job_id).values(
                total=Job.total + len(new), failed=Job.failed + failed))
        batch.clear()
        return [(row.id, row.uri) for row in new if not pending_only or row.status == "pending"]

    for entry in entries:
        batch.append(_item_row(job_id, entry))
        if len(batch) >= page:
            yield flush()
    if batch:
        yield flush()


def claim_items(conn, job_id: str, item_ids: list[int]) -> dict[int, int]:
    """Count one more delivery of each still-pending item; returns ``{item id: deliveries}``.

    Items that have already ended are left out: a redelivered message does not redo them.
    Commit before explaining, so the count survives a worker killed mid-batch.
    """
    rows = conn.execute(
        update(Item)
        .where(Item.job_id == job_id, Item.id.in_(item_ids), Item.status == "pending")
        .values(deliveries=Item.deliveries + 1, updated_at=utcnow())
        .returning(Item.id, Item.deliveries)
    )
    return {row.id: row.deliveries for row in rows}


def release_items(conn, job_id: str, item_ids: list[int]) -> int:
    """Take back the delivery ``claim_items`` counted for still-pending items that a live worker gives
    back (its storage or database was down past the retry budget): they did not kill it, so they must
    not come closer to failing as poison. Returns how many were released."""
    return conn.execute(
        update(Item)
        .where(Item.job_id == job_id, Item.id.in_(item_ids), Item.status == "pending", Item.deliveries > 0)
        .values(deliveries=Item.deliveries - 1)
    ).rowcount


def cancel_job(engine: Engine, job_id: str) -> int | None:
    """Cancel a job: items no worker has started are skipped now; started ones finish. Returns the
    number skipped, or None when there is no such job."""
    with engine.begin() as conn:
        # Lock the job row first: a worker finishing an item waits, so the counters stay exact.
        status = conn.execute(select(Job.status).where(Job.id == job_id).with_for_update()).scalar()
        if status is None:
            return None
        skipped = conn.execute(
            update(Item)
            .where(Item.job_id == job_id, Item.status == "pending", Item.deliveries == 0)
            .values(status="skipped", error="job cancelled", updated_at=utcnow())
        ).rowcount
        values: dict[str, Any] = {"skipped": Job.skipped + skipped}
        if status in ("listing", "running"):
            values["status"] = "cancelled"
        conn.execute(update(Job).where(Job.id == job_id).values(values))
        _finish_job_if_complete(conn, job_id)
    return skipped


def job_is_cancelled(conn, job_id: str) -> bool:
    return conn.execute(select(Job.status).where(Job.id == job_id)).scalar() == "cancelled"


def reconcile_jobs(engine: Engine) -> int:
    """Recount every unfinished job's counters from its items and finish the complete ones; returns
    how many jobs had drifted. A safety net: counters only drift if a write was lost outside salient."""
    with engine.connect() as conn:
        open_jobs = conn.execute(
            select(Job.id).where(Job.status.in_(("running", "cancelled")), Job.finished_at.is_(None))
        ).scalars().all()
    drifted = 0
    for job_id in open_jobs:
        with engine.begin() as conn:
            # Lock first, then count: the count's snapshot is taken after every finisher before us committed,
            # and finishers after us wait for the lock and add to the corrected counters.
            job = conn.execute(select(Job.done, Job.failed, Job.skipped, Job.total)
                               .where(Job.id == job_id).with_for_update()).one()
            counts = dict(conn.execute(
                select(Item.status, func.count()).where(Item.job_id == job_id).group_by(Item.status)).all())
            actual = {"done": counts.get("done", 0), "failed": counts.get("failed", 0),
                      "skipped": counts.get("skipped", 0), "total": sum(counts.values())}
            seen = dict(job._mapping)
            if actual != seen:
                # Compare-and-set as well: SQLite ignores FOR UPDATE, and there a finisher that commits
                # between our reads makes this a no-op instead of a lost update.
                unchanged = [getattr(Job, name) == value for name, value in seen.items()]
                drifted += conn.execute(update(Job).where(Job.id == job_id, *unchanged).values(actual)).rowcount
            _finish_job_if_complete(conn, job_id)
    return drifted
