"""``salient report``: one folder with a static HTML page about a job, readable without a server.

The page holds the job summary, metric plots and per-class mean maps (drawn here), and a gallery
rendered in the browser from embedded JSON, 100 images a page. Thumbnails and overlays are drawn from the
result shards into ``pictures/`` (overlays need OpenCV); the raw maps link to a local store's shards.
Light side: no torch. Everything from the database or a file name is escaped.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from html import escape
from importlib.resources import files
from pathlib import Path
from urllib.parse import quote

import numpy as np

from salient_maps.storage.database import connect
from salient_maps.storage.maps import MapReader
from salient_maps.storage.objects import LocalObjectStore, ObjectStore, open_store
from salient_maps.storage.results import find_job
from salient_maps.storage.settings import Settings

from . import charts
from .audit_page import audit_page
from .collect import CURVES, METRICS, Collected, collect

PAGE_SIZE = 100
CLASS_TABLE_ROWS = 50
METRIC_TITLES = {"deletion_auc": "deletion AUC (lower is better)", "insertion_auc": "insertion AUC (higher is better)",
                 "drop": "drop in confidence (lower is better)"}


@dataclass
class ReportSummary:
    path: Path  # the page, OUT/index.html
    job_id: str
    images: int
    explanations: int
    seconds: float


def build_report(settings: Settings, job_id: str | None, out_dir: Path | None = None,
                 copy: bool = False) -> ReportSummary:
    """Write ``out_dir/index.html`` (plus ``class-maps/`` and, when copying, ``objects/``) for a job
    (default: the latest); ``out_dir`` defaults to ``salient-report-<first 8 characters of the job id>``."""
    start = time.perf_counter()
    store = open_store(settings.resolved_object_store_url)
    db = connect(settings.resolved_database_url)
    try:
        with db.connect() as conn:
            job = find_job(conn, job_id)
            out_dir = Path(out_dir or f"salient-report-{job.id[:8]}")
            out_dir.mkdir(parents=True, exist_ok=True)
            draw = _Pictures(store, out_dir, copy=copy or not isinstance(store, LocalObjectStore))
            data = collect(conn, job, draw)
            css = files(__package__).joinpath("report.css").read_text(encoding="utf-8")
            audit = audit_page(conn, job, draw, next(iter(data.overlay_styles.values()), None), css, _sha256(css))
            (out_dir / "audit.html").write_text(audit, encoding="utf-8")
    finally:
        db.dispose()
    class_maps = _write_class_maps(data, draw.reader, out_dir)
    page = _page(data, class_maps)
    (out_dir / "index.html").write_text(page, encoding="utf-8")
    explanations = sum(len(card["x"]) for card in data.cards)
    return ReportSummary(out_dir / "index.html", job.id, len(data.cards), explanations, time.perf_counter() - start)


class _Pictures:
    """Draws each record's thumbnail and overlay from its shard into ``pictures/`` (overlays need OpenCV;
    without it the gallery shows thumbnails only) and links a local store's shards (the raw maps)."""

    def __init__(self, store: ObjectStore, out_dir: Path, copy: bool):
        self.reader = MapReader(store)
        self.store, self.out_dir = store, out_dir
        self.folder = out_dir / "pictures"
        self.folder.mkdir(exist_ok=True)
        self.link_shards = isinstance(store, LocalObjectStore) and not copy
        if isinstance(store, LocalObjectStore) and not copy:
            self.root_from_report = Path(os.path.relpath(store.root.resolve(), out_dir.resolve())).as_posix()
        self.styles: dict[str, object] = {}
        try:
            import cv2  # noqa: F401
            self.can_draw = True
        except ModuleNotFoundError:
            self.can_draw = False

    def _safely(self, name: str, render) -> str | None:
        target = self.folder / name
        if not target.exists():
            try:
                data = render()
            except Exception:  # a missing or unreadable shard: the page shows a gap, not a crash
                return None
            if data is None:
                return None
            target.write_bytes(data)
        return quote(f"pictures/{name}")

    def thumbnail(self, record: dict) -> str | None:
        return self._safely(f"{record['sha256'][:24]}.jpg", lambda: self.reader.thumbnail(record))

    def overlay(self, record: dict, style: dict | None = None) -> str | None:
        if not self.can_draw:
            return None
        from salient_maps.storage.overlays import OverlayStyle

        key = json.dumps(style or {}, sort_keys=True)
        if key not in self.styles:
            self.styles[key] = OverlayStyle(**(style or {}))
        name = f"{record['sha256'][:24]}-{record['method']}-{record['class_id']}.png"
        return self._safely(name, lambda: self.reader.overlay_png(record, self.styles[key]))

    def shard(self, key: str | None) -> str | None:
        if not key or not self.link_shards or ".." in key.split("/"):
            return None
        return quote(f"{self.root_from_report}/{key}")


