"""One pass over a job's rows: the gallery's compact records plus everything the summary aggregates.

Thumbnails and overlays are drawn here from the shards (``draw``), not read as stored objects."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote

from sqlalchemy.engine import Connection

from salient_maps.storage.results import job_records

METRICS = ("deletion_auc", "insertion_auc", "drop")
CURVES = ("deletion_curve", "insertion_curve")
# Mean maps average at most this many rank-1 maps per (class, method): the cost stays flat with the job.
MAPS_PER_CLASS = 100


@dataclass
class Collected:
    """``cards``: per image {n: name, s: status, e: error, t: thumbnail href, x: explanations}, each
    explanation [method index, class index, score, rank, overlay href, map href, deletion AUC,
    insertion AUC, drop, increase] (metrics null where not computed)."""

    job: Any
    methods: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    cards: list[dict] = field(default_factory=list)
    method_params: dict[str, dict] = field(default_factory=dict)
    overlay_styles: dict[str, dict] = field(default_factory=dict)
    metric_values: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    increases: dict[str, list[bool]] = field(default_factory=lambda: defaultdict(list))
    curve_sums: dict[str, dict[str, list[float]]] = field(default_factory=lambda: defaultdict(dict))
    curve_counts: Counter = field(default_factory=Counter)
    predicted: Counter = field(default_factory=Counter)  # class index -> images predicted (rank 1, first method)
    predicted_score: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    class_maps: dict[tuple[int, str], list[dict]] = field(default_factory=lambda: defaultdict(list))  # records
    errors: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    item_seconds: float = 0.0


class Drawer(Protocol):
    """Makes a record's pictures reachable from the report; each returns a relative address or None."""

    def thumbnail(self, record: dict) -> str | None: ...

    def overlay(self, record: dict, style: dict | None = None) -> str | None: ...

    def shard(self, key: str | None) -> str | None: ...


def collect(conn: Connection, job, draw: Drawer) -> Collected:
    """Stream the job's items with their explanations; ``draw`` writes or links each picture."""
    data = Collected(job=job)
    method_index: dict[str, int] = {}
    class_index: dict[str, int] = {}
    shared, query = job_records(conn, job)
    card: dict = {}  # the current item's; the first row starts one
    last_item = None
    for row in conn.execution_options(yield_per=2000).execute(query):
        record = dict(row._mapping)
        if row.id != last_item:
            last_item = row.id
            card = _new_card(data, row)
        if row.method is None:
            continue
        if card["t"] is None:
            card["t"] = draw.thumbnail(record)
        class_name = shared.class_names[row.class_id]
        if row.method not in method_index:
            method_index[row.method] = len(data.methods)
            data.methods.append(row.method)
            data.method_params[row.method] = shared.methods.get(row.method, {})
            data.overlay_styles[row.method] = shared.overlay
        if class_name not in class_index:
            class_index[class_name] = len(data.classes)
            data.classes.append(class_name)
        m, c = method_index[row.method], class_index[class_name]
        metrics = (row.extra or {}).get("metrics") or {}
        card["x"].append([m, c, round(row.score, 5), row.rank, draw.overlay(record, shared.overlay),
                          draw.shard(row.shard), *(_rounded(metrics.get(name)) for name in METRICS),
                          metrics.get("increase")])
        _aggregate(data, row.method, metrics)
        if row.rank == 1:
            if m == 0:
                data.predicted[c] += 1
                data.predicted_score[c] += row.score
            records = data.class_maps[(c, row.method)]
            if len(records) < MAPS_PER_CLASS:
                records.append({"shard": row.shard, "slot": row.slot, "method": row.method})
    return data


def _new_card(data: Collected, row) -> dict:
    data.statuses[row.status] += 1
    data.item_seconds += row.seconds or 0.0
    if row.error:
        data.errors[row.error] += 1
    name = unquote(row.uri.rstrip("/").rsplit("/", 1)[-1]) or row.uri
    card = {"n": name, "s": row.status, "e": row.error, "x": [], "t": None}
    data.cards.append(card)
    return card


def _aggregate(data: Collected, method: str, metrics: dict) -> None:
    for name in METRICS:
        if metrics.get(name) is not None:
            data.metric_values[method][name].append(float(metrics[name]))
    if metrics.get("increase") is not None:
        data.increases[method].append(bool(metrics["increase"]))
    for name in CURVES:
        curve = metrics.get(name)
        if not curve:
            continue
        sums = data.curve_sums[method].get(name)
        if sums is None or len(sums) != len(curve):
            if sums is not None:  # curves of another length (other steps) cannot be averaged together
                continue
            sums = data.curve_sums[method][name] = [0.0] * len(curve)
        for i, value in enumerate(curve):
            sums[i] += value
        data.curve_counts[(method, name)] += 1


def _rounded(value) -> float | None:
    return None if value is None else round(float(value), 4)
