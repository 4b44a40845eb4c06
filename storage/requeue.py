"""Lost messages: the database is the source of truth, the queue only a transport.

Redis restarted without persistence, a flushed queue or a lost volume leaves items pending that no
message will ever bring to a worker. ``requeue_lost`` finds them and publishes them again; an item
ends once (``finish_item``), so a message that turns out to be a second one costs a lookup, not a
duplicate.

An item is lost when it is pending in an open job, nothing has touched it (recorded, claimed by a
worker, republished: ``items.updated_at``) for ``SALIENT_PENDING_TIMEOUT`` seconds, and Redis holds no
message with it:

- not in a worker's hands: kombu keeps every delivered, unacknowledged message in the ``unacked`` hash;
- not waiting in the queue. The queue is a Redis list that producers push at one end and workers pop
  at the other, so it needs no scan: every message waiting was published after the oldest one waiting,
  the one at the popping end, and an item last touched a pending timeout before that message was
  published cannot be in the list. Messages restored from a dead worker (flagged ``redelivered``) go
  back to the popping end out of order, so those are read item by item instead.

A message moves between the two while a worker takes it, so one look can miss it: kombu pops it from the
list (BRPOP) and only then adds it to the unacked hash, and a look reads the hash and the lists one after
the other. So every look reads the hash both before and after the lists, and an item is published only when
two looks ``SETTLE_SECONDS`` apart both find it lost; a message in a worker's hands is in the hash (or its
items have ended) by the second. What both looks miss is really gone: for instance the message a worker had
just popped when Redis stopped, whose entry in the unacked hash was never written (the pop is persisted,
the hash entry is not): persistence keeps every message Redis holds, not one in transit, and the reconciler
publishes that one again.

With a broker other than Redis nothing can be looked at and the pending timeout alone decides: it must
then exceed the longest wait in the queue.

Only jobs made by ``salient submit`` (their settings hold the message spec and the chunk size) are
requeued; an embedded run's job or another service's rows are left alone. Several reconcilers at once
(every worker runs one) publish each lost item once: an item is taken by a conditional UPDATE of its
``updated_at`` before it is published.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterator

from sqlalchemy import func, select, update
from sqlalchemy.engine import Engine

from .database import Item, Job, utcnow
from .messages import MESSAGE_SCHEMA, TASK_NAME, MessageError, chunk_message, parse_chunk
from .settings import Settings

log = logging.getLogger(__name__)

# kombu's Redis transport: a queue is one list per priority step (0 is the queue's own name), and
# delivered-but-unacknowledged messages live in one hash.
_PRIORITY_SEPARATOR = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)
_UNACKED_KEY = "unacked"
_TAIL_PAGE = 50
_TAIL_MAX = 500  # messages read from the popping end before giving up on dating the queue this round
_SPEC_KEYS = tuple(MESSAGE_SCHEMA["properties"]["spec"]["properties"])
# Between the two looks: a worker that popped a message writes it to the unacked hash microseconds later,
# so this is ample even for a process the machine's load keeps waiting.
SETTLE_SECONDS = 2.0
# Items the first look remembers; the others found lost wait for the next round.
_SUSPECTS_MAX = 100_000


@dataclass
class QueueView:
    """What the broker holds now, as far as lost items are concerned."""

    readable: bool  # False: not Redis; the pending timeout alone decides
    in_hand: set[int] = field(default_factory=set)  # items of messages delivered and not acknowledged
    read: set[int] = field(default_factory=set)  # items of the messages read at the queue's popping end
    # Every message waiting was published at or after this; None: nothing waits (or nothing to date).
    waiting_since: datetime | None = None
    undated: bool = False  # messages wait but none could be dated: nothing counts as lost this round

    def describe(self) -> str:
        if not self.readable:
            return "broker not readable (not Redis): judged by the pending timeout alone"
        waiting = ("none waiting" if self.waiting_since is None and not self.undated
                   else "waiting messages not datable" if self.undated
                   else f"oldest waiting message published {self.waiting_since:%Y-%m-%d %H:%M:%S}")
        return f"{len(self.in_hand)} items in workers' hands, {waiting}"


@dataclass
class RequeueReport:
    queue: QueueView
    items: int = 0
    messages: int = 0
    jobs: set[str] = field(default_factory=set)
    unsendable: dict[str, str] = field(default_factory=dict)  # job id -> why its items cannot be published
    dry_run: bool = False

    def summary(self) -> str:
        verb = "would publish" if self.dry_run else "published"
        line = f"{verb} {self.items} lost items of {len(self.jobs)} jobs again in {self.messages} messages"
        for job_id, why in self.unsendable.items():
            line += f"; job {job_id} has lost items but {why}"
        return f"{line} ({self.queue.describe()})"

    def as_dict(self) -> dict[str, Any]:
        return {"requeued_items": self.items, "messages": self.messages, "jobs": sorted(self.jobs),
                "unsendable": self.unsendable, "dry_run": self.dry_run, "in_hand": len(self.queue.in_hand),
                "queue_readable": self.queue.readable,
                "waiting_since": self.queue.waiting_since.isoformat() if self.queue.waiting_since else None}


def message_items(payload: dict[str, Any]) -> list[int] | None:
    """Item ids of a ``salient.explain`` message as kombu stores it in Redis; None for anything else."""
    try:
        if payload["headers"]["task"] != TASK_NAME:
            return None
        body = payload["body"]
        if payload["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        _args, kwargs, _embed = json.loads(body)
        return [item["id"] for item in kwargs["items"] if isinstance(item.get("id"), int)]
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _redelivered(payload: dict[str, Any]) -> bool:
    headers = payload.get("headers") or {}
    delivery = (payload.get("properties") or {}).get("delivery_info") or {}
    return bool(headers.get("redelivered") or delivery.get("redelivered"))


def read_queue(settings: Settings, db: Engine, attempts: int = 5) -> QueueView:
    """Look at Redis: the items in workers' hands and when the oldest waiting message was published."""
    if not settings.broker_url.startswith(("redis://", "rediss://", "unix://")):
        return QueueView(readable=False)
    import redis

    client = redis.Redis.from_url(settings.broker_url, socket_timeout=30)
    try:
        view = QueueView(readable=True)
        _read_unacked(client, view)
        lists = [settings.queue, *(f"{settings.queue}{_PRIORITY_SEPARATOR}{p}" for p in _PRIORITY_STEPS)]
        for key in lists:
            for _ in range(attempts):
                dated = _date_waiting(client, key, db, view)
                if dated is not None:
                    break
            else:  # workers kept popping while we read: the queue moves, date it next round
                view.undated = True
                continue
            since, read = dated
            view.read.update(read)
            if since is not None:
                view.waiting_since = since if view.waiting_since is None else min(view.waiting_since, since)
        _read_unacked(client, view)  # again: a message a worker took from a list meanwhile is here now
        return view
    finally:
        client.close()


