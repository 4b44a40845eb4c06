"""A finished job written straight into a data folder (rows, and optionally tiny objects), so the
report and export can be tested at scale without running a model."""

from __future__ import annotations

import hashlib
import struct
import zlib
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
from salient_maps.storage.shards import encode, shard_key

POOL = 64
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


def png(pixels: np.ndarray) -> bytes:
    """8-bit RGB PNG of an H×W×3 uint8 array (no imaging library needed)."""
    h, w = pixels.shape[:2]
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def make_job(data_dir: Path, images: int, *, failed_every: int = 10, methods: tuple[str, ...] = ("gradcam", "saliency"),
             topk: int = 3, objects: bool = True, map_side: int = 8) -> SyntheticJob:
    """A finished job of ``images`` items, every ``failed_every``-th failed (with an HTML-laden reason);
    item 1's file name and class 2's label are HTML. Rows point into one shard of ``POOL`` images'
    maps and thumbnails (so every picture in a report can be drawn); with ``objects`` False it is not
    written."""
    db = connect(f"sqlite:///{(data_dir / 'salient.db').resolve()}")
    objects_root = data_dir / "objects"
    rng = np.random.default_rng(0)

    def put(key: str, data: bytes) -> None:  # plain writes: the store's atomic put is slow for 10,000s of files
        path = objects_root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    tensors = {f"{m}.layer": rng.random((POOL * topk, map_side, map_side)).astype(np.float32) for m in methods}
    tensors.update({f"thumbnail.{j}": np.frombuffer(png(rng.integers(0, 255, (6, 8, 3), np.uint8)), np.uint8)
                    for j in range(POOL)})
    shard = encode(tensors, {"format": 1, "input_size": [map_side * 4, map_side * 4], "targets": topk,
                             "methods": {m: {"map": "layer"} for m in methods}})
    if objects:
        put(shard_key(shard), shard)
    digest = "d" * 64
    job_id = create_job(db, {
        "model": "resnet18", "layer": "layer4", "methods": list(methods), "targets": {"topk": topk},
        "precision": "fp32", "sources": [str(data_dir / "images")],
        "method_definitions": {m: f"{m} <b>definition</b>" for m in methods},
        "method_options": {"score": "logit"}, "versions": {"salient": "0.1.0", "torch": "2.14.1"},
        "metrics": {"metrics": ["deletion", "insertion", "drop"], "score": "probability"},
        "overlay": {"colormap": "jet", "alpha": 0.4},
    })
    # Every row of one table needs the same keys: an executemany takes its columns from the first.
    items, image_rows, explanations = [], [], []
    failed = 0
    for i in range(images):
        name = {1: EVIL_NAME, 3: EVIL_FILE_NAME}.get(i, f"img{i:05d}.png")
        sha = hashlib.sha256(f"{job_id}-{i}".encode()).hexdigest()
        uri = (data_dir / "images").as_uri() + "/" + quote(name, safe="")
        if failed_every and i % failed_every == failed_every - 1:
            failed += 1
            items.append({"job_id": job_id, "uri": uri, "sha256": sha, "status": "failed", "seconds": 0.01,
                          "error": f"not an image (<b>corrupt</b> header) #{i}", "updated_at": utcnow()})
            continue
        items.append({"job_id": job_id, "uri": uri, "sha256": sha, "status": "done", "seconds": 0.05,
                      "error": None, "updated_at": utcnow()})
        image_rows.append({"sha256": sha, "width": 64, "height": 48})
        probs = np.sort(rng.dirichlet(np.ones(len(CLASSES))))[::-1]
        classes = rng.permutation(len(CLASSES))
        for method in methods:
            for k in range(topk):
                class_id = int(classes[k])
                curve = np.sort(rng.random(5))
                explanations.append({
                    "sha256": sha, "settings_id": 1, "method": method, "class_id": class_id,
                    "score": float(probs[k]), "rank": k + 1, "shard_id": 1, "slot": (i % POOL) * topk + k,
                    "extra": {"metrics": {
                        "deletion_curve": curve[::-1].tolist(), "deletion_auc": float(curve.mean()),
                        "insertion_curve": curve.tolist(), "insertion_auc": float(rng.random()),
                        "drop": float(rng.random()), "increase": bool(rng.random() < 0.3), "masked_score": 0.1}},
                })
    with db.begin() as conn:
        conn.execute(ResultSettings.__table__.insert(), [{
            "id": 1, "digest": digest, "model": "resnet18-x", "layer": "layer4", "methods": {m: {} for m in methods},
            "overlay": {"colormap": "jet", "alpha": 0.4}, "class_names": CLASSES, "created_at": utcnow()}])
        conn.execute(Shard.__table__.insert(), [{"id": 1, "key": shard_key(shard), "images": POOL,
                                                 "bytes": len(shard), "created_at": utcnow()}])
        conn.execute(Item.__table__.insert(), items)
        if image_rows:
            conn.execute(Image.__table__.insert(), image_rows)
        if explanations:
            conn.execute(Explanation.__table__.insert(), explanations)
        conn.execute(update(Job).where(Job.id == job_id).values(
            status="finished", settings_digest=digest, total=images, done=images - failed, failed=failed,
            finished_at=utcnow() + timedelta(seconds=images * 0.05)))
    db.dispose()
    return SyntheticJob(job_id, images, failed, methods, topk)
