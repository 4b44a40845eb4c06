"""Batching across messages: the images of every message a worker holds go into one queue, and the
device lanes take them out in batches of the engine's batch size.

A worker holds ``concurrency`` messages at once (Celery threads pool, prefetch 1 each). Each
message's task reads its images in a shared thread pool (one thread per core, or per torch thread
when the worker was given --torch-threads), asks the
database once which are explained already (those are not decoded), decodes the rest (a CUDA
device decodes the JPEGs among them, in one call) and hands them over one by one;
a lane fills a batch from whatever is ready, across messages, waiting for more only while some
message is still decoding images for the same model (``LINGER``: briefly on a GPU, longer on the
CPU, whose cores the decoding shares). A task waits until all its images have
ended and only then returns, so its message is acknowledged (acks_late) only when every one of its
images is written: a worker killed at any point leaves its messages to be redelivered.

Two lanes (threads) run batches so that writing one batch's maps, overlays and rows (S3 and database
round trips) overlaps the next batch's model call; a lock lets only one lane use the model at a time
(``ModelGuard``), which also keeps the engine's layer hooks from ever seeing another batch's forward, and
the calls run on one model thread whichever lane makes them: each thread that enters torch's OpenMP
regions gets a team of its own, and two teams took the model ~35 % more CPU than one (48 against 40 ms
of the worker's CPU per image, resnet18 Grad-CAM top-3 on 2 cores). Every other thread of the loop (the
decode pool, the lanes, the message tasks, the reconciler) runs at ``SALIENT_HOST_NICE`` (19), the model
thread and its OpenMP team at the process's own priority: host work fills the cores the model leaves idle
instead of slowing its calls (``runtime.yield_to_the_model``).

Poison images: every image's delivery counter goes up before it is decoded. An image that a dead
worker had started (counter > 0) is a suspect: it is decoded and explained alone while nothing else
runs in the process (``Gate.exclusive``), so an image that keeps killing workers counts only its own
deliveries and fails with the reason once past the limit, and the images around it do not.

Faults, and what each does to an image:
- Storage or database errors (S3 or PostgreSQL down) are retried with backoff for
  ``SALIENT_RETRY_SECONDS``; past that the images are given back: still pending, their delivery not
  counted (they killed nobody), and the task retries the message later.
- Any other error of a batch fails its images with the reason; the job goes on.
- Time limit (``SALIENT_IMAGE_TIME_LIMIT``): decoding an image and every model call run under a
  deadline (``Watchdog``; a model call gets the limit times its batch size). Neither a decoder nor a
  model call can be interrupted from Python, so past a deadline the process exits (status 75) for its
  supervisor to start a fresh one, and its messages come back: when the watch covered one image, that
  image is first failed with "exceeded the per-image time limit"; when it covered a batch, its images
  come back as suspects, are explained one at a time, and the slow one meets the limit alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Callable, Iterator, cast

from sqlalchemy.engine import Engine

from salient_maps.storage.database import ItemEnd, claim_items, finish_items, release_items
from salient_maps.storage.retry import is_transient, with_backoff
from salient_maps.storage.settings import Settings

from .process import ItemProcessor, PendingItem, Prepared, host_threads
from .runtime import yield_to_the_model

if TYPE_CHECKING:
    from .engine import Explainer
    from .metrics import Faithfulness

log = logging.getLogger(__name__)
EXIT_TIME_LIMIT = 75  # the worker's exit status after a time limit (EX_TEMPFAIL): restart it


class ModelGuard:
    """Stands in for an object whose named methods run the model, and runs them under a lock, on the
    lock's model thread."""

    def __init__(self, target, lock: "ModelLock", methods: tuple[str, ...]):
        self._target, self._lock, self._methods = target, lock, methods

    def __getattr__(self, name: str):
        value = getattr(self._target, name)
        if name not in self._methods:
            return value

        def locked(*args, **kwargs):
            with self._lock:
                return self._lock.run(value, *args, **kwargs)

        return locked


def guard_model(processor: ItemProcessor, lock: "ModelLock") -> ItemProcessor:
    """Make every model call of ``processor`` (explanations, faithfulness metrics) take ``lock``."""
    # A guard answers every attribute of what it guards, so it stands in for it.
    processor.explainer = cast("Explainer", ModelGuard(processor.explainer, lock, ("explain",)))
    if processor.metrics is not None:
        processor.metrics = cast("Faithfulness", ModelGuard(processor.metrics, lock, ("evaluate",)))
    return processor


_batch = threading.local()


@contextlib.contextmanager
def working_on(items: list[PendingItem]) -> Iterator[None]:
    """Name the images this thread's model calls are for (the watchdog's deadline and culprit)."""
    _batch.items = items
    try:
        yield
    finally:
        _batch.items = []


