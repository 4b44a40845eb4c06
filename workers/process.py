"""Pending items in; per batch one result shard in the object store and its rows in the database out.

Both the embedded ``salient run`` and the queue workers drive this one loop: read and decode
(``prepare``), explain (``explain_batch``), encode the shard and write it with its rows
(``encode`` and workers/writer.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from salient_maps.storage.database import Item, ItemEnd, ItemMetrics, Job, explained_among, finish_items, insert_ignore
from salient_maps.storage.input_crop import input_box
from salient_maps.storage.objects import ObjectStore
from salient_maps.storage.overlay_archives import overlay_archive
from salient_maps.storage.overlays import OverlayStyle, fit_long_side
from salient_maps.storage.settings import Settings
from salient_maps.storage.shards import FORMAT as SHARD_FORMAT
from salient_maps.storage.shards import encode as encode_shard
from salient_maps.storage.shards import localization_mask_name, shard_key
from salient_maps.storage.sources import SourceError, read_uri, truth_digest

from .engine import BatchResult, Explainer
from .images import (
    decode_image,
    decode_jpegs_on_device,
    decode_scaled,
    device_decodable,
    stack_inputs,
    to_input,
)
from .localization import PARAMS as LOCALIZATION_PARAMS
from .localization import localize, mask_png
from .localization_metrics import GroundTruth
from .metrics import Faithfulness
from .reused_truth import measure_copies, measure_skipped
from .targets import ClassNames, TargetError
from .writer import (
    METRIC_COLUMNS,
    THUMBNAIL_SIDE,
    BackgroundWriter,
    EncodedBatch,
    Row,
    ShardWriter,
    shard_tensors,
    thumbnail_jpeg,
)

log = logging.getLogger(__name__)


@dataclass
class PendingItem:
    id: int
    job_id: str
    uri: str
    # The manifest's ground truth, when the query that found the item brought it (``truth_known``): then
    # ``take_truths`` needs no query of its own.
    truth: dict | None = None
    truth_known: bool = False


@dataclass
class Prepared:
    item: PendingItem
    sha256: str | None = None
    data: bytes | None = None  # the file, from reading until decoding
    # The picture on the host: the whole image, or a JPEG decoded smaller, as far as ``picture_side`` allows.
    rgb: np.ndarray | None = None
    width: int | None = None  # the image's own size (EXIF orientation applied), whatever ``rgb``'s
    height: int | None = None
    x: torch.Tensor | None = None  # the model input (on the device when decoded there)
    error: str | None = None
    seconds: float = 0.0
    explained: bool = False  # these bytes already have results under these settings: not decoded
    truth: dict | None = None  # the item's ground truth (label, boxes, mask) from the manifest
    label: int | None = None  # its label as a class id of the model
    mask: np.ndarray | None = None  # its mask decoded, H×W bool at the image's own size


# Batches read together ahead of the model in ``salient run``, with one query for which are explained already.
LOOKUP_BATCHES = 2


def host_threads() -> int:
    """The cores this process may run on: the size of the pools that read and decode images."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def stacked_inputs(batch: list[Prepared], device: torch.device) -> torch.Tensor:
    """A batch's model inputs as one tensor: on the host when all were decoded there (the engine copies it
    over, from pinned memory on CUDA), else on ``device``, where nvJPEG left the JPEGs among them."""
    xs = [p.x for p in batch]
    if any(x.device != xs[0].device for x in xs):
        xs = [x.to(device) for x in xs]
    return stack_inputs(xs)


