"""``salient report``: one folder with a static HTML page about a job, readable without a server, from ten images
to 10^6.

In: a job in the database (and its shards). Out: ``index.html`` (the summary, metric plots and per-class mean maps,
drawn here from SQL aggregates: storage/report/summary.py; the gallery's controls and its first page), ``data/``
(the gallery's pages and each filter's list as script files the page loads on demand: pages.py), ``pictures/``
(thumbnails and overlays of the images the first pages show: pictures.py), ``class-maps/`` and ``audit.html``.
Memory stays flat while it builds: every pass streams rows and writes files as it goes. Light side: no torch.
Everything from the database or a file name is escaped, or reaches the page as JSON data.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass
from html import escape
from importlib.resources import files
from pathlib import Path

from sqlalchemy import func, select

from salient_maps.storage.database import Shard, connect
from salient_maps.storage.maps import MapReader
from salient_maps.storage.objects import LocalObjectStore, open_store
from salient_maps.storage.results import find_job
from salient_maps.storage.settings import Settings

from . import charts
from .audit_page import audit_page
from .pages import INDEX_CHUNK, PAGE_SIZE, SORTS, Views, write_pages
from .pictures import Pictures
from .summary import CLASS_TABLE_ROWS, CURVES, FAITHFULNESS, LOCALIZATION, ROWS, Summary, summarize

PICTURED_IMAGES = 500  # drawn in job order (the first five pages), besides each sort's first page
MAPS_PER_CLASS = 100  # a class's mean map averages at most this many rank-1 maps: the cost stays flat
METRIC_TITLES = {"deletion_auc": "deletion AUC (lower is better)", "insertion_auc": "insertion AUC (higher is better)",
                 "drop": "drop in confidence (lower is better)", "energy_in_box": "energy in box (higher is better)",
                 "border_energy": "border energy (lower is better)",
                 "localization_iou": "localisation IoU (higher is better)"}
SORT_LABELS = {"score": "score (high first)", "deletion_auc": "deletion AUC (low first)",
               "insertion_auc": "insertion AUC (high first)", "drop": "drop (low first)",
               "energy_in_box": "energy in box (low first)", "border_energy": "border energy (high first)",
               "localization_iou": "localisation IoU (high first)"}

__all__ = ["PAGE_SIZE", "ReportSummary", "build_report"]


@dataclass
class ReportSummary:
    path: Path  # the page, OUT/index.html
    job_id: str
    images: int
    explanations: int
    seconds: float
    phases: dict[str, float]  # seconds per step: summary, views, pages, audit, class maps, page
    cpu_phases: dict[str, float]  # this process's CPU seconds per step (SQLite's work included)


def build_report(settings: Settings, job_id: str | None, out_dir: Path | None = None,
                 copy: bool = False, pictured: int = PICTURED_IMAGES) -> ReportSummary:
    """Write the report of a job (default: the latest) into ``out_dir`` (default ``salient-report-<first 8
    characters of the job id>``); ``pictured``: how many images, in job order, get pictures."""
    start = time.perf_counter()
    cpu = time.process_time()
    phases: dict[str, float] = {}
    cpu_phases: dict[str, float] = {}

    def lap(name: str) -> None:
        phases[name] = round(time.perf_counter() - start - sum(phases.values()), 3)
        cpu_phases[name] = round(time.process_time() - cpu - sum(cpu_phases.values()), 3)

    store = open_store(settings.resolved_object_store_url)
    db = connect(settings.resolved_database_url)
    try:
        with db.connect() as conn:
            job = find_job(conn, job_id)
            out_dir = Path(out_dir or f"salient-report-{job.id[:8]}")
            data_dir = out_dir / "data"
            # A rebuild overwrites the files it needs; any others are never named by the new page.
            data_dir.mkdir(parents=True, exist_ok=True)
            summary = summarize(conn, job)
            lap("summary")
            style = summary.shared.overlay if summary.shared is not None else None
            draw = Pictures(store, out_dir, summary.methods, style,
                            copy=copy or not isinstance(store, LocalObjectStore))
            views = Views(conn, summary, data_dir)
            manifest = views.write_all()
            lap("views")
            first = write_pages(conn, summary, data_dir, draw, lambda n: n < pictured or n in views.first_pages)
            lap("pages")
            css = files(__package__).joinpath("report.css").read_text(encoding="utf-8")
            (out_dir / "audit.html").write_text(audit_page(conn, summary, draw, style, css, _sha256(css)),
                                                encoding="utf-8")
            lap("audit")
            class_maps = _write_class_maps(conn, summary, draw.reader, out_dir)
            lap("class maps")
    finally:
        db.dispose()
    (out_dir / "index.html").write_text(_page(summary, manifest, first, class_maps), encoding="utf-8")
    lap("page")
    return ReportSummary(out_dir / "index.html", job.id, sum(summary.statuses.values()), summary.explanations,
                         time.perf_counter() - start, phases, cpu_phases)


def _write_class_maps(conn, summary: Summary, reader: MapReader, out_dir: Path) -> dict[tuple[int, str], str]:
    """Mean rank-1 map per (predicted class, method) for the most frequent classes, as viridis PNGs: the first
    MAPS_PER_CLASS of each, chosen in one pass (a window function)."""
    folder = out_dir / "class-maps"
    folder.mkdir(exist_ok=True)
    classes = [c for c, _, _ in summary.predicted]
    if not classes:
        return {}
    r = ROWS.c
    numbered = select(r.class_id, r.method, r.slot, r.shard_id, func.row_number().over(
        partition_by=(r.class_id, r.method), order_by=r.n).label("k")).where(
        r.rank == 1, r.class_id.in_(classes)).subquery()
    chosen = (select(numbered.c.class_id, numbered.c.method, numbered.c.slot, Shard.key)
              .join(Shard, Shard.id == numbered.c.shard_id).where(numbered.c.k <= MAPS_PER_CLASS)
              .order_by(numbered.c.class_id, numbered.c.method, numbered.c.k))
    sums: dict[tuple[int, str], list] = {}
    for c, method, slot, key in conn.execute(chosen):
        try:
            heat = reader.map({"shard": key, "slot": slot, "method": method}, size="layer")
        except Exception:  # a missing or unreadable shard leaves the cell empty
            continue
        total = sums.setdefault((c, method), [None, 0])
        if total[0] is not None and heat.shape != total[0].shape:
            continue
        total[0] = heat if total[0] is None else total[0] + heat
        total[1] += 1
    written = {}
    method_index = {m: i for i, m in enumerate(summary.methods)}
    for (c, method), (total, count) in sums.items():
        name = f"{int(c)}-{method_index[method]}.png"
        (folder / name).write_bytes(charts.heat_png(total / count))
        written[(c, method)] = f"class-maps/{name}"
    return written


def _page(summary: Summary, views: dict, first: dict, class_maps: dict[tuple[int, str], str]) -> str:
    css = files(__package__).joinpath("report.css").read_text(encoding="utf-8")
    js = files(__package__).joinpath("report.js").read_text(encoding="utf-8")
    job = summary.job
    names = summary.class_names
    classes = {}
    for key in views:
        if key.startswith("class-"):
            c = int(key.removeprefix("class-"))
            classes[c] = names[c] if 0 <= c < len(names) else f"class {c}"
    sorts = {m: [k for k in SORTS if f"sort-{i}-{k}" in views] for i, m in enumerate(summary.methods)}
    payload = {"methods": summary.methods, "classes": classes, "pageSize": PAGE_SIZE, "chunk": INDEX_CHUNK,
               "images": sum(summary.statuses.values()), "views": views, "first": first}
    # Inside <script> only "</" could end the element early; \u003c keeps the JSON identical.
    embedded = json.dumps(payload, separators=(",", ":")).replace("<", "\\u003c")
    # The data files are scripts of this folder: 'self' over http, file: when opened from disk.
    csp = (f"default-src 'none'; img-src 'self' file: data:; script-src '{_sha256(js)}' 'self' file:; "
           f"style-src '{_sha256(css)}'")
    status_options = "".join(f'<option value="{s}">{s}</option>' for s in ("done", "failed", "skipped", "pending")
                             if summary.statuses.get(s))
    sort_keys = [k for k in SORTS if any(k in keys for keys in sorts.values())]
    sort_options = "".join(f'<option value="{k}">{escape(SORT_LABELS[k])}</option>' for k in sort_keys)
    correct = ('<label>prediction <select id="f-correct"><option value="">all</option>'
               '<option value="1">correct</option><option value="0">wrong</option></select></label>'
               if summary.labelled else "")
    named = f" · {escape(job.name)}" if job.name else ""
    pager = ('<button id="prev" type="button">&larr; previous</button><span id="page"></span>'
             '<button id="next" type="button">next &rarr;</button>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{escape(csp)}">
<link rel="icon" href="data:,">
<title>salient report · {escape(job.name or job.id)}</title>
<style>{css}</style></head>
<body>
<h1>salient report</h1>
<p class="muted">job <code>{escape(job.id)}</code>{named} · {escape(job.status)} · <a href="audit.html">audit</a></p>
{_summary_html(summary)}
{_metrics_html(summary)}
{_classes_html(summary, class_maps)}
{_failures_html(summary)}
<h2 id="gallery-title">Gallery</h2>
<div class="controls">
<label>status <select id="f-status"><option value="">all</option>{status_options}</select></label>
<label>method <select id="f-method"><option value="-1">all</option></select></label>
<label>class <select id="f-class"><option value="-1">all</option></select></label>
{correct}
<label>sort <select id="f-sort"><option value="order">job order</option>{sort_options}</select></label>
<label>from <input id="f-min" type="number" step="any" size="6" disabled></label>
<label>to <input id="f-max" type="number" step="any" size="6" disabled></label>
<span id="count" data-count="0"></span>
{pager}
</div>
<div id="gallery"></div>
<script type="application/json" id="report-data">{embedded}</script>
<script>{js}</script>
</body></html>
"""


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode()


