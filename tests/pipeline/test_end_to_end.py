"""submit -> Redis -> real `salient worker` processes -> S3 (SeaweedFS) + PostgreSQL, checked row by
row and object by object; then the same with a worker SIGKILLed in the middle of a batch."""

from __future__ import annotations

import io
import os
import signal
import time

import pytest
from sqlalchemy import select

from faults import check_shards
from salient_maps.storage.database import Explanation, Item, Job, ResultSettings

# Small and quick on CPU: random-init resnet18, one method, one class; batch 3 with chunks of 4 makes
# the workers fill batches across messages.
SPEC = dict(model="resnet18", methods="gradcam", topk=1, batch_size=3)


def check_exactly_once(pipeline, job_id: str, n_images: int, overlays: bool = False) -> list:
    """The job ended with every item done once, one explanation per image, and the bucket holds the shards
    the rows name, each row's slot holding its image and class, and with ``overlays`` each shard's overlay
    archive (faults.check_shards). Returns the item rows."""
    db = pipeline.db()
    with db.connect() as conn:
        job = conn.execute(select(Job).where(Job.id == job_id)).one()
        items = conn.execute(select(Item).where(Item.job_id == job_id).order_by(Item.id)).all()
        explanations = conn.execute(select(Explanation)).all()
    assert (job.status, job.total, job.done, job.failed, job.skipped) == ("finished", n_images, n_images, 0, 0)
    assert job.finished_at is not None and job.settings_digest
    assert len(items) == n_images
    assert [(i.status, i.error) for i in items] == [("done", None)] * n_images
    shas = {i.sha256 for i in items}
    assert len(shas) == n_images  # the generated images all differ
    assert sorted(e.sha256 for e in explanations) == sorted(shas)  # one per image: none missing, none twice
    with db.connect() as conn:
        digests = conn.execute(select(ResultSettings.digest).where(
            ResultSettings.id.in_({e.settings_id for e in explanations}))).scalars().all()
    assert digests == [job.settings_digest]
    check_shards(pipeline, explanations, db, overlays)
    return items


def check_overlay_archives(pipeline, job_id: str) -> None:
    """--overlays store: each record's overlay is in its shard's archive, the very PNG the reader draws on demand
    for that record on the original image, and the archives hold nothing else."""
    import tarfile

    from salient_maps.storage.maps import MapReader, picture_of
    from salient_maps.storage.overlay_archives import archive_key, member_name
    from salient_maps.storage.overlays import OverlayStyle
    from salient_maps.storage.results import iter_results

    settings = pipeline.settings
    records = list(iter_results(settings, job_id))
    reader = MapReader.for_settings(settings)
    members: dict[str, bytes] = {}
    for shard in {r["shard"] for r in records}:
        body = pipeline.s3.get_object(Bucket=pipeline.bucket, Key=pipeline.prefix + archive_key(shard))["Body"]
        with tarfile.open(fileobj=io.BytesIO(body.read())) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    assert set(members) == {member_name(r) for r in records}
    for r in records:
        picture = picture_of(r, settings, settings.overlay_max_side, local_files=True)
        assert members[member_name(r)] == reader.overlay_png(r, OverlayStyle(), picture), r["uri"]


def test_two_workers_explain_every_image_exactly_once(pipeline, tiny_images):
    from salient_maps.producer import submit
    from salient_maps.producer.jobs import wait_for_job

    folder = tiny_images(14)
    for name in ("a", "b"):
        pipeline.start_worker(name, "--concurrency", "2", wait=False)
    for process, log in zip(pipeline.workers, pipeline.logs):
        deadline = time.monotonic() + 90
        while b" ready." not in log.read_bytes():
            assert process.poll() is None and time.monotonic() < deadline, pipeline.log_tail()
            time.sleep(0.1)
    job_id = submit([folder, folder / "img000.png"], chunk=4, **SPEC)  # a duplicate URI: still one item
    try:
        wait_for_job(pipeline.db(), job_id, show_progress=False, timeout=180)
    except TimeoutError:
        pytest.fail(pipeline.log_tail())
    items = check_exactly_once(pipeline, job_id, 14)
    assert {i.deliveries for i in items} == {1}
    pipeline.stop_workers()
    logs = [log.read_text() for log in pipeline.logs]
    assert all("salient.explain" in log and "succeeded" in log for log in logs), pipeline.log_tail()


