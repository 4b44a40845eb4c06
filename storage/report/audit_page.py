"""The report's audit page (``audit.html``): a job's accuracy, per-class means of the localisation metrics and its
"right for the wrong reason" suspects with their overlays.

The numbers are storage/audits.py's (``audit_job``, ``suspects``: the same definitions, each job's own ground
truth), computed from the report's temporary tables (summary.py) rather than by joining the job's items and
explanations three times more: at 10^6 images that join is most of a report's time. tests/test_report.py checks
the page against storage/audits.py."""

from __future__ import annotations

from html import escape

from sqlalchemy import and_, case, func, select

from salient_maps.storage.audits import METRIC_COLUMNS, Audit
from salient_maps.storage.database import Shard
from salient_maps.storage.results import IOU_CORRECT

from .summary import EXPLAINED, ITEMS, ROWS, Summary

SUSPECTS = 50  # listed on the page; `salient audit --format jsonl` gives them all


def audit_of(conn, report: Summary) -> Audit:
    """``audit_job``'s summary, from the report's tables."""
    i, r = ITEMS.c, ROWS.c
    images, labelled, correct = conn.execute(
        select(func.count(), func.count(i.label).filter(i.predicted.is_not(None)),
               func.count().filter(i.predicted == i.label)).where(i.status.in_(EXPLAINED))).one()
    means = [func.avg(r[name]).label(name) for name in METRIC_COLUMNS]
    located = func.avg(case((r.localization_iou >= IOU_CORRECT, 1.0), (r.localization_iou.is_not(None), 0.0)))
    rows = conn.execute(select(r.method, r.class_id, func.count().label("explanations"), *means,
                               located.label("localization_correct"))
                        .group_by(r.method, r.class_id).order_by(r.method, r.class_id)).mappings().all()
    names = report.class_names
    classes = [dict(row, class_name=names[row["class_id"]] if 0 <= row["class_id"] < len(names) else None)
               for row in rows]
    with_boxes = conn.execute(select(func.count()).where(r.energy_in_box.is_not(None))).scalar()
    return Audit(report.job.id, images, labelled, correct, classes, "energy_in_box" if with_boxes else "border_energy")


def suspects_of(conn, ranked_by: str, limit: int) -> list[dict]:
    """``suspects``' first ``limit``, from the report's tables."""
    i, r = ITEMS.c, ROWS.c
    metric = r[ranked_by]
    labelled = conn.execute(select(func.count(i.label))).scalar()
    chosen = and_(i.predicted == i.label, r.class_id == i.label) if labelled else r.rank == 1
    query = (select(i.uri, i.sha256, r.class_id, r.method, metric.label(ranked_by), Shard.key.label("shard"), r.slot)
             .select_from(ROWS).join(ITEMS, i.n == r.n).join(Shard, Shard.id == r.shard_id)
             .where(chosen, metric.is_not(None))
             .order_by(metric.asc() if ranked_by == "energy_in_box" else metric.desc(), r.n, r.method).limit(limit))
    return [dict(row) for row in conn.execute(query).mappings()]


def audit_page(conn, report: Summary, draw, style: dict | None, css: str, csp_style: str) -> str:
    """The page's HTML; ``draw`` (the report's picture drawer) renders each suspect's overlay."""
    job = report.job
    summary = audit_of(conn, report)
    columns = (*METRIC_COLUMNS, "localization_correct")
    accuracy = (f"accuracy {summary.accuracy:.3f} ({summary.correct} of {summary.labelled} labelled images)"
                if summary.labelled else "no labels in this job")
    head = "".join(f"<th>{escape(c)}</th>" for c in ("method", "class", "explanations", *columns))
    body = "".join(
        "<tr>" + f"<td>{escape(row['method'])}</td><td>{escape(str(row['class_name'] or row['class_id']))}</td>"
        f"<td>{row['explanations']}</td>" + "".join(
            f"<td>{'-' if row[c] is None else f'{row[c]:.3f}'}</td>" for c in columns) + "</tr>"
        for row in summary.classes)
    order = "lowest" if summary.ranked_by == "energy_in_box" else "highest"
    cards = []
    for n, record in enumerate(suspects_of(conn, summary.ranked_by, SUSPECTS), 1):
        picture = draw.overlay(record, style)
        image = f'<img src="{picture}" alt="" width="160">' if picture else ""
        name = record["uri"].rstrip("/").rsplit("/", 1)[-1]
        cards.append(f"<figure>{image}<figcaption>{n}. {escape(name)} · {escape(record['method'])} · class "
                     f"{record['class_id']} · {summary.ranked_by} {record[summary.ranked_by]:.3f}"
                     "</figcaption></figure>")
    csp = f"default-src 'none'; img-src 'self' file: data:; style-src '{csp_style}'"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{escape(csp)}">
<title>salient audit · {escape(job.name or job.id)}</title>
<style>{css}</style></head>
<body>
<h1>salient audit</h1>
<p class="muted">job <code>{escape(job.id)}</code> · {summary.images} images explained · {escape(accuracy)} ·
<a href="index.html">report</a></p>
<h2>Per class</h2>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<h2>Right for the wrong reason</h2>
<p class="muted">Correct predictions ({order} {escape(summary.ranked_by)} first), the first {SUSPECTS}.</p>
<div id="suspects">{"".join(cards)}</div>
</body></html>
"""