def _summary_html(summary: Summary) -> str:
    job = summary.job
    settings = job.settings or {}
    definitions = settings.get("method_definitions") or {}
    rows = [("model", f"{settings.get('model', '?')} (weights {settings.get('weights') or 'bundled / seeded'})"),
            ("layer", settings.get("layer")), ("targets", json.dumps(settings.get("targets"))),
            ("precision", settings.get("precision")),
            # `salient run` records method_options; a queued job's spec carries all options as options
            ("options", json.dumps(settings.get("method_options") or settings.get("options") or {}, sort_keys=True)),
            ("metrics", json.dumps(settings.get("metrics"), sort_keys=True) if settings.get("metrics")
             else "not computed"),
            ("overlay", json.dumps(settings.get("overlay") or {}, sort_keys=True)),
            ("versions", ", ".join(f"{k} {v}" for k, v in (settings.get("versions") or {}).items()) or "not recorded"),
            ("settings digest", job.settings_digest)]
    pending = max(0, job.total - job.done - job.failed - job.skipped)
    counts = (f"{job.total} images: {job.done} done, {job.failed} failed, {job.skipped} skipped"
              f"{f', {pending} pending' if pending else ''}; {summary.explanations} explanations")
    rows.append(("counts", counts))
    rows.append(("throughput", _throughput(summary)))
    body = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in rows)
    params = summary.shared.methods if summary.shared is not None else {}
    methods = "".join(
        f"<tr><td><code>{escape(m)}</code></td>"
        f"<td class='mono'>{escape(json.dumps(params.get(m, {}), sort_keys=True))}</td>"
        f"<td>{escape(definitions.get(m, ''))}</td></tr>"
        for m in summary.methods)
    return (f"<h2>Job</h2><table>{body}</table><h2>Methods</h2>"
            f"<table><tr><th>method</th><th>params</th><th>definition</th></tr>{methods}</table>")