def _write_class_maps(data: Collected, reader: MapReader, out_dir: Path) -> dict[tuple[int, str], str]:
    """Mean rank-1 map per (predicted class, method) for the most frequent classes, as viridis PNGs."""
    folder = out_dir / "class-maps"
    folder.mkdir(exist_ok=True)
    written = {}
    top = [c for c, _ in data.predicted.most_common(CLASS_TABLE_ROWS)]
    for c in top:
        for m, method in enumerate(data.methods):
            total: np.ndarray | None = None
            count = 0
            for record in data.class_maps.get((c, method), []):
                try:
                    heat = reader.map(record).astype(np.float64)
                except (OSError, ValueError, KeyError, LookupError):
                    continue
                if total is not None and heat.shape != total.shape:
                    continue
                total = heat if total is None else total + heat
                count += 1
            if total is not None:
                name = f"{c}-{m}.png"
                (folder / name).write_bytes(charts.heat_png(total / count))
                written[(c, method)] = f"class-maps/{name}"
    return written


def _page(data: Collected, class_maps: dict[tuple[int, str], str]) -> str:
    css = files(__package__).joinpath("report.css").read_text(encoding="utf-8")
    js = files(__package__).joinpath("report.js").read_text(encoding="utf-8")
    job = data.job
    payload = {"methods": data.methods, "classes": data.classes, "cards": data.cards, "pageSize": PAGE_SIZE}
    # Inside <script> only "</" could end the element early; \u003c keeps the JSON identical.
    embedded = json.dumps(payload, separators=(",", ":")).replace("<", "\\u003c")
    csp = (f"default-src 'none'; img-src 'self' file: data:; script-src '{_sha256(js)}'; "
           f"style-src '{_sha256(css)}'")
    status_options = "".join(f'<option value="{s}">{s}</option>' for s in ("done", "failed", "skipped", "pending"))
    sort_options = "".join(f'<option value="{v}">{escape(label)}</option>' for v, label in (
        ("order", "job order"), ("score", "score (high first)"), ("deletion_auc", "deletion AUC (low first)"),
        ("insertion_auc", "insertion AUC (high first)"), ("drop", "drop (low first)")))
    named = f" · {escape(job.name)}" if job.name else ""
    pager = ('<button id="prev" type="button">&larr; previous</button><span id="page"></span>'
             '<button id="next" type="button">next &rarr;</button>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{escape(csp)}">
<title>salient report · {escape(job.name or job.id)}</title>
<style>{css}</style></head>
<body>
<h1>salient report</h1>
<p class="muted">job <code>{escape(job.id)}</code>{named} · {escape(job.status)} · <a href="audit.html">audit</a></p>
{_summary_html(data)}
{_metrics_html(data)}
{_classes_html(data, class_maps)}
{_failures_html(data)}
<h2 id="gallery-title">Gallery</h2>
<div class="controls">
<label>status <select id="f-status"><option value="">all</option>{status_options}</select></label>
<label>method <select id="f-method"><option value="-1">all</option></select></label>
<label>class <select id="f-class"><option value="-1">all</option></select></label>
<label>sort <select id="f-sort">{sort_options}</select></label>
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


def _summary_html(data: Collected) -> str:
    job = data.job
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
              f"{f', {pending} pending' if pending else ''}; {sum(len(c['x']) for c in data.cards)} explanations")
    rows.append(("counts", counts))
    rows.append(("throughput", _throughput(data)))
    body = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in rows)
    methods = "".join(
        f"<tr><td><code>{escape(m)}</code></td>"
        f"<td class='mono'>{escape(json.dumps(data.method_params.get(m, {}), sort_keys=True))}</td>"
        f"<td>{escape(definitions.get(m, ''))}</td></tr>"
        for m in data.methods)
    return (f"<h2>Job</h2><table>{body}</table><h2>Methods</h2>"
            f"<table><tr><th>method</th><th>params</th><th>definition</th></tr>{methods}</table>")


