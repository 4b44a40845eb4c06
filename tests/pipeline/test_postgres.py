"""PostgreSQL: many writers at once lose no counter update, the schema is created once under
concurrent starts and migrated like SQLite, and cancel/reconcile keep the counters exact."""

from __future__ import annotations

import threading
import time

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select, update

from salient_maps.storage.database import (
    SCHEMA_REVISION, Base, Item, ItemEnd, Job, cancel_job, claim_items, close_listing, connect, create_job,
    finish_item, finish_items, reconcile_jobs, record_items, schema_revision,
)
from salient_maps.storage.migrations import alembic_config

WRITERS, PER_WRITER = 8, 40


def _job_with_items(db, n: int) -> tuple[str, list[int]]:
    job_id = create_job(db, {"test": True})
    ids = [item_id for page in record_items(db, job_id, (f"file:///img{i}.png" for i in range(n)))
           for item_id, _ in page]
    close_listing(db, job_id)
    return job_id, ids


def _in_threads(target, n: int) -> None:
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            target(k)
        except BaseException as exc:  # surfaced below: a thread's assertion must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_items_are_recorded_a_page_at_a_time_with_their_ground_truth(pipeline):
    from salient_maps.storage.sources import Entry

    db = pipeline.db()
    job_id = create_job(db, {})
    # 1,500 distinct URIs over two pages, each of the first 20 twice (the copy on the second page), ground truth
    # with nesting and a quote on some, one with a problem
    entries = [Entry(f"file:///{i}.png", {"label": i, "boxes": [[0, 0, i, 2]]} if i % 3 == 0 else None)
               for i in range(1500)] + [f"file:///{i}.png" for i in range(20)]
    entries[7] = Entry("file:///7.png", None, "bad ground truth: it's \"boxes\"")
    pages = list(record_items(db, job_id, entries))
    assert [len(page) for page in pages] == [999, 500]  # new pending items only: #7 failed, the copies known
    new = [uri for page in pages for _, uri in page]
    assert new == [f"file:///{i}.png" for i in range(1500) if i != 7]
    ids = [item_id for page in pages for item_id, _ in page]
    assert ids == sorted(ids)
    with db.connect() as conn:
        assert conn.execute(select(Job.total, Job.failed)).one() == (1500, 1)
        rows = {row.uri: row for row in conn.execute(select(Item.uri, Item.status, Item.error, Item.truth))}
        nulls = conn.execute(select(sa.func.count()).where(Item.truth.is_(None))).scalar()
    assert rows["file:///3.png"].truth == {"label": 3, "boxes": [[0, 0, 3, 2]]}
    assert rows["file:///4.png"].truth is None and nulls == 1000  # SQL NULL, not the JSON value null
    assert (rows["file:///7.png"].status, rows["file:///7.png"].error) == ("failed", "bad ground truth: it's \"boxes\"")


