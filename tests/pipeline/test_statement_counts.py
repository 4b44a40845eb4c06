"""The database per batch, counted: SQL statements of a queue worker's messages (PostgreSQL) and of `salient run`
(SQLite) stay at most 0.2 per image at batch 32 for Grad-CAM top-3, and the statements that merge several writes
(rows and shard in one, item ends and job counters in one) keep exactly-once counting on PostgreSQL."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import sqlalchemy as sa
from sqlalchemy import event, func, select

from salient_maps.storage import database
from salient_maps.storage.database import (
    Explanation,
    Image,
    Item,
    ItemEnd,
    Job,
    ResultSettings,
    Shard,
    add_items,
    close_listing,
    connect,
    create_job,
    finish_items,
    result_settings_id,
    store_shard_rows,
)
from salient_maps.storage.job_options import job_spec
from salient_maps.storage.messages import chunk_message, parse_chunk
from salient_maps.storage.objects import open_store
from salient_maps.storage.orphan_shards import record_shard
from salient_maps.storage.settings import Settings
from salient_maps.storage.sources import iter_uris

BATCH = 32
SPEC = dict(model="resnet18", methods="gradcam", topk=3, batch_size=BATCH, input_size=32)


@contextmanager
def counting(engine):
    """The statements run on ``engine`` inside the block (schema creation excluded)."""
    statements: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:
        statements.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", count)


def listed_job(db, settings: Settings, folder) -> tuple[str, list[tuple[int, str]]]:
    job_id = create_job(db, {})
    add_items(db, job_id, iter_uris([str(folder)], settings))
    close_listing(db, job_id)
    with db.connect() as conn:
        return job_id, [tuple(row) for row in conn.execute(select(Item.id, Item.uri).order_by(Item.id))]


def job_state(db, job_id: str):
    with db.connect() as conn:
        job = conn.execute(select(Job.status, Job.total, Job.done, Job.failed, Job.skipped)
                           .where(Job.id == job_id)).one()
        statuses = dict(conn.execute(select(Item.status, func.count()).group_by(Item.status)).all())
        rows = conn.execute(select(func.count()).select_from(Explanation)).scalar()
    return tuple(job), statuses, rows


def test_a_queue_worker_runs_six_statements_per_message_of_32(pipeline, tiny_images):
    from salient_maps.workers.batching import DeviceLoop
    from salient_maps.workers.explainers import ProcessorCache
    from salient_maps.workers.tasks import Runtime, run_chunk

    settings = pipeline.settings
    db = pipeline.db()
    job_id, items = listed_job(db, settings, tiny_images(3 * BATCH, size=(24, 32)))
    loop = DeviceLoop(db, settings, 2, linger=600)
    rt = Runtime(settings, ProcessorCache(settings, db, open_store(settings.resolved_object_store_url, settings), "cpu",
                                          model_lock=loop.model_lock), loop)
    per_message = []
    for start in range(0, len(items), BATCH):
        message = chunk_message(job_id, items[start:start + BATCH], job_spec(**SPEC))
        with counting(db) as statements:
            run_chunk(parse_chunk(message), rt)
        per_message.append(statements)
    # Per message: the items' state with their truth and job, the claim, the explained-images query, the shard's
    # row (before its upload), images and explanations, item ends with the job counters. The first message
    # also records the job's settings digest and the result settings row.
    assert [len(s) for s in per_message] == [8, 6, 6], "\n".join(s[:60] for m in per_message for s in m + ["--"])
    assert 6 / BATCH <= 0.2
    assert job_state(db, job_id) == (("finished", 96, 96, 0, 0), {"done": 96}, 96 * 3)
    # A redelivered message ends nothing twice: one query finds every item ended.
    with counting(db) as statements:
        counts = run_chunk(parse_chunk(chunk_message(job_id, items[:BATCH], job_spec(**SPEC))), rt)
    assert counts == {"already_ended": BATCH} and len(statements) == 1
    assert job_state(db, job_id) == (("finished", 96, 96, 0, 0), {"done": 96}, 96 * 3)


def test_salient_run_stays_under_a_fifth_of_a_statement_per_image(tmp_path, tiny_images):
    """Everything from creating the job to its end, but the schema: `salient run`'s own command code on SQLite."""
    from salient_maps.workers.cli import explain_sources

    n = 8 * BATCH
    folder = tiny_images(n, size=(24, 32))
    statements: list[str] = []
    creating_schema = [False]
    ensure_schema = database.ensure_schema

    def schema(engine):
        creating_schema[0] = True
        try:
            return ensure_schema(engine)
        finally:
            creating_schema[0] = False

    def count(_conn, _cursor, statement, *_args) -> None:
        if not creating_schema[0]:
            statements.append(statement)

    from sqlalchemy.engine import Engine

    event.listen(Engine, "before_cursor_execute", count)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(database, "ensure_schema", schema)
            _, counts, _, _ = explain_sources([str(folder)], weights=None, layer=None, classes=None, device="cpu",
                                              precision="fp32", data_dir=tmp_path / "data", show_progress=False,
                                              **SPEC)
    finally:
        event.remove(Engine, "before_cursor_execute", count)
    assert counts["done"] == n
    # Per batch: the shard row, images, explanations, item ends, job counters; one explained-images query per
    # two batches; per job: listing, settings, the pending items' page.
    assert len(statements) / n <= 0.2, len(statements)
    writes = [s for s in statements if s.lstrip().upper().startswith(("INSERT INTO EXPLANATIONS", "UPDATE ITEMS"))]
    assert len(writes) == 2 * n // BATCH