def _throughput(data: Collected) -> str:
    job = data.job
    parts = []
    if job.finished_at and job.created_at:
        wall = (job.finished_at - job.created_at).total_seconds()
        if wall > 0:
            parts.append(f"{wall:.1f} s wall clock, {(job.done + job.failed + job.skipped) / wall:.2f} images/s")
    ended = sum(data.statuses.values())
    if ended and data.item_seconds:
        parts.append(f"{data.item_seconds / ended:.3f} s per image of worker time")
    return "; ".join(parts) or "unknown (job not finished)"


def _legend(methods: list[str]) -> str:
    # Colour swatches as SVG: the page's CSP allows no inline style attributes.
    return "<p class='legend'>" + "".join(
        f"<span><svg width='10' height='10'><rect width='10' height='10' fill='{charts.colour(i)}'/></svg> "
        f"{escape(m)}</span>" for i, m in enumerate(methods)) + "</p>"


def _metrics_html(data: Collected) -> str:
    if not data.metric_values:
        return ("<h2>Faithfulness</h2>"
                "<p class='muted'>No metrics in this job (run with --metrics deletion,insertion,drop).</p>")
    rows = []
    for m in data.methods:
        values = data.metric_values.get(m, {})
        increases = data.increases.get(m, [])
        cells = [f"{np.mean(values[k]):.3f}" if values.get(k) else "–" for k in ("deletion_auc", "insertion_auc")]
        cells.append(f"{100 * np.mean(values['drop']):.1f}" if values.get("drop") else "–")
        cells.append(f"{100 * np.mean(increases):.1f}" if increases else "–")
        n = max((len(v) for v in values.values()), default=0)
        rows.append(f"<tr><td><code>{escape(m)}</code></td>" + "".join(f"<td class='num'>{c}</td>" for c in cells)
                    + f"<td class='num'>{n}</td></tr>")
    table = ("<table><tr><th>method</th><th class='num'>mean deletion AUC ↓</th>"
             "<th class='num'>mean insertion AUC ↑</th>"
             "<th class='num'>Average Drop % ↓</th><th class='num'>Increase in Confidence % ↑</th>"
             "<th class='num'>explanations</th></tr>" + "".join(rows) + "</table>")
    plots = [charts.histogram_svg({m: data.metric_values[m][k] for m in data.methods if data.metric_values[m].get(k)},
                                  METRIC_TITLES[k])
             for k in METRICS if any(data.metric_values[m].get(k) for m in data.methods)]
    for curve in CURVES:
        means = {m: [s / data.curve_counts[(m, curve)] for s in data.curve_sums[m][curve]]
                 for m in data.methods if curve in data.curve_sums.get(m, {})}
        if means:
            plots.append(charts.curves_svg(means, f"mean {curve.split('_')[0]} curve"))
    return f"<h2>Faithfulness</h2>{table}{_legend(data.methods)}<div class='charts'>{''.join(plots)}</div>"


def _classes_html(data: Collected, class_maps: dict[tuple[int, str], str]) -> str:
    if not data.predicted:
        return ""
    head = "".join(f"<th>mean map: {escape(m)}</th>" for m in data.methods)
    rows = []
    for c, count in data.predicted.most_common(CLASS_TABLE_ROWS):
        maps = "".join(
            f"<td><img class='classmap' src='{escape(class_maps[(c, m)])}' alt='mean {escape(m)} map'></td>"
            if (c, m) in class_maps else "<td class='muted'>–</td>" for m in data.methods)
        rows.append(f"<tr><td>{escape(data.classes[c])}</td><td class='num'>{count}</td>"
                    f"<td class='num'>{data.predicted_score[c] / count:.3f}</td>{maps}</tr>")
    more = len(data.predicted) - CLASS_TABLE_ROWS
    note = f"<p class='muted'>… and {more} more classes.</p>" if more > 0 else ""
    return (f"<h2>Predicted classes</h2><p class='muted'>Top-1 class of each image; mean of up to "
            f"100 of its maps per method.</p><table><tr><th>class</th><th class='num'>images</th>"
            f"<th class='num'>mean score</th>{head}</tr>{''.join(rows)}</table>{note}")


def _failures_html(data: Collected) -> str:
    if not data.errors:
        return ""
    rows = "".join(f"<tr><td class='num'>{n}</td><td class='mono'>{escape(reason)}</td></tr>"
                   for reason, n in data.errors.most_common(20))
    return (f"<h2>Failures</h2><table><tr><th class='num'>images</th><th>reason</th></tr>{rows}</table>"
            f"<p class='muted'>Filter the gallery by status “failed” for every file.</p>")
