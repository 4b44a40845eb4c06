"""What the fault and poison tests share: waiting on a job through outages, the end-state check (every
item ended once, counters = statuses, rows = objects), and a supervisor that restarts dead workers."""

from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from salient_maps.storage.database import Explanation, Image, Item, Job, ResultSettings, Shard
from salient_maps.storage.objects import open_store
from salient_maps.storage.orphan_shards import collect
from salient_maps.storage.overlay_archives import OVERLAYS, archive_key, shard_of_archive
from salient_maps.storage.shards import Shard as ShardFile

# Cheap on CPU (~4 ms an image for Grad-CAM), 224 px maps; chunks of 4, batches of 4.
SPEC = dict(model="mobilenet_v3_small", methods="gradcam", topk=1, batch_size=4)
CHUNK = 4


def start_workers(pipeline, names: list[str], *args: str) -> list:
    """Start workers side by side (each takes seconds to import torch) and wait until all are ready."""
    processes = [pipeline.start_worker(name, "--concurrency", "2", *args, wait=False) for name in names]
    for process, log in zip(processes, pipeline.logs[-len(names):]):
        wait_until(lambda: b" ready." in log.read_bytes() or process.poll() is not None, "a worker to start",
                   pipeline, timeout=120, poll=0.1)
        assert process.poll() is None, pipeline.log_tail()
    return processes


