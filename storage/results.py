"""A job's results as one flat record per explanation, or per image that has no explanation (failed,
pending), streamed from the database to JSON Lines, CSV or Parquet without holding them in memory."""

from __future__ import annotations

import csv
import json
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import IO, Iterator, Protocol

from sqlalchemy import and_, select
from sqlalchemy.engine import Engine

from salient_maps.storage.database import (
    Explanation,
    Image,
    Item,
    ItemMetrics,
    Job,
    ResultSettings,
    Shard,
    connect,
    legacy_explanations,
)
from salient_maps.storage.ground_truth import OWN_METRICS, own_metric
from salient_maps.storage.input_crop import input_box
from salient_maps.storage.settings import Settings
from salient_maps.storage.shards import localization_mask_name

# Scalar faithfulness metrics copied from an explanation's extra JSON (null where not computed).
METRIC_FIELDS = ("deletion_auc", "insertion_auc", "drop", "increase")
# Localisation metrics (workers/localization_metrics.py): columns of the explanation, null where not computed.
LOCALIZATION_FIELDS = ("pointing_game", "energy_in_box", "localization_iou", "localization_correct", "border_energy")
# Ground truth from the manifest (``label`` as the class id it names), top-1 == label, and the --localize result.
TRUTH_FIELDS = ("label", "correct", "boxes", "mask", "localization_box", "localization_mask")
# ``shard`` + ``slot``: where the record's map lies (storage/shards.py; read it with ``storage.maps``).
# ``layout``: how the target layer's output became the map (workers/layouts.py); ``preprocessing``: input size,
# crop, resize, interpolation, mean, std; ``input_box``: [x0, y0, x1, y1], the part of the image the map covers,
# in fractions of its width and height ([0, 0, 1, 1] without a crop). Records made before these were stored have
# null layout and preprocessing; their maps cover the whole image (salient did not crop then).
# New fields go after the existing ones, so a CSV reader's column positions stay where they were.
FIELDS = ("job_id", "uri", "sha256", "model", "method", "method_params", "layer", "class_id", "class_name",
          "score", "rank", "shard", "slot", "status", "error", "seconds", "layout", "preprocessing",
          "input_box") + METRIC_FIELDS + LOCALIZATION_FIELDS + TRUTH_FIELDS
IOU_CORRECT = 0.5  # Simonyan et al. 2014's localisation criterion (as workers/localization_metrics.py)
ERROR_FIELDS = ("job_id", "uri", "sha256", "status", "error", "seconds")
FORMATS = ("jsonl", "csv", "parquet")
PARQUET_ROW_GROUP = 10_000


def find_job(conn, job_id: str | None):
    """The job (default: the newest), with the settings its results share (None before any result)."""
    if job_id is None:
        job_id = conn.execute(select(Job.id).order_by(Job.created_at.desc()).limit(1)).scalar()
        if job_id is None:
            raise LookupError("no jobs yet in this database")
    job = conn.execute(select(Job).where(Job.id == job_id)).first()
    if job is None:
        raise LookupError(f"no job {job_id}")
    return job


def result_settings(conn, job):
    """The settings row every explanation of ``job`` points to, or None when it has none yet; a job whose
    results are only in the layout before shards gets a clear error instead."""
    found = conn.execute(select(ResultSettings).where(ResultSettings.digest == job.settings_digest)).first()
    if found is None and (old := legacy_explanations(conn, job.settings_digest)):
        raise LookupError(
            f"job {job.id} was explained by salient before result shards (schema 0004): its {old} results are kept "
            f"in the table explanations_0004 and their objects under maps/ and overlays/; explain its images "
            f"again (salient run / submit with the same settings) to read them with this version")
    return found


def job_records(conn, job, item_range: tuple[int, int] | None = None):
    """The query behind every per-job listing: items in order, each with its explanations (if any) and
    their shard's key."""
    settings = result_settings(conn, job)
    settings_id = settings.id if settings is not None else -1
    query = (
        select(Item.id, Item.uri, Item.sha256, Item.status, Item.error, Item.seconds, Item.truth,
               Item.label.label("label_id"), Item.predicted, Explanation.method,
               Explanation.class_id, Explanation.score, Explanation.rank, Explanation.slot, Explanation.extra,
               Explanation.border_energy, *(own_metric(name).label(name) for name in OWN_METRICS),
               Shard.key.label("shard"), Image.width, Image.height)
        .outerjoin(Explanation, and_(
            Explanation.sha256 == Item.sha256,
            Explanation.settings_id == settings_id,
            Item.status.in_(("done", "skipped")),
        ))
        .outerjoin(Shard, Shard.id == Explanation.shard_id)
        .outerjoin(ItemMetrics, and_(ItemMetrics.item_id == Item.id, ItemMetrics.method == Explanation.method,
                                     ItemMetrics.class_id == Explanation.class_id))
        .outerjoin(Image, Image.sha256 == Explanation.sha256)
        .where(Item.job_id == job.id)
        .order_by(Item.id, Explanation.method, Explanation.rank)
    )
    if item_range is not None:
        query = query.where(Item.id > item_range[0], Item.id <= item_range[1])
    return settings, query


