"""The ``salient.explain`` task: one message = one chunk of items of one job.

Each item ends exactly once (``finish_items``' conditional update): items that already ended (a
redelivered message) are passed over, items of a cancelled job are skipped, a spec this worker cannot
run fails its items with the reason, and the rest go to the device loop, which batches them with the
images of the other messages in hand. Storage/DB errors are retried with backoff within the retry
budget, then the message is retried (``self.retry``) with its images given back.

Every worker also runs the reconciler in a thread: job counters recounted from the items, and items
lost by the queue (Redis restarted without persistence, a flushed queue) published again
(``storage.requeue``); several workers doing it at once publish each lost item once.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from celery.signals import worker_ready
from sqlalchemy import select

from salient_maps.storage.database import Item, ItemEnd, Job, connect, finish_items, reconcile_jobs
from salient_maps.storage.messages import TASK_NAME, Chunk, MessageError, parse_chunk
from salient_maps.storage.objects import open_store
from salient_maps.storage.requeue import requeue_lost
from salient_maps.storage.retry import backoff_delay, is_transient, with_backoff
from salient_maps.storage.settings import Settings

from .batching import DeviceLoop, Ticket
from .celery_app import app
from .explainers import ProcessorCache, SpecError
from .process import PendingItem, record_digest

log = logging.getLogger(__name__)
MAX_TASK_RETRIES = 10


@dataclass
class WorkerOptions:
    """Set by ``salient worker`` before the pool starts."""

    device: str = "auto"
    decode_threads: int | None = None  # one per core


options = WorkerOptions()


@dataclass
class Runtime:
    """What a worker process builds once: as it starts (``_connect_at_start``), or at its first message."""

    settings: Settings
    cache: ProcessorCache
    loop: DeviceLoop
    digests_recorded: set[tuple[str, str]] = field(default_factory=set)

    @classmethod
    def create(cls) -> "Runtime":
        settings = Settings()
        db = connect(settings.resolved_database_url)
        store = open_store(settings.resolved_object_store_url, settings)
        loop = DeviceLoop(db, settings, options.decode_threads)
        runtime = cls(settings, ProcessorCache(settings, db, store, options.device, model_lock=loop.model_lock), loop)
        threading.Thread(target=runtime._reconcile_forever, name="salient-reconciler", daemon=True).start()
        return runtime

    @property
    def db(self):
        return self.cache.db

    def _reconcile_forever(self) -> None:
        def publish(message: dict) -> None:
            app.send_task(TASK_NAME, kwargs=message, queue=self.settings.queue)

        self.loop.host_thread()
        while True:
            time.sleep(self.settings.reconcile_interval)
            try:
                if drifted := reconcile_jobs(self.db):
                    log.warning("reconciler corrected the counters of %d job(s)", drifted)
                requeued = requeue_lost(self.db, self.settings, publish)
                if requeued.items:
                    log.warning("reconciler: %s", requeued.summary())
            except Exception as exc:  # the next round tries again
                log.warning("reconciler: %s: %s", type(exc).__name__, exc)


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def runtime() -> Runtime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = Runtime.create()
        return _runtime


@worker_ready.connect
def _connect_at_start(**_) -> None:
    """Connect to the database and the store, and start the reconciler, while the producer is still listing:
    ~0.5 s (S3 client, schema check) that the first message would otherwise wait for."""

    def connect_now() -> None:
        try:
            runtime()
        except Exception as exc:  # not fatal: the first message builds it, and is retried if it must be
            log.warning("could not connect at start (%s); the first message tries again", type(exc).__name__)

    threading.Thread(target=connect_now, name="salient-start", daemon=True).start()


def run_chunk(chunk: Chunk, rt: Runtime) -> dict[str, int]:
    """Bring every item of the chunk to its end; returns counts of what this delivery did."""
    ids = [item_id for item_id, _ in chunk.items]

    def read_state():
        # One query: the items' state and ground truth, and their job's status (the batch needs no query for truths).
        with rt.db.connect() as conn:
            rows = conn.execute(
                select(Item.id, Item.status, Item.deliveries, Item.truth, Job.status.label("job_status"))
                .join(Job, Job.id == Item.job_id).where(Item.job_id == chunk.job_id, Item.id.in_(ids))).all()
            return {row.id: row for row in rows}, any(row.job_status == "cancelled" for row in rows)

    state, cancelled = with_backoff(read_state, rt.settings.retry_seconds, "reading items")
    pending = [(item_id, uri) for item_id, uri in chunk.items
               if item_id in state and state[item_id].status == "pending"]
    counts = {"already_ended": len(chunk.items) - len(pending)}
    if not pending:
        return counts
    if cancelled:
        _end_all(rt, chunk.job_id, pending, "skipped", "job cancelled")
        return {**counts, "skipped": len(pending)}
    try:
        processor = rt.cache.get(chunk.spec)
    except SpecError as exc:
        _end_all(rt, chunk.job_id, pending, "failed", f"cannot explain with this spec: {exc}")
        return {**counts, "failed": len(pending)}
    if (chunk.job_id, processor.digest) not in rt.digests_recorded:
        with_backoff(lambda: record_digest(rt.db, chunk.job_id, processor.digest), rt.settings.retry_seconds,
                     "recording the settings digest")
        rt.digests_recorded.add((chunk.job_id, processor.digest))
    # Suspects (started before by a worker that died) first and one at a time, before the others are
    # counted as delivered: a poison image among them then costs only its own deliveries. Fewest
    # deliveries first: a poison image, counted again at every crash, falls behind the images beside it.
    suspects = sorted(((i, uri) for i, uri in pending if state[i].deliveries > 0),
                      key=lambda suspect: state[suspect[0]].deliveries)
    for item_id, uri in suspects:
        rt.loop.explain_alone(processor, PendingItem(item_id, chunk.job_id, uri, state[item_id].truth, True))
    fresh = [(i, uri) for i, uri in pending if state[i].deliveries == 0]
    claimed = rt.loop.claim(chunk.job_id, [i for i, _ in fresh]) if fresh else {}
    rt.loop.explain([Ticket(processor, PendingItem(i, chunk.job_id, uri, state[i].truth, True))
                     for i, uri in fresh if i in claimed])
    return {**counts, "alone": len(suspects), "batched": len(claimed)}


def _end_all(rt: Runtime, job_id: str, items: list[tuple[int, str]], status: str, reason: str) -> None:
    def write() -> None:
        with rt.db.begin() as conn:
            finish_items(conn, [ItemEnd(item_id, job_id, status, error=reason) for item_id, _ in items])

    with_backoff(write, rt.settings.retry_seconds, f"marking items {status}")


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
def explain(self, **kwargs) -> dict[str, int]:
    try:
        chunk = parse_chunk(kwargs)
    except MessageError as exc:  # nothing to retry: say why and let the message go
        log.error("dropping a message that breaks the contract: %s", exc)
        return {"invalid": 1}
    started = time.monotonic()
    try:
        rt = runtime()  # built (model thread included) before this thread of Celery's pool lowers its priority
        rt.loop.host_thread()
        counts = run_chunk(chunk, rt)
    except Exception as exc:
        if not is_transient(exc) or self.request.retries >= MAX_TASK_RETRIES:
            raise
        # A new message with the same items: the ones that ended meanwhile are passed over.
        raise self.retry(exc=exc, countdown=backoff_delay(self.request.retries, base=2.0, cap=300.0),
                         max_retries=MAX_TASK_RETRIES)
    seconds = time.monotonic() - started
    if seconds > rt.settings.visibility_timeout / 2:
        # Past the visibility timeout Redis hands the message to another worker while this one works.
        log.warning("a chunk of %d images took %.0fs, over half the visibility timeout (%ds): "
                    "use smaller chunks or a longer SALIENT_VISIBILITY_TIMEOUT",
                    len(chunk.items), seconds, rt.settings.visibility_timeout)
    return counts