@pytest.mark.parametrize("overlays", ["none", "store"])
def test_worker_killed_mid_batch_is_redelivered_and_nothing_is_done_twice(pipeline, tiny_images, overlays):
    from salient_maps.producer import submit
    from salient_maps.producer.jobs import wait_for_job

    folder = tiny_images(16, size=(96, 96))
    victim = pipeline.start_worker("victim", "--concurrency", "2")
    job_id = submit([folder], chunk=4, overlays=overlays, **SPEC)
    db = pipeline.db()
    # Kill once some images are written and others are claimed (delivery counted) but not finished.
    deadline = time.monotonic() + 120
    with db.connect() as conn:
        while not (conn.execute(select(Item.id).where(Item.job_id == job_id, Item.status == "done")).first() and
                   conn.execute(select(Item.id).where(Item.job_id == job_id, Item.status == "pending",
                                                      Item.deliveries > 0)).first()):
            assert time.monotonic() < deadline, pipeline.log_tail()
            conn.commit()
            time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    with db.connect() as conn:
        in_flight = conn.execute(select(Item.id).where(Item.job_id == job_id, Item.status == "pending",
                                                       Item.deliveries > 0)).scalars().all()
    assert in_flight
    pipeline.start_worker("restarted", "--concurrency", "2")
    try:
        wait_for_job(db, job_id, show_progress=False, timeout=180)
    except TimeoutError:
        pytest.fail(pipeline.log_tail())
    items = check_exactly_once(pipeline, job_id, 16, overlays == "store")
    if overlays == "store":
        check_overlay_archives(pipeline, job_id)
    deliveries = {i.id: i.deliveries for i in items}
    # The batch the kill interrupted ran again (alone, one image at a time), the rest once.
    assert all(deliveries[i] == 2 for i in in_flight)
    assert max(deliveries.values()) == 2


def publish_raw(redis_url: str, queue: str, kwargs: dict) -> None:
    """What a service in another language does (docs/messages.md): LPUSH a Celery protocol-2 JSON message."""
    import base64
    import json
    import uuid

    import redis

    task_id = str(uuid.uuid4())
    body = [[], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    message = {
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"lang": "go", "task": "salient.explain", "id": task_id, "root_id": task_id, "parent_id": None,
                    "group": None, "retries": 0, "eta": None, "expires": None},
        "properties": {"correlation_id": task_id, "delivery_mode": 2, "priority": 0, "body_encoding": "base64",
                       "delivery_info": {"exchange": "", "routing_key": queue}, "delivery_tag": str(uuid.uuid4())},
    }
    redis.Redis.from_url(redis_url).lpush(queue, json.dumps(message))


def test_image_past_the_delivery_limit_fails_with_the_reason_and_the_rest_go_on(pipeline, tiny_images):
    """As if one image had killed three workers and another one: the first fails at its fourth start,
    the second (a suspect) is explained alone, the others in batches. The job is written the way a
    service in another language would: rows in SQL, then a raw JSON message into the Redis list."""
    from sqlalchemy import update

    from salient_maps.producer.jobs import wait_for_job
    from salient_maps.storage.database import close_listing, create_job, record_items
    from salient_maps.storage.sources import iter_uris

    folder = tiny_images(6)
    db = pipeline.db()
    job_id = create_job(db, {"by": "another service"})
    items = [row for page in record_items(db, job_id, iter_uris([str(folder)])) for row in page]
    close_listing(db, job_id)
    ids = [item_id for item_id, _ in items]
    with db.begin() as conn:
        conn.execute(update(Item).where(Item.id == ids[2]).values(deliveries=3))
        conn.execute(update(Item).where(Item.id == ids[4]).values(deliveries=1))
    publish_raw(pipeline.env["SALIENT_BROKER_URL"], pipeline.env["SALIENT_QUEUE"], {
        "version": 1, "job_id": job_id, "items": [{"id": i, "uri": u} for i, u in items],
        "spec": {"model": "resnet18", "methods": ["gradcam"], "targets": {"topk": 1}, "batch_size": 3}})
    pipeline.start_worker("solo")
    job = wait_for_job(db, job_id, show_progress=False, timeout=120)
    assert (job.status, job.done, job.failed) == ("finished", 5, 1), pipeline.log_tail()
    with db.connect() as conn:
        rows = {i.id: i for i in conn.execute(select(Item).where(Item.job_id == job_id))}
    assert rows[ids[2]].status == "failed" and "killed the worker 3 times" in rows[ids[2]].error
    assert rows[ids[2]].deliveries == 4
    assert (rows[ids[4]].status, rows[ids[4]].deliveries) == ("done", 2)
    assert all(rows[i].deliveries == 1 and rows[i].status == "done" for i in ids if i not in (ids[2], ids[4]))


def test_sigterm_is_a_warm_shutdown_that_finishes_the_messages_in_hand(pipeline, tiny_images):
    from salient_maps.producer import submit
    from salient_maps.producer.jobs import get_job, wait_for_job

    folder = tiny_images(16)
    first = pipeline.start_worker("first", "--concurrency", "2")
    job_id = submit([folder], chunk=4, **SPEC)
    db = pipeline.db()
    deadline = time.monotonic() + 120
    while get_job(db, job_id).done == 0:
        assert time.monotonic() < deadline, pipeline.log_tail()
        time.sleep(0.02)
    first.send_signal(signal.SIGTERM)
    assert first.wait(60) == 0, pipeline.log_tail()
    with db.connect() as conn:
        # Everything the worker had started, it finished: nothing is left claimed but pending.
        assert conn.execute(select(Item.id).where(Item.job_id == job_id, Item.status == "pending",
                                                  Item.deliveries > 0)).first() is None
    assert get_job(db, job_id).done < 16  # it stopped taking messages
    pipeline.start_worker("second", "--concurrency", "2")
    wait_for_job(db, job_id, show_progress=False, timeout=120)
    items = check_exactly_once(pipeline, job_id, 16)
    assert {i.deliveries for i in items} == {1}  # no message came back after the shutdown