def test_concurrent_writers_lose_no_counter_update(pipeline):
    db = pipeline.db()
    job_id, ids = _job_with_items(db, WRITERS * PER_WRITER)
    stop = threading.Event()
    reconciled = []

    def reconcile_meanwhile() -> None:  # the reconciler recounts while the writers write
        while not stop.is_set():
            reconciled.append(reconcile_jobs(db))

    reconciler = threading.Thread(target=reconcile_meanwhile)
    reconciler.start()

    def writer(k: int) -> None:
        mine = ids[k * PER_WRITER:(k + 1) * PER_WRITER]
        for n, item_id in enumerate(mine):
            with db.begin() as conn:
                claim_items(conn, job_id, [item_id])
            with db.begin() as conn:
                assert finish_item(conn, item_id, job_id, "failed" if n % 10 == 0 else "done", error=None)
            with db.begin() as conn:  # a redelivery of the same item changes nothing
                assert not finish_item(conn, item_id, job_id, "done")

    try:
        _in_threads(writer, WRITERS)
    finally:
        stop.set()
        reconciler.join()
    with db.connect() as conn:
        job = conn.execute(select(Job).where(Job.id == job_id)).one()
    total = WRITERS * PER_WRITER
    assert (job.total, job.done, job.failed, job.status) == (total, total - total // 10, total // 10, "finished")
    assert job.finished_at is not None
    assert len(reconciled) > 1 and sum(reconciled) == 0  # nothing ever drifted


def test_a_batch_of_mixed_ends_lands_each_value_once_and_finishes_the_job(pipeline):
    db = pipeline.db()
    job_id, ids = _job_with_items(db, 4)
    ends = [ItemEnd(ids[0], job_id, "done", sha256="a" * 64, seconds=0.25, label=3, predicted=5),
            ItemEnd(ids[1], job_id, "failed", error="not an image: 'quotes' and \\ and ünïcode"),
            ItemEnd(ids[2], job_id, "skipped", error="job cancelled", seconds=float("nan"))]
    with db.begin() as conn:
        assert finish_items(conn, ends) == set(ids[:3])
    with db.begin() as conn:  # redone: nothing ends twice, the counters stay
        assert finish_items(conn, ends + [ItemEnd(ids[3], job_id, "done", sha256="b" * 64)]) == {ids[3]}
    with db.connect() as conn:
        rows = {r.id: r for r in conn.execute(select(Item).where(Item.job_id == job_id))}
        job = conn.execute(select(Job).where(Job.id == job_id)).one()
    assert (rows[ids[0]].status, rows[ids[0]].sha256, rows[ids[0]].seconds, rows[ids[0]].label,
            rows[ids[0]].predicted, rows[ids[0]].error) == ("done", "a" * 64, 0.25, 3, 5, None)
    assert (rows[ids[1]].status, rows[ids[1]].error, rows[ids[1]].sha256) == (
        "failed", "not an image: 'quotes' and \\ and ünïcode", None)
    assert rows[ids[2]].status == "skipped" and rows[ids[2]].seconds != rows[ids[2]].seconds  # NaN kept
    assert (job.done, job.failed, job.skipped, job.status) == (2, 1, 1, "finished") and job.finished_at is not None


def test_the_same_load_with_read_modify_write_does_lose_updates(pipeline):
    """Control: the test above can fail. Counting in Python (read, then write the sum) under the same
    concurrency loses updates, which the single UPDATE ... SET done = done + 1 never does."""
    db = pipeline.db()
    job_id, _ = _job_with_items(db, 1)

    def naive(_k: int) -> None:
        for _ in range(PER_WRITER):
            with db.begin() as conn:
                done = conn.execute(select(Job.done).where(Job.id == job_id)).scalar()
                time.sleep(0.001)
                conn.execute(update(Job).where(Job.id == job_id).values(done=done + 1))

    _in_threads(naive, WRITERS)
    with db.connect() as conn:
        assert conn.execute(select(Job.done).where(Job.id == job_id)).scalar() < WRITERS * PER_WRITER


def test_workers_starting_at_once_create_the_schema_once(pipeline):
    url = pipeline.database_url
    _in_threads(lambda _k: connect(url), 6)
    with connect(url).connect() as conn:
        assert schema_revision(conn) == SCHEMA_REVISION
        assert conn.execute(sa.text("SELECT count(*) FROM alembic_version")).scalar() == 1
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_an_old_postgres_database_is_migrated_on_connect(pipeline):
    engine = sa.create_engine(pipeline.database_url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0001")
        conn.execute(sa.text("INSERT INTO jobs (id, status, settings, total, done, failed, skipped, created_at) "
                             "VALUES ('j1', 'running', '{}', 1, 0, 0, 0, now())"))
        conn.execute(sa.text("INSERT INTO items (job_id, uri, status, updated_at) "
                             "VALUES ('j1', 'file:///a.png', 'pending', now())"))
    db = connect(pipeline.database_url)
    with db.connect() as conn:
        assert schema_revision(conn) == SCHEMA_REVISION
        assert conn.execute(select(Item.deliveries)).scalars().all() == [0]
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_cancel_skips_unstarted_items_and_lets_started_ones_finish(pipeline):
    db = pipeline.db()
    job_id, ids = _job_with_items(db, 10)
    with db.begin() as conn:
        claim_items(conn, job_id, ids[:2])  # two images are on a worker
    assert cancel_job(db, job_id) == 8
    assert cancel_job(db, "no-such-job") is None
    with db.connect() as conn:
        job = conn.execute(select(Job).where(Job.id == job_id)).one()
        assert (job.status, job.skipped, job.finished_at) == ("cancelled", 8, None)
    with db.begin() as conn:
        for item_id in ids[:2]:
            assert finish_item(conn, item_id, job_id, "done")
    with db.connect() as conn:
        job = conn.execute(select(Job).where(Job.id == job_id)).one()
        statuses = conn.execute(select(Item.status, Item.error).where(Item.job_id == job_id)
                                .order_by(Item.id)).all()
    assert (job.status, job.done, job.skipped) == ("cancelled", 2, 8) and job.finished_at is not None
    assert statuses == [("done", None)] * 2 + [("skipped", "job cancelled")] * 8


def test_reconciler_repairs_drifted_counters_and_finishes_the_job(pipeline):
    db = pipeline.db()
    job_id, ids = _job_with_items(db, 3)
    with db.begin() as conn:
        for item_id in ids:
            finish_item(conn, item_id, job_id, "done")
        # A counter write lost outside salient (e.g. a restored backup): the job looks unfinished.
        conn.execute(update(Job).where(Job.id == job_id).values(done=1, status="running", finished_at=None))
    assert reconcile_jobs(db) == 1
    with db.connect() as conn:
        job = conn.execute(select(Job).where(Job.id == job_id)).one()
    assert (job.done, job.status) == (3, "finished") and job.finished_at is not None
    assert reconcile_jobs(db) == 0


def test_audit_and_compare_summaries_run_on_postgres(pipeline):
    """The audit's SQL (FILTER, averages of the metric columns, the ranking) and compare's pairing, on PostgreSQL."""
    import numpy as np

    from salient_maps.storage.audits import audit_job, suspects
    from salient_maps.storage.database import Explanation, ItemEnd, ItemMetrics, ResultSettings, Shard, finish_items
    from salient_maps.storage.run_comparison import compare_jobs
    from salient_maps.storage.sources import Entry

    db = connect(pipeline.database_url)
    jobs = []
    with db.begin() as conn:
        for n in range(2):
            conn.execute(ResultSettings.__table__.insert().values(
                digest=f"audit-{n}", model="m", layer="l", methods={"gradcam": {}}, overlay={},
                class_names=["a", "b"], created_at=sa.func.now()))
        conn.execute(Shard.__table__.insert().values(key="audit-shard", images=3, bytes=1, created_at=sa.func.now()))
        conn.execute(sa.text("INSERT INTO images (sha256, width, height, created_at) VALUES "
                             "('s0', 8, 8, now()), ('s1', 8, 8, now()), ('s2', 8, 8, now())"))
    for n in range(2):
        job_id = create_job(db, {})
        items = [row for page in record_items(db, job_id, [Entry(f"file:///{i}.png", {"label": 1}) for i in range(3)])
                 for row in page]
        with db.begin() as conn:
            conn.execute(update(Job).where(Job.id == job_id).values(settings_digest=f"audit-{n}"))
            settings_id = conn.execute(select(ResultSettings.id).where(ResultSettings.digest == f"audit-{n}")).scalar()
            shard_id = conn.execute(select(Shard.id)).scalar()
            finish_items(conn, [ItemEnd(item_id, job_id, "done", f"s{i}", label=1, predicted=1 if i < 2 else 0)
                                for i, (item_id, _) in enumerate(items)])
            conn.execute(Explanation.__table__.insert(), [
                {"sha256": f"s{i}", "settings_id": settings_id, "method": "gradcam", "class_id": 1, "score": 0.5,
                 "rank": 1, "shard_id": shard_id, "slot": 3 * n + i, "extra": None, "energy_in_box": [0.9, 0.2, 0.5][i],
                 "border_energy": 0.1, "pointing_game": 1, "localization_iou": None} for i in range(3)])
        jobs.append(job_id)
    with db.connect() as conn:
        summary = audit_job(conn, jobs[0])
        assert (summary.images, summary.labelled, summary.correct, summary.ranked_by) == (3, 3, 2, "energy_in_box")
        (row,) = summary.classes
        assert row["explanations"] == 3 and abs(row["energy_in_box"] - 1.6 / 3) < 1e-9
        assert [r["sha256"] for r in suspects(conn, jobs[0], "energy_in_box")] == ["s1", "s0"]  # s2 is wrong
    with db.begin() as conn:  # s1's item measured against its own boxes (storage/ground_truth.py)
        s1_item = conn.execute(select(Item.id).where(Item.job_id == jobs[0], Item.sha256 == "s1")).scalar()
        conn.execute(ItemMetrics.__table__.insert().values(item_id=s1_item, method="gradcam", class_id=1,
                                                           energy_in_box=0.95, pointing_game=1))
    with db.connect() as conn:
        (row,) = audit_job(conn, jobs[0]).classes
        assert abs(row["energy_in_box"] - 2.35 / 3) < 1e-9
        assert [(r["sha256"], r["energy_in_box"]) for r in suspects(conn, jobs[0], "energy_in_box")] == \
            [("s0", 0.9), ("s1", 0.95)]
        assert [r["sha256"] for r in suspects(conn, jobs[1], "energy_in_box")] == ["s1", "s0"]  # job 1: the rows'

        class Maps:  # the slot's own map: job 0's slots 0-2, job 1's 3-5, job 1's image s1 moved
            def map(self, record):
                heat = np.zeros((4, 4))
                heat.flat[record["slot"] % 3 if record["slot"] != 4 else 15] = 1.0
                return heat

        result = compare_jobs(conn, Maps(), jobs[0], jobs[1])
    assert result.images == 3 and result.predictions_changed == 0
    assert result.pairs[0]["sha256"] == "s1" and result.pairs[0]["top10_iou"] < 0.5  # 2 top cells, one shared
    assert [p["top10_iou"] for p in result.pairs[1:]] == [1.0, 1.0]
