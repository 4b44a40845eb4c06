"""An explained batch in; one shard object, one multi-row insert and one statement ending its items out.

``encode_batch`` turns a batch's results into safetensors bytes (storage/shards.py describes the layout:
CAM maps at the layer's size, input-gradient methods' signed attribution in float16, a JPEG thumbnail per
image); ``ShardWriter.write`` records the shard's row (storage/orphan_shards.py), puts the shard
(content-addressed key) and then, in one transaction, the images, the explanation rows and the items' ends.
Items end only after their shard is stored and their rows are in, so a worker killed anywhere in between
leaves them pending for a redo (and at most a shard no row names, which ``salient gc`` deletes).
``BackgroundWriter`` runs ``write`` on one thread, at most ``depth`` batches behind the model.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np
from sqlalchemy.engine import Engine

from salient_maps.storage.database import (
    ItemEnd,
    ItemMetrics,
    finish_items,
    insert_ignore,
    result_settings_id,
    store_shard_rows,
)
from salient_maps.storage.objects import ObjectStore
from salient_maps.storage.orphan_shards import record_shard
from salient_maps.storage.overlay_archives import archive_key
from salient_maps.storage.overlays import fit_long_side
from salient_maps.storage.shards import RENDERINGS, shard_key

THUMBNAIL_SIDE = 160
THUMBNAIL_QUALITY = 80


@dataclass
class Row:
    """One explanation before its shard has an id: everything but ``shard_id``."""

    sha256: str
    method: str
    class_id: int
    score: float
    rank: int
    slot: int
    extra: dict | None
    # localisation metrics (workers/localization_metrics.py), None where the map or the ground truth has none
    border_energy: float | None = None
    energy_in_box: float | None = None
    pointing_game: int | None = None
    localization_iou: float | None = None
    truth_digest: int | None = None  # the boxes and mask those were measured against (storage/ground_truth.py)


METRIC_COLUMNS = ("border_energy", "energy_in_box", "pointing_game", "localization_iou")


@dataclass
class EncodedBatch:
    data: bytes
    images: list[dict]  # rows for the images table
    rows: list[Row]
    ends: list[ItemEnd]  # every item of the batch that ends done with it (copies of one picture included)
    # copies of a picture with other boxes or mask than the one explained: their own metrics (workers/reused_truth.py)
    item_metrics: list[dict] = field(default_factory=list)
    overlays: bytes | None = None  # --overlays store: the batch's overlay PNGs in one tar (storage/overlay_archives.py)


def thumbnail_jpeg(rgb: np.ndarray) -> np.ndarray:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(fit_long_side(rgb, THUMBNAIL_SIDE), cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, THUMBNAIL_QUALITY])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return data.reshape(-1)


def shard_tensors(methods, outputs) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """The tensors a shard keeps of each method's B×K results, flattened to (B·K) slots, and how each
    method's map is stored (see storage/shards.py)."""
    tensors: dict[str, np.ndarray] = {}
    described: dict[str, dict] = {}  # per method, how its map is stored
    for method in methods:
        out = outputs[method.name]
        name = method.name
        if out.layer_maps is not None:
            layer = out.layer_maps.detach().float().cpu().numpy()
            tensors[f"{name}.layer"] = layer.reshape(-1, *layer.shape[2:])
            described[name] = {"map": "layer"}
        elif out.attribution is not None:
            signed = out.arrays[out.attribution].detach().float().cpu().numpy().astype(np.float16)
            tensors[f"{name}.{out.attribution}"] = signed.reshape(-1, *signed.shape[2:])
            described[name] = {"map": "attribution", "attribution": out.attribution, "reduce": out.reduce,
                               "renderings": set(RENDERINGS) <= set(out.arrays)}
        else:
            maps = out.maps.detach().float().cpu().numpy().astype(np.float16)
            tensors[f"{name}.map"] = maps.reshape(-1, *maps.shape[2:])
            for array, tensor in out.arrays.items():
                values = tensor.detach().float().cpu().numpy().astype(np.float16)
                tensors[f"{name}.{array}"] = values.reshape(-1, *values.shape[2:])
            described[name] = {"map": "map", "arrays": list(out.arrays)}
    return tensors, described


class ShardWriter:
    """Writes encoded batches of one processor (one settings digest) to its store and database."""

    def __init__(self, db: Engine, store: ObjectStore, settings_row: dict, clock: Callable):
        self.db, self.store, self.settings_row, self.clock = db, store, settings_row, clock
        self._settings_id: int | None = None

    def write(self, batch: EncodedBatch) -> set[int]:
        """Store the shard, then its rows and the items' ends in one transaction (on PostgreSQL two statements:
        the rows, the ends with the job counters); returns the item ids this call ended (a redone batch ends
        none twice)."""
        key = shard_key(batch.data)
        with self.clock("database"), self.db.begin() as conn:  # the row first: an object no result names is
            record_shard(conn, key, len(batch.images), len(batch.data))  # found by ``salient gc``
        with self.clock("upload"):
            self.store.put_if_absent(key, lambda: batch.data, "application/octet-stream")
            if (overlays := batch.overlays) is not None:  # before the rows: a record's archive exists once it does
                self.store.put_if_absent(archive_key(key), lambda: overlays, "application/x-tar")
        with self.clock("database"), self.db.begin() as conn:
            settings_id = self._settings_id or result_settings_id(conn, self.settings_row)
            store_shard_rows(conn, key, batch.images, [
                {"sha256": r.sha256, "settings_id": settings_id, "method": r.method, "class_id": r.class_id,
                 "score": r.score, "rank": r.rank, "slot": r.slot, "extra": r.extra,
                 "truth_digest": r.truth_digest, **{name: getattr(r, name) for name in METRIC_COLUMNS}}
                for r in batch.rows])
            if batch.item_metrics:
                conn.execute(insert_ignore(self.db, ItemMetrics.__table__, batch.item_metrics))
            ended = finish_items(conn, batch.ends)
        self._settings_id = settings_id  # kept once committed: a rolled-back insert leaves no row to point to
        return ended


class BackgroundWriter:
    """Runs ``write`` for one batch after another on its own thread while the caller explains the next;
    ``submit`` blocks while ``depth`` batches are waiting, so memory stays bounded. ``on_done(future)``
    runs in the writer's thread with each batch's outcome (its exception surfaces there)."""

    def __init__(self, write: Callable[[EncodedBatch], set[int]], depth: int = 2):
        self._write = write
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="salient-writer")
        self._slots = threading.Semaphore(depth)

    def submit(self, encode: Callable[[], EncodedBatch], on_done: Callable[[Future], None]) -> None:
        self._slots.acquire()

        def work():
            try:
                return self._write(encode())
            finally:
                self._slots.release()

        self._pool.submit(work).add_done_callback(on_done)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


