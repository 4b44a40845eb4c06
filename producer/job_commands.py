"""Queue-side commands of ``salient``: submit, status, jobs, cancel, db. Light: no torch, no workers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from salient_maps.storage.database import cancel_job, connect, schema_revision
from salient_maps.storage.job_options import data_dir_option as shared_data_dir_option
from salient_maps.storage.job_options import job_options
from salient_maps.storage.settings import Settings, mask_url
from salient_maps.storage.sources import SourceError

from .jobs import JobProgress, get_job, list_jobs, wait_for_job

data_dir_option = shared_data_dir_option("--data", "--out", note="; its database, unless SALIENT_DATABASE_URL is set")
# `salient run`'s options, but weights and labels may be URIs, and each worker picks its device.
spec_options = job_options(local=False)


def _settings(data_dir: Path | None) -> Settings:
    return Settings().with_data_dir(data_dir)


def _line(job: JobProgress) -> str:
    finished = f", finished {job.finished_at:%Y-%m-%d %H:%M:%S}" if job.finished_at else ""
    name = f" ({job.name})" if job.name else ""
    return (f"job {job.id}{name}: {job.status}, {job.ended}/{job.total} ended: done {job.done}, "
            f"failed {job.failed}, skipped {job.skipped}; created {job.created_at:%Y-%m-%d %H:%M:%S}{finished}")


@click.command()
@click.argument("sources", nargs=-1, required=True)
@spec_options
@click.option("--name", default=None, help="A name to find the job by.")
@click.option("--chunk", type=click.IntRange(1), default=None,
              help="Images per message (default SALIENT_CHUNK_SIZE: 32).")
@click.option("--wait", is_flag=True, help="Show progress (done/failed/total, images/s, ETA) until the job ends.")
@data_dir_option
def submit(sources, name, chunk, wait, data_dir, **spec):
    """Queue every image in SOURCES for the workers and print the job id.

    SOURCES: files, folders, file:// URIs, s3://bucket/prefix, http(s):// URLs, manifests (.txt, .csv,
    .jsonl of URIs or paths) or - for URIs on standard input. Duplicates become one item.
    """
    from kombu.exceptions import OperationalError

    from .submit import build_spec
    from .submit import submit as submit_job

    settings = _settings(data_dir)
    try:
        job_id = submit_job(sources, build_spec(**spec), name=name, chunk=chunk, settings=settings)
    except (SourceError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    except OperationalError as exc:
        raise click.ClickException(f"cannot publish to the broker {mask_url(settings.broker_url)}: {exc}; "
                                   "the job was cancelled") from None
    click.echo(job_id)
    if wait:
        db = connect(settings.resolved_database_url)
        try:
            job = wait_for_job(db, job_id, show_progress=sys.stderr.isatty())
        except KeyboardInterrupt:
            click.echo(f"stopped waiting; the job goes on: salient status {job_id}", err=True)
            sys.exit(130)
        click.echo(_line(job), err=True)


@click.command()
@click.argument("job_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of a line of text.")
@data_dir_option
def status(job_id, as_json, data_dir):
    """Progress of a job (default: the newest)."""
    try:
        job = get_job(connect(_settings(data_dir).resolved_database_url), job_id)
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps({**vars(job), "created_at": job.created_at.isoformat(),
                               "finished_at": job.finished_at.isoformat() if job.finished_at else None}))
    else:
        click.echo(_line(job))


@click.command()
@click.option("--limit", type=click.IntRange(1), default=20, show_default=True)
@data_dir_option
def jobs(limit, data_dir):
    """The newest jobs, one line each."""
    for job in list_jobs(connect(_settings(data_dir).resolved_database_url), limit):
        click.echo(_line(job))


@click.command()
@click.argument("job_id")
@data_dir_option
def cancel(job_id, data_dir):
    """Cancel a job: images not started yet are skipped, the ones being explained finish."""
    skipped = cancel_job(connect(_settings(data_dir).resolved_database_url), job_id)
    if skipped is None:
        raise click.ClickException(f"no job {job_id}")
    click.echo(f"job {job_id} cancelled: {skipped} images skipped")


@click.group()
def db():
    """The metadata database."""


@db.command()
@data_dir_option
def upgrade(data_dir):
    """Create the schema or migrate it to this version's (workers and producers also do it at start)."""
    url = _settings(data_dir).resolved_database_url
    with connect(url).connect() as conn:
        revision = schema_revision(conn)
    click.echo(f"{mask_url(url)}: schema at revision {revision}")


COMMANDS = (submit, status, jobs, cancel, db)