def _chunks(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


class StageClock:
    """CPU seconds of the host's own work per stage (read, decode, ...), summed over the threads doing it:
    ``time.thread_time`` counts what the calling thread itself computed, not time spent waiting."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.thread_time()
        try:
            yield
        finally:
            with self._lock:
                self.seconds[stage] += time.thread_time() - start


def settings_digest(explainer: Explainer, metrics: Faithfulness | None = None,
                    overlay_style: OverlayStyle | None = None, localize: bool = False,
                    store_overlays: bool = False) -> str:
    """Identity of everything that changes a result; a rerun with the same digest is skipped."""
    spec = {
        "model": explainer.model.tag,
        "layer": explainer.layer_name,
        "methods": {m.name: m.params() for m in explainer.methods},
        "targets": explainer.targets.describe(),
        "precision": explainer.precision,
        "input_size": explainer.model.input_size,
    }
    # Only when it differs from what every result had before it was recorded (ImageNet's mean and std).
    if (preprocessing := explainer.model.preprocessing_identity()) is not None:
        spec["preprocessing"] = preprocessing
    # Added only when used, so results made without them keep their identity.
    if metrics is not None:
        spec["metrics"] = metrics.params()
    if overlay_style is not None and overlay_style != OverlayStyle():
        spec["overlay"] = overlay_style.params()
    if localize:
        spec["localization"] = LOCALIZATION_PARAMS
    if store_overlays:  # a rerun that asks for overlay files must not skip the images explained without them
        spec["overlays"] = "store"
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


class ItemProcessor:
    def __init__(self, settings: Settings, db: Engine, store: ObjectStore, explainer: Explainer, batch_size: int = 16,
                 metrics: Faithfulness | None = None, overlay_style: OverlayStyle = OverlayStyle(),
                 localize: bool = False, store_overlays: bool = False):
        self.settings = settings
        self.db = db
        self.store = store
        self.explainer = explainer
        self.batch_size = batch_size
        self.metrics = metrics
        self.overlay_style = overlay_style
        self.localize = localize
        self.store_overlays = store_overlays
        self.digest = settings_digest(explainer, metrics, overlay_style, localize, store_overlays)
        # The long side the host picture must keep (None: the full image): it becomes the shard's thumbnail
        # (overlays are rendered on read), and localisation boxes come from the picture, so these need it whole.
        # Stored overlays are drawn on the whole picture fit to ``overlay_max_side``, as ``salient show`` draws.
        self.picture_side: int | None = None if localize or store_overlays else THUMBNAIL_SIDE
        # CPU seconds by stage: read, decode, preprocess (input side), encode, upload, database (output side)
        self.cpu_seconds = StageClock()
        self.class_names = ClassNames(explainer.model.class_names)
        self.writer = ShardWriter(db, store, {
            "digest": self.digest, "model": explainer.model.tag, "layer": explainer.layer_name,
            "methods": {m.name: m.params() for m in explainer.methods}, "overlay": overlay_style.params(),
            "class_names": list(explainer.model.class_names), "layout": explainer.layout.params(),
            "preprocessing": explainer.model.preprocessing()}, self.cpu_seconds)

    def read(self, item: PendingItem) -> Prepared:
        """Read and hash one item (thread-safe); one that cannot be read gets its reason in ``error``."""
        t = time.perf_counter()
        prepared = Prepared(item)
        try:
            with self.cpu_seconds("read"):
                prepared.data = read_uri(item.uri, self.settings.max_image_bytes, self.settings, expect_image=True)
                prepared.sha256 = hashlib.sha256(prepared.data).hexdigest()
        except SourceError as exc:
            prepared.error = str(exc)
        prepared.seconds = time.perf_counter() - t
        return prepared

    def skip_explained(self, batch: list[Prepared]) -> None:
        """Mark the read images that already have results under these settings (one query for the batch):
        they are not decoded, so a nightly rerun over a folder pays reading and hashing only."""
        read = [p for p in batch if p.data is not None]
        if not read:
            return
        with self.cpu_seconds("database"), self.db.connect() as conn:
            found = explained_among(conn, [p.sha256 for p in read], self.digest)
        for p in read:
            if p.sha256 in found:
                p.explained, p.data = True, None

    def truths(self, batch: list[Prepared]) -> dict[int, dict | None]:
        """Item id -> the manifest's ground truth: as the items came, else one query for those that came without."""
        truths = {p.item.id: p.item.truth for p in batch if p.item.truth_known}
        if unknown := [p.item.id for p in batch if not p.item.truth_known]:
            with self.cpu_seconds("database"), self.db.connect() as conn:
                truths.update(conn.execute(select(Item.id, Item.truth).where(Item.id.in_(unknown))).all())
        return truths

    def take_truths(self, batch: list[Prepared]) -> None:
        """The decoded images' ground truth (see ``take_truth``), masks decoded: as the items came (``pending_items``
        and the queue's tasks read it with them), else one query for the batch."""
        truths = self.truths(batch)
        for p in batch:
            self.take_truth(p, truths.get(p.item.id))
            self.decode_mask(p)

    def take_truth(self, p: Prepared, truth: dict | None) -> None:
        """Keep an item's ground truth, its label as the model's class id; an item whose label names no class
        (or that has none when the targets need it) fails with the reason."""
        p.truth = truth or None
        label = (truth or {}).get("label")
        try:
            p.label = None if label is None else self.class_names.class_id(label)
        except TargetError as exc:
            p.error = f"ground truth: {exc}"
            return
        if p.label is None and self.explainer.targets.label:
            p.error = "no ground-truth label to explain (the job explains each image's label)"

    def decode_mask(self, p: Prepared) -> None:
        """Read and decode the item's ground-truth mask (nonzero = object) with the images' reading policy; one
        that cannot be read or does not match the image's size fails the item with the reason."""
        uri = (p.truth or {}).get("mask")
        if uri is None or p.error is not None:
            return
        try:
            data = read_uri(uri, self.settings.max_image_bytes, self.settings, expect_image=True)
            mask = decode_image(data, self.settings.max_image_pixels).any(axis=2)
        except SourceError as exc:
            p.error = f"ground-truth mask: {exc}"
            return
        if mask.shape != (p.height, p.width):
            p.error = f"ground-truth mask is {mask.shape[1]}×{mask.shape[0]}, the image {p.width}×{p.height}"
            return
        p.mask = mask

    def decode(self, p: Prepared) -> Prepared:
        """Decode one read image into its picture and model input on the host (thread-safe); a bad image
        gets its reason in ``error``. JPEGs are decoded only as large as the input and ``picture_side`` need."""
        if p.data is None:  # failed, explained or decoded already
            return p
        t = time.perf_counter()
        m = self.explainer.model
        resizing = m.resizing
        try:
            with self.cpu_seconds("decode"):
                decoded = decode_scaled(p.data, self.settings.max_image_pixels, resizing.decode_side,
                                        self.picture_side)
            with self.cpu_seconds("preprocess"):
                p.x = to_input(decoded.rgb, resizing, m.mean, m.std, (decoded.width, decoded.height))
            p.rgb, p.width, p.height = decoded.rgb, decoded.width, decoded.height
        except SourceError as exc:
            p.error = str(exc)
        finally:
            p.data = None
        p.seconds += time.perf_counter() - t
        return p

    def decode_batch(self, batch: list[Prepared], pool: ThreadPoolExecutor) -> None:
        """Decode a batch's read images: on a CUDA device its plain JPEGs in one nvJPEG call, the rest (and
        all of them elsewhere) on the host in ``pool``. Must not run on one of ``pool``'s own threads."""
        todo = [p for p in batch if p.data is not None]
        if self.explainer.device.type == "cuda":
            todo = self.decode_on_device(todo)
        list(pool.map(self.decode, todo))

    def decode_on_device(self, batch: list[Prepared]) -> list[Prepared]:
        """nvJPEG for the JPEGs it decodes as the host would; returns the images left for the host. When
        nvJPEG refuses a batch, its images are tried one at a time; those it refuses alone go to the host,
        where a bad image fails with its own reason."""
        jpegs: list[Prepared] = []
        for p in batch:
            try:
                size = device_decodable(p.data, self.settings.max_image_pixels)
            except SourceError as exc:
                p.error, p.data = str(exc), None
                continue
            if size is not None:
                p.width, p.height = size
                jpegs.append(p)
        if jpegs and not self._decode_on_device(jpegs) and len(jpegs) > 1:
            for p in jpegs:
                self._decode_on_device([p])
        return [p for p in batch if p.data is not None]

    def _decode_on_device(self, jpegs: list[Prepared]) -> bool:
        t = time.perf_counter()
        m = self.explainer.model
        try:
            with self.cpu_seconds("decode"):
                decoded = decode_jpegs_on_device([p.data for p in jpegs], self.explainer.device, m.resizing,
                                                 m.mean, m.std, self.picture_side)
        except RuntimeError:  # nvJPEG's errors, and running out of device memory
            return False
        share = (time.perf_counter() - t) / len(jpegs)
        for p, (x, rgb) in zip(jpegs, decoded):
            p.x, p.rgb, p.data = x, rgb, None
            p.seconds += share
        return True

    def prepare(self, item: PendingItem) -> Prepared:
        """Read, hash and decode one item on the host (a bad image gets its reason in ``error``)."""
        prepared = self.read(item)
        self.skip_explained([prepared])
        return self.decode(prepared)

    def prepare_batch(self, items: list[PendingItem], pool: ThreadPoolExecutor) -> list[Prepared]:
        """Read, hash and decode a batch in ``pool`` with one database query for the batch (``skip_explained``).
        Must not run on one of ``pool``'s own threads."""
        batch = list(pool.map(self.read, items))
        self.skip_explained(batch)
        self.decode_batch(batch, pool)
        return batch

    def _prefetched(self, items: Iterable[PendingItem]) -> Iterator[list[Prepared]]:
        """Batches of prepared items: up to two groups of ``LOOKUP_BATCHES`` batches are read and decoded ahead
        of the model (one explained-images query per group), their images spread over a pool as large as the
        machine has cores."""
        with ThreadPoolExecutor(host_threads(), thread_name_prefix="salient-decode") as pool, \
                ThreadPoolExecutor(2, thread_name_prefix="salient-batch") as groups:
            ahead: deque = deque()
            for group in _chunks(items, self.batch_size * LOOKUP_BATCHES):
                ahead.append(groups.submit(self.prepare_batch, group, pool))
                if len(ahead) > 1:
                    yield from _chunks(ahead.popleft().result(), self.batch_size)
            while ahead:
                yield from _chunks(ahead.popleft().result(), self.batch_size)

    def run(self, items: Iterable[PendingItem], on_item: Callable[[str], None] | None = None) -> None:
        """Explain every item; storing batch N (shard, rows, items' ends) overlaps the model on batch N+1.
        ``on_item(status)`` is called once per item as it ends (from the writer's thread for done ones)."""
        report = on_item or (lambda status: None)
        writer = BackgroundWriter(self.writer.write)

        def stored(explained: Explained, future: Future) -> None:
            error = future.exception()
            if error is None:
                statuses = ["done"] * len(future.result())
            else:  # the shard or its rows could not be written: the items fail with the reason, the job goes on
                log.error("storing a batch of %d images failed", len(explained.items), exc_info=error)
                reason = f"storing results failed: {type(error).__name__}: {error}"
                with self.db.begin() as conn:
                    statuses = ["failed"] * len(finish_items(conn, [
                        ItemEnd(p.item.id, p.item.job_id, "failed", p.sha256, reason) for p in explained.items]))
            for status in statuses:
                report(status)

        try:
            for batch in self._prefetched(items):
                statuses, explained = self.explain_batch(batch)
                for status in statuses:
                    report(status)
                if explained is not None:
                    writer.submit(lambda e=explained: self.encode(e), lambda f, e=explained: stored(e, f))
        finally:
            writer.close()

    def process_batch(self, batch: list[Prepared]) -> list[str]:
        """Explain and store one batch; its items have ended when this returns (the queue workers' path)."""
        statuses, explained = self.explain_batch(batch)
        if explained is not None:
            statuses += ["done"] * len(self.writer.write(self.encode(explained)))
        return statuses

    def explain_batch(self, batch: list[Prepared]) -> tuple[list[str], Explained | None]:
        """End the batch's bad and already explained items (one statement per status) and explain the
        rest; returns the statuses of the items ended here and what is left to store."""
        ends: list[ItemEnd] = []
        todo: list[Prepared] = []
        if decoded := [p for p in batch if p.error is None and not p.explained]:
            self.take_truths(decoded)  # a label that names no class or an unreadable mask fails the item here
        # skipped items' label, top-1 and, against other boxes than the shared rows', their own metrics
        reused = measure_skipped(self, [p for p in batch if p.error is None and p.explained])
        for p in batch:
            if p.error is not None:
                ends.append(ItemEnd(p.item.id, p.item.job_id, "failed", p.sha256, p.error, p.seconds))
            elif p.explained:
                ends.append(ItemEnd(p.item.id, p.item.job_id, "skipped", p.sha256, None, p.seconds, p.label,
                                    reused.predicted.get(p.sha256)))
            else:
                todo.append(p)
        # (``skip_explained`` asked which images have results when the batch was read; one a peer explains
        # since is explained again, its rows ignored as duplicates: one statement less per batch.)
        ended: set[int] = set()
        if ends:
            with self.cpu_seconds("database"), self.db.begin() as conn:
                if reused.rows:
                    conn.execute(insert_ignore(self.db, ItemMetrics.__table__, reused.rows))
                ended = finish_items(conn, ends)
        statuses = [e.status for e in ends if e.id in ended]
        if not todo:
            return statuses, None
        # One picture under several URIs (same sha256) is explained once; its copies end with it.
        first: dict[str, Prepared] = {}
        for p in todo:
            first.setdefault(p.sha256, p)
        unique = list(first.values())
        t = time.perf_counter()
        try:
            x = stacked_inputs(unique, self.explainer.device)
            if self.explainer.targets.label:
                result = self.explainer.explain(x, torch.tensor([p.label for p in unique]))
            else:
                result = self.explainer.explain(x)
            scores = self._faithfulness(x, result)
        except Exception as exc:  # one bad batch must not end the job: every item gets the reason
            reason = f"explanation failed: {type(exc).__name__}: {exc}"
            with self.db.begin() as conn:
                ended = finish_items(conn, [ItemEnd(p.item.id, p.item.job_id, "failed", p.sha256, reason)
                                            for p in todo])
            return statuses + ["failed"] * len(ended), None
        per_image = (time.perf_counter() - t) / len(unique)
        return statuses, Explained(todo, unique, result, scores, per_image)

    def _faithfulness(self, x: torch.Tensor, result: BatchResult) -> dict[str, dict[str, list]]:
        """Per method, the metrics of every map as host lists indexed [image][target] (one copy per batch)."""
        if self.metrics is None:
            return {}
        ex = self.explainer
        x = x.to(ex.device)
        scores = {}
        for method in ex.methods:
            values = self.metrics.evaluate(ex.module, x, result.outputs[method.name].maps, result.targets,
                                           ex.model.mean, ex.model.std, ex.autocast)
            scores[method.name] = {name: tensor.cpu().tolist() for name, tensor in values.items()}
        return scores

    def encode(self, e: Explained) -> EncodedBatch:
        """The batch's shard bytes and rows (storage/shards.py gives the layout)."""
        with self.cpu_seconds("encode"):
            ex = self.explainer
            result = e.result
            targets = result.targets.cpu()
            k_targets = targets.shape[1]
            probs = result.probs.cpu().numpy()
            ranks = (-probs).argsort(axis=1, kind="stable").argsort(axis=1) + 1
            tensors, methods = shard_tensors(ex.methods, result.outputs)
            input_size = list(next(iter(result.outputs.values())).maps.shape[-2:])
            # the maps at input size as the method returned them: the localisation metrics' input
            heats = {m.name: result.outputs[m.name].maps.detach().float().cpu().numpy() for m in ex.methods}
            rows = []
            for i, p in enumerate(e.unique):
                tensors[f"thumbnail.{i}"] = thumbnail_jpeg(p.rgb)
                truth = self._ground_truth(p)
                for method in ex.methods:
                    for k, class_id in enumerate(targets[i].tolist()):
                        slot = i * k_targets + k
                        extra = _metrics_extra(self.metrics, e.scores.get(method.name), i, k)
                        found = None
                        if self.localize:  # the box in the row, the mask in the shard beside the map
                            found = localize(p.rgb, heats[method.name][i, k],
                                             ex.model.resizing.box(p.width, p.height))
                            extra["localization"] = None if found is None else {"bbox": list(found.bbox)}
                            if found is not None:
                                tensors[localization_mask_name(method.name, slot)] = np.frombuffer(
                                    mask_png(found.mask), np.uint8)
                        fields = truth.metrics(heats[method.name][i, k], None if found is None else list(found.bbox))
                        rows.append(Row(p.sha256, method.name, class_id, float(probs[i, class_id]),
                                        int(ranks[i, class_id]), slot, extra or None,
                                        *(fields.get(name) for name in METRIC_COLUMNS),
                                        truth_digest=truth_digest(p.truth)))
            description = {"format": SHARD_FORMAT, "settings_digest": self.digest, "model": ex.model.tag,
                           "layer": ex.layer_name, "input_size": input_size,
                           "images": [p.sha256 for p in e.unique], "targets": k_targets,
                           "classes": targets.tolist(), "methods": methods}
            data = encode_shard(tensors, description)
            first = {p.sha256: p for p in e.unique}
            top1 = dict(zip(first, probs.argmax(axis=1).tolist()))
            ends = [ItemEnd(p.item.id, p.item.job_id, "done", p.sha256, None,
                            p.seconds + (e.per_image if first[p.sha256] is p else 0.0), p.label, top1[p.sha256])
                    for p in e.items]
            images = [{"sha256": p.sha256, "width": p.width, "height": p.height} for p in e.unique]
            own = measure_copies(self, e.items, first, rows, heats)  # copies with other boxes than the first's
        overlays = self._overlay_archive(e, data, rows) if self.store_overlays else None
        return EncodedBatch(data, images, rows, ends, item_metrics=own, overlays=overlays)

    def _overlay_archive(self, e: Explained, data: bytes, rows: list[Row]) -> bytes:
        """--overlays store: the tar of the batch's overlays (storage/overlay_archives.py), drawn from the shard
        as the reader draws them, on each picture at ``overlay_max_side``."""
        with self.cpu_seconds("overlays"):
            first = {p.sha256: p for p in e.unique}
            # each record's input_box, as the results give it: the part of the picture its map covers (a crop)
            preprocessing = self.writer.settings_row.get("preprocessing")
            key = shard_key(data)
            records = [{"shard": key, "slot": r.slot, "method": r.method, "class_id": r.class_id,
                        "sha256": r.sha256, "uri": first[r.sha256].item.uri,
                        "input_box": input_box(preprocessing, first[r.sha256].width, first[r.sha256].height)}
                       for r in rows]
            pictures = {sha: fit_long_side(p.rgb, self.settings.overlay_max_side) for sha, p in first.items()}
            return overlay_archive(key, data, records, pictures, self.overlay_style)

    def _ground_truth(self, p: Prepared) -> GroundTruth:
        """The image's boxes and mask in the frame of the model's input: the resize and crop ``to_input`` (and
        nvJPEG's path) applied, from the image's own size (a JPEG decoded reduced is cut at the same place)."""
        boxes = (p.truth or {}).get("boxes") or ()
        return GroundTruth(self.explainer.model.resizing.frame(p.width, p.height), boxes, p.mask)


@dataclass
class Explained:
    """A batch explained and not yet stored: ``items`` all end done with it; ``unique`` (one per picture)
    were the model's inputs, in the order of ``result``."""

    items: list[Prepared]
    unique: list[Prepared]
    result: BatchResult
    scores: dict[str, dict[str, list]]
    per_image: float


def _metrics_extra(metrics: Faithfulness | None, scores: dict[str, list] | None, i: int, k: int) -> dict:
    if metrics is None or scores is None:
        return {}
    return {"metrics": {name: values[i][k] for name, values in scores.items()}, "metric_settings": metrics.params()}


def pending_items(db: Engine, job_id: str, page: int = 1000) -> Iterator[PendingItem]:
    """The job's pending items with their ground truth, in keyset pages: a million items never sit in memory
    at once."""
    last = 0
    while True:
        with db.connect() as conn:
            rows = conn.execute(
                select(Item.id, Item.job_id, Item.uri, Item.truth)
                .where(Item.job_id == job_id, Item.status == "pending", Item.id > last)
                .order_by(Item.id).limit(page)
            ).all()
        for row in rows:
            yield PendingItem(row.id, row.job_id, row.uri, row.truth, truth_known=True)
        if len(rows) < page:
            return
        last = rows[-1].id


def record_digest(db: Engine, job_id: str, digest: str) -> None:
    with db.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(settings_digest=digest))
