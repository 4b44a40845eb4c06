"""A job's results as one flat record per explanation, or per failed image."""

from __future__ import annotations

import csv
import json
from typing import IO, Iterator

from sqlalchemy import and_, select

from storage.database import Explanation, Item, Job, connect
from storage.settings import Settings

FIELDS = ("job_id", "uri", "sha256", "model", "method", "layer", "class_id", "class_name", "score", "rank",
          "map_key", "overlay_key", "status", "error", "seconds")


def iter_results(settings: Settings, job_id: str | None) -> Iterator[dict]:
    db = connect(settings.resolved_database_url)
    with db.connect() as conn:
        if job_id is None:
            job_id = conn.execute(select(Job.id).order_by(Job.created_at.desc()).limit(1)).scalar()
            if job_id is None:
                raise LookupError("no jobs yet in this database")
        job = conn.execute(select(Job).where(Job.id == job_id)).first()
        if job is None:
            raise LookupError(f"no job {job_id}")
        query = (
            select(Item.uri, Item.sha256, Item.status, Item.error, Item.seconds, Explanation.model,
                   Explanation.method, Explanation.layer, Explanation.class_id, Explanation.class_name,
                   Explanation.score, Explanation.rank, Explanation.map_key, Explanation.overlay_key,
                   Explanation.seconds.label("explanation_seconds"))
            .outerjoin(Explanation, and_(
                Explanation.sha256 == Item.sha256,
                Explanation.settings_digest == job.settings_digest,
                Item.status.in_(("done", "skipped")),
            ))
            .where(Item.job_id == job_id)
            .order_by(Item.id, Explanation.method, Explanation.rank)
        )
        for row in conn.execution_options(yield_per=1000).execute(query).mappings():
            record = dict(row, job_id=job_id)
            if row["map_key"] is not None:
                # an image skipped as already explained reports the earlier, identical result
                record.update(status="done", seconds=row["explanation_seconds"])
            yield {f: record.get(f) for f in FIELDS}


def write_results(settings: Settings, job_id: str | None, fmt: str, out: IO[str]) -> None:
    rows = iter_results(settings, job_id)
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    else:
        for row in rows:
            out.write(json.dumps(row) + "\n")