def wait_until(condition: Callable[[], bool], what: str, pipeline, timeout: float = 120, poll: float = 0.02) -> None:
    """Poll ``condition`` (database errors count as "not yet": the database may be the thing restarting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except OperationalError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{pipeline.log_tail()}")
        time.sleep(poll)


def item_counts(db, job_id: str) -> dict[str, int]:
    """{"done": n, "failed": n, "skipped": n, "pending": n, "claimed": pending items a worker has started}."""
    with db.connect() as conn:
        counts = dict(conn.execute(select(Item.status, func.count()).where(Item.job_id == job_id)
                                   .group_by(Item.status)).all())
        counts["claimed"] = conn.execute(select(func.count()).where(
            Item.job_id == job_id, Item.status == "pending", Item.deliveries > 0)).scalar()
    return {status: counts.get(status, 0) for status in ("done", "failed", "skipped", "pending", "claimed")}


def wait_for_end(pipeline, job_id: str, timeout: float = 180) -> None:
    db = pipeline.db()

    def finished() -> bool:
        with db.connect() as conn:
            return conn.execute(select(Job.finished_at).where(Job.id == job_id)).scalar() is not None

    wait_until(finished, f"job {job_id} to finish", pipeline, timeout, poll=0.2)


def check_consistent(pipeline, job_id: str, n_images: int, failed: dict[int, str] | None = None) -> list:
    """The job finished; each item is done, or failed with the reason expected for it (``failed``: item id ->
    a substring of the reason); the job's counters equal the items' statuses; one image row and one
    explanation per done image and none for a failed one; and the bucket holds the shards the rows name, each
    once, and each row's slot in its shard holds that row's image, method and class (``check_shards``).
    Returns the item rows."""
    failed = failed or {}
    db = pipeline.db()
    with db.connect() as conn:
        job = conn.execute(select(Job).where(Job.id == job_id)).one()
        items = conn.execute(select(Item).where(Item.job_id == job_id).order_by(Item.id)).all()
        explanations = conn.execute(select(Explanation)).all()
        images = conn.execute(select(Image.sha256)).scalars().all()
    assert len(items) == n_images == job.total
    ended = {i.id: (i.status, i.error) for i in items}
    for item_id, (status, error) in ended.items():
        if item_id in failed:
            assert status == "failed" and failed[item_id] in (error or ""), (item_id, status, error)
        else:
            assert (status, error) == ("done", None), (item_id, status, error, pipeline.log_tail())
    assert (job.status, job.done, job.failed, job.skipped) == ("finished", n_images - len(failed), len(failed), 0)
    assert job.finished_at is not None
    done_shas = [i.sha256 for i in items if i.status == "done"]
    assert len(set(done_shas)) == len(done_shas)  # the generated images all differ
    assert sorted(e.sha256 for e in explanations) == sorted(done_shas)  # one each: none missing, none twice
    assert sorted(images) == sorted(done_shas)
    with db.connect() as conn:
        assert conn.execute(select(ResultSettings.digest).where(ResultSettings.id.in_(
            {e.settings_id for e in explanations}))).scalars().all() == [job.settings_digest]
    check_shards(pipeline, explanations, db)
    return items


def check_shards(pipeline, explanations: list, db, overlays: bool = False) -> None:
    """Every shard the rows name is in the bucket, and each row's slot there holds its image (sha256), method
    and class, with a finite map in [0, 1] and a thumbnail. Every object in the bucket has its shards row (the
    row goes in before the upload), or is the overlay archive of a shard that has one. Any other object is a
    shard no explanation names: a batch whose worker died between the upload and the commit (or lost the race
    to a peer), so everything in it must be a result that rows name in another shard; ``salient gc`` (grace 0:
    the job has ended, nothing is being written) deletes those, their archives and their rows, after which the
    bucket holds exactly the shards the explanations name, and with ``overlays`` (--overlays store) the archive
    of each."""
    with db.connect() as conn:
        shard_keys = dict(conn.execute(select(Shard.id, Shard.key)).all())
    keys = pipeline.bucket_keys()
    assert len(keys) == len(set(keys))
    stored = {k.removeprefix(pipeline.prefix) for k in keys}
    archives = {k for k in stored if k.startswith(OVERLAYS)}
    stored -= archives
    named = {shard_keys[e.shard_id] for e in explanations}
    assert named <= stored, sorted(named - stored)
    assert stored <= set(shard_keys.values()), sorted(stored - set(shard_keys.values()))  # no unrecorded object
    assert {shard_of_archive(k) for k in archives} <= stored, sorted(archives)  # an archive goes with its shard
    if overlays:
        assert {archive_key(k) for k in named} <= archives, sorted({archive_key(k) for k in named} - archives)
    else:
        assert not archives, sorted(archives)
    results = {(e.sha256, e.method, e.class_id) for e in explanations}

    def read(key: str) -> ShardFile:
        return ShardFile(pipeline.s3.get_object(Bucket=pipeline.bucket, Key=pipeline.prefix + key)["Body"].read())

    by_shard: dict[str, list] = {}
    for e in explanations:
        by_shard.setdefault(shard_keys[e.shard_id], []).append(e)
    for key, rows in by_shard.items():
        shard = read(key)
        images, classes, k = shard.description["images"], shard.description["classes"], shard.targets
        for e in rows:
            i = e.slot // k
            assert (images[i], classes[i][e.slot % k]) == (e.sha256, e.class_id), (key, e.slot)
            heat = shard.map(e.method, e.slot, "layer")
            assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1
            assert shard.thumbnail(i)
    for key in stored - named:
        assert key.startswith("shards/"), key
        shard = read(key)
        description = shard.description
        for slot in range(len(description["images"]) * shard.targets):
            i, k = divmod(slot, shard.targets)
            for method in description["methods"]:
                assert (description["images"][i], method, description["classes"][i][k]) in results, (key, slot)
    collected = collect(db, open_store(pipeline.settings.resolved_object_store_url, pipeline.settings), grace=0,
                        listing=True)
    assert sorted(collected.rows) == sorted(set(shard_keys.values()) - named) and not collected.unrecorded
    with db.connect() as conn:
        assert set(conn.execute(select(Shard.key)).scalars()) == named
    assert {k.removeprefix(pipeline.prefix) for k in pipeline.bucket_keys()} == \
        named | ({archive_key(k) for k in named} if overlays else set())


def claimed_ids(db, job_id: str) -> set[int]:
    with db.connect() as conn:
        return set(conn.execute(select(Item.id).where(Item.job_id == job_id, Item.status == "pending",
                                                      Item.deliveries > 0)).scalars())


class Supervisor:
    """Restarts the pipeline's workers that exit, as Kubernetes or compose ``restart: always`` would; counts
    the exits by status."""

    def __init__(self, pipeline, start: Callable[[str], object], names: list[str]):
        self.pipeline, self._start, self.names = pipeline, start, names
        self.exits: list[int] = []
        self._stop = threading.Event()
        self._current = {name: start(name) for name in names}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, process in list(self._current.items()):
                if process.poll() is not None and not self._stop.is_set():
                    self.exits.append(process.returncode)
                    self._current[name] = self._start(name)
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
