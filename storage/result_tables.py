"""A job's results opened from Python: ``open_results(folder or database URL)`` in, the records of
``storage.results.iter_results`` out as an Arrow table (``to_arrow``) or a pandas DataFrame (``to_pandas``),
one row per explanation or per item without one, in the columns of ``storage.results.FIELDS``; and a
record's map (``load_map``, read from its shard by ``storage.maps.MapReader``).

Light: no torch. pyarrow comes with the ``parquet`` extra, pandas with the ``pandas`` extra.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import numpy as np
from sqlalchemy import select
from sqlalchemy.engine import Engine

from .database import Job, connect
from .maps import MapReader
from .results import FIELDS, iter_results
from .settings import Settings

if TYPE_CHECKING:
    import pandas
    import pyarrow

_BATCH_ROWS = 10_000
_INT_FIELDS = ("class_id", "rank", "slot", "label", "pointing_game", "localization_correct")
_FLOAT_FIELDS = ("score", "seconds", "deletion_auc", "insertion_auc", "drop", "energy_in_box", "localization_iou",
                 "border_energy")
_BOOL_FIELDS = ("increase", "correct")


def open_results(location: str | Path | None = None, job: str | None = None, *, objects: str | None = None,
                 settings: Settings | None = None) -> "JobResults":
    """The results of ``job`` (default: the newest job) from ``location``: a data folder (``--out`` / ``--data``
    of ``salient run``: DIR/salient.db and DIR/objects/), a SQLAlchemy database URL (the queued pipeline's
    PostgreSQL; its maps in ``objects``, an object store URL, by default ``SALIENT_OBJECT_STORE_URL``), or None
    for the ``SALIENT_*`` settings."""
    settings = settings or Settings()
    if location is not None and "://" in str(location):
        settings = settings.model_copy(update={"database_url": str(location),
                                               "object_store_url": objects or settings.object_store_url})
    elif location is not None:
        folder = Path(location)
        if not (folder / "salient.db").is_file():
            raise FileNotFoundError(f"no salient results in {folder} (no {folder / 'salient.db'})")
        settings = settings.with_data_dir(folder).model_copy(update={"database_url": None,
                                                                     "object_store_url": None})
    db = connect(settings.resolved_database_url)
    return JobResults(settings, db, _job_id(db, job))


def _job_id(db: Engine, job: str | None) -> str:
    """``job``, checked, or the newest job's id."""
    with db.connect() as conn:
        if job is None:
            job = conn.execute(select(Job.id).order_by(Job.created_at.desc()).limit(1)).scalar()
            if job is None:
                raise LookupError("no jobs yet in this database")
        elif conn.execute(select(Job.id).where(Job.id == job)).scalar() is None:
            raise LookupError(f"no job {job}")
    return job


@dataclass
class JobResults:
    """One job's results in one database (and object store)."""

    settings: Settings
    db: Engine
    job_id: str

    def records(self) -> Iterator[dict[str, Any]]:
        """The records as dicts, streamed in item order (``storage.results.iter_results``)."""
        return iter_results(self.settings, self.job_id, db=self.db)

    def to_arrow(self) -> "pyarrow.Table":
        """Every record as an Arrow table, built in batches of 10,000 rows; nested values (a method's
        parameters) are JSON text, as in the Parquet export."""
        try:
            import pyarrow as pa
        except ImportError:
            raise ImportError("to_arrow needs pyarrow: pip install 'salient-maps[parquet]'") from None
        schema = arrow_schema(FIELDS)
        batches = []
        columns: dict[str, list] = {f: [] for f in FIELDS}
        rows = 0
        for record in self.records():
            for name, values in columns.items():
                value = record.get(name)
                values.append(json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value)
            rows += 1
            if rows == _BATCH_ROWS:
                batches.append(pa.record_batch(columns, schema=schema))
                columns, rows = {f: [] for f in FIELDS}, 0
        if rows or not batches:
            batches.append(pa.record_batch(columns, schema=schema))
        return pa.Table.from_batches(batches, schema=schema)

    @cached_property
    def reader(self) -> MapReader:
        """The maps' reader on this job's object store (shards kept in memory while their records come)."""
        return MapReader.for_settings(self.settings)

    def load_map(self, record: Mapping[str, Any], size: str = "input") -> np.ndarray:
        """A record's map (a dict of ``records``, a row of ``to_arrow().to_pylist()`` or of ``to_pandas()``):
        float32 in [0, 1] at the model's input size, or with ``size="layer"`` as stored (``storage.maps``)."""
        row = dict(record)
        if not isinstance(row.get("shard"), str):  # None, or NaN in a DataFrame
            raise ValueError(f"{row.get('uri')} has no map ({row.get('status')}: {row.get('error')})")
        # a DataFrame column with a failed item's null slot holds floats
        return self.reader.map({**row, "slot": int(row["slot"])}, size)

    def to_pandas(self) -> "pandas.DataFrame":
        """Every record as a pandas DataFrame (through ``to_arrow``); needs pandas."""
        try:
            import pandas  # noqa: F401  (pyarrow's to_pandas imports it; fail here with the install line)
        except ImportError:
            raise ImportError("to_pandas needs pandas: pip install 'salient-maps[pandas]'") from None
        return self.to_arrow().to_pandas()


def arrow_schema(fields: tuple[str, ...]) -> "pyarrow.Schema":
    """Arrow types of the record fields: ids and ranks int32, scores and seconds float64, text otherwise."""
    import pyarrow as pa

    def type_of(name: str) -> "pyarrow.DataType":
        if name in _INT_FIELDS:
            return pa.int32()
        if name in _FLOAT_FIELDS:
            return pa.float64()
        if name in _BOOL_FIELDS:
            return pa.bool_()
        return pa.string()

    return pa.schema([(name, type_of(name)) for name in fields])
