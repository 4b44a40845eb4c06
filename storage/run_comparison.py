"""Two jobs in (say last night's model and tonight's); per common image × method × class, how much the map moved.

Images are matched by content (sha256), explanations by method and class id. Each pair's maps are read from their
shards at the model's input size (storage/maps.py) and compared with ``spearman`` and ``top10_iou``
(storage/map_comparison.py); ``prediction_changed`` says whether the two models' top-1 class differs. The biggest
shifts come first: lowest ``top10_iou`` (where the most salient region went), then lowest ``spearman``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

from sqlalchemy import and_, func, select
from sqlalchemy.orm import aliased

from .database import Explanation, Item, Shard
from .map_comparison import spearman, top_fraction_iou
from .maps import MapReader
from .results import find_job, result_settings


@dataclass
class Comparison:
    job_a: str
    job_b: str
    images: int  # explained in both (same sha256)
    predictions_changed: int
    pairs: list[dict]  # biggest shift first

    def summary(self) -> dict:
        return _summary(self.job_a, self.job_b, self.images, self.predictions_changed, self.pairs)


def _summary(job_a: str, job_b: str, images: int, changed: int, pairs: Iterable[dict]) -> dict:
    """Counts and means over ``pairs``, consumed once (a stream holds no pair in memory)."""
    n, sums, counts = 0, {"spearman": 0.0, "top10_iou": 0.0}, {"spearman": 0, "top10_iou": 0}
    for pair in pairs:
        n += 1
        for name in sums:
            if pair[name] is not None:
                sums[name] += pair[name]
                counts[name] += 1

    def mean(name: str) -> float | None:
        return sums[name] / counts[name] if counts[name] else None

    return {"job_a": job_a, "job_b": job_b, "images": images, "pairs": n, "predictions_changed": changed,
            "mean_spearman": mean("spearman"), "mean_top10_iou": mean("top10_iou")}


def _predictions(conn, job) -> dict[str, int]:
    """Each explained image's top-1 class: the item's, else its rank-1 explanation's."""
    found = dict(conn.execute(select(Item.sha256, Item.predicted).where(
        Item.job_id == job.id, Item.status.in_(("done", "skipped")), Item.predicted.is_not(None))).all())
    shared = result_settings(conn, job)
    if shared is not None:
        for sha256, class_id in conn.execute(
                select(Explanation.sha256, Explanation.class_id).join(Item, Item.sha256 == Explanation.sha256)
                .where(Item.job_id == job.id, Explanation.settings_id == shared.id, Explanation.rank == 1)):
            found.setdefault(sha256, class_id)
    return found


def _shift(pair: dict) -> tuple:
    worst = 2.0  # a comparison that could not be made sorts last
    return (pair["top10_iou"] if pair["top10_iou"] is not None else worst,
            pair["spearman"] if pair["spearman"] is not None else worst, pair["uri"], pair["method"], pair["class_id"])


def compare_jobs(conn, reader: MapReader, job_a: str, job_b: str) -> Comparison:
    a, b = find_job(conn, job_a), find_job(conn, job_b)
    images, changed, pairs = _compared(conn, reader, a, b)
    return Comparison(a.id, b.id, images, changed, sorted(pairs, key=_shift))


def comparison_summary(conn, reader: MapReader, job_a: str, job_b: str) -> dict:
    """``compare_jobs(...).summary()`` with the pairs streamed, not kept: memory stays flat for any job size (what
    a schedule's drift check needs)."""
    a, b = find_job(conn, job_a), find_job(conn, job_b)
    images, changed, pairs = _compared(conn, reader, a, b)
    return _summary(a.id, b.id, images, changed, pairs)


def _compared(conn, reader: MapReader, a, b) -> tuple[int, int, Iterator[dict]]:
    """Images in common, predictions changed among them, and the pairs (in shard order, read as they come)."""
    settings_a, settings_b = result_settings(conn, a), result_settings(conn, b)
    predicted_a, predicted_b = _predictions(conn, a), _predictions(conn, b)
    common = set(predicted_a) & set(predicted_b)
    if settings_a is None or settings_b is None:
        return 0, 0, iter(())
    changed = sum(predicted_a[s] != predicted_b[s] for s in common)
    return len(common), changed, _pairs(conn, reader, a, b, settings_a, settings_b, predicted_a, predicted_b)


def _pairs(conn, reader: MapReader, a, b, settings_a, settings_b, predicted_a: dict, predicted_b: dict
           ) -> Iterator[dict]:
    ea, eb = aliased(Explanation), aliased(Explanation)
    sa, sb = aliased(Shard), aliased(Shard)
    items_b = select(Item.sha256).where(Item.job_id == b.id, Item.status.in_(("done", "skipped")))
    first_uri = (select(Item.sha256, func.min(Item.uri).label("uri"))  # one URI per picture of job A
                 .where(Item.job_id == a.id, Item.status.in_(("done", "skipped"))).group_by(Item.sha256)).subquery()
    rows = conn.execution_options(yield_per=1000).execute(
        select(first_uri.c.uri, ea.sha256, ea.method, ea.class_id, ea.slot.label("slot_a"), sa.key.label("shard_a"),
               eb.slot.label("slot_b"), sb.key.label("shard_b"))
        .join(ea, and_(ea.sha256 == first_uri.c.sha256, ea.settings_id == settings_a.id))
        .join(eb, and_(eb.sha256 == ea.sha256, eb.settings_id == settings_b.id, eb.method == ea.method,
                       eb.class_id == ea.class_id))
        .join(sa, sa.id == ea.shard_id).join(sb, sb.id == eb.shard_id)
        .where(ea.sha256.in_(items_b))
        .order_by(sa.key, ea.slot)).mappings()
    for row in rows:
        map_a = reader.map({"shard": row["shard_a"], "slot": row["slot_a"], "method": row["method"]})
        map_b = reader.map({"shard": row["shard_b"], "slot": row["slot_b"], "method": row["method"]})
        same = map_a.shape == map_b.shape  # models of different input sizes: no cell-by-cell comparison
        yield {"uri": row["uri"], "sha256": row["sha256"], "method": row["method"], "class_id": row["class_id"],
               "spearman": spearman(map_a, map_b) if same else None,
               "top10_iou": top_fraction_iou(map_a, map_b) if same else None,
               "prediction_changed": predicted_a.get(row["sha256"]) != predicted_b.get(row["sha256"])}
