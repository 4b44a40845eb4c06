"""Batching across messages: the images of every message a worker holds go into one queue, and one
device thread takes them out in batches of the engine's batch size.

A worker holds ``concurrency`` messages at once (Celery threads pool, prefetch 1 each). Each
message's task reads and decodes its images in a shared thread pool and hands them over one by one;
the device thread fills a batch from whatever is ready, across messages, waiting briefly for more
only while some message is still decoding images for the same model. A task waits until all its
images have ended and only then returns, so its message is acknowledged (acks_late) only when every
one of its images is written: a worker killed at any point leaves its messages to be redelivered.

An image that was already started once by a worker that died (``deliveries`` > 0) runs in a batch of
its own, so a poison image that kills the worker only ever takes itself down.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sqlalchemy.engine import Engine

from storage.database import claim_items, finish_item
from storage.retry import with_backoff

from .process import ItemProcessor, PendingItem, Prepared

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Ticket:
    """One image of one message, from decoding to its end."""

    processor: ItemProcessor
    item: PendingItem
    suspect: bool  # started before by a worker that never finished it: run alone
    prepared: Prepared | None = None
    error: BaseException | None = None
    ended: threading.Event = field(default_factory=threading.Event)


class DeviceLoop:
    """One thread owns the model and the device; message tasks feed it images and wait for them."""

    def __init__(self, db: Engine, max_deliveries: int, transient_retries: int, decode_threads: int = 4,
                 linger: float = 0.1):
        self.db = db
        self.max_deliveries = max_deliveries
        self.transient_retries = transient_retries
        self.linger = linger
        self._decode = ThreadPoolExecutor(decode_threads, thread_name_prefix="salient-decode")
        self._ready: deque[Ticket] = deque()
        self._decoding: defaultdict[int, int] = defaultdict(int)  # id(processor) -> images still decoding
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._serve, name="salient-device", daemon=True)
        self._thread.start()

    def explain(self, tickets: list[Ticket]) -> None:
        """Decode, batch and explain the tickets; returns when every one has ended. Raises the first
        error that stopped a batch (after its transient retries), leaving those images pending."""
        with self._cond:
            for t in tickets:
                self._decoding[id(t.processor)] += 1
        for t in tickets:
            self._decode.submit(self._prepare, t)
        for t in tickets:
            t.ended.wait()
        errors = [t.error for t in tickets if t.error is not None]
        if errors:
            raise errors[0]

    def _prepare(self, ticket: Ticket) -> None:
        try:
            # Reading (file, S3, HTTP) and decoding; a bad image comes back with its reason, not raised.
            ticket.prepared = ticket.processor._prepare(ticket.item)
        except BaseException as exc:  # S3 down: this image cannot go on now
            ticket.error = exc
        with self._cond:
            self._decoding[id(ticket.processor)] -= 1
            if ticket.error is None:
                self._ready.append(ticket)
            self._cond.notify_all()
        if ticket.error is not None:
            ticket.ended.set()

    def _next_batch(self) -> list[Ticket]:
        with self._cond:
            while not self._ready:
                self._cond.wait()
            head = self._ready[0]
            if head.suspect:
                return [self._ready.popleft()]
            processor = head.processor
            deadline = time.monotonic() + self.linger
            while True:
                batch = [t for t in self._ready if t.processor is processor and not t.suspect][:processor.batch_size]
                wait = deadline - time.monotonic()
                if len(batch) == processor.batch_size or not self._decoding[id(processor)] or wait <= 0:
                    break
                self._cond.wait(wait)
            for t in batch:
                self._ready.remove(t)
            return batch

    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            try:
                self._run(batch)
            except BaseException as exc:
                log.warning("batch of %d images stopped: %s: %s", len(batch), type(exc).__name__, exc)
                for t in batch:
                    t.error = exc
            finally:
                for t in batch:
                    t.ended.set()

    def _run(self, batch: list[Ticket]) -> None:
        by_job: defaultdict[str, list[int]] = defaultdict(list)
        for t in batch:
            by_job[t.item.job_id].append(t.item.id)

        def claim() -> dict[int, int]:
            # Committed before the model runs, so the count survives a kill in the middle of the batch.
            with self.db.begin() as conn:
                return {k: v for job_id, ids in by_job.items() for k, v in claim_items(conn, job_id, ids).items()}

        deliveries = with_backoff(claim, self.transient_retries, "claiming items")
        # Items missing from the claim have already ended (a redelivered message): nothing to do.
        live = [t for t in batch if t.item.id in deliveries]
        worn = [t for t in live if deliveries[t.item.id] > self.max_deliveries]
        if worn:
            reason = (f"killed the worker {self.max_deliveries} times (started {self.max_deliveries} times and "
                      "never finished: a crash, out of memory, or past the visibility timeout)")

            def fail_worn() -> None:
                with self.db.begin() as conn:
                    for t in worn:
                        finish_item(conn, t.item.id, t.item.job_id, "failed", sha256=t.prepared.sha256, error=reason)

            with_backoff(fail_worn, self.transient_retries, "failing worn-out items")
        run = [t.prepared for t in live if deliveries[t.item.id] <= self.max_deliveries]
        if run:
            processor = batch[0].processor
            # Safe to repeat: finished items are not finished twice, objects are content-addressed,
            # rows are insert-or-ignore.
            with_backoff(lambda: processor.process_batch(run), self.transient_retries, "explaining a batch")
