"""A finished job written straight into a data folder (rows, and optionally one small shard), so the report,
export and bench/report.py can work at scale without running a model. Rows go in by Core executemany, a chunk
of items at a time: a job of 10^6 images is written in bounded memory.

In: a data folder, a number of images and the job's shape (methods, top-k, labels, metrics). Out: the rows in
``DIR/salient.db`` (and one shard under ``DIR/objects/``) and a ``SyntheticJob`` describing them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

import numpy as np
from sqlalchemy import update

from salient_maps.storage.database import (
    Explanation,
    Image,
    Item,
    Job,
    ResultSettings,
    Shard,
    connect,
    create_job,
    utcnow,
)
from salient_maps.storage.report.charts import png_rgb
from salient_maps.storage.shards import encode, shard_key

POOL = 64
CHUNK = 20_000  # items per executemany
# Item 1's URI ends in this name percent-encoded (a "/" cannot be in a file name, but can be in a URL);
# item 3 is a file name that a file system allows.
EVIL_NAME = "<script>alert(1)</script>.png"
EVIL_FILE_NAME = "<img src=x onerror=alert(3)>.png"
EVIL_CLASS = '<img src=x onerror="alert(2)">cat & "dog"'
CLASSES = ["tabby cat", "golden retriever", EVIL_CLASS, "teapot", "bicycle"]


@dataclass
class SyntheticJob:
    job_id: str
    images: int
    failed: int
    methods: tuple[str, ...]
    topk: int

    @property
    def explanations(self) -> int:
        return (self.images - self.failed) * len(self.methods) * self.topk


def class_names(classes: int) -> list[str]:
    """The five named classes (one with HTML in its name), then ``class 5``, ``class 6``, ..."""
    return (CLASSES + [f"class {c}" for c in range(len(CLASSES), classes)])[:max(classes, 1)]


def make_job(data_dir: Path, images: int, *, failed_every: int = 10, methods: tuple[str, ...] = ("gradcam", "saliency"),
             topk: int = 3, objects: bool = True, map_side: int = 8, classes: int = len(CLASSES),
             labels: bool = False, localization: bool = False, metrics: bool = True, seed: int = 0,
             database_url: str | None = None) -> SyntheticJob:
    """A finished job of ``images`` items, every ``failed_every``-th failed (with an HTML-laden reason);
    item 1's file name and class 2's label are HTML. Rows point into one shard of ``POOL`` images'
    maps and thumbnails (so every picture in a report can be drawn); with ``objects`` False it is not
    written. ``labels``: each item gets a label (its top-1 class for two images in three, so ``correct``
    varies); ``localization``: the explanations get ``energy_in_box``, ``border_energy`` and
    ``pointing_game``; ``metrics``: deletion/insertion curves, AUCs, drop and increase in ``extra``;
    ``database_url``: the rows go there instead of ``DIR/salient.db``."""
    db = connect(database_url or f"sqlite:///{(data_dir / 'salient.db').resolve()}")
    rng = np.random.default_rng(seed)
    names = class_names(classes)
    tensors = {f"{m}.layer": rng.random((POOL * topk, map_side, map_side)).astype(np.float32) for m in methods}
    tensors.update({f"thumbnail.{j}": np.frombuffer(png_rgb(rng.integers(0, 255, (6, 8, 3), np.uint8)), np.uint8)
                    for j in range(POOL)})
    shard = encode(tensors, {"format": 1, "input_size": [map_side * 4, map_side * 4], "targets": topk,
                             "methods": {m: {"map": "layer"} for m in methods}})
    if objects:
        path = data_dir / "objects" / shard_key(shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(shard)
    digest = hashlib.sha256(f"synthetic-{seed}-{methods}-{topk}-{classes}".encode()).hexdigest()
    job_id = create_job(db, {
        "model": "resnet18", "layer": "layer4", "methods": list(methods), "targets": {"topk": topk},
        "precision": "fp32", "sources": [str(data_dir / "images")],
        "method_definitions": {m: f"{m} <b>definition</b>" for m in methods},
        "method_options": {"score": "logit"}, "versions": {"salient": "0.1.0", "torch": "2.14.1"},
        "metrics": {"metrics": ["deletion", "insertion", "drop"], "score": "probability"} if metrics else None,
        "overlay": {"colormap": "jet", "alpha": 0.4},
    })
    with db.begin() as conn:
        settings_id = conn.execute(ResultSettings.__table__.insert().values(
            digest=digest, model="resnet18-x", layer="layer4", methods={m: {} for m in methods},
            overlay={"colormap": "jet", "alpha": 0.4}, class_names=names, created_at=utcnow())).inserted_primary_key[0]
        shard_id = conn.execute(Shard.__table__.insert().values(
            key=shard_key(shard), images=POOL, bytes=len(shard), created_at=utcnow())).inserted_primary_key[0]
    failed = 0
    folder = (data_dir / "images").as_uri()
    now = utcnow()
    for start in range(0, images, CHUNK):
        # Every row of one table needs the same keys: an executemany takes its columns from the first.
        items, image_rows, explanations = [], [], []
        for i in range(start, min(images, start + CHUNK)):
            name = {1: EVIL_NAME, 3: EVIL_FILE_NAME}.get(i, f"img{i:07d}.png")
            sha = hashlib.sha256(f"{job_id}-{i}".encode()).hexdigest()
            item = {"job_id": job_id, "uri": f"{folder}/{quote(name, safe='')}", "sha256": sha, "status": "done",
                    "seconds": 0.05, "error": None, "label": None, "predicted": None, "updated_at": now}
            items.append(item)
            if failed_every and i % failed_every == failed_every - 1:
                failed += 1
                item.update(status="failed", seconds=0.01, error=f"not an image (<b>corrupt</b> header) #{i}")
                continue
            image_rows.append({"sha256": sha, "width": 64, "height": 48})
            probs = np.sort(rng.dirichlet(np.ones(max(topk, 2))))[::-1]
            chosen = rng.choice(len(names), size=topk, replace=False) if topk <= len(names) else rng.permutation(topk)
            if labels:
                item.update(predicted=int(chosen[0]),
                            label=int(chosen[0]) if rng.random() < 2 / 3 else int(rng.integers(len(names))))
            for method in methods:
                for k in range(topk):
                    row = {"sha256": sha, "settings_id": settings_id, "method": method, "class_id": int(chosen[k]),
                           "score": float(probs[k]), "rank": k + 1, "shard_id": shard_id,
                           "slot": (i % POOL) * topk + k, "extra": None, "energy_in_box": None,
                           "border_energy": None, "pointing_game": None}
                    if metrics:
                        curve = np.sort(rng.random(5))
                        row["extra"] = {"metrics": {
                            "deletion_curve": curve[::-1].tolist(), "deletion_auc": float(curve.mean()),
                            "insertion_curve": curve.tolist(), "insertion_auc": float(rng.random()),
                            "drop": float(rng.random()), "increase": bool(rng.random() < 0.3), "masked_score": 0.1}}
                    if localization:
                        row.update(energy_in_box=float(rng.random()), border_energy=float(rng.random() * 0.5),
                                   pointing_game=int(rng.random() < 0.6))
                    explanations.append(row)
        with db.begin() as conn:
            conn.execute(Item.__table__.insert(), items)
            if image_rows:
                conn.execute(Image.__table__.insert(), image_rows)
            if explanations:
                conn.execute(Explanation.__table__.insert(), explanations)
    with db.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(
            status="finished", settings_digest=digest, total=images, done=images - failed, failed=failed,
            finished_at=utcnow() + timedelta(seconds=images * 0.05)))
    db.dispose()
    return SyntheticJob(job_id, images, failed, methods, topk)
