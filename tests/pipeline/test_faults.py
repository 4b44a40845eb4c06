"""Faults survived with a job of 60 images in flight on real servers: a worker SIGKILLed mid-batch, Redis
restarted with persistence and without it (the reconciler brings the lost messages back), SeaweedFS down
for 30 s, PostgreSQL restarted, a worker that lost its model cache. After each: every item done once,
counters equal to the statuses, one row per image and the bucket exactly as the rows say.

These tests stop and start servers, so the module runs its own (not the session's).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from faults import CHUNK, SPEC, check_consistent, claimed_ids, item_counts, start_workers, wait_for_end, wait_until

N_IMAGES = 60


@pytest.fixture(scope="module")
def server_folder() -> Path:
    # Not under pytest's temporary root: every pytest session that starts takes that back to mode 0700,
    # and PostgreSQL (run as the postgres user) could then not be restarted.
    folder = Path(tempfile.mkdtemp(prefix="salient-fault-servers-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def servers(server_folder: Path):
    """Own servers, since these tests restart them; Redis persists every write, as in production."""
    import launch

    absent = launch.missing()
    if absent:
        pytest.skip(f"servers not installed ({', '.join(absent)}): run tests/servers/install.sh")
    started: list = []
    try:
        started.append(launch.start_redis(server_folder / "redis", appendonly=True))
        started.append(launch.start_postgres(server_folder / "postgres"))
        started.append(launch.start_seaweedfs(server_folder / "s3"))
        yield SimpleNamespace(redis=started[0], postgres=started[1], s3=started[2])
    finally:
        for server in reversed(started):
            server.stop()


@pytest.fixture
def faulty(pipeline, servers, tiny_images):
    """The pipeline with the reconciler on a short fuse (every 2 s, items pending 5 s), 60 images, the servers."""
    pipeline.env.update(SALIENT_RECONCILE_INTERVAL="2", SALIENT_PENDING_TIMEOUT="5")
    return pipeline, tiny_images(N_IMAGES), servers


def submit_job(folder: Path, spec: dict | None = None) -> str:
    from salient_maps.producer import submit

    return submit([folder], spec, chunk=CHUNK) if spec else submit([folder], chunk=CHUNK, **SPEC)


def running_job(pipeline, folder: Path):
    """Two workers on a job of ``folder``, some of it done and most of it still queued: (job id, engine)."""
    start_workers(pipeline, ["a", "b"])
    job_id = submit_job(folder)
    db = pipeline.db()
    wait_until(lambda: item_counts(db, job_id)["done"] >= 8, "some images done", pipeline)
    return job_id, db


def requeue_lines(pipeline) -> list[str]:
    return [line for log in pipeline.logs for line in log.read_text().splitlines() if "lost items of" in line]


def published_counts(pipeline) -> list[int]:
    """How many items each reconciler round of the workers published again."""
    return [int(line.split("published ")[1].split()[0]) for line in requeue_lines(pipeline)]


def test_a_worker_sigkilled_mid_batch_leaves_its_images_to_the_other(faulty):
    pipeline, folder, _ = faulty
    victim, _survivor = start_workers(pipeline, ["victim", "survivor"])
    job_id = submit_job(folder)
    db = pipeline.db()
    # More images started than one worker can hold (2 messages of 4): both are mid-batch.
    wait_until(lambda: item_counts(db, job_id)["done"] >= 4 and item_counts(db, job_id)["claimed"] > 2 * CHUNK,
               "both workers mid-batch", pipeline)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    in_flight = claimed_ids(db, job_id)  # the victim's and the survivor's
    wait_for_end(pipeline, job_id)  # the victim's messages come back after the visibility timeout (10 s)
    items = check_consistent(pipeline, job_id, N_IMAGES)
    twice = {i.id for i in items if i.deliveries == 2}
    # The victim's unfinished images were started once more, by the survivor; nothing else was.
    assert twice and twice <= in_flight
    assert max(i.deliveries for i in items) == 2


def test_redis_restarted_with_persistence_loses_nothing(faulty):
    pipeline, folder, servers = faulty
    job_id, db = running_job(pipeline, folder)
    redis = servers.redis
    redis.stop()  # SIGTERM: Redis writes its append-only file and exits
    assert item_counts(db, job_id)["pending"] > 20  # most of the job waits in the queue
    time.sleep(3)
    redis.start()
    wait_for_end(pipeline, job_id)
    items = check_consistent(pipeline, job_id, N_IMAGES)  # each image done once: no row or object twice
    # A claim made as Celery restored a running task's message at the connection loss is counted twice, at worst.
    assert max(i.deliveries for i in items) <= 2
    # Every message Redis held survived the restart. The one a worker had just popped as Redis stopped, if
    # any, never reached the unacked hash (the pop is persisted, the hash entry is not): the reconciler
    # published it again. One worker takes one message at a time, so that is at most a chunk per worker.
    assert sum(published_counts(pipeline)) <= 2 * CHUNK, requeue_lines(pipeline)


def test_redis_restarted_without_persistence_the_reconciler_requeues_the_lost_images(faulty, server_folder):
    pipeline, folder, servers = faulty
    job_id, db = running_job(pipeline, folder)
    redis = servers.redis
    redis.stop()
    lost = item_counts(db, job_id)["pending"]
    assert lost > 20
    shutil.rmtree(server_folder / "redis" / "appendonlydir")  # as if it had run without persistence
    redis.start()
    wait_for_end(pipeline, job_id)
    items = check_consistent(pipeline, job_id, N_IMAGES)
    assert max(i.deliveries for i in items) <= 2
    assert sum(published_counts(pipeline)) > 0, pipeline.log_tail()


def test_s3_down_for_30_seconds_fails_nothing(faulty):
    pipeline, folder, servers = faulty
    # The writes held up by the outage keep their messages longer than the tests' usual 10 s.
    pipeline.env["SALIENT_VISIBILITY_TIMEOUT"] = "120"
    job_id, db = running_job(pipeline, folder)
    s3 = servers.s3
    s3.stop()
    done_at_stop = item_counts(db, job_id)["done"]
    time.sleep(30)
    assert item_counts(db, job_id)["done"] - done_at_stop <= 4 * CHUNK  # at most what was already written
    assert item_counts(db, job_id)["failed"] == 0
    s3.start()
    wait_for_end(pipeline, job_id)
    items = check_consistent(pipeline, job_id, N_IMAGES)
    assert {i.deliveries for i in items} == {1}  # the outage counted no delivery against any image
    logs = "".join(log.read_text() for log in pipeline.logs)
    assert "retry budget left" in logs  # the writes did wait for S3


def test_postgres_restarted_the_workers_reconnect(faulty):
    pipeline, folder, servers = faulty
    job_id, db = running_job(pipeline, folder)
    postgres = servers.postgres
    postgres.stop()  # every connection is cut
    time.sleep(3)
    postgres.start()
    wait_for_end(pipeline, job_id)
    items = check_consistent(pipeline, job_id, N_IMAGES)
    # A claim whose commit went through just as its connection was cut is counted twice, at worst.
    assert {i.deliveries for i in items} <= {1, 2}
    logs = "".join(log.read_text() for log in pipeline.logs)
    assert "retry budget left" in logs  # the writes did wait for PostgreSQL
    assert requeue_lines(pipeline) == []  # every message was in Redis all along


def test_a_worker_that_lost_its_model_cache_downloads_the_weights_again(faulty):
    import torch
    import torchvision

    from salient_maps.producer.submit import build_spec

    pipeline, folder, _ = faulty
    torch.manual_seed(1)
    buffer = io.BytesIO()
    torch.save(torchvision.models.get_model(SPEC["model"], weights=None).state_dict(), buffer)
    weights = buffer.getvalue()
    bucket = pipeline.bucket + "-models"
    pipeline.s3.create_bucket(Bucket=bucket)
    pipeline.s3.put_object(Bucket=bucket, Key="weights.pt", Body=weights)
    sha256 = hashlib.sha256(weights).hexdigest()
    spec = build_spec(**SPEC, weights=f"s3://{bucket}/weights.pt")
    spec["weights_sha256"] = sha256  # workers keep the file by this digest
    cache = Path(pipeline.env["SALIENT_DATA_DIR"]) / "downloads"

    (first,) = start_workers(pipeline, ["first"])
    job_id = submit_job(folder, spec)
    db = pipeline.db()
    wait_until(lambda: item_counts(db, job_id)["done"] >= 4 and item_counts(db, job_id)["claimed"] > 0,
               "the worker mid-batch", pipeline)
    assert (cache / sha256).is_file()
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    in_flight = claimed_ids(db, job_id)
    shutil.rmtree(cache)
    start_workers(pipeline, ["fresh"])
    wait_for_end(pipeline, job_id)
    items = check_consistent(pipeline, job_id, N_IMAGES)
    assert {i.id for i in items if i.deliveries == 2} <= in_flight
    assert hashlib.sha256((cache / sha256).read_bytes()).hexdigest() == sha256
    with db.connect() as conn:
        from sqlalchemy import select

        from salient_maps.storage.database import ResultSettings

        models = set(conn.execute(select(ResultSettings.model)).scalars())
    assert models == {f"{SPEC['model']}-{sha256[:12]}"}  # the downloaded weights, not a random init


def test_reconcile_publishes_only_the_items_no_message_holds(pipeline, tiny_images, run_cli):
    """No workers: four messages of four images, and Redis edited by hand into what faults leave behind.
    A is in a worker's hands (the unacked hash), R was restored from a dead worker to the popping end,
    B waits, C was lost. Only C's images are published again, once; and once the queue is empty,
    whatever is old and pending is lost."""
    import json
    from datetime import timedelta

    import redis
    from sqlalchemy import select, update

    from salient_maps.storage.database import Item, close_listing, create_job, record_items, utcnow
    from salient_maps.storage.messages import TASK_NAME

    folder = tiny_images(16)
    job_id = submit_job(folder)
    db = pipeline.db()
    client = redis.Redis.from_url(pipeline.env["SALIENT_BROKER_URL"])
    queue = pipeline.env["SALIENT_QUEUE"]
    assert client.llen(queue) == 4  # [C, B, R, A]: workers pop from the right
    a = client.rpop(queue)
    client.hset("unacked", "tag-a", json.dumps([json.loads(a), "", queue]))
    r = json.loads(client.rpop(queue))
    r["headers"]["redelivered"] = True
    client.rpush(queue, json.dumps(r))
    client.lpop(queue)  # C
    with db.connect() as conn:
        ids = conn.execute(select(Item.id).where(Item.job_id == job_id).order_by(Item.id)).scalars().all()
    groups = dict(zip("ARBC", (ids[i:i + 4] for i in range(0, 16, 4))))
    now = utcnow()
    with db.begin() as conn:
        conn.execute(update(Item).where(Item.job_id == job_id).values(updated_at=now - timedelta(hours=2)))
        conn.execute(update(Item).where(Item.id.in_(groups["B"])).values(updated_at=now - timedelta(hours=1)))
    # Another service's job, with rows but no spec salient could publish: reported, left alone.
    other = create_job(db, {"by": "another service"})
    for _ in record_items(db, other, ["file:///elsewhere/x.png"]):
        pass
    close_listing(db, other)
    with db.begin() as conn:
        conn.execute(update(Item).where(Item.job_id == other).values(updated_at=now - timedelta(hours=2)))

    dry = json.loads(run_cli(["reconcile", "--dry-run", "--json", "--pending-timeout", "60"]).output)
    assert (dry["requeued_items"], dry["messages"], dry["jobs"]) == (4, 1, [job_id])
    assert dry["in_hand"] == 4 and other in dry["unsendable"]
    assert client.llen(queue) == 2  # nothing published
    out = run_cli(["reconcile", "--pending-timeout", "60"]).output
    assert "published 4 lost items of 1 jobs again in 1 messages" in out
    assert f"job {other} has lost items but it was not submitted to the queue" in out
    head = json.loads(client.lindex(queue, 0))
    assert head["headers"]["task"] == TASK_NAME
    from salient_maps.storage.requeue import message_items

    assert message_items(head) == groups["C"]
    again = json.loads(run_cli(["reconcile", "--json", "--pending-timeout", "60"]).output)
    assert again["requeued_items"] == 0  # C was touched when it was published

    # Redis loses everything: the old items of A, R and B are lost now; C was published a moment ago.
    client.delete(queue, "unacked")
    with db.begin() as conn:
        conn.execute(update(Item).where(Item.id.in_(groups["A"] + groups["R"] + groups["B"]))
                     .values(updated_at=now - timedelta(hours=2)))
    flushed = json.loads(run_cli(["reconcile", "--json", "--pending-timeout", "60"]).output)
    assert (flushed["requeued_items"], flushed["messages"], flushed["waiting_since"]) == (12, 3, None)
    assert sorted(i for raw in client.lrange(queue, 0, -1) for i in message_items(json.loads(raw))) == \
        sorted(groups["A"] + groups["R"] + groups["B"])



def test_a_message_a_worker_is_taking_is_not_published_again_one_lost_in_transit_is(pipeline, tiny_images,
                                                                                   monkeypatch):
    """A worker pops a message (BRPOP) and writes it to the unacked hash a moment later: a look at Redis in
    between finds it nowhere. Two messages are taken that way; the first one's hash entry lands before the
    reconciler's second look, the second one's never does (Redis stopped right after the pop). Only the
    second is published again."""
    import json
    from datetime import timedelta

    import redis
    from sqlalchemy import select, update

    from salient_maps.storage import requeue
    from salient_maps.storage.database import Item, utcnow

    job_id = submit_job(tiny_images(8))
    db = pipeline.db()
    with db.begin() as conn:
        conn.execute(update(Item).where(Item.job_id == job_id).values(updated_at=utcnow() - timedelta(hours=2)))
    with db.connect() as conn:
        ids = conn.execute(select(Item.id).where(Item.job_id == job_id).order_by(Item.id)).scalars().all()
    client = redis.Redis.from_url(pipeline.env["SALIENT_BROKER_URL"])
    queue = pipeline.env["SALIENT_QUEUE"]
    taking, gone = client.rpop(queue), client.rpop(queue)  # popped: in neither the list nor the hash
    assert client.llen(queue) == 0 and requeue.message_items(json.loads(taking)) == ids[:4]
    looks: list[float] = []

    def between_the_looks(seconds: float) -> None:
        looks.append(seconds)
        client.hset("unacked", "tag-taking", json.dumps([json.loads(taking), "", queue]))

    monkeypatch.setattr(requeue, "time", SimpleNamespace(sleep=between_the_looks))
    published: list[dict] = []
    report = requeue.requeue_lost(db, pipeline.settings, published.append)
    assert looks == [requeue.SETTLE_SECONDS]
    assert [[item["id"] for item in message["items"]] for message in published] == [ids[4:]]
    assert (report.items, report.messages, report.queue.in_hand) == (4, 1, set(ids[:4]))
    assert requeue.message_items(json.loads(gone)) == ids[4:]
    # Nothing lost at the first look: no second look, nothing published.
    looks.clear()
    assert requeue.requeue_lost(db, pipeline.settings, published.append).items == 0 and looks == []
    client.hdel("unacked", "tag-taking")


def test_retries_last_the_budget_in_seconds_then_give_up(monkeypatch):
    from salient_maps.storage import retry

    # A clock that only the waits move: the test measures the retry schedule, not this machine's load.
    clock = SimpleNamespace(now=1000.0)

    def sleep(seconds: float) -> None:
        clock.now += seconds

    monkeypatch.setattr(retry, "time", SimpleNamespace(monotonic=lambda: clock.now, sleep=sleep))
    calls: list[float] = []

    def down_for(seconds: float):
        def call() -> str:
            calls.append(clock.now)
            if calls[-1] - calls[0] < seconds:
                raise ConnectionError("connection refused")
            return "up"
        return call

    assert retry.with_backoff(down_for(0.5), budget=3, what="a write", base=0.05, cap=0.1) == "up"
    assert 0.5 <= calls[-1] - calls[0] <= 0.6  # the outage was ridden out, and its end noticed within a wait
    calls.clear()
    with pytest.raises(ConnectionError):
        retry.with_backoff(down_for(10), budget=0.5, what="a write", base=0.05, cap=0.1)
    assert calls[-1] - calls[0] == pytest.approx(0.5)  # the last call comes at the end of the budget
    assert all(later - earlier <= 0.1 + 1e-9 for earlier, later in zip(calls, calls[1:]))  # waits are capped
    calls.clear()

    def bug() -> None:
        calls.append(clock.now)
        raise ValueError("not transient")

    with pytest.raises(ValueError):
        retry.with_backoff(bug, budget=3, what="a write")
    assert len(calls) == 1


def test_a_damaged_cached_weights_file_is_downloaded_again(pipeline, tmp_path):
    from salient_maps.storage.settings import Settings
    from salient_maps.workers.explainers import _local_file

    weights = b"weights " * 1000
    sha256 = hashlib.sha256(weights).hexdigest()
    pipeline.s3.put_object(Bucket=pipeline.bucket, Key="w.pt", Body=weights)
    settings = Settings(data_dir=tmp_path)
    cached = tmp_path / "downloads" / sha256
    cached.parent.mkdir()
    cached.write_bytes(weights[:100])  # cut short: a disk error, an interrupted copy by hand
    assert _local_file(f"s3://{pipeline.bucket}/w.pt", settings, sha256) == cached
    assert cached.read_bytes() == weights
    assert [p.name for p in cached.parent.iterdir()] == [sha256]  # no temporary file left behind