def _throughput(summary: Summary) -> str:
    job = summary.job
    parts = []
    if job.finished_at and job.created_at:
        wall = (job.finished_at - job.created_at).total_seconds()
        if wall > 0:
            parts.append(f"{wall:.1f} s wall clock, {(job.done + job.failed + job.skipped) / wall:.2f} images/s")
    ended = sum(n for s, n in summary.statuses.items() if s != "pending")
    if ended and summary.item_seconds:
        parts.append(f"{summary.item_seconds / ended:.3f} s per image of worker time")
    return "; ".join(parts) or "unknown (job not finished)"


def _legend(methods: list[str]) -> str:
    # Colour swatches as SVG: the page's CSP allows no inline style attributes.
    return "<p class='legend'>" + "".join(
        f"<span><svg width='10' height='10'><rect width='10' height='10' fill='{charts.colour(i)}'/></svg> "
        f"{escape(m)}</span>" for i, m in enumerate(methods)) + "</p>"


def _mean_cell(summary: Summary, method: str, name: str, scale: float = 1.0, digits: int = 3) -> str:
    mean, n = summary.means[method][name]
    return f"<td class='num'>{'–' if not n else f'{scale * mean:.{digits}f}'}</td>"


def _metrics_html(summary: Summary) -> str:
    faithful = any(summary.means[m][k][1] for m in summary.methods for k in FAITHFULNESS)
    located = any(summary.means[m][k][1] for m in summary.methods for k in LOCALIZATION)
    if not faithful and not located:
        return ("<h2>Faithfulness</h2>"
                "<p class='muted'>No metrics in this job (run with --metrics deletion,insertion,drop).</p>")
    parts = []
    if faithful:
        rows = []
        for m in summary.methods:
            increase = summary.increase.get(m)
            n = max(summary.means[m][k][1] for k in FAITHFULNESS)
            rows.append(f"<tr><td><code>{escape(m)}</code></td>" + _mean_cell(summary, m, "deletion_auc")
                        + _mean_cell(summary, m, "insertion_auc") + _mean_cell(summary, m, "drop", 100, 1)
                        + f"<td class='num'>{'–' if increase is None else f'{100 * increase:.1f}'}</td>"
                        + f"<td class='num'>{n}</td></tr>")
        parts.append("<h2>Faithfulness</h2><table><tr><th>method</th><th class='num'>mean deletion AUC ↓</th>"
                     "<th class='num'>mean insertion AUC ↑</th><th class='num'>Average Drop % ↓</th>"
                     "<th class='num'>Increase in Confidence % ↑</th><th class='num'>explanations</th></tr>"
                     + "".join(rows) + "</table>")
    if located:
        head = "".join(f"<th class='num'>mean {escape(k)}</th>" for k in LOCALIZATION)
        rows = [f"<tr><td><code>{escape(m)}</code></td>" + "".join(_mean_cell(summary, m, k) for k in LOCALIZATION)
                + "</tr>" for m in summary.methods]
        parts.append(f"<h2>Localisation</h2><table><tr><th>method</th>{head}</tr>{''.join(rows)}</table>")
    plots = [charts.histogram_svg(summary.histograms[k], METRIC_TITLES[k]) for k in METRIC_TITLES
             if k in summary.histograms]
    for curve in CURVES:
        if summary.curves.get(curve):
            plots.append(charts.curves_svg(summary.curves[curve], f"mean {curve.split('_')[0]} curve"))
    return f"{''.join(parts)}{_legend(summary.methods)}<div class='charts'>{''.join(plots)}</div>"


