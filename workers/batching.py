"""Batching across messages: the images of every message a worker holds go into one queue, and the
device lanes take them out in batches of the engine's batch size.

A worker holds ``concurrency`` messages at once (Celery threads pool, prefetch 1 each). Each
message's task reads and decodes its images in a shared thread pool and hands them over one by one;
a lane fills a batch from whatever is ready, across messages, waiting briefly for more only while
some message is still decoding images for the same model. A task waits until all its images have
ended and only then returns, so its message is acknowledged (acks_late) only when every one of its
images is written: a worker killed at any point leaves its messages to be redelivered.

Two lanes (threads) run batches so that writing one batch's maps, overlays and rows (S3 and database
round trips) overlaps the next batch's model call; a lock lets only one lane use the model at a time
(``ModelGuard``), which also keeps the engine's layer hooks from ever seeing another batch's forward.

Poison images: every image's delivery counter goes up before it is decoded. An image that a dead
worker had started (counter > 0) is a suspect: it is decoded and explained alone while nothing else
runs in the process (``Gate.exclusive``), so an image that keeps killing workers counts only its own
deliveries and fails with the reason once past the limit, and the images around it do not.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

from sqlalchemy.engine import Engine

from storage.database import claim_items, finish_item
from storage.retry import with_backoff

from .process import ItemProcessor, PendingItem, Prepared

log = logging.getLogger(__name__)


class ModelGuard:
    """Stands in for an object whose named methods run the model, and runs them under a lock."""

    def __init__(self, target, lock: threading.Lock, methods: tuple[str, ...]):
        self._target, self._lock, self._methods = target, lock, methods

    def __getattr__(self, name: str):
        value = getattr(self._target, name)
        if name not in self._methods:
            return value

        def locked(*args, **kwargs):
            with self._lock:
                return value(*args, **kwargs)

        return locked


def guard_model(processor: ItemProcessor, lock: threading.Lock) -> ItemProcessor:
    """Make every model call of ``processor`` (explanations, faithfulness metrics) take ``lock``."""
    processor.explainer = ModelGuard(processor.explainer, lock, ("explain",))
    if processor.metrics is not None:
        processor.metrics = ModelGuard(processor.metrics, lock, ("evaluate",))
    return processor


class Gate:
    """Shared/exclusive lock: decoding and batches share the process; a suspect image runs alone.
    A waiting exclusive holder stops new shared holders, so suspects are not starved."""

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._exclusive or self._shared:
                self._cond.wait()
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


@dataclass(eq=False)
class Ticket:
    """One image of one message, from decoding to its end."""

    processor: ItemProcessor
    item: PendingItem
    prepared: Prepared | None = None
    error: BaseException | None = None
    ended: threading.Event = field(default_factory=threading.Event)


class DeviceLoop:
    """The lanes own the model and the device; message tasks feed them images and wait for them."""

    def __init__(self, db: Engine, max_deliveries: int, transient_retries: int, decode_threads: int = 4,
                 linger: float = 0.1, lanes: int = 2):
        self.db = db
        self.max_deliveries = max_deliveries
        self.transient_retries = transient_retries
        self.linger = linger
        self.gate = Gate()
        self.model_lock = threading.Lock()
        self._decode = ThreadPoolExecutor(decode_threads, thread_name_prefix="salient-decode")
        self._ready: deque[Ticket] = deque()
        self._decoding: defaultdict[int, int] = defaultdict(int)  # id(processor) -> images still decoding
        self._cond = threading.Condition()
        for lane in range(lanes):
            threading.Thread(target=self._serve, name=f"salient-lane-{lane}", daemon=True).start()

    def claim(self, job_id: str, item_ids: list[int]) -> dict[int, int]:
        """Count a delivery of each still-pending item (committed before any decoding, so the count
        survives a crash); returns ``{item id: deliveries}``, without items that have ended."""
        def write() -> dict[int, int]:
            with self.db.begin() as conn:
                return claim_items(conn, job_id, item_ids)

        return with_backoff(write, self.transient_retries, "counting deliveries")

    def explain(self, tickets: list[Ticket]) -> None:
        """Decode, batch and explain claimed items; returns when every one has ended. Raises the first
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

    def explain_alone(self, processor: ItemProcessor, item: PendingItem) -> None:
        """A suspect: claim, decode and explain it with nothing else running in this process; past
        ``max_deliveries`` it fails with the reason instead."""
        with self.gate.exclusive():
            deliveries = self.claim(item.job_id, [item.id]).get(item.id)
            if deliveries is None:  # it ended meanwhile
                return
            if deliveries > self.max_deliveries:
                reason = (f"killed the worker {self.max_deliveries} times (started {self.max_deliveries} times, "
                          "never finished: a crash, out of memory, or past the visibility timeout)")
                with_backoff(lambda: self._end(item, "failed", reason), self.transient_retries, "failing an item")
                return
            prepared = processor.prepare(item)
            with_backoff(lambda: processor.process_batch([prepared]), self.transient_retries, "explaining an image")

    def _end(self, item: PendingItem, status: str, reason: str) -> None:
        with self.db.begin() as conn:
            finish_item(conn, item.id, item.job_id, status, error=reason)

    def _prepare(self, ticket: Ticket) -> None:
        try:
            with self.gate.shared():
                # Reading (file, S3, HTTP) and decoding; a bad image comes back with its reason, not raised.
                ticket.prepared = ticket.processor.prepare(ticket.item)
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
            processor = self._ready[0].processor
            deadline = time.monotonic() + self.linger
            while True:
                batch = [t for t in self._ready if t.processor is processor][:processor.batch_size]
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
                with self.gate.shared():
                    processor = batch[0].processor
                    # Safe to repeat: an ended item is not ended twice, objects are content-addressed,
                    # rows are insert-or-ignore.
                    with_backoff(lambda: processor.process_batch([t.prepared for t in batch]),
                                 self.transient_retries, "explaining a batch")
            except BaseException as exc:
                log.warning("batch of %d images stopped: %s: %s", len(batch), type(exc).__name__, exc)
                for t in batch:
                    t.error = exc
            finally:
                for t in batch:
                    t.ended.set()
