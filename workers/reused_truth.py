"""Ground truth for items that reuse a shared explanation: a batch's items in; their label, top-1 class and, where
their boxes or mask differ from those the shared rows were measured against, ``item_metrics`` rows out.

An explanation row (image × settings × method × class) is shared by every job, but ``energy_in_box``,
``pointing_game`` and ``localization_iou`` also depend on the item's boxes and mask. The row keeps those measured for
the item explained first and that ground truth's digest (storage/sources.py ``truth_digest``); an item with another
digest gets its own numbers here, measured the same way (workers/localization_metrics.py), and storage/ground_truth.py
gives every query the item's own. Two kinds of item need them:

- an image skipped as already explained (a rerun with other boxes): its maps are read back from the shards at the
  input size (the stored map equals the one in memory to 1e-6) and measured again; the model does not run;
- a copy of a picture (same bytes under another URI) explained in the same batch: measured on the map in memory.

Items whose digest matches the rows' cost nothing beyond the batch's query: a nightly rerun with the same manifest
reads no map.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import select

from salient_maps.storage.database import Explanation, Image, ResultSettings, Shard
from salient_maps.storage.ground_truth import OWN_METRICS
from salient_maps.storage.maps import MapReader
from salient_maps.storage.sources import truth_digest

if TYPE_CHECKING:
    from .process import ItemProcessor, Prepared
    from .writer import Row


@dataclass
class Reused:
    rows: list[dict] = field(default_factory=list)  # for item_metrics
    predicted: dict[str, int] = field(default_factory=dict)  # sha256 -> the class of its rank-1 row


def _own(item_id: int, method: str, class_id: int, fields: dict) -> dict:
    return {"item_id": item_id, "method": method, "class_id": class_id, **{n: fields.get(n) for n in OWN_METRICS}}


def _found_box(extra: dict | None) -> list | None:
    return ((extra or {}).get("localization") or {}).get("bbox")


def measure_skipped(processor: ItemProcessor, skipped: list[Prepared]) -> Reused:
    """For the batch's items skipped as already explained: their ground truth taken (label as a class id; a label
    naming no class or an unusable mask sets ``error``), their top-1 class from the stored rank-1 row, and their
    own metrics where their boxes or mask are not those the rows were measured against. No query unless some
    skipped item has ground truth."""
    reused = Reused()
    truths = processor.truths(skipped)
    with_truth = [p for p in skipped if truths.get(p.item.id)]
    if not with_truth:
        return reused
    settings_id = select(ResultSettings.id).where(ResultSettings.digest == processor.digest).scalar_subquery()
    with processor.db.connect() as conn:
        rows = conn.execute(
            select(Explanation.sha256, Explanation.method, Explanation.class_id, Explanation.rank, Explanation.slot,
                   Explanation.extra, Explanation.truth_digest, Shard.key.label("shard"), Image.width, Image.height)
            .join(Shard, Shard.id == Explanation.shard_id).join(Image, Image.sha256 == Explanation.sha256)
            .where(Explanation.sha256.in_(sorted({p.sha256 for p in with_truth})),
                   Explanation.settings_id == settings_id)).mappings().all()
    by_image = defaultdict(list)
    for row in rows:
        by_image[row["sha256"]].append(row)
        if row["rank"] == 1:
            reused.predicted[row["sha256"]] = row["class_id"]
    reader = MapReader(processor.store)
    for p in with_truth:
        processor.take_truth(p, truths[p.item.id])
        digest = truth_digest(p.truth)
        stale = [r for r in by_image[p.sha256] if digest is not None and r["truth_digest"] != digest]
        if p.error is not None or not stale:
            continue
        p.width, p.height = stale[0]["width"], stale[0]["height"]
        processor.decode_mask(p)
        if p.error is not None:
            continue
        truth = processor._ground_truth(p)
        for r in stale:
            reused.rows.append(_own(p.item.id, r["method"], r["class_id"],
                                    truth.metrics(reader.map(r), _found_box(r["extra"]))))
    return reused


def measure_copies(processor: ItemProcessor, items: list[Prepared], first: dict[str, Prepared], rows: list[Row],
                   heats: dict[str, np.ndarray]) -> list[dict]:
    """Own metrics of the batch's copies of a picture whose boxes or mask differ from the copy that was explained
    (``first``), on the maps in memory (``heats``: per method B×K×H×W, slot = image × K + k)."""
    measured: list[dict] = []
    for q in items:
        digest = truth_digest(q.truth)
        if q.sha256 is None or digest is None or q is first[q.sha256] or digest == truth_digest(first[q.sha256].truth):
            continue
        truth = processor._ground_truth(q)
        for r in (r for r in rows if r.sha256 == q.sha256):
            heat = heats[r.method].reshape(-1, *heats[r.method].shape[-2:])[r.slot]
            measured.append(_own(q.item.id, r.method, r.class_id, truth.metrics(heat, _found_box(r.extra))))
    return measured
