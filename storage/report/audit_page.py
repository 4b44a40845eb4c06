"""The report's audit page (``audit.html``): a job's accuracy, per-class means of the localisation metrics and its
"right for the wrong reason" suspects with their overlays, from the SQL summaries of storage/audits.py."""

from __future__ import annotations

from html import escape

from salient_maps.storage.audits import METRIC_COLUMNS, audit_job, suspects

SUSPECTS = 50  # listed on the page; `salient audit --format jsonl` gives them all


def audit_page(conn, job, draw, style: dict | None, css: str, csp_style: str) -> str:
    """The page's HTML; ``draw`` (the report's picture drawer) renders each suspect's overlay."""
    summary = audit_job(conn, job.id)
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
    for n, record in enumerate(suspects(conn, job.id, summary.ranked_by, limit=SUSPECTS), 1):
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
