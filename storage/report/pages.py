"""The gallery's data as files the page loads on demand: a job's rows in; ``data/page-NNNNNN.js`` (the cards of
``PAGE_SIZE`` images each, in job order) and ``data/<view>-NNNN.js`` (each filter's and sort's list of images)
out, written as the rows stream past, so memory stays flat however large the job.

Why script files and not JSON: a report is opened as ``file://`` as often as it is served, and Chromium refuses
``fetch``/XHR of ``file://`` URLs, while a ``<script src>`` it loads either way. Each file is one call,
``salientReport.receive("<name>", <JSON>)``, that the page registers before it inserts the tag (JSONP without a
server); the JSON is the data itself, produced by ``json.dumps`` (no text from the database reaches the page as
code: the browser parses it as a literal).

A card is ``{n: file name, s: status, e: error, l: label, k: correct (1, 0, null), h: index of its shard in the
page's ``shards`` (the raw maps; null when not linked), p: picture name (null when not drawn), x: explanations}``
and an explanation ``[method index, class id, score, rank, deletion AUC, insertion AUC, drop, increase,
energy_in_box, border_energy, pointing_game, localization_iou, overlay drawn]`` (null where not computed).

A view is the ordered list of image numbers (0-based positions in job order) for one filter value — status,
correct, method, class — in job order, or for one sort key of one method's top-1 explanation, best first, with
the values (so a threshold is a binary search). The page combines several filters by walking the smallest list
and testing the others on the cards; see report.js.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import unquote

from sqlalchemy import Float, Numeric, and_, cast, func, select

from salient_maps.storage.database import Shard

from .summary import ITEMS, ROWS, Summary, stream

PAGE_SIZE = 100
INDEX_CHUNK = 10_000
STATUSES = ("done", "failed", "skipped", "pending")
# Sort keys and their best end: True when higher is better (listed first).
SORTS = {"score": True, "deletion_auc": False, "insertion_auc": True, "drop": False, "energy_in_box": False,
         "border_energy": True, "localization_iou": True}
CARD_METRICS = ("deletion_auc", "insertion_auc", "drop", "increase", "energy_in_box", "border_energy",
                "pointing_game", "localization_iou")
STREAM = 5_000  # rows fetched at a time (a server-side cursor on PostgreSQL)


def rounded(value, digits: int):
    """``value`` rounded in SQL (the page shows no more, and 17 digits would double its files); PostgreSQL rounds
    to a number of digits only numerics, so the value goes through one and back."""
    return cast(func.round(cast(value, Numeric), digits), Float)


def script(name: str, payload) -> str:
    return f"salientReport.receive({json.dumps(name)},{json.dumps(payload, separators=(',', ':'))});\n"


class Views:
    """Writes every view's list under ``folder`` and describes them for the page (``manifest``)."""

    def __init__(self, conn, summary: Summary, folder: Path):
        self.conn, self.summary, self.folder = conn, summary, folder
        self.manifest: dict[str, dict] = {}
        self.first_pages: set[int] = set()  # the image numbers each sort shows first

    def write_all(self) -> dict[str, dict]:
        n = ITEMS.c
        for status in STATUSES:
            if self.summary.statuses.get(status):
                self._write(f"status-{status}", select(n.n).where(n.status == status).order_by(n.n))
        if self.summary.labelled:
            verdict = and_(n.label.is_not(None), n.predicted.is_not(None))
            self._write("correct-1", select(n.n).where(verdict, n.predicted == n.label).order_by(n.n))
            self._write("correct-0", select(n.n).where(verdict, n.predicted != n.label).order_by(n.n))
        r = ROWS.c
        for m, method in enumerate(self.summary.methods):
            self._write(f"method-{m}", select(r.n).distinct().where(r.method == method).order_by(r.n))
        self._write_classes(select(r.class_id, r.n).distinct().order_by(r.class_id, r.n))
        for m, method in enumerate(self.summary.methods):
            for key, higher_first in SORTS.items():
                if key != "score" and key not in self.summary.metrics_of(method):
                    continue
                value = r[key]
                query = (select(r.n, rounded(value, 5)).where(r.method == method, r.rank == 1, value.is_not(None))
                         .order_by(value.desc() if higher_first else value.asc(), r.n))
                self._write(f"sort-{m}-{key}", query, values=True, higher_first=higher_first)
        return self.manifest

    def _write(self, key: str, query, values: bool = False, higher_first: bool = True) -> None:
        chunks: list = []
        count, ordinals, numbers = 0, [], []
        for rows in stream(self.conn, query, INDEX_CHUNK):
            ordinals += [row[0] for row in rows]
            if values:
                numbers += [row[1] for row in rows]
            count += len(rows)
            while len(ordinals) >= INDEX_CHUNK:
                chunks.append(self._chunk(key, len(chunks), ordinals[:INDEX_CHUNK],
                                          numbers[:INDEX_CHUNK] if values else None))
                ordinals, numbers = ordinals[INDEX_CHUNK:], numbers[INDEX_CHUNK:]
        if ordinals:
            chunks.append(self._chunk(key, len(chunks), ordinals, numbers if values else None))
        view: dict = {"count": count, "chunks": len(chunks)}
        if values:
            view.update(bounds=chunks, higherFirst=higher_first)
        self.manifest[key] = view

    def _chunk(self, key: str, index: int, ordinals: list[int], numbers: list[float] | None):
        name = f"{key}-{index:04d}"
        payload = {"n": ordinals} if numbers is None else {"n": ordinals, "v": numbers}
        (self.folder / f"{name}.js").write_text(script(name, payload), encoding="utf-8")
        if numbers is None:
            return None
        if index == 0:
            self.first_pages.update(ordinals[:PAGE_SIZE])
        return [numbers[0], numbers[-1]]

    def _write_classes(self, query) -> None:
        """One query ordered by class: each class's list ends where the next class begins."""
        current, chunks, count = None, 0, 0
        ordinals: list[int] = []

        def end() -> None:
            nonlocal chunks
            if ordinals:
                self._chunk(f"class-{current}", chunks, ordinals, None)
                chunks += 1
            if current is not None:
                self.manifest[f"class-{current}"] = {"count": count, "chunks": chunks}

        for rows in stream(self.conn, query, STREAM):
            for class_id, ordinal in rows:
                if class_id != current:
                    end()
                    current, ordinals, chunks, count = class_id, [], 0, 0
                ordinals.append(ordinal)
                count += 1
                if len(ordinals) == INDEX_CHUNK:
                    self._chunk(f"class-{current}", chunks, ordinals, None)
                    chunks, ordinals = chunks + 1, []
        end()


