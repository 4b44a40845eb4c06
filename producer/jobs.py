"""Reading jobs back: one job's progress, the list of jobs, and waiting for a job with a progress bar."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.engine import Engine

from salient_maps.storage.database import Job


@dataclass
class JobProgress:
    id: str
    name: str | None
    status: str
    total: int
    done: int
    failed: int
    skipped: int
    created_at: datetime
    finished_at: datetime | None

    @property
    def ended(self) -> int:
        return self.done + self.failed + self.skipped

    @property
    def is_over(self) -> bool:
        """Finished, or cancelled with nothing left in flight."""
        return self.finished_at is not None


_COLUMNS = (Job.id, Job.name, Job.status, Job.total, Job.done, Job.failed, Job.skipped, Job.created_at,
            Job.finished_at)


def get_job(db: Engine, job_id: str | None = None) -> JobProgress:
    """One job (default: the newest); LookupError if there is none."""
    query = select(*_COLUMNS)
    query = query.where(Job.id == job_id) if job_id else query.order_by(Job.created_at.desc()).limit(1)
    with db.connect() as conn:
        row = conn.execute(query).first()
    if row is None:
        raise LookupError(f"no job {job_id}" if job_id else "no jobs yet in this database")
    return JobProgress(*row)


def list_jobs(db: Engine, limit: int = 20) -> list[JobProgress]:
    with db.connect() as conn:
        rows = conn.execute(select(*_COLUMNS).order_by(Job.created_at.desc()).limit(limit)).all()
    return [JobProgress(*row) for row in rows]


def wait_for_job(db: Engine, job_id: str, show_progress: bool = True, poll: float = 0.5,
                 timeout: float | None = None) -> JobProgress:
    """Poll until the job is over, drawing done/failed/total, images/s and ETA; returns the last progress.

    TimeoutError after ``timeout`` seconds (the job goes on).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    start = time.monotonic()
    first = get_job(db, job_id)
    with Progress(TextColumn("[bold]{task.fields[status]}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("done {task.fields[done]} failed {task.fields[failed]} skipped {task.fields[skipped]}"),
                  TextColumn("{task.fields[rate]:.1f} img/s"), TimeRemainingColumn(),
                  disable=not show_progress) as bar:
        task = bar.add_task("job", total=first.total or None, status=first.status, done=0, failed=0, skipped=0,
                            rate=0.0)
        while True:
            job = get_job(db, job_id)
            elapsed = time.monotonic() - start
            ended_here = job.ended - first.ended
            bar.update(task, total=job.total or None, completed=job.ended, status=job.status, done=job.done,
                       failed=job.failed, skipped=job.skipped, rate=ended_here / elapsed if elapsed else 0.0)
            if job.is_over:
                return job
            if timeout is not None and elapsed > timeout:
                raise TimeoutError(f"job {job_id} not over after {timeout:.0f}s: {job.ended}/{job.total} ended")
            time.sleep(poll)