@dataclass(eq=False)
class Watch:
    items: list[PendingItem]
    what: str
    deadline: float


class Watchdog:
    """Deadlines for the work whose length an image's content decides: decoding it, model calls.

    A watch past its deadline is handed to ``on_expired(items, what)`` on the watchdog's own thread
    (the watched thread cannot be interrupted); ``DeviceLoop`` then fails the image and exits."""

    def __init__(self, limit: float, on_expired: Callable[[list[PendingItem], str], None]):
        self.limit = limit
        self._on_expired = on_expired
        self._watches: set[Watch] = set()
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name="salient-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def watch(self, items: list[PendingItem], what: str) -> Iterator[None]:
        """Watch the block: its deadline is the limit times the number of images (at least one)."""
        w = Watch(items, what, time.monotonic() + self.limit * max(1, len(items)))
        with self._cond:
            self._watches.add(w)
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._watches.discard(w)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                expired = [w for w in self._watches if w.deadline <= now]
                if not expired:
                    nearest = min((w.deadline for w in self._watches), default=None)
                    self._cond.wait(None if nearest is None else nearest - now)
                    continue
                self._watches.difference_update(expired)
            for w in expired:
                self._on_expired(w.items, w.what)


# Seconds a lane waits for a fuller batch once the model is free, by device type (others: 0.1). A GPU idles
# while it waits. On the CPU the decode threads and the model share the cores, so the wait takes nothing from
# the model, and a short batch pays a batch's fixed work (its statements, its PUT, the model's per-call cost)
# for fewer images: at 0.1 s, bench/load.py's batches of 32 held 25 images on average (filling one takes
# ~0.2 s there; resnet18 on 640×480 JPEGs ~0.8 s). Still bounded, for images that wait on a slow source.
LINGER = {"cuda": 0.1, "cpu": 2.0}


class ModelLock:
    """The device's lock, taken around every model call (``guard_model``): one call at a time, each on the
    one model thread (``run``) and watched for the images of the batch the calling lane is working on
    (``working_on``). ``on_release`` runs after each call."""

    def __init__(self, watchdog: Watchdog, on_release: Callable[[], None] = lambda: None):
        self._lock = threading.Lock()
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="salient-model")
        # Started now, by the thread building the loop: at the process's priority, which the host threads
        # lower for themselves (``yield_to_the_model``) and a new thread inherits from its creator.
        self._model_thread.submit(lambda: None).result()
        self._watchdog = watchdog
        self._watch: contextlib.AbstractContextManager | None = None
        self._on_release = on_release

    def busy(self) -> bool:
        return self._lock.locked()

    def run(self, call: Callable, *args, **kwargs):
        """``call`` on the one model thread, whichever lane holds the lock."""
        return self._model_thread.submit(call, *args, **kwargs).result()

    def __enter__(self) -> None:
        self._lock.acquire()
        self._watch = self._watchdog.watch(getattr(_batch, "items", []), "in the model")
        self._watch.__enter__()

    def __exit__(self, *exc_info) -> None:
        try:
            if self._watch is not None:
                self._watch.__exit__(*exc_info)
        finally:
            self._lock.release()
            self._on_release()


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
    # A storage or database error that outlasted the retry budget: the image is given back, still pending.
    error: BaseException | None = None
    ended: threading.Event = field(default_factory=threading.Event)

    @property
    def read(self) -> Prepared:
        """``prepared``, which every step after reading has."""
        if self.prepared is None:
            raise RuntimeError(f"item {self.item.id} was not read")
        return self.prepared