def iter_results(settings: Settings, job_id: str | None, *, db: Engine | None = None,
                 item_range: tuple[int, int] | None = None) -> Iterator[dict]:
    """One record per explanation, or per item without one, in item order. ``db``: an engine to reuse
    (default: one from ``settings``); ``item_range`` ``(after, upto)``: only items with after < id <= upto,
    for paging."""
    db = db or connect(settings.resolved_database_url)
    with db.connect() as conn:
        job = find_job(conn, job_id)
        shared, query = job_records(conn, job, item_range)
        for row in conn.execution_options(yield_per=1000).execute(query).mappings():
            record = dict(row, job_id=job.id)
            if row["shard"] is not None:
                # an image skipped as already explained reports the earlier, identical result
                record.update(status="done", model=shared.model, layer=shared.layer,
                              method_params=shared.methods.get(row["method"], {}),
                              class_name=shared.class_names[row["class_id"]], layout=shared.layout,
                              preprocessing=shared.preprocessing,
                              input_box=list(input_box(shared.preprocessing, row["width"], row["height"])))
            record.update(_truth_fields(row, shared.class_names if shared is not None else ()))
            metrics = (row["extra"] or {}).get("metrics") or {}
            yield {f: metrics.get(f) if f in METRIC_FIELDS else record.get(f) for f in FIELDS}


def _truth_fields(row, class_names) -> dict:
    """A record's ground truth (``label`` as a class id: the worker's, or the exact class name's when no worker
    resolved it), its top-1 verdict and localisation as result fields."""
    truth = row["truth"] or {}
    label = row["label_id"] if row["label_id"] is not None else truth.get("label")
    if isinstance(label, str):
        label = list(class_names).index(label) if label in class_names else None
    found = (row["extra"] or {}).get("localization") or {}
    iou = row["localization_iou"]
    return {"label": label, "boxes": truth.get("boxes"), "mask": truth.get("mask"),
            "correct": None if row["predicted"] is None or label is None else row["predicted"] == label,
            "localization_box": found.get("bbox"), "localization_mask": _mask_name(row, found),
            "localization_correct": None if iou is None else int(iou >= IOU_CORRECT)}


def _mask_name(row, found: dict) -> str | None:
    """Where the record's --localize mask PNG lies: a tensor of its shard (``MapReader.localization_mask_png``
    reads it); results made before masks moved into shards name their own object (``mask_key``)."""
    if not found:
        return None
    return found.get("mask_key") or localization_mask_name(row["method"], row["slot"])


def write_results(settings: Settings, job_id: str | None, fmt: str, out: IO[str]) -> None:
    writer = _text_writer(fmt, out, FIELDS)
    for row in iter_results(settings, job_id):
        writer.write(row)
    writer.close()


