"""``salient reconcile``: make the database and the queue agree, once. Workers do the same every
``SALIENT_RECONCILE_INTERVAL`` seconds; this is for an operator after an incident (Redis restarted
without persistence, a flushed queue) or when no worker runs.

Two repairs: job counters recounted from the items (complete jobs finished), and items the queue lost
published again (``storage/requeue.py`` says how "lost" is decided). Light: no torch, no workers.
"""

from __future__ import annotations

import json

import click

from salient_maps.storage.database import connect, reconcile_jobs
from salient_maps.storage.requeue import requeue_lost
from salient_maps.storage.settings import Settings, mask_url

from .queue import Publisher


@click.command()
@click.option("--dry-run", is_flag=True, help="Only say what would be published; change nothing.")
@click.option("--pending-timeout", type=click.FloatRange(min=0), default=None,
              help="Seconds an item must have stayed pending untouched (default SALIENT_PENDING_TIMEOUT: 900).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of lines of text.")
def reconcile(dry_run, pending_timeout, as_json):
    """Recount job counters and publish again the images the queue lost."""
    from kombu.exceptions import OperationalError
    from redis.exceptions import RedisError

    settings = Settings()
    if pending_timeout is not None:
        settings = settings.model_copy(update={"pending_timeout": pending_timeout})
    db = connect(settings.resolved_database_url)
    corrected = 0 if dry_run else reconcile_jobs(db)
    try:
        if dry_run:
            report = requeue_lost(db, settings, _refuse, dry_run=True)
        else:
            with Publisher(settings) as publisher:
                report = requeue_lost(db, settings, publisher.publish)
    except (OperationalError, RedisError, OSError) as exc:
        raise click.ClickException(f"cannot reach the broker {mask_url(settings.broker_url)}: {exc}") from None
    if as_json:
        click.echo(json.dumps({"counters_corrected": corrected, **report.as_dict()}))
        return
    if not dry_run:
        click.echo(f"counters: {corrected} jobs corrected")
    click.echo(f"queue: {report.summary()}")


def _refuse(message: dict) -> None:
    raise AssertionError("a dry run publishes nothing")