class DeviceLoop:
    """The lanes own the model and the device; message tasks feed them images and wait for them."""

    def __init__(self, db: Engine, settings: Settings, decode_threads: int | None = None,
                 linger: float | None = None, lanes: int = 2,
                 on_time_limit: Callable[[list[PendingItem], str], None] | None = None):
        """``linger``: how long a lane waits for a fuller batch once the model is free (``_next_batch``);
        None: by the batch's device (``LINGER``)."""
        self.db = db
        self.max_deliveries = settings.max_deliveries
        self.retry_seconds = settings.retry_seconds
        self.linger = linger
        self.gate = Gate()
        self.watchdog = Watchdog(settings.image_time_limit, on_time_limit or self._time_limit_exceeded)
        self.model_lock = ModelLock(self.watchdog, self._model_released)
        self.host_thread = partial(yield_to_the_model, settings.host_nice)
        self._decode = ThreadPoolExecutor(decode_threads or host_threads(), thread_name_prefix="salient-decode",
                                          initializer=self.host_thread)
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

        return with_backoff(write, self.retry_seconds, "counting deliveries")

    def explain(self, tickets: list[Ticket]) -> None:
        """Decode, batch and explain claimed items; returns when every one has ended. When storage or
        the database stayed down past the retry budget, the images it stopped are given back (still
        pending, delivery not counted) and the error is raised, for the task to retry the message."""
        with self._cond:
            for t in tickets:
                self._decoding[id(t.processor)] += 1
        if tickets:
            self._prepare(tickets)
        for t in tickets:
            t.ended.wait()
        given_back = [t for t in tickets if t.error is not None]
        if given_back:
            self._give_back([t.item for t in given_back])
            raise cast(BaseException, given_back[0].error)

    def explain_alone(self, processor: ItemProcessor, item: PendingItem) -> None:
        """A suspect: claim, decode and explain it with nothing else running in this process; past
        ``max_deliveries`` it fails with the reason instead. Raises like ``explain``."""
        with self.gate.exclusive():
            deliveries = self.claim(item.job_id, [item.id]).get(item.id)
            if deliveries is None:  # it ended meanwhile
                return
            if deliveries > self.max_deliveries:
                reason = (f"killed the worker {self.max_deliveries} times (started {self.max_deliveries} times, "
                          "never finished: a crash, out of memory, or past the visibility timeout)")
                with_backoff(lambda: self._end([item], "failed", reason), self.retry_seconds, "failing an image")
                return
            try:
                prepared = self._read(item, processor.prepare, "reading and decoding")
            except Exception as exc:  # transient, past the retry budget
                error: BaseException | None = exc
            else:
                error = self._run_batch(processor, [prepared])
        if error is not None:
            self._give_back([item])
            raise error

    def _read(self, item: PendingItem, step: Callable[[PendingItem], Prepared], what: str) -> Prepared:
        """Read (and with ``processor.prepare`` decode) one image; each attempt watched, transient errors retried
        (and raised past the budget). Any other error fails the image with the reason (a bad image is already one)."""
        def attempt() -> Prepared:
            with self.watchdog.watch([item], what):
                return step(item)

        try:
            return with_backoff(attempt, self.retry_seconds, "reading an image")
        except Exception as exc:
            if is_transient(exc):
                raise
            log.exception("reading item %d (%s) failed", item.id, item.uri)
            return Prepared(item, error=f"reading failed: {type(exc).__name__}: {exc}")

    def _run_batch(self, processor: ItemProcessor, batch: list[Prepared]) -> BaseException | None:
        """Explain and store a batch (safe to repeat: an ended item is not ended twice, objects are
        content-addressed, rows are insert-or-ignore). Returns the transient error that outlasted the
        retry budget, if one did; any other error fails the batch's images with the reason."""
        items = [p.item for p in batch]
        try:
            with working_on(items):
                with_backoff(lambda: processor.process_batch(batch), self.retry_seconds, "explaining a batch")
            return None
        except Exception as exc:
            if is_transient(exc):
                log.warning("a batch of %d images is given back after the %.0fs retry budget: %s: %s",
                            len(batch), self.retry_seconds, type(exc).__name__, exc)
                return exc
            log.exception("a batch of %d images failed", len(batch))
            reason = f"explanation failed: {type(exc).__name__}: {exc}"
            try:
                with_backoff(lambda: self._end(items, "failed", reason), self.retry_seconds, "failing a batch")
            except Exception as write_error:
                return write_error
            return None

    def _end(self, items: list[PendingItem], status: str, reason: str) -> None:
        with self.db.begin() as conn:
            finish_items(conn, [ItemEnd(item.id, item.job_id, status, error=reason) for item in items])

    def _give_back(self, items: list[PendingItem]) -> None:
        """Undo the delivery count of images handed back alive; the database may be the thing that is
        down, so one short try: a count left standing only brings the image one delivery closer to the limit."""
        def write() -> int:
            with self.db.begin() as conn:
                return sum(release_items(conn, job_id, [i.id for i in items if i.job_id == job_id])
                           for job_id in {i.job_id for i in items})

        try:
            with_backoff(write, min(self.retry_seconds, 10.0), "giving images back")
        except Exception as exc:
            log.warning("could not take back the delivery count of %d images: %s: %s", len(items),
                        type(exc).__name__, exc)

    def _time_limit_exceeded(self, items: list[PendingItem], what: str) -> None:
        """Runs on the watchdog's thread while the slow work goes on: fail the image when it is known,
        then end the process, the only way to stop a decoder or a model call."""
        limit = self.watchdog.limit
        if len(items) == 1:
            item = items[0]
            reason = f"exceeded the per-image time limit of {limit:g}s ({what})"
            try:
                with_backoff(lambda: self._end(items, "failed", reason), 10.0, "failing an image")
            except Exception as exc:  # its delivery count still fails it in the end
                log.error("could not record that item %d failed: %s: %s", item.id, type(exc).__name__, exc)
            log.error("item %d (%s) %s; the worker exits (status %d) to be restarted, its messages come back",
                      item.id, item.uri, reason, EXIT_TIME_LIMIT)
        else:
            log.error("a batch of %d images was %s for over %gs (the per-image limit of %gs times %d); the worker "
                      "exits (status %d) to be restarted, its messages come back and their images are explained "
                      "one at a time", len(items), what, limit * len(items), limit, len(items), EXIT_TIME_LIMIT)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_TIME_LIMIT)

    def _prepare(self, tickets: list[Ticket]) -> None:
        """Read one message's images in the pool, ask in one query which are explained already (those are not
        decoded), then decode the rest: on a CUDA device its plain JPEGs in one nvJPEG call, the others in
        the pool. Each image goes to the lanes as soon as it is decoded (or has failed, or is explained)."""
        processor = tickets[0].processor
        handed: set[int] = set()

        def hand(t: Ticket) -> None:
            handed.add(id(t))
            with self._cond:
                self._decoding[id(t.processor)] -= 1
                if t.error is None:
                    self._ready.append(t)
                self._cond.notify_all()
            if t.error is not None:
                t.ended.set()

        try:
            with self.gate.shared():
                reads = [self._decode.submit(self._read, t.item, processor.read, "reading") for t in tickets]
                for t, future in zip(tickets, reads):
                    try:
                        t.prepared = future.result()
                    except BaseException as exc:  # S3 down past the retry budget: this image cannot go on now
                        t.error = exc
                        hand(t)
                alive = [t for t in tickets if t.error is None]
                try:
                    with_backoff(lambda: processor.skip_explained([t.read for t in alive]), self.retry_seconds,
                                 "looking up explained images")
                except Exception as exc:
                    if is_transient(exc):
                        for t in alive:
                            t.error = exc
                    else:  # the batch checks again before writing: decoding them all is only slower
                        log.exception("looking up explained images failed")
                for t in alive:
                    if t.error is not None or t.read.data is None:  # given back, failed or explained
                        hand(t)
                todo = [t for t in alive if id(t) not in handed]
                if todo and processor.explainer.device.type == "cuda":
                    with self.watchdog.watch([t.item for t in todo], "decoding on the device"):
                        processor.decode_on_device([t.read for t in todo])
                    for t in todo:
                        if t.read.data is None:
                            hand(t)
                decodes = [self._decode.submit(self._decode_one, t, hand) for t in todo if id(t) not in handed]
                for decoding in decodes:
                    decoding.result()
        except BaseException as exc:  # never leave a message waiting for its images
            for t in tickets:
                if id(t) not in handed:
                    t.error = t.error or exc
                    hand(t)

    def _decode_one(self, t: Ticket, hand: Callable[[Ticket], None]) -> None:
        try:
            with self.watchdog.watch([t.item], "decoding"):
                t.processor.decode(t.read)  # a bad image comes back with its reason, not raised
        except Exception as exc:
            log.exception("decoding item %d (%s) failed", t.item.id, t.item.uri)
            t.read.error, t.read.data = f"decoding failed: {type(exc).__name__}: {exc}", None
        hand(t)

    def _model_released(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _next_batch(self) -> list[Ticket]:
        """A batch of one processor's ready images: full, or all there will be (nothing of it is decoding), or
        what is ready once the linger has passed and the model is free. While the model is busy a lane
        waits on: a fuller batch costs nothing then, and a short one costs a batch's fixed work twice."""
        with self._cond:
            while not self._ready:
                self._cond.wait()
            processor = self._ready[0].processor
            linger = self.linger if self.linger is not None else LINGER.get(processor.explainer.device.type, 0.1)
            deadline = time.monotonic() + linger
            while True:
                batch = [t for t in self._ready if t.processor is processor][:processor.batch_size]
                wait = deadline - time.monotonic()
                if len(batch) == processor.batch_size or not self._decoding[id(processor)]:
                    break
                if wait <= 0:
                    if not self.model_lock.busy():
                        break
                    wait = 1.0  # woken at once by the model's release (``_model_released``) or new images
                self._cond.wait(wait)
            for t in batch:
                self._ready.remove(t)
            return batch

    def _serve(self) -> None:
        self.host_thread()
        while True:
            batch = self._next_batch()
            error: BaseException | None = None
            try:
                with self.gate.shared():
                    error = self._run_batch(batch[0].processor, [t.read for t in batch])
            except BaseException as exc:  # never leave a message waiting for its images
                error = exc
            finally:
                for t in batch:
                    t.error = error
                    t.ended.set()
