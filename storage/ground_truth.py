"""Each job's localisation metrics against its own ground truth, in SQL: column expressions for queries that join a
job's items (``Item``) with their explanations (``Explanation``) and, by ``with_own_metrics``, ``ItemMetrics``.

An explanation row is shared by every job that explains the same image under the same settings (the map depends on
nothing else), but ``energy_in_box``, ``pointing_game`` and ``localization_iou`` depend on the item's boxes and mask
too. The row keeps the metrics measured against the ground truth of the item that was explained first, and that
ground truth's digest (``truth_digest``, storage/sources.py). An item of another job reads them only when its own
digest is the same; where it differs the worker has measured them again from the stored map into ``item_metrics``
(workers/reused_truth.py), and those win. A row without a digest had no boxes or mask (its metrics are null), or
was made before digests were kept (revision 0008), when its metrics are the only ones there are.
"""

from __future__ import annotations

from sqlalchemy import and_, case, or_

from .database import Explanation, Item, ItemMetrics

OWN_METRICS = ("energy_in_box", "pointing_game", "localization_iou")


def with_own_metrics(query):
    """``query`` (joining Item and Explanation) outer-joined with the items' own measurements."""
    return query.outerjoin(ItemMetrics, and_(ItemMetrics.item_id == Item.id, ItemMetrics.method == Explanation.method,
                                             ItemMetrics.class_id == Explanation.class_id))


def own_metric(name: str):
    """The metric ``name`` of an item's explanation against the item's own ground truth (null where it has none)."""
    if name not in OWN_METRICS:
        return getattr(Explanation, name)  # border_energy: the map's alone
    shared_truth = or_(Explanation.truth_digest.is_(None), Explanation.truth_digest == Item.truth_digest)
    return case((ItemMetrics.item_id.is_not(None), getattr(ItemMetrics, name)),
                (shared_truth, getattr(Explanation, name)), else_=None)