def _classes_html(summary: Summary, class_maps: dict[tuple[int, str], str]) -> str:
    if not summary.predicted:
        return ""
    names = summary.class_names
    head = "".join(f"<th>mean map: {escape(m)}</th>" for m in summary.methods)
    rows = []
    for c, count, score in summary.predicted:
        maps = "".join(
            f"<td><img class='classmap' src='{escape(class_maps[(c, m)])}' alt='mean {escape(m)} map'></td>"
            if (c, m) in class_maps else "<td class='muted'>–</td>" for m in summary.methods)
        name = names[c] if 0 <= c < len(names) else f"class {c}"
        rows.append(f"<tr><td>{escape(name)}</td><td class='num'>{count}</td>"
                    f"<td class='num'>{score:.3f}</td>{maps}</tr>")
    more = summary.predicted_classes - CLASS_TABLE_ROWS
    note = f"<p class='muted'>… and {more} more classes.</p>" if more > 0 else ""
    return (f"<h2>Predicted classes</h2><p class='muted'>Top-1 class of each image; mean of up to "
            f"{MAPS_PER_CLASS} of its maps per method.</p><table><tr><th>class</th><th class='num'>images</th>"
            f"<th class='num'>mean score</th>{head}</tr>{''.join(rows)}</table>{note}")


def _failures_html(summary: Summary) -> str:
    if not summary.failures:
        return ""
    rows = "".join(f"<tr><td class='num'>{n}</td><td class='mono'>{escape(reason)}</td></tr>"
                   for reason, n in summary.failures)
    return (f"<h2>Failures</h2><table><tr><th class='num'>images</th><th>reason</th></tr>{rows}</table>"
            f"<p class='muted'>Filter the gallery by status “failed” for every file.</p>")
