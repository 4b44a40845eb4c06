"""The report's summaries, each one SQL aggregate (GROUP BY, COUNT, AVG): a job in; its status counts, failure
reasons, methods, per-method metric means, metric histograms, mean deletion/insertion curves and the
predicted-class table out. Nothing here holds a row per image, so memory is the same for 10^6 images as for ten.

The job's items are numbered once (``ITEMS``) and its explanations joined to them once, into temporary tables
(``ROWS``: per explanation the
image's number in job order and every number the report uses, faithfulness metrics already read out of the
``extra`` JSON); the summaries, the gallery's lists (pages.py) and its pages read that table instead of
repeating the join (by sha256 text, the costly step: about 10 µs a row on SQLite here). A temporary table lives
on disk (SQLite's temp file, PostgreSQL's temp tablespace) and only as long as the report's connection.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterator

from sqlalchemy import Column, Float, Integer, MetaData, String, Table, Text, and_, case, cast, func, select
from sqlalchemy.schema import CreateTable, DropTable

from salient_maps.storage.database import Explanation, Item
from salient_maps.storage.ground_truth import own_metric, with_own_metrics
from salient_maps.storage.results import result_settings

FAITHFULNESS = ("deletion_auc", "insertion_auc", "drop")
LOCALIZATION = ("energy_in_box", "border_energy", "pointing_game", "localization_iou")
METRICS = FAITHFULNESS + LOCALIZATION
CURVES = ("deletion_curve", "insertion_curve")
HISTOGRAM_BINS = 20  # over [0, 1]
CLASS_TABLE_ROWS = 50
FAILURE_ROWS = 20
EXPLAINED = ("done", "skipped")

ROWS = Table("report_explanations", MetaData(), Column("n", Integer), Column("method", String(100)),
             Column("class_id", Integer), Column("score", Float), Column("rank", Integer), Column("slot", Integer),
             Column("shard_id", Integer), *(Column(name, Float) for name in METRICS), Column("increase", Integer),
             prefixes=["TEMPORARY"])
ITEMS = Table("report_items", MetaData(), Column("n", Integer, primary_key=True, autoincrement=False),
              Column("id", Integer), Column("uri", Text), Column("sha256", String(64)), Column("status", String(16)),
              Column("error", Text), Column("label", Integer), Column("predicted", Integer), prefixes=["TEMPORARY"])


_cursors = itertools.count()


def stream(conn, query, size: int = 5_000) -> Iterator[list[tuple]]:
    """The rows of ``query`` as plain tuples, ``size`` at a time, from the driver's own cursor: SQLAlchemy's row
    objects cost twice the query's own time at 10^6 rows (the columns read this way are numbers and text, which
    need none of its type processing). PostgreSQL gets a named (server-side) cursor, so memory stays flat."""
    compiled = query.compile(conn)
    params = [compiled.params[k] for k in compiled.positiontup] if compiled.positional else compiled.params
    raw = conn.connection.dbapi_connection
    cursor = raw.cursor(name=f"report_{next(_cursors)}") if conn.dialect.name == "postgresql" else raw.cursor()
    try:
        cursor.execute(str(compiled), params)
        while rows := cursor.fetchmany(size):
            yield rows
    finally:
        cursor.close()


def _fill_rows(conn, job, settings_id: int) -> None:
    """ITEMS: the job's items numbered in job order (``n``: the gallery's image number, from 0); ROWS: their
    explanations with ``n``."""
    for table in (ROWS, ITEMS):
        conn.execute(DropTable(table, if_exists=True))
        conn.execute(CreateTable(table))
    numbered = select((func.row_number().over(order_by=Item.id) - 1).label("n"), Item.id, Item.uri, Item.sha256,
                      Item.status, Item.error, Item.label, Item.predicted).where(Item.job_id == job.id)
    conn.execute(ITEMS.insert().from_select([c.name for c in ITEMS.columns], numbered))
    items = ITEMS.c
    increase = Explanation.extra[("metrics", "increase")].as_boolean()
    # localisation metrics against each item's own ground truth, as audits read them (storage/ground_truth.py)
    values = [own_metric(name) if name in LOCALIZATION else Explanation.extra[("metrics", name)].as_float()
              for name in METRICS]
    query = with_own_metrics(
        select(items.n, Explanation.method, Explanation.class_id, Explanation.score, Explanation.rank,
               Explanation.slot, Explanation.shard_id, *values,
               case((increase.is_(None), None), (increase, 1), else_=0))
        .select_from(ITEMS).join(Item, Item.id == items.id)
        .join(Explanation, and_(Explanation.sha256 == items.sha256, Explanation.settings_id == settings_id))
    ).where(items.status.in_(EXPLAINED))
    conn.execute(ROWS.insert().from_select([c.name for c in ROWS.columns], query))


@dataclass
class Summary:
    job: Any
    shared: Any  # the job's ResultSettings row (None before any result)
    statuses: dict[str, int] = field(default_factory=dict)
    item_seconds: float = 0.0
    failures: list[tuple[str, int]] = field(default_factory=list)  # the most frequent reasons
    explanations: int = 0
    methods: list[str] = field(default_factory=list)  # by name: the gallery's method index
    means: dict[str, dict[str, tuple[float, int]]] = field(default_factory=dict)  # method -> metric -> (mean, n)
    increase: dict[str, float] = field(default_factory=dict)  # method -> share of explanations that raised the score
    histograms: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # metric -> method -> counts
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # curve -> method -> mean curve
    predicted: list[tuple[int, int, float]] = field(default_factory=list)  # (class id, images, mean score)
    predicted_classes: int = 0
    labelled: int = 0

    @property
    def class_names(self) -> list[str]:
        return list(self.shared.class_names) if self.shared is not None else []

    def metrics_of(self, method: str) -> list[str]:
        return [k for k, (_, n) in self.means.get(method, {}).items() if n]


def summarize(conn, job) -> Summary:
    """The summaries; leaves ``ROWS`` filled for the gallery (on this connection)."""
    shared = result_settings(conn, job)
    summary = Summary(job=job, shared=shared)
    of_job = Item.job_id == job.id
    for status, count, seconds in conn.execute(
            select(Item.status, func.count(), func.sum(Item.seconds)).where(of_job).group_by(Item.status)):
        summary.statuses[status] = count
        summary.item_seconds += seconds or 0.0
    summary.labelled = conn.execute(select(func.count(Item.label)).where(of_job)).scalar() or 0
    summary.failures = [(reason, n) for reason, n in conn.execute(
        select(Item.error, func.count().label("n")).where(of_job, Item.error.is_not(None))
        .group_by(Item.error).order_by(func.count().desc(), Item.error).limit(FAILURE_ROWS))]
    _fill_rows(conn, job, shared.id if shared is not None else -1)
    r = ROWS.c
    columns: list = [func.count()]
    for name in METRICS:
        columns += [func.avg(r[name]), func.count(r[name])]
    columns.append(func.avg(cast(r.increase, Float)))
    for method, count, *values in conn.execute(select(r.method, *columns).group_by(r.method).order_by(r.method)):
        summary.methods.append(method)
        summary.explanations += count
        summary.means[method] = {name: (values[2 * i], values[2 * i + 1]) for i, name in enumerate(METRICS)}
        if values[-1] is not None:
            summary.increase[method] = values[-1]
    binned = [k for k in METRICS if k != "pointing_game" and any(summary.means[m][k][1] for m in summary.methods)]
    summary.histograms = _histograms(conn, binned)
    if any(summary.means[m][k][1] for m in summary.methods for k in ("deletion_auc", "insertion_auc")):
        summary.curves = _mean_curves(conn, job, shared.id, summary.methods)
    first = summary.methods[0] if summary.methods else None
    top = and_(r.method == first, r.rank == 1)
    summary.predicted = [tuple(row) for row in conn.execute(
        select(r.class_id, func.count().label("n"), func.avg(r.score)).where(top)
        .group_by(r.class_id).order_by(func.count().desc(), r.class_id).limit(CLASS_TABLE_ROWS))]
    summary.predicted_classes = conn.execute(select(func.count(func.distinct(r.class_id))).where(top)).scalar()
    return summary


def _histograms(conn, names: list[str]) -> dict[str, dict[str, list[int]]]:
    """Counts in HISTOGRAM_BINS equal bins over [0, 1] (values outside go to the end bins), every metric in one
    pass. A bin is a pair of comparisons rather than CAST/FLOOR, which truncate on SQLite but round on
    PostgreSQL."""
    if not names:
        return {}
    r = ROWS.c
    edges = [b / HISTOGRAM_BINS for b in range(1, HISTOGRAM_BINS)]
    columns = []
    for name in names:
        v = r[name]
        bounds = [v < edges[0]] + [and_(v >= lo, v < hi) for lo, hi in zip(edges, edges[1:])] + [v >= edges[-1]]
        columns += [func.count(case((inside, 1))) for inside in bounds]
    found: dict[str, dict[str, list[int]]] = {name: {} for name in names}
    for method, *counts in conn.execute(select(r.method, *columns).group_by(r.method).order_by(r.method)):
        for i, name in enumerate(names):
            bins = list(counts[i * HISTOGRAM_BINS:(i + 1) * HISTOGRAM_BINS])
            if any(bins):
                found[name][method] = bins
    return {name: series for name, series in found.items() if series}


def _mean_curves(conn, job, settings_id: int, methods: list[str]) -> dict[str, dict[str, list[float]]]:
    """The mean curve per method over the curves of the first row's length (curves of other step counts cannot
    be averaged with it), both curves in one pass over the JSON."""
    def element(curve: str, i: int):
        return Explanation.extra[("metrics", curve, i)].as_float()

    scope = and_(Item.job_id == job.id, Item.status.in_(EXPLAINED), Explanation.sha256 == Item.sha256,
                 Explanation.settings_id == settings_id)
    found: dict[str, dict[str, list[float]]] = {}
    for method in methods:
        sample = conn.execute(select(Explanation.extra).where(scope, Explanation.method == method,
                                                              Explanation.extra.is_not(None)).limit(1)).scalar()
        lengths = {c: len(((sample or {}).get("metrics") or {}).get(c) or []) for c in CURVES}
        columns, layout = [], []
        for curve, steps in lengths.items():
            if steps < 2:
                continue
            fits = and_(element(curve, steps - 1).is_not(None), element(curve, steps).is_(None))
            columns += [func.avg(case((fits, element(curve, i)))) for i in range(steps)]
            layout.append((curve, steps))
        if not columns:
            continue
        row = conn.execute(select(*columns).where(scope, Explanation.method == method)).one()
        at = 0
        for curve, steps in layout:
            values = row[at:at + steps]
            at += steps
            if values[0] is not None:
                found.setdefault(curve, {})[method] = [float(v) for v in values]
    return found