def _read_unacked(client, view: QueueView) -> None:
    for raw in client.hvals(_UNACKED_KEY):
        payload, _exchange, _routing_key = json.loads(raw)
        view.in_hand.update(message_items(payload) or ())


def _date_waiting(client, key: str, db: Engine, view: QueueView) -> tuple[datetime | None, set[int]] | None:
    """(When the oldest waiting message of list ``key`` was published, the items read on the way), or
    None when a worker popped the list meanwhile (read again)."""
    first = client.lindex(key, -1)
    if first is None:
        return None, set()
    read: set[int] = set()
    since: datetime | None = None
    messages = 0
    for start in range(0, _TAIL_MAX, _TAIL_PAGE):
        page = client.lrange(key, -(start + _TAIL_PAGE), -(start + 1))
        for raw in reversed(page):  # from the popping end
            messages += 1
            payload = json.loads(raw)
            ids = message_items(payload)
            if not ids:
                continue
            read.update(ids)
            if _redelivered(payload):
                continue
            with db.connect() as conn:
                # Its unclaimed items were last touched when it was published (recorded or republished).
                since = conn.execute(select(func.min(Item.updated_at))
                                     .where(Item.id.in_(ids), Item.status == "pending")).scalar()
            if since is not None:
                break
        if since is not None or len(page) < _TAIL_PAGE:
            break
    if client.lindex(key, -1) != first:
        return None
    if since is None:
        # Only restored messages, or messages whose items all ended, as far as we read: the rest is undated.
        view.undated = view.undated or client.llen(key) > messages
    elif since.tzinfo is None:  # SQLite keeps naive UTC
        since = since.replace(tzinfo=timezone.utc)
    return since, read


