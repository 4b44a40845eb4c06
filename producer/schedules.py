"""Recurring incremental jobs: schedules live in the database and ``salient beat`` fires the due ones.

A run is a plain ``submit`` of the schedule's sources, with its spec rebuilt at firing time. It is
incremental because the workers skip an image whose bytes (sha256) were already explained under the
same settings digest: only new images and images whose bytes changed are explained, the others end as
``skipped`` (the job's ``skipped`` counter) and report the earlier, identical result.

Any number of beat processes may run: a run fires only in the process whose conditional UPDATE moves
``next_run_at`` off the due time it read, so two beats never fire the same run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from sqlalchemy import Row, delete, insert, null, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from salient_maps.storage.database import Schedule, utcnow
from salient_maps.storage.settings import Settings
from salient_maps.storage.sources import URI_SCHEMES

from .drift import check_drift
from .jobs import get_job
from .submit import build_spec, submit

log = logging.getLogger(__name__)
CRON_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


class ScheduleError(ValueError):
    """A schedule that cannot be stored as given."""


@dataclass
class Firing:
    """What one due schedule led to: a job, or the reason there is none."""

    schedule_id: int
    job_id: str | None = None
    error: str | None = None


def check_cron(cron: str) -> str:
    """``cron`` normalised: five fields (minute hour day-of-month month day-of-week) or a macro like @daily."""
    cron = " ".join(cron.split())
    five_fields = len(cron.split()) == 5
    if not (five_fields or cron in CRON_MACROS) or not croniter.is_valid(cron):
        raise ScheduleError(f"not a cron expression: {cron!r} "
                            f"(five fields, e.g. '0 2 * * *', or {', '.join(CRON_MACROS)})")
    return cron


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(f"unknown time zone {name!r} (an IANA name such as UTC or Europe/Paris)") from None


def next_run(cron: str, tz: str, after: datetime) -> datetime:
    """The first time strictly after ``after`` that ``cron`` names on the clocks of ``tz``, in UTC."""
    local = after.astimezone(zone(tz))
    return croniter(cron, local).get_next(datetime).astimezone(timezone.utc)


def _absolute_source(source: str) -> str:
    """Beat may run in another folder: a local path is stored absolute, and must exist now."""
    if urlparse(source).scheme in URI_SCHEMES:
        return source
    if source == "-":
        raise ScheduleError("a schedule cannot read URIs from standard input: give a manifest file")
    path = Path(source).absolute()
    if not path.exists():
        raise ScheduleError(f"source not found: {source}")
    return str(path)


def add_schedule(db: Engine, cron: str, sources: list[str], options: dict[str, Any], *, name: str | None = None,
                 tz: str = "UTC", chunk: int | None = None, now: datetime | None = None,
                 drift_thresholds: dict | None = None) -> Row:
    """Store a schedule; ``options`` are ``build_spec``'s keyword arguments (checked here by building the spec).
    ``drift_thresholds`` (producer/drift.py): compare each finished run with the previous one."""
    cron = check_cron(cron)
    if not sources:
        raise ScheduleError("a schedule needs at least one source")
    sources = [_absolute_source(s) for s in sources]
    spec = build_spec(**options)  # bad options fail now, not at 2 a.m.
    # Stored as the resolved locations, so a relative path still means the same file to beat.
    options = {**{k: v for k, v in options.items() if v is not None},
               **{k: spec[k] for k in ("weights", "labels") if spec.get(k) is not None}}
    now = now or utcnow()
    try:
        with db.begin() as conn:
            schedule_id = conn.execute(insert(Schedule).values(
                name=name, cron=cron, timezone=tz, sources=sources, options=options, chunk=chunk,
                drift_thresholds=null() if drift_thresholds is None else drift_thresholds,  # SQL NULL, not JSON null
                next_run_at=next_run(cron, tz, now),
                created_at=now).returning(Schedule.id)).scalar_one()
    except IntegrityError:  # the only unique column besides the id
        raise ScheduleError(f"a schedule named {name!r} exists already") from None
    return get_schedule(db, schedule_id)


def get_schedule(db: Engine, schedule_id: int) -> Row:
    with db.connect() as conn:
        row = conn.execute(select(Schedule.__table__).where(Schedule.id == schedule_id)).first()
    if row is None:
        raise LookupError(f"no schedule {schedule_id}")
    return row


def list_schedules(db: Engine) -> list[Row]:
    with db.connect() as conn:
        return list(conn.execute(select(Schedule.__table__).order_by(Schedule.id)).all())


def remove_schedule(db: Engine, id_or_name: str) -> bool:
    """Delete a schedule by id or name; the jobs it made stay."""
    where = Schedule.id == int(id_or_name) if id_or_name.isdigit() else Schedule.name == id_or_name
    with db.begin() as conn:
        return conn.execute(delete(Schedule).where(where)).rowcount == 1


def due_schedules(db: Engine, now: datetime) -> list[Row]:
    with db.connect() as conn:
        return list(conn.execute(select(Schedule.__table__).where(Schedule.next_run_at <= now)
                                 .order_by(Schedule.next_run_at)).all())


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; salient stores UTC everywhere.
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def claim(db: Engine, schedule: Row, now: datetime) -> datetime | None:
    """Move the schedule's ``next_run_at`` from the due time read in ``schedule`` to its next time after ``now``;
    returns that next time if this call did it (and so owns the run), None if another beat did first.

    Runs missed while no beat was up fold into this one run. On PostgreSQL a concurrent UPDATE of the row
    waits for ours and then sees the new value; SQLite serialises writers: either way only one matches.
    """
    following = next_run(schedule.cron, schedule.timezone, now)
    with db.begin() as conn:
        won = conn.execute(update(Schedule).where(Schedule.id == schedule.id,
                                                  Schedule.next_run_at == schedule.next_run_at)
                           .values(next_run_at=following, last_run_at=now)).rowcount == 1
    return following if won else None


def fire_due(db: Engine, settings: Settings, now: datetime | None = None) -> list[Firing]:
    """Judge drift of the runs that finished (producer/drift.py), then fire every schedule due at ``now`` that
    this process claims; one beat tick."""
    now = now or utcnow()
    check_drift(db, settings)  # first: firing moves last_job_id on to the new run
    firings = []
    for schedule in due_schedules(db, now):
        following = claim(db, schedule, now)
        if following is not None:
            firings.append(_run(db, settings, schedule, following, now))
    return firings


def _run(db: Engine, settings: Settings, schedule: Row, following: datetime, now: datetime) -> Firing:
    label = f"schedule {schedule.id}" + (f" ({schedule.name})" if schedule.name else "")
    if schedule.last_job_id and _still_running(db, schedule.last_job_id):
        # A second run would queue the same unexplained images again while the first is on them.
        firing = Firing(schedule.id, error=f"not run: the previous job {schedule.last_job_id} is still running")
        _record(db, schedule.id, last_error=firing.error)
        log.warning("%s: %s", label, firing.error)
        return firing
    try:
        job_id = submit(schedule.sources, build_spec(**schedule.options), name=schedule.name or label,
                        chunk=schedule.chunk, settings=settings, db=db)
    except Exception as exc:  # submit has cancelled the job; the run is tried again soon
        retry_at = min(following, now + timedelta(seconds=settings.schedule_retry))
        firing = Firing(schedule.id, error=f"{type(exc).__name__}: {exc}")
        with db.begin() as conn:
            conn.execute(update(Schedule).where(Schedule.id == schedule.id, Schedule.next_run_at == following)
                         .values(next_run_at=retry_at))
        _record(db, schedule.id, last_error=firing.error)
        log.error("%s: submit failed, next try at %s: %s", label, _aware(retry_at).isoformat(), firing.error)
        return firing
    _record(db, schedule.id, last_job_id=job_id, last_error=None)
    log.info("%s: job %s", label, job_id)
    return Firing(schedule.id, job_id=job_id)


def _still_running(db: Engine, job_id: str) -> bool:
    try:
        return not get_job(db, job_id).is_over
    except LookupError:
        return False


def _record(db: Engine, schedule_id: int, **values: Any) -> None:
    with db.begin() as conn:
        conn.execute(update(Schedule).where(Schedule.id == schedule_id).values(**values))
