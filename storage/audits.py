"""Audits of a job against its ground truth, summarised in SQL: a job id in; accuracy, per-class means of every
localisation metric, and the "right for the wrong reason" ranking out.

The suspects are the correct predictions (top-1 == label, the explanation of that class) whose map puts the least
mass on the object (lowest ``energy_in_box``); a job without boxes or masks ranks its top-1 explanations by the most
mass in the image's border instead (highest ``border_energy``). Nothing here loads a map: the metrics are columns
of the explanation rows (workers/localization_metrics.py computes them while the map is in memory), read against
each item's own ground truth (storage/ground_truth.py: a rerun with other boxes has its own numbers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from sqlalchemy import and_, case, func, select

from .database import Explanation, Item, Shard
from .ground_truth import own_metric, with_own_metrics
from .results import IOU_CORRECT, find_job, result_settings

METRIC_COLUMNS = ("pointing_game", "energy_in_box", "localization_iou", "border_energy")


@dataclass
class Audit:
    job_id: str
    images: int  # items explained (done or skipped as already explained)
    labelled: int  # of them, with a label and a prediction
    correct: int
    classes: list[dict]  # per method and class: count, the mean of every metric, localisation accuracy
    ranked_by: str  # energy_in_box (lowest first) or border_energy (highest first)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None


def _scoped(query, job, settings_id: int):
    """``query`` over the job's explanations: its explained items joined with the rows of its settings and with
    their own ground-truth measurements."""
    explained = and_(Explanation.sha256 == Item.sha256, Explanation.settings_id == settings_id)
    return with_own_metrics(query.select_from(Item).join(Explanation, explained)).where(
        Item.job_id == job.id, Item.status.in_(("done", "skipped")))


def audit_job(conn, job_id: str | None) -> Audit:
    job = find_job(conn, job_id)
    shared = result_settings(conn, job)
    settings_id = shared.id if shared is not None else -1
    images, labelled, correct = conn.execute(
        select(func.count(), func.count(Item.label).filter(Item.predicted.is_not(None)),
               func.count().filter(Item.predicted == Item.label))
        .where(Item.job_id == job.id, Item.status.in_(("done", "skipped")))).one()
    means = [func.avg(own_metric(name)).label(name) for name in METRIC_COLUMNS]
    iou = own_metric("localization_iou")
    rows = conn.execute(_scoped(
        select(Explanation.method, Explanation.class_id, func.count().label("explanations"), *means,
               func.avg(case((iou >= IOU_CORRECT, 1.0), (iou.is_not(None), 0.0))).label("localization_correct")),
        job, settings_id)
        .group_by(Explanation.method, Explanation.class_id)
        .order_by(Explanation.method, Explanation.class_id)).mappings().all()
    names = shared.class_names if shared is not None else []
    classes = [dict(row, class_name=names[row["class_id"]] if row["class_id"] < len(names) else None) for row in rows]
    with_boxes = conn.execute(_scoped(select(func.count()), job, settings_id)
                              .where(own_metric("energy_in_box").is_not(None))).scalar()
    return Audit(job.id, images, labelled, correct, classes, "energy_in_box" if with_boxes else "border_energy")


def suspects(conn, job_id: str, ranked_by: str, *, method: str | None = None, class_id: int | None = None,
             limit: int | None = None) -> Iterator[dict]:
    """Right for the wrong reason, best suspect first: one record per image and method (``uri``, ``sha256``,
    ``class_id``, ``method``, the ranking metric, and ``shard`` + ``slot`` where its map lies). With labels: the
    correct predictions' explanations of their class; without: the top-1 explanations."""
    job = find_job(conn, job_id)
    shared = result_settings(conn, job)
    settings_id = shared.id if shared is not None else -1
    metric = own_metric(ranked_by)
    labelled = conn.execute(select(func.count(Item.label)).where(Item.job_id == job.id)).scalar()
    chosen = (and_(Item.predicted == Item.label, Explanation.class_id == Item.label) if labelled
              else Explanation.rank == 1)
    query = (_scoped(select(Item.uri, Item.sha256, Explanation.class_id, Explanation.method, metric.label(ranked_by),
                            Shard.key.label("shard"), Explanation.slot), job, settings_id)
             .join(Shard, Shard.id == Explanation.shard_id)
             .where(chosen, metric.is_not(None))
             .order_by(metric.asc() if ranked_by == "energy_in_box" else metric.desc(), Item.id, Explanation.method))
    if method is not None:
        query = query.where(Explanation.method == method)
    if class_id is not None:
        query = query.where(Explanation.class_id == class_id)
    if limit is not None:
        query = query.limit(limit)
    for row in conn.execution_options(yield_per=1000).execute(query).mappings():
        yield dict(row)