def write_pages(conn, summary: Summary, folder: Path, pictures, pictured) -> dict:
    """Stream the job's items, and beside them its explanations (both in job order), into page files;
    ``pictures`` draws the thumbnail and overlays of the images whose number ``pictured(n)`` accepts. Returns
    the first page's payload (the report embeds it, so the first page needs no file)."""
    method_index = {m: i for i, m in enumerate(summary.methods)}
    shard_keys = dict(conn.execute(select(Shard.id, Shard.key).where(
        Shard.id.in_(select(ROWS.c.shard_id).distinct().scalar_subquery()))).all())
    items = ITEMS.c
    r = ROWS.c
    explanations = (row for rows in stream(conn, select(
        r.n, r.method, r.class_id, rounded(r.score, 5), r.rank, r.slot, r.shard_id,
        *(rounded(r[k], 4) for k in CARD_METRICS))
        .order_by(r.n, r.method, r.rank)) for row in rows)
    pending = next(explanations, None)
    page: list[dict] = []
    shards: dict[str, int] = {}
    links: dict[int, str | None] = {}  # shard id -> its link (or None)
    first: dict | None = None
    number = -1

    def flush(index: int) -> None:
        nonlocal first, page, shards
        payload = {"cards": page, "shards": list(shards)}
        if index == 0:
            first = payload
        (folder / f"page-{index:06d}.js").write_text(script(f"page-{index:06d}", payload), encoding="utf-8")
        page, shards = [], {}

    query = select(items.n, items.uri, items.sha256, items.status, items.error, items.label, items.predicted)
    for rows in stream(conn, query.order_by(items.n)):
        for number, uri, sha, status, error, label, predicted in rows:
            if len(page) == PAGE_SIZE:
                flush(number // PAGE_SIZE - 1)
            name = uri.rstrip("/").rsplit("/", 1)[-1]
            if "%" in name:
                name = unquote(name)
            x: list[list] = []
            card = {"n": name or uri, "s": status, "e": error, "l": label, "h": None, "p": None, "x": x,
                    "k": None if label is None or predicted is None else int(label == predicted)}
            page.append(card)
            draw = pictured(number)
            while pending is not None and pending[0] <= number:
                _, method, class_id, score, rank, slot, shard_id, *values = pending
                pending = next(explanations, None)
                if shard_id not in links:
                    links[shard_id] = pictures.shard(shard_keys.get(shard_id))
                link = links[shard_id]
                if card["h"] is None and link is not None:
                    card["h"] = shards.setdefault(link, len(shards))
                drawn = 0
                if draw:
                    record = {"sha256": sha, "method": method, "class_id": class_id, "slot": slot,
                              "shard": shard_keys.get(shard_id)}
                    if card["p"] is None and pictures.thumbnail(record):
                        card["p"] = pictures.name(record)
                    drawn = int(pictures.overlay(record) is not None)
                values[3] = None if values[3] is None else bool(values[3])
                x.append([method_index[method], class_id, score, rank, *values, drawn])
    if page:
        flush(number // PAGE_SIZE)
    return first or {"cards": [], "shards": []}
