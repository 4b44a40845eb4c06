"""Shards no explanation names (a worker killed between upload and commit) have a row from before their upload,
and ``salient gc`` deletes them, row and object, once older than the grace period; named shards stay readable."""

from __future__ import annotations

import json
from contextlib import nullcontext
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from salient_maps.storage.database import Shard, connect, utcnow
from salient_maps.storage.maps import MapReader
from salient_maps.storage.objects import open_store
from salient_maps.storage.orphan_shards import collect, record_shard
from salient_maps.storage.overlay_archives import archive_key
from salient_maps.storage.results import iter_results
from salient_maps.storage.settings import Settings
from salient_maps.storage.shards import FORMAT, encode, shard_key
from salient_maps.workers.writer import EncodedBatch, ShardWriter


class UploadFails:
    """A store whose every write dies: the worker is gone after recording the row, before the bytes land."""

    url = "memory://"

    def put_if_absent(self, key, render, content_type):
        raise ConnectionError("killed")


def an_orphan(settings: Settings, tag: str, age: timedelta) -> str:
    """A shard uploaded by a batch whose rows never came (as ShardWriter.write leaves it when killed after the
    upload), its row ``age`` old."""
    data = encode({}, {"format": FORMAT, "orphan": tag, "methods": {}, "targets": 1, "images": []})
    key = shard_key(data)
    db = connect(settings.resolved_database_url)
    with db.begin() as conn:
        record_shard(conn, key, 0, len(data))
        conn.execute(update(Shard).where(Shard.key == key).values(created_at=utcnow() - age))
    open_store(settings.resolved_object_store_url).put(key, data, "application/octet-stream")
    return key


@pytest.fixture
def job(tmp_path, tiny_images, run_cli):
    data = tmp_path / "data"
    run_cli(["run", tiny_images(3), "--model", "resnet18", "--methods", "gradcam", "--topk", "1", "--batch-size", "2",
             "--data", data, "--device", "cpu"])
    return Settings().with_data_dir(data)


def shard_objects(settings: Settings) -> set[str]:
    return {key for key, _ in open_store(settings.resolved_object_store_url).list("shards/")}


def test_gc_deletes_orphans_past_the_grace_only_and_named_shards_stay(job, run_cli):
    db = connect(job.resolved_database_url)
    named = {r["shard"] for r in iter_results(job, None)}
    assert len(named) == 2 and shard_objects(job) == named  # two batches, every object has its row
    old, young = an_orphan(job, "old", timedelta(hours=2)), an_orphan(job, "young", timedelta(seconds=5))
    legacy = "shards/00/" + "0" * 64 + ".safetensors"  # an object with no row at all
    store = open_store(job.resolved_object_store_url)
    store.put(legacy, b"x", "application/octet-stream")
    store.put(archive_key(old), b"tar", "application/x-tar")  # --overlays store: its archive goes with it
    store.put(archive_key(legacy), b"tar", "application/x-tar")

    dry = json.loads(run_cli(["gc", "--data", job.data_dir, "--grace", "3600", "--dry-run", "--listing",
                              "--json"]).output)
    assert (dry["shards"], dry["unrecorded"]) == ([old], [])  # the legacy object is brand new too
    assert shard_objects(job) == named | {old, young, legacy}

    assert "deleted: 1 shards" in run_cli(["gc", "--data", job.data_dir, "--grace", "3600"]).output
    assert shard_objects(job) == named | {young, legacy}
    assert [key for key, _ in store.list("overlays/")] == [archive_key(legacy)]
    with db.connect() as conn:
        assert set(conn.execute(select(Shard.key)).scalars()) == named | {young}

    gone = json.loads(run_cli(["gc", "--data", job.data_dir, "--grace", "0", "--listing", "--json"]).output)
    assert (gone["shards"], gone["unrecorded"]) == ([young], [legacy, archive_key(legacy)])
    assert shard_objects(job) == named and not list(store.list("overlays/"))
    reader = MapReader.for_settings(job)
    assert all(reader.map(r).shape == (224, 224) for r in iter_results(job, None))
    assert run_cli(["gc", "--data", job.data_dir, "--grace", "0", "--listing"]).output.startswith(
        "deleted: 0 shards no result names, 0 objects")


def test_a_shard_being_written_again_is_not_collected(job):
    """A redo (or a peer with the same bytes) records the row again before uploading: it is young again."""
    key = an_orphan(job, "redone", timedelta(hours=2))
    db = connect(job.resolved_database_url)
    with db.begin() as conn:
        record_shard(conn, key, 0, 1)
    store = open_store(job.resolved_object_store_url)
    assert collect(db, store, grace=3600).rows == []
    assert collect(db, store, grace=0).rows == [key]


def test_the_row_goes_in_before_the_upload(job):
    db = connect(job.resolved_database_url)
    writer = ShardWriter(db, UploadFails(), {}, lambda stage: nullcontext())
    with pytest.raises(ConnectionError):
        writer.write(EncodedBatch(b"never stored", [], [], []))
    with db.connect() as conn:
        assert conn.execute(select(Shard.key).where(Shard.key == shard_key(b"never stored"))).scalar()
    # collected like any orphan; its object never existed, which is no error
    assert collect(db, open_store(job.resolved_object_store_url), grace=0).rows == [shard_key(b"never stored")]