def export_results(settings: Settings, job_id: str | None, fmt: str, out: str | Path | None,
                   stdout: IO[str] | None = None, row_group: int = PARQUET_ROW_GROUP) -> dict[str, int]:
    """Stream a job's records to ``out``; returns how many went to each file.

    ``out`` a folder (existing, or named with a trailing slash): ``predictions_00001.<fmt>`` with the
    explanations and ``errors_00001.<fmt>`` with the items that have none (failed, pending), as managed
    batch-prediction jobs write them. ``out`` a file: every record in it. None: jsonl/csv to ``stdout``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    # A str keeps the trailing slash that a Path would drop.
    path = Path(out) if out is not None else None
    counts = {"predictions": 0, "errors": 0}
    if path is None or not (str(out).endswith(("/", os.sep)) or path.is_dir()):
        if path is None and fmt == "parquet":
            raise ValueError("parquet needs --out FILE or FOLDER/")
        with _opened(fmt, path, FIELDS, stdout, row_group) as writer:
            for row in iter_results(settings, job_id):
                writer.write(row)
                counts["errors" if row["shard"] is None else "predictions"] += 1
        return counts
    path.mkdir(parents=True, exist_ok=True)
    with _opened(fmt, path / f"predictions_00001.{fmt}", FIELDS, None, row_group) as predictions, \
            _opened(fmt, path / f"errors_00001.{fmt}", ERROR_FIELDS, None, row_group) as errors:
        for row in iter_results(settings, job_id):
            if row["shard"] is None:
                errors.write({f: row[f] for f in ERROR_FIELDS})
                counts["errors"] += 1
            else:
                predictions.write(row)
                counts["predictions"] += 1
    return counts


class RecordWriter(Protocol):
    def write(self, row: dict) -> None: ...

    def close(self) -> None: ...


class _JsonLines:
    def __init__(self, out: IO[str]):
        self.out = out

    def write(self, row: dict) -> None:
        self.out.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self.out.flush()


class _Csv:
    def __init__(self, out: IO[str], fields: tuple[str, ...]):
        self.out = out
        self.writer = csv.DictWriter(out, fieldnames=fields)
        self.writer.writeheader()

    def write(self, row: dict) -> None:
        self.writer.writerow(_flat(row))

    def close(self) -> None:
        self.out.flush()


class _Parquet:
    """Rows buffered one row group at a time, so memory is bounded by ``row_group``, not by the job."""

    def __init__(self, path: Path, fields: tuple[str, ...], row_group: int):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError("parquet export needs pyarrow: pip install 'salient-maps[parquet]'") from None
        types = {"class_id": pa.int32(), "rank": pa.int32(), "slot": pa.int32(), "score": pa.float64(),
                 "seconds": pa.float64(),
                 "deletion_auc": pa.float64(), "insertion_auc": pa.float64(), "drop": pa.float64(),
                 "increase": pa.bool_(), "pointing_game": pa.int32(), "energy_in_box": pa.float64(),
                 "localization_iou": pa.float64(), "localization_correct": pa.int32(), "border_energy": pa.float64(),
                 "correct": pa.bool_(), "label": pa.int32()}
        self.pa = pa
        self.schema = pa.schema([(f, types.get(f, pa.string())) for f in fields])
        self.writer = pq.ParquetWriter(str(path), self.schema)
        self.row_group = row_group
        self.columns: dict[str, list] = {f: [] for f in fields}
        self.buffered = 0

    def write(self, row: dict) -> None:
        row = _flat(row)
        for name, values in self.columns.items():
            values.append(row[name])
        self.buffered += 1
        if self.buffered >= self.row_group:
            self._flush()

    def _flush(self) -> None:
        if self.buffered:
            self.writer.write_table(self.pa.table(self.columns, schema=self.schema), row_group_size=self.buffered)
            for values in self.columns.values():
                values.clear()
            self.buffered = 0

    def close(self) -> None:
        self._flush()
        self.writer.close()


def _flat(row: dict) -> dict:
    """Nested values (``method_params``, ``boxes``) as JSON text, for the tabular formats."""
    return {k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v for k, v in row.items()}


def _text_writer(fmt: str, out: IO[str], fields: tuple[str, ...]) -> RecordWriter:
    return _Csv(out, fields) if fmt == "csv" else _JsonLines(out)


@contextmanager
def _opened(fmt: str, path: Path | None, fields: tuple[str, ...], stdout: IO[str] | None,
            row_group: int) -> Iterator[RecordWriter]:
    """A writer for ``fmt`` on ``path`` (``stdout`` when path is None), closed with its file."""
    if fmt == "parquet":
        if path is None:
            raise ValueError("parquet needs a file")
        parquet = _Parquet(path, fields, row_group)
        try:
            yield parquet
        finally:
            parquet.close()
        return
    with open(path, "w", newline="", encoding="utf-8") if path else nullcontext(stdout) as file:
        if file is None:
            raise ValueError("no file and no stdout to write to")
        writer = _text_writer(fmt, file, fields)
        yield writer
        writer.close()


def find_record(conn, job, sha256: str, method: str, class_id: int) -> dict | None:
    """One explanation of one of the job's images (``shard``, ``slot``, ``method``, ...), or None."""
    shared = result_settings(conn, job)
    if shared is None:
        return None
    row = conn.execute(
        select(Item.uri, Explanation.sha256, Explanation.method, Explanation.class_id, Explanation.slot,
               Shard.key.label("shard"), Image.width, Image.height)
        .join(Explanation, and_(Explanation.sha256 == Item.sha256, Explanation.settings_id == shared.id))
        .join(Shard, Shard.id == Explanation.shard_id)
        .join(Image, Image.sha256 == Explanation.sha256)
        .where(Item.job_id == job.id, Item.sha256 == sha256, Explanation.method == method,
               Explanation.class_id == class_id)
        .limit(1)).mappings().first()
    if row is None:
        return None
    return dict(row, style=shared.overlay,
                input_box=list(input_box(shared.preprocessing, row["width"], row["height"])))
