"""Drift between a schedule's runs: a schedule with ``drift_thresholds`` in, its ``drift`` verdict out.

When a run of such a schedule has finished, its maps are compared with those of the schedule's previous finished
run (the baseline: storage/run_comparison.py, images matched by content) and the summary is kept on the schedule
with ``flagged`` and the reasons: mean Spearman of the maps below ``min_spearman``, or a larger share of the common
images than ``max_changed`` changing their top-1 class. The finished run then becomes the baseline of the next.
A cancelled run is never a baseline. Beat does this at every tick, before it fires due runs; no torch is needed.

Incremental runs under unchanged settings reuse the previous results, so their maps compare equal (Spearman 1);
a new model (weights, layer, preprocessing) re-explains every image and is what the comparison measures.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import Row, or_, select, update
from sqlalchemy.engine import Engine

from salient_maps.storage.database import Schedule
from salient_maps.storage.settings import Settings

from .jobs import get_job

if TYPE_CHECKING:  # the map readers load NumPy: imported where drift is checked, not by every `salient` command
    from salient_maps.storage.maps import MapReader

log = logging.getLogger(__name__)
# Maps of one model on the same images correlate at 1; a retrained or replaced model's CAMs fall well below 0.8 on
# most images, while noise from a re-run on other hardware stays above 0.99. One image in twenty changing its
# top-1 class is a change a reviewer wants to hear of.
DEFAULT_THRESHOLDS = {"min_spearman": 0.8, "max_changed": 0.05}


def thresholds(min_spearman: float | None, max_changed: float | None, enabled: bool) -> dict | None:
    """The stored ``drift_thresholds``: None unless asked for (either threshold given counts as asking)."""
    if not enabled and min_spearman is None and max_changed is None:
        return None
    chosen = {"min_spearman": min_spearman, "max_changed": max_changed}
    return {k: DEFAULT_THRESHOLDS[k] if v is None else v for k, v in chosen.items()}


def verdict(summary: dict, limits: dict) -> dict:
    """A comparison summary with ``changed_share``, ``flagged`` and the ``reasons`` it is flagged for."""
    images = summary["images"]
    share = summary["predictions_changed"] / images if images else None
    reasons = []
    spearman = summary["mean_spearman"]
    if spearman is not None and spearman < limits["min_spearman"]:
        reasons.append(f"mean spearman {spearman:.3f} < {limits['min_spearman']}")
    if share is not None and share > limits["max_changed"]:
        reasons.append(f"{summary['predictions_changed']} of {images} predictions changed "
                       f"({share:.1%} > {limits['max_changed']:.1%})")
    return {**summary, "changed_share": share, "flagged": bool(reasons), "reasons": reasons}


def _waiting(db: Engine) -> list[Row]:
    """Schedules that compare runs and have a last job not yet taken as the baseline."""
    with db.connect() as conn:
        return list(conn.execute(select(Schedule.__table__).where(
            Schedule.drift_thresholds.is_not(None), Schedule.last_job_id.is_not(None),
            or_(Schedule.baseline_job_id.is_(None), Schedule.baseline_job_id != Schedule.last_job_id))).all())


def check_drift(db: Engine, settings: Settings, reader: MapReader | None = None) -> list[int]:
    """Compare each finished last run with its baseline; returns the ids of the schedules given a new verdict."""
    from salient_maps.storage.maps import MapReader
    from salient_maps.storage.run_comparison import comparison_summary

    judged = []
    for schedule in _waiting(db):
        if not schedule.drift_thresholds:  # a JSON null written by hand or by an older salient
            continue
        try:
            job = get_job(db, schedule.last_job_id)
        except LookupError:
            continue
        if not job.is_over or job.status != "finished":
            continue  # still running, or cancelled: not a run to compare or to compare with
        drift: dict[str, Any] | None = schedule.drift
        if schedule.baseline_job_id is not None:
            try:
                reader = reader or MapReader.for_settings(settings)
                with db.connect() as conn:
                    summary = comparison_summary(conn, reader, schedule.baseline_job_id, job.id)
            except Exception as exc:  # the store may be down: the next tick tries again
                log.error("schedule %s: comparing job %s with %s failed: %s: %s", schedule.id, job.id,
                          schedule.baseline_job_id, type(exc).__name__, exc)
                continue
            drift = verdict(summary, schedule.drift_thresholds)
            if drift["flagged"]:
                log.warning("schedule %s: drift from job %s to %s: %s", schedule.id, schedule.baseline_job_id,
                            job.id, "; ".join(drift["reasons"]))
        with db.begin() as conn:  # compare-and-set: of two beats judging one run, one writes
            won = conn.execute(update(Schedule).where(
                Schedule.id == schedule.id, Schedule.last_job_id == job.id,
                Schedule.baseline_job_id.is_(None) if schedule.baseline_job_id is None
                else Schedule.baseline_job_id == schedule.baseline_job_id)
                .values(baseline_job_id=job.id, drift=drift)).rowcount == 1
        if won and drift is not schedule.drift:
            judged.append(schedule.id)
    return judged


def describe(drift: dict | None, limits: dict | None) -> str:
    """``schedule list``'s drift column."""
    if limits is None:
        return "drift not watched"
    if drift is None:
        return "drift: no comparison yet (after two finished runs)"
    numbers = (f"mean spearman {'-' if drift['mean_spearman'] is None else format(drift['mean_spearman'], '.3f')}, "
               f"{drift['predictions_changed']} of {drift['images']} predictions changed")
    if drift["flagged"]:
        return f"DRIFT job {drift['job_a']} → {drift['job_b']}: {'; '.join(drift['reasons'])}"
    return f"no drift job {drift['job_a']} → {drift['job_b']} ({numbers})"
