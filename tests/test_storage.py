"""The ground floor: the local object store, the database's exactly-once writes and the results records."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest
from sqlalchemy import func, select

from salient_maps.storage.database import (
    Explanation,
    Image,
    Item,
    Job,
    ResultSettings,
    Shard,
    add_items,
    already_explained,
    close_listing,
    connect,
    create_job,
    finish_item,
    insert_ignore,
    utcnow,
)
from salient_maps.storage.objects import LocalObjectStore
from salient_maps.storage.results import FIELDS, iter_results, write_results
from salient_maps.storage.settings import Settings

REQUIRED_FIELDS = ("job_id", "uri", "sha256", "model", "method", "method_params", "layer", "class_id", "class_name",
                   "score", "rank", "shard", "slot", "status", "error", "seconds")


# --- local object store -------------------------------------------------------------------------------------------


def test_put_get_exists_round_trip(tmp_path):
    store = LocalObjectStore(tmp_path / "objects")
    key = "maps/ab/abcdef/resnet18-x/layer4/gradcam/285.npy"
    assert not store.exists(key)
    store.put(key, b"first", "application/octet-stream")
    assert store.exists(key) and store.get(key) == b"first"
    store.put(key, b"second", "application/octet-stream")  # overwrite replaces whole
    assert store.get(key) == b"second"
    assert not store.exists("maps/ab")  # a folder is not an object
    files = [p.name for p in (tmp_path / "objects").rglob("*") if p.is_file()]
    assert files == ["285.npy"]  # no temp files left behind
    with pytest.raises(FileNotFoundError):
        store.get("maps/missing.npy")


def test_a_failed_write_leaves_neither_object_nor_temp_file(tmp_path, monkeypatch):
    store = LocalObjectStore(tmp_path)

    def broken_rename(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_rename)
    with pytest.raises(OSError, match="disk full"):
        store.put("a/b.png", b"data", "image/png")
    monkeypatch.undo()
    assert not store.exists("a/b.png")
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("key", ["../outside.npy", "maps/../../outside.npy", "/etc/passwd", "maps/link/x.npy"])
def test_keys_that_escape_the_store_are_refused(tmp_path, key):
    root = tmp_path / "objects"
    (root / "maps").mkdir(parents=True)
    (root / "maps" / "link").symlink_to(tmp_path)  # a symlink inside the store pointing out of it
    store = LocalObjectStore(root)
    for call in (lambda: store.put(key, b"x", "text/plain"), lambda: store.get(key), lambda: store.exists(key)):
        with pytest.raises(ValueError, match="escapes the store"):
            call()
    assert not (tmp_path / "outside.npy").exists() and not (tmp_path / "x.npy").exists()


# --- database -----------------------------------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path):
    return connect(f"sqlite:///{tmp_path / 'salient.db'}")


def job_row(db, job_id: str):
    with db.connect() as conn:
        return conn.execute(select(Job).where(Job.id == job_id)).one()


def item_ids(db, job_id: str) -> list[int]:
    with db.connect() as conn:
        return conn.execute(select(Item.id).where(Item.job_id == job_id).order_by(Item.id)).scalars().all()


def test_insert_ignore_is_idempotent(db):
    row = {"sha256": "a" * 64, "width": 3, "height": 2}
    with db.begin() as conn:
        assert conn.execute(insert_ignore(db, Image.__table__, [row])).rowcount == 1
        assert conn.execute(insert_ignore(db, Image.__table__, [row, {**row, "width": 99}])).rowcount == 0
        assert conn.execute(select(func.count()).select_from(Image)).scalar() == 1
        assert conn.execute(select(Image.width)).scalar() == 3  # the first write stands


def test_items_are_deduplicated_per_job_and_counted(db):
    job = create_job(db, {"model": "m"})
    assert add_items(db, job, ["file:///a.png", "file:///b.png", "file:///a.png"]) == 2
    assert add_items(db, job, ["file:///b.png", "file:///c.png"]) == 1
    assert job_row(db, job).total == 3
    other = create_job(db, {"model": "m"})  # the same URI in another job is another item
    assert add_items(db, other, ["file:///a.png"]) == 1


def test_each_item_ends_exactly_once_and_the_job_finishes_with_the_last(db):
    job = create_job(db, {})
    add_items(db, job, [f"file:///{i}.png" for i in range(3)])
    close_listing(db, job)
    first, second, third = item_ids(db, job)
    with db.begin() as conn:
        assert finish_item(conn, first, job, "done", sha256="1" * 64, seconds=0.5)
        # a redelivered message finishing the same item again changes nothing
        assert not finish_item(conn, first, job, "failed", error="late duplicate")
        assert finish_item(conn, second, job, "failed", error="truncated PNG (no IEND chunk)")
    row = job_row(db, job)
    assert (row.status, row.done, row.failed, row.skipped, row.finished_at) == ("running", 1, 1, 0, None)
    with db.connect() as conn:
        status, error = conn.execute(select(Item.status, Item.error).where(Item.id == first)).one()
    assert (status, error) == ("done", None)
    with db.begin() as conn:
        assert finish_item(conn, third, job, "skipped", sha256="3" * 64)
    row = job_row(db, job)
    assert (row.status, row.done, row.failed, row.skipped) == ("finished", 1, 1, 1)
    assert row.finished_at is not None


def test_a_job_still_listing_does_not_finish_early(db):
    job = create_job(db, {})
    add_items(db, job, ["file:///only.png"])
    [only] = item_ids(db, job)
    with db.begin() as conn:
        finish_item(conn, only, job, "done", sha256="0" * 64)
    assert job_row(db, job).status == "listing"  # more items may still come
    close_listing(db, job)
    assert job_row(db, job).status == "finished"
    empty = create_job(db, {})
    close_listing(db, empty)
    assert job_row(db, empty).status == "finished"


def test_already_explained_is_per_settings_digest(db):
    sha = "f" * 64
    with db.begin() as conn:
        conn.execute(insert_ignore(db, Image.__table__, [{"sha256": sha, "width": 1, "height": 1}]))
        conn.execute(insert_ignore(db, Explanation.__table__, [explanation(sha, shared(conn, "d1"), "gradcam", 1)]))
        shared(conn, "d2")
        assert already_explained(conn, sha, "d1")
        assert not already_explained(conn, sha, "d2")
        assert not already_explained(conn, "e" * 64, "d1")


def shared(conn, digest: str) -> int:
    """The settings row of ``digest`` and a shard row for explanations to point to; returns the settings id."""
    conn.execute(insert_ignore(conn.engine, ResultSettings.__table__, [dict(
        digest=digest, model="resnet18-abc", layer="layer4", methods={"gradcam": {}, "saliency": {"score": "logit"}},
        overlay={}, class_names=[f"class {i}" for i in range(1000)], created_at=utcnow())]))
    conn.execute(insert_ignore(conn.engine, Shard.__table__, [{"key": "shards/ab/ab.safetensors", "images": 1,
                                                               "bytes": 1}]))
    return conn.execute(select(ResultSettings.id).where(ResultSettings.digest == digest)).scalar_one()


def explanation(sha: str, settings_id: int, method: str, rank: int, class_id: int = 285) -> dict:
    return {"sha256": sha, "settings_id": settings_id, "method": method, "class_id": class_id + rank - 1,
            "score": 0.5 / rank, "rank": rank, "shard_id": 1, "slot": rank - 1, "extra": None}


# --- results records ----------------------------------------------------------------------------------------------


@pytest.fixture
def finished_job(tmp_path, db):
    """A job with one explained image (2 methods × top-2), one failed image and one skipped duplicate."""
    job = create_job(db, {})
    add_items(db, job, ["file:///good.png", "file:///bad.png", "file:///copy.png"])
    close_listing(db, job)
    good, bad, copy = item_ids(db, job)
    sha = "c" * 64
    with db.begin() as conn:
        conn.execute(Job.__table__.update().where(Job.id == job).values(settings_digest="d1"))
        conn.execute(insert_ignore(db, Image.__table__, [{"sha256": sha, "width": 4, "height": 3}]))
        conn.execute(insert_ignore(db, Explanation.__table__, [
            explanation(sha, shared(conn, "d1"), method, rank)
            for method in ("gradcam", "saliency") for rank in (1, 2)]))
        # an explanation under other settings must not show up in this job
        conn.execute(insert_ignore(db, Explanation.__table__, [explanation(sha, shared(conn, "other"), "gradcam", 1)]))
        finish_item(conn, good, job, "done", sha256=sha, seconds=0.2)
        finish_item(conn, bad, job, "failed", error="empty file", seconds=0.001)
        finish_item(conn, copy, job, "skipped", sha256=sha, seconds=0.003)
    return Settings(data_dir=tmp_path), job


def test_results_have_every_field_and_one_record_per_explanation_or_failure(finished_job):
    settings, job = finished_job
    assert set(REQUIRED_FIELDS) <= set(FIELDS)
    records = list(iter_results(settings, job))
    assert all(tuple(r)[:len(REQUIRED_FIELDS)] == REQUIRED_FIELDS for r in records)
    by_uri: dict[str, list[dict]] = {}
    for r in records:
        by_uri.setdefault(r["uri"], []).append(r)
    assert {u: len(rs) for u, rs in by_uri.items()} == {"file:///good.png": 4, "file:///bad.png": 1,
                                                        "file:///copy.png": 4}
    [failed] = by_uri["file:///bad.png"]
    assert failed["status"] == "failed" and failed["error"] == "empty file" and failed["shard"] is None
    for uri in ("file:///good.png", "file:///copy.png"):  # the skipped copy reports the earlier result
        rows = by_uri[uri]
        assert {(r["method"], r["rank"]) for r in rows} == {(m, k) for m in ("gradcam", "saliency") for k in (1, 2)}
        assert all(r["status"] == "done" and r["error"] is None and r["job_id"] == job for r in rows)
        assert all(r["shard"] == "shards/ab/ab.safetensors" and r["slot"] == r["rank"] - 1 for r in rows)
        assert all(r["class_name"] == f"class {r['class_id']}" and r["layer"] == "layer4" for r in rows)
        assert {r["method"]: r["method_params"] for r in rows} == {"gradcam": {}, "saliency": {"score": "logit"}}


def test_results_as_jsonl_and_csv_agree(finished_job):
    settings, job = finished_job
    jsonl, table = io.StringIO(), io.StringIO()
    write_results(settings, job, "jsonl", jsonl)
    write_results(settings, job, "csv", table)
    from_json = [json.loads(line) for line in jsonl.getvalue().splitlines()]
    from_csv = list(csv.DictReader(io.StringIO(table.getvalue())))
    assert len(from_json) == len(from_csv) == 9
    for j, c in zip(from_json, from_csv):
        assert list(c) == list(FIELDS)
        as_text = {dict: lambda v: json.dumps(v, sort_keys=True), type(None): lambda v: ""}  # nested: JSON text
        assert {k: as_text.get(type(v), str)(v) for k, v in j.items()} == c


def test_results_of_a_missing_job_say_so(finished_job):
    settings, _ = finished_job
    with pytest.raises(LookupError, match="no job nope"):
        list(iter_results(settings, "nope"))
    empty = Settings(data_dir=Path(settings.data_dir) / "elsewhere")
    with pytest.raises(LookupError, match="no jobs"):
        list(iter_results(empty, None))


def test_local_put_if_absent_neither_renders_nor_writes_an_existing_object(tmp_path):
    store = LocalObjectStore(tmp_path / "objects")
    store.put_if_absent("maps/a.npy", lambda: b"first", "application/octet-stream")
    written = (tmp_path / "objects" / "maps" / "a.npy").stat().st_mtime_ns

    def render() -> bytes:
        raise AssertionError("rendered an object that exists")

    store.put_if_absent("maps/a.npy", render, "application/octet-stream")
    assert store.get("maps/a.npy") == b"first"
    assert (tmp_path / "objects" / "maps" / "a.npy").stat().st_mtime_ns == written


def _connect_when_all_are_ready(url: str, ready, outcomes) -> None:
    from salient_maps.storage.database import connect, schema_revision

    ready.wait()
    try:
        with connect(url).connect() as conn:
            outcomes.put(schema_revision(conn))
    except Exception as exc:  # the parent asserts on what each process saw
        outcomes.put(f"{type(exc).__name__}: {exc}"[:300])


def test_processes_starting_at_once_on_a_new_sqlite_database_create_its_schema_once(tmp_path):
    import multiprocessing

    from salient_maps.storage.database import SCHEMA_REVISION

    context = multiprocessing.get_context("spawn")  # this process may hold threads; a fork would copy their locks
    for trial in range(3):
        url = f"sqlite:///{tmp_path / f'new-{trial}' / 'salient.sqlite'}"
        ready, outcomes = context.Barrier(4, timeout=120), context.Queue()
        processes = [context.Process(target=_connect_when_all_are_ready, args=(url, ready, outcomes))
                     for _ in range(4)]
        for process in processes:
            process.start()
        seen = [outcomes.get(timeout=180) for _ in processes]
        for process in processes:
            process.join(60)
        assert seen == [SCHEMA_REVISION] * 4, seen
