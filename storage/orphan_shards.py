"""Shards no explanation row names: recorded before their upload, collected after a grace period.

A worker killed between a shard's upload and the commit of its rows (or one whose rows all lost the race to a
peer that stored the same results first) leaves an object that no row points into. ``record_shard`` gives
every shard its ``shards`` row *before* the upload, so every object in the store has a row; ``collect`` then
finds the rows no explanation names that are older than ``grace`` seconds and deletes each with its object.
``collect(listing=True)`` also walks the store's ``shards/`` (and ``overlays/``) objects for ones whose shard has no
row at all (written by a salient from before rows came first), by the object's own age. A shard's stored
overlays (``--overlays store``) go with it.

Safety: a shard's row is refreshed (``created_at``) every time a batch is about to upload it, so a shard
being written is never older than the grace unless its writer stalled for longer, far past the queue's
visibility timeout and the storage retry budget, by when its work has been redone. The row is deleted
(only while still unnamed) in the same transaction as its object, so a failed object delete leaves the row
for the next round, and a writer committing rows into the shard meanwhile keeps it (foreign key). A writer
that stalled past the grace finds its row gone: its rows name the shard by key (``store_shard_rows``), so
they get no shard id and fail, and the batch is done again.

In: a database engine and the object store. Out: the keys deleted (or that would be, in a dry run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from itertools import chain, islice

from sqlalchemy import delete, exists, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from .database import Explanation, Shard, conflict_insert, utcnow
from .objects import ObjectStore
from .overlay_archives import OVERLAYS, SHARDS, archive_key, shard_of_archive

PAGE = 1000


def record_shard(conn, key: str, images: int, size: int) -> None:
    """The shard's row before its bytes go up (one statement); a row that exists gets a fresh ``created_at``,
    so the collector leaves a shard alone while a batch (a redo, or a peer with the same bytes) writes it."""
    row = conflict_insert(conn, Shard).values(key=key, images=images, bytes=size, created_at=utcnow())
    conn.execute(row.on_conflict_do_update(index_elements=[Shard.key], set_={"created_at": row.excluded.created_at}))


@dataclass
class Collected:
    rows: list[str] = field(default_factory=list)  # shards with a row and no explanation: row and object deleted
    unrecorded: list[str] = field(default_factory=list)  # objects with no row at all (``listing``)

    def summary(self) -> str:
        return (f"{len(self.rows)} shards no result names, {len(self.unrecorded)} objects with no shard row")


def _unnamed(cutoff):
    return (Shard.created_at < cutoff) & ~exists().where(Explanation.shard_id == Shard.id)


def collect(db: Engine, store: ObjectStore, grace: float, dry_run: bool = False, listing: bool = False) -> Collected:
    """Delete the shards no explanation names whose row is older than ``grace`` seconds (each with its object);
    with ``listing``, also the ``shards/`` objects older than that with no row. Returns the keys."""
    cutoff = utcnow() - timedelta(seconds=grace)
    found = Collected()
    after = 0
    while True:
        with db.connect() as conn:
            page = conn.execute(select(Shard.id, Shard.key).where(_unnamed(cutoff), Shard.id > after)
                                .order_by(Shard.id).limit(PAGE)).all()
        for shard_id, key in page:
            if dry_run:
                found.rows.append(key)
                continue
            try:
                with db.begin() as conn:
                    gone = conn.execute(delete(Shard).where(Shard.id == shard_id, _unnamed(cutoff))).rowcount
                    if gone:
                        store.delete(key)
                        store.delete(archive_key(key))  # its stored overlays, if the job asked for them
            except IntegrityError:  # rows naming it were committed meanwhile: it is no orphan
                continue
            if gone:
                found.rows.append(key)
        if len(page) < PAGE:
            break
        after = page[-1][0]
    if listing:
        found.unrecorded = _collect_unrecorded(db, store, cutoff, dry_run)
    return found


def _collect_unrecorded(db: Engine, store: ObjectStore, cutoff, dry_run: bool) -> list[str]:
    """Shards, and overlay archives, whose shard has no row."""
    deleted: list[str] = []
    objects = chain(((key, key, modified) for key, modified in store.list(SHARDS)),
                    ((key, shard_of_archive(key), modified) for key, modified in store.list(OVERLAYS)))
    while True:
        page = list(islice(objects, PAGE))
        if not page:
            return deleted
        with db.connect() as conn:
            recorded = set(conn.execute(select(Shard.key).where(Shard.key.in_([s for _, s, _ in page]))).scalars())
        for key, shard, modified in page:
            if shard not in recorded and modified < cutoff:
                if not dry_run:
                    store.delete(key)
                deleted.append(key)
