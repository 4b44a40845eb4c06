"""``salient schedule add|list|remove`` and ``salient beat``. Light: no torch, no workers."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import click

from salient_maps.storage.database import connect
from salient_maps.storage.settings import Settings

from .drift import DEFAULT_THRESHOLDS, describe, thresholds
from .job_commands import data_dir_option, spec_options
from .jobs import get_job


def _db(data_dir):
    return connect(Settings().with_data_dir(data_dir).resolved_database_url)


def _utc(moment: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; salient stores UTC everywhere.
    return moment if moment is None or moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _record(db, row) -> dict:
    """The schedule as JSON-ready values (ISO 8601 times), with its last job's counts."""
    record = dict(row._mapping)
    for key in ("next_run_at", "last_run_at", "created_at"):
        moment = _utc(record[key])
        record[key] = moment and moment.isoformat()
    last_job = None
    if row.last_job_id:
        try:
            last_job = vars(get_job(db, row.last_job_id))
        except LookupError:
            pass
    record["last_job"] = last_job and {k: last_job[k] for k in ("status", "total", "done", "failed", "skipped")}
    return record


def _line(record: dict) -> str:
    name = f" ({record['name']})" if record["name"] else ""
    job = record["last_job"]
    last = (f"last job {record['last_job_id']}: {job['status']}, done {job['done']}, failed {job['failed']}, "
            f"skipped {job['skipped']} of {job['total']}") if job else "no job yet"
    error = f"; last error: {record['last_error']}" if record["last_error"] else ""
    next_run = datetime.fromisoformat(record["next_run_at"])
    drift = f"; {describe(record['drift'], record['drift_thresholds'])}" if record["drift_thresholds"] else ""
    return (f"schedule {record['id']}{name}: '{record['cron']}' {record['timezone']}, next run "
            f"{next_run:%Y-%m-%d %H:%M:%S} UTC; {last}{drift}{error}; sources {' '.join(record['sources'])}")


@click.group()
def schedule():
    """Recurring incremental jobs, fired by `salient beat`."""


@schedule.command()
@click.option("--cron", required=True,
              help="When to run: minute hour day-of-month month day-of-week, e.g. '0 2 * * *' (02:00 daily), or "
                   "@hourly, @daily, @weekly, @monthly.")
@click.option("--timezone", "tz", default="UTC", show_default=True, help="Clock the cron times are read on (IANA).")
@click.argument("sources", nargs=-1, required=True)
@spec_options
@click.option("--name", default=None, help="A unique name; also the name of the jobs it makes.")
@click.option("--chunk", type=click.IntRange(1), default=None, help="Images per message (default SALIENT_CHUNK_SIZE).")
@click.option("--compare-previous", is_flag=True,
              help="Compare each finished run's maps with the previous finished run's (salient compare) and flag "
                   "drift in `schedule list`: mean Spearman below --drift-spearman or more top-1 changes than "
                   "--drift-changed.")
@click.option("--drift-spearman", type=click.FloatRange(-1, 1), default=None,
              help=f"Drift when the maps' mean Spearman falls below this (default "
                   f"{DEFAULT_THRESHOLDS['min_spearman']}; implies --compare-previous).")
@click.option("--drift-changed", type=click.FloatRange(0, 1), default=None,
              help=f"Drift when more than this share of the common images change their top-1 class (default "
                   f"{DEFAULT_THRESHOLDS['max_changed']}; implies --compare-previous).")
@data_dir_option
def add(cron, tz, sources, name, chunk, compare_previous, drift_spearman, drift_changed, data_dir, **options):
    """Explain SOURCES on a schedule, incrementally: each run explains only the images that are new or whose
    bytes changed since a run with the same settings; the others count as skipped."""
    from .schedules import ScheduleError, add_schedule

    db = _db(data_dir)
    try:
        row = add_schedule(db, cron, list(sources), options, name=name, tz=tz, chunk=chunk,
                           drift_thresholds=thresholds(drift_spearman, drift_changed, compare_previous))
    except (ScheduleError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(_line(_record(db, row)))


@schedule.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of text.")
@data_dir_option
def list_(as_json, data_dir):
    """Every schedule: when it runs next, how its last job went and, with --compare-previous, its drift."""
    from .schedules import list_schedules

    db = _db(data_dir)
    for row in list_schedules(db):
        record = _record(db, row)
        click.echo(json.dumps(record) if as_json else _line(record))


@schedule.command()
@click.argument("schedule_id")
@data_dir_option
def remove(schedule_id, data_dir):
    """Delete a schedule (by id or name); the jobs it made stay."""
    from .schedules import remove_schedule

    if not remove_schedule(_db(data_dir), schedule_id):
        raise click.ClickException(f"no schedule {schedule_id}")
    click.echo(f"schedule {schedule_id} removed")


@click.command()
@click.option("--interval", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds between checks for due schedules (default SALIENT_BEAT_INTERVAL: 30).")
@click.option("--loglevel", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), default="INFO", show_default=True)
@data_dir_option
def beat(interval, loglevel, data_dir):
    """Fire due schedules (Celery beat); several may run, each run fires once."""
    from .beat import run_beat

    settings = Settings().with_data_dir(data_dir)
    if interval is not None:
        settings = settings.model_copy(update={"beat_interval": interval})
    run_beat(settings, loglevel)


COMMANDS = (schedule, beat)