def test_merged_statements_count_each_item_once_on_postgres(pipeline):
    """Item ends and job counters in one statement: mixed statuses, items of two jobs, a redone batch, an item
    that ended before; images and explanations in one: a redone batch adds no row."""
    db = pipeline.db()
    jobs = []
    for _ in range(2):
        job_id = create_job(db, {})
        add_items(db, job_id, [f"file:///{job_id}/{i}.png" for i in range(3)])
        close_listing(db, job_id)
        jobs.append(job_id)
    with db.connect() as conn:
        ids = {job: conn.execute(select(Item.id).where(Item.job_id == job).order_by(Item.id)).scalars().all()
               for job in jobs}
    a, b = jobs
    with db.begin() as conn:
        assert finish_items(conn, [ItemEnd(ids[a][0], a, "failed", error="bad")]) == {ids[a][0]}
    ends = [ItemEnd(ids[a][0], a, "done", "s0"), ItemEnd(ids[a][1], a, "done", "s1", seconds=0.5, label=2, predicted=2),
            ItemEnd(ids[a][2], a, "skipped", "s2"), ItemEnd(ids[b][0], b, "done", "s3"),
            ItemEnd(ids[b][1], b, "failed", error="unreadable")]
    with db.begin() as conn, counting(db) as statements:
        ended = finish_items(conn, ends)
    assert ended == {ids[a][1], ids[a][2], ids[b][0], ids[b][1]} and len(statements) == 1
    with db.begin() as conn:  # redone: nothing moves
        assert finish_items(conn, ends) == set()
    with db.connect() as conn:
        counters = {row.id: tuple(row)[1:] for row in conn.execute(
            select(Job.id, Job.status, Job.done, Job.failed, Job.skipped, Job.finished_at.is_not(None)))}
        item = conn.execute(select(Item.status, Item.sha256, Item.seconds, Item.label)
                            .where(Item.id == ids[a][1])).one()
        first = conn.execute(select(Item.status, Item.error).where(Item.id == ids[a][0])).one()
    assert counters[a] == ("finished", 1, 1, 1, True)
    assert counters[b] == ("running", 1, 1, 0, False)
    assert tuple(item) == ("done", "s1", 0.5, 2) and tuple(first) == ("failed", "bad")

    row = {"digest": "d", "model": "m", "layer": "l", "methods": {}, "overlay": {}, "class_names": []}
    images = [{"sha256": f"s{i}", "width": 8, "height": 6} for i in range(2)]
    for _ in range(2):  # the second time redone
        with db.begin() as conn:
            record_shard(conn, "shards/x", 2, 10)
        with db.begin() as conn, counting(db) as statements:
            settings_id = result_settings_id(conn, row)
            explanations = [{"sha256": f"s{i}", "settings_id": settings_id, "method": "gradcam", "class_id": k,
                             "score": 0.5, "rank": k + 1, "slot": 2 * i + k, "extra": None,
                             "border_energy": [0.25, float("nan"), None, float("inf")][2 * i + k]}
                            for i in range(2) for k in range(2)]
            explanations[0]["extra"] = {"metrics": {"deletion": 0.125}}
            store_shard_rows(conn, "shards/x", images, explanations)
        assert len(statements) == 2
    with db.connect() as conn:
        assert [conn.execute(select(func.count()).select_from(t)).scalar()
                for t in (ResultSettings, Shard, Image, Explanation)] == [1, 1, 2, 4]
        shard_id = conn.execute(select(Shard.id)).scalar()
        assert set(conn.execute(select(Explanation.shard_id)).scalars()) == {shard_id}
        stored = conn.execute(select(Explanation.extra, Explanation.border_energy).order_by(Explanation.slot)).all()
        # JSON null for no extra, as SQLAlchemy's JSON type stores None
        assert conn.execute(sa.text("SELECT count(*) FROM explanations WHERE extra IS NULL")).scalar() == 0
    assert [row.extra for row in stored] == [{"metrics": {"deletion": 0.125}}, None, None, None]
    energies = [row.border_energy for row in stored]
    assert energies[0] == 0.25 and math.isnan(energies[1]) and energies[2] is None and energies[3] == math.inf


def test_merged_statements_on_sqlite(tmp_path):
    """The same writes on SQLite (several statements there): the same outcome."""
    db = connect(f"sqlite:///{tmp_path / 'db.sqlite'}")
    job_id = create_job(db, {})
    add_items(db, job_id, ["file:///a.png", "file:///b.png"])
    close_listing(db, job_id)
    with db.connect() as conn:
        ids = conn.execute(select(Item.id).order_by(Item.id)).scalars().all()
    ends = [ItemEnd(ids[0], job_id, "done", "s0"), ItemEnd(ids[1], job_id, "failed", error="bad")]
    with db.begin() as conn:
        assert finish_items(conn, ends) == set(ids)
    with db.begin() as conn:
        assert finish_items(conn, ends) == set()
    assert job_state(db, job_id)[:2] == (("finished", 2, 1, 1, 0), {"done": 1, "failed": 1})
    row = {"digest": "d", "model": "m", "layer": "l", "methods": {}, "overlay": {}, "class_names": []}
    for _ in range(2):
        with db.begin() as conn:
            record_shard(conn, "k", 1, 1)
            settings_id = result_settings_id(conn, row)
            store_shard_rows(conn, "k", [
                {"sha256": "s0", "width": 1, "height": 1}], [
                {"sha256": "s0", "settings_id": settings_id, "method": "gradcam", "class_id": 0, "score": 1.0,
                 "rank": 1, "slot": 0, "extra": None}])
    with db.connect() as conn:
        assert [conn.execute(select(func.count()).select_from(t)).scalar()
                for t in (ResultSettings, Shard, Image, Explanation)] == [1, 1, 1, 1]
        assert conn.execute(select(Explanation.shard_id)).scalar() == conn.execute(select(Shard.id)).scalar()