def job_message_spec(job_id: str, job_settings: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """(The message spec a job was submitted with, or None), and why not."""
    if "chunk" not in job_settings:
        return None, "it was not submitted to the queue (an embedded run or another service's job)"
    spec = {k: job_settings[k] for k in _SPEC_KEYS if k in job_settings}
    try:
        return parse_chunk(chunk_message(job_id, [(0, "")], spec)).spec, ""
    except MessageError as exc:
        return None, f"its settings hold no valid message spec ({exc})"


def _lost_pages(db: Engine, job_id: str, horizon: datetime, page: int = 1000) -> Iterator[list[tuple[int, str]]]:
    last = 0
    while True:
        with db.connect() as conn:
            rows = conn.execute(
                select(Item.id, Item.uri)
                .where(Item.job_id == job_id, Item.status == "pending", Item.updated_at < horizon, Item.id > last)
                .order_by(Item.id).limit(page)
            ).all()
        if not rows:
            return
        yield [(row.id, row.uri) for row in rows]
        last = rows[-1].id


def requeue_lost(db: Engine, settings: Settings, publish: Callable[[dict[str, Any]], None], *,
                 dry_run: bool = False, now: datetime | None = None,
                 settle: float = SETTLE_SECONDS) -> RequeueReport:
    """Publish the lost items of every open job again (``publish(message_kwargs)``), in chunks of the
    job's chunk size; with ``dry_run`` only count them. An item counts as lost when two looks at the queue
    ``settle`` seconds apart both miss it (see the module's docstring); the second is taken only when the
    first found something."""
    now = now or utcnow()
    first = read_queue(settings, db)
    report = RequeueReport(queue=first, dry_run=dry_run)
    if first.undated:
        return report
    suspects: set[int] = set()
    for _job_id, _spec, _chunk, candidates in _lost(db, settings, first, now, report):
        suspects.update(i for i, _ in candidates[:_SUSPECTS_MAX - len(suspects)])
        if len(suspects) >= _SUSPECTS_MAX:
            break
    if not suspects:
        return report
    time.sleep(settle)
    report = RequeueReport(queue=read_queue(settings, db), dry_run=dry_run)
    if report.queue.undated:
        return report
    for job_id, spec, chunk, candidates in _lost(db, settings, report.queue, now, report):
        candidates = [(i, uri) for i, uri in candidates if i in suspects]
        if not candidates:
            continue
        if not dry_run:
            candidates = _take(db, [i for i, _ in candidates], _horizon(settings, report.queue, now), now)
            for start in range(0, len(candidates), chunk):
                publish(chunk_message(job_id, candidates[start:start + chunk], spec))
        report.items += len(candidates)
        report.messages += -(-len(candidates) // chunk)
        if candidates:
            report.jobs.add(job_id)
    return report


def _horizon(settings: Settings, view: QueueView, now: datetime) -> datetime:
    """Items last touched before this cannot be in the queue (module docstring)."""
    return min(now, view.waiting_since or now) - timedelta(seconds=settings.pending_timeout)


def _lost(db: Engine, settings: Settings, view: QueueView, now: datetime, report: RequeueReport
          ) -> Iterator[tuple[str, dict[str, Any], int, list[tuple[int, str]]]]:
    """Per open job and page: (job id, message spec, chunk size, the page's items no message in ``view``
    holds). A job whose items cannot be published is noted in ``report.unsendable`` instead."""
    horizon = _horizon(settings, view, now)
    with db.connect() as conn:
        jobs = conn.execute(select(Job.id, Job.settings).where(
            Job.status.in_(("listing", "running", "cancelled")), Job.finished_at.is_(None))).all()
    for job_id, job_settings in jobs:
        spec, why = job_message_spec(job_id, job_settings or {})
        chunk = int((job_settings or {}).get("chunk") or settings.chunk_size)
        for page in _lost_pages(db, job_id, horizon):
            candidates = [(i, uri) for i, uri in page if i not in view.in_hand and i not in view.read]
            if not candidates:
                continue
            if spec is None:
                report.unsendable[job_id] = why
                break
            yield job_id, spec, chunk, candidates


def _take(db: Engine, item_ids: list[int], horizon: datetime, now: datetime) -> list[tuple[int, str]]:
    """Mark items as republished now; only the items this call changed are returned, so of several
    reconcilers at once exactly one publishes each. One that dies before publishing leaves them to the
    next round after another pending timeout."""
    with db.begin() as conn:
        rows = conn.execute(
            update(Item)
            .where(Item.id.in_(item_ids), Item.status == "pending", Item.updated_at < horizon)
            .values(updated_at=now)
            .returning(Item.id, Item.uri)
        ).all()
    return sorted((row.id, row.uri) for row in rows)
