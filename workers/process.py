"""Pending items in, maps + overlays in the object store and rows in the database out.

Both the embedded ``salient run`` and the queue workers drive this one loop.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import cv2
import numpy as np
import torch
from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from salient_maps.storage.database import Explanation, Image, Item, Job, already_explained, finish_item, insert_ignore
from salient_maps.storage.objects import ObjectStore
from salient_maps.storage.results import THUMBNAIL_SIDE, thumbnail_key
from salient_maps.storage.settings import Settings
from salient_maps.storage.sources import SourceError, read_uri

from .engine import BatchResult, Explainer
from .images import decode_image, to_input
from .localization import PARAMS as LOCALIZATION_PARAMS
from .localization import localize, mask_png
from .metrics import Faithfulness
from .overlays import OverlayStyle, fit_long_side, overlay_png


@dataclass
class PendingItem:
    id: int
    job_id: str
    uri: str


@dataclass
class Prepared:
    item: PendingItem
    sha256: str | None = None
    rgb: np.ndarray | None = None
    x: torch.Tensor | None = None
    error: str | None = None
    seconds: float = 0.0
    explained: bool = False  # these bytes already have results under these settings: not decoded


def settings_digest(explainer: Explainer, metrics: Faithfulness | None = None,
                    overlay_style: OverlayStyle | None = None, localize: bool = False) -> str:
    """Identity of everything that changes a result; a rerun with the same digest is skipped."""
    spec = {
        "model": explainer.model.tag,
        "layer": explainer.layer_name,
        "methods": {m.name: m.params() for m in explainer.methods},
        "targets": explainer.targets.describe(),
        "precision": explainer.precision,
        "input_size": explainer.model.input_size,
    }
    # Added only when used, so results made without them keep their identity.
    if metrics is not None:
        spec["metrics"] = metrics.params()
    if overlay_style is not None and overlay_style != OverlayStyle():
        spec["overlay"] = overlay_style.params()
    if localize:
        spec["localization"] = LOCALIZATION_PARAMS
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def method_id(method) -> str:
    params = method.params()
    if not params:
        return method.name
    return f"{method.name}-{hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]}"


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array.astype(np.float16), allow_pickle=False)
    return buf.getvalue()


class ItemProcessor:
    def __init__(self, settings: Settings, db: Engine, store: ObjectStore, explainer: Explainer, batch_size: int = 16,
                 metrics: Faithfulness | None = None, overlay_style: OverlayStyle = OverlayStyle(),
                 localize: bool = False):
        self.settings = settings
        self.db = db
        self.store = store
        self.explainer = explainer
        self.batch_size = batch_size
        self.metrics = metrics
        self.overlay_style = overlay_style
        self.localize = localize
        self.digest = settings_digest(explainer, metrics, overlay_style, localize)

    def prepare(self, item: PendingItem) -> Prepared:
        """Read, hash and decode one item (a bad image gets its reason in ``error``); thread-safe, so
        the queue workers decode the images of several messages at once. An image already explained
        under these settings is not decoded: a nightly rerun over a folder pays reading and hashing only."""
        t = time.perf_counter()
        prepared = Prepared(item)
        try:
            data = read_uri(item.uri, self.settings.max_image_bytes, self.settings, expect_image=True)
            prepared.sha256 = hashlib.sha256(data).hexdigest()
            with self.db.connect() as conn:
                prepared.explained = already_explained(conn, prepared.sha256, self.digest)
            if prepared.explained:
                prepared.seconds = time.perf_counter() - t
                return prepared
            prepared.rgb = decode_image(data, self.settings.max_image_pixels)
            m = self.explainer.model
            prepared.x = to_input(prepared.rgb, m.input_size, m.mean, m.std)
        except SourceError as exc:
            prepared.error = str(exc)
        prepared.seconds = time.perf_counter() - t
        return prepared

    def _prefetched(self, items: Iterable[PendingItem]) -> Iterator[list[Prepared]]:
        """Batches of prepared items; reading and decoding run in threads ahead of the model."""
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="salient-decode") as pool:
            window: list = []
            batch: list[Prepared] = []
            for item in items:
                window.append(pool.submit(self.prepare, item))
                if len(window) < 2 * self.batch_size:
                    continue
                batch.append(window.pop(0).result())
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            for fut in window:
                batch.append(fut.result())
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch

    def run(self, items: Iterable[PendingItem], on_item: Callable[[str], None] | None = None) -> None:
        for batch in self._prefetched(items):
            for status in self.process_batch(batch):
                if on_item:
                    on_item(status)

    def process_batch(self, batch: list[Prepared]) -> list[str]:
        statuses = []
        todo: list[Prepared] = []
        with self.db.begin() as conn:
            for p in batch:
                if p.error is not None:
                    finish_item(conn, p.item.id, p.item.job_id, "failed", sha256=p.sha256, error=p.error, seconds=p.seconds)
                    statuses.append("failed")
                elif p.explained or already_explained(conn, p.sha256, self.digest):  # or by a peer since
                    finish_item(conn, p.item.id, p.item.job_id, "skipped", sha256=p.sha256, seconds=p.seconds)
                    statuses.append("skipped")
                else:
                    todo.append(p)
        if not todo:
            return statuses
        # One picture under several URIs (same sha256) is explained once; its copies end with it.
        first: dict[str, Prepared] = {}
        for p in todo:
            first.setdefault(p.sha256, p)
        unique = list(first.values())
        t = time.perf_counter()
        try:
            x = torch.stack([p.x for p in unique])
            result = self.explainer.explain(x)
            scores = self._faithfulness(x, result)
        except Exception as exc:  # one bad batch must not end the job: every item gets the reason
            with self.db.begin() as conn:
                for p in todo:
                    finish_item(conn, p.item.id, p.item.job_id, "failed", sha256=p.sha256,
                                error=f"explanation failed: {type(exc).__name__}: {exc}")
                    statuses.append("failed")
            return statuses
        per_image = (time.perf_counter() - t) / len(unique)
        for i, p in enumerate(unique):
            self._store_image(i, p, result, per_image, scores)
            statuses.append("done")
        copies = [p for p in todo if first[p.sha256] is not p]
        if copies:
            with self.db.begin() as conn:  # after the rows they share are in
                for p in copies:
                    finish_item(conn, p.item.id, p.item.job_id, "done", sha256=p.sha256, seconds=p.seconds)
                    statuses.append("done")
        return statuses

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

    def _store_image(self, i: int, p: Prepared, result: BatchResult, seconds: float,
                     scores: dict[str, dict[str, list]]) -> None:
        ex = self.explainer
        model = ex.model
        base = f"{p.sha256[:2]}/{p.sha256}/{model.tag}/{ex.layer_name}"
        picture = fit_long_side(p.rgb, self.settings.overlay_max_side)
        self.store.put_if_absent(thumbnail_key(p.sha256), lambda: _jpeg(fit_long_side(p.rgb, THUMBNAIL_SIDE)),
                                 "image/jpeg")
        style = self.overlay_style
        ranks = result.probs[i].argsort(descending=True).argsort()
        n_methods = len(ex.methods)
        rows = []
        for method in ex.methods:
            out = result.outputs[method.name]
            mid = method_id(method)
            for k, class_id in enumerate(result.targets[i].tolist()):
                stem = f"{base}/{mid}/{class_id}"
                heat = out.maps[i, k].cpu().numpy()
                map_key = f"maps/{stem}.npy"
                self.store.put_if_absent(map_key, lambda: _npy(heat), "application/octet-stream")
                overlay_key = f"overlays/{stem}.{style.key}.png"
                shown = _overlay_source(out, i, k, style)
                self.store.put_if_absent(overlay_key, lambda: overlay_png(picture, shown, style), "image/png")
                arrays = {}
                for name, tensor in out.arrays.items():
                    key = f"maps/{stem}.{name}.npy"
                    self.store.put_if_absent(key, lambda: _npy(tensor[i, k].cpu().numpy()), "application/octet-stream")
                    arrays[name] = key
                rows.append({
                    "sha256": p.sha256, "settings_digest": self.digest, "model": model.tag, "method": mid,
                    "layer": ex.layer_name, "class_id": class_id, "class_name": model.class_names[class_id],
                    "score": float(result.probs[i, class_id]), "rank": int(ranks[class_id]) + 1,
                    "map_key": map_key, "overlay_key": overlay_key,
                    "extra": {"params": method.params(), "arrays": arrays, "overlay": style.params(),
                              **_metrics_extra(self.metrics, scores.get(method.name), i, k),
                              **self._localization_extra(p.rgb, heat, stem)},
                    "seconds": result.seconds[method.name] / len(result.targets) / result.targets.shape[1],
                })
        with self.db.begin() as conn:
            conn.execute(insert_ignore(self.db, Image.__table__, [
                {"sha256": p.sha256, "width": p.rgb.shape[1], "height": p.rgb.shape[0]}]))
            conn.execute(insert_ignore(self.db, Explanation.__table__, rows))
            finish_item(conn, p.item.id, p.item.job_id, "done", sha256=p.sha256, seconds=p.seconds + seconds)

    def _localization_extra(self, rgb: np.ndarray, heat: np.ndarray, stem: str) -> dict:
        """With --localize: the GrabCut box from this map (None when the map cannot seed it) and its mask object."""
        if not self.localize:
            return {}
        found = localize(rgb, heat)
        if found is None:
            return {"localization": None}
        mask_key = f"masks/{stem}.png"
        self.store.put_if_absent(mask_key, lambda: mask_png(found.mask), "image/png")
        return {"localization": {"bbox": list(found.bbox), "mask_key": mask_key}}


def _jpeg(rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return data.tobytes()


def _overlay_source(out, i: int, k: int, style: OverlayStyle) -> np.ndarray:
    """What the overlay shows: with a polarity, the method's signed attribution (its first stored array
    with colour channels, B×K×3×H×W, e.g. saliency's raw gradient) when it keeps one; else the map."""
    if style.polarity is not None:
        for tensor in out.arrays.values():
            if tensor.dim() == 5 and tensor.shape[2] == 3:
                return tensor[i, k].float().cpu().numpy()
    return out.maps[i, k].float().cpu().numpy()


def _metrics_extra(metrics: Faithfulness | None, scores: dict[str, list] | None, i: int, k: int) -> dict:
    if metrics is None or scores is None:
        return {}
    return {"metrics": {name: values[i][k] for name, values in scores.items()}, "metric_settings": metrics.params()}


def pending_items(db: Engine, job_id: str) -> Iterator[PendingItem]:
    last = 0
    while True:  # keyset pages: a million items never sit in memory at once
        with db.connect() as conn:
            rows = conn.execute(
                select(Item.id, Item.job_id, Item.uri)
                .where(Item.job_id == job_id, Item.status == "pending", Item.id > last)
                .order_by(Item.id).limit(500)
            ).all()
        if not rows:
            return
        for row in rows:
            yield PendingItem(*row)
        last = rows[-1][0]


def record_digest(db: Engine, job_id: str, digest: str) -> None:
    with db.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(settings_digest=digest))
