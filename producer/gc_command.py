"""``salient gc``: delete the result shards no explanation names (storage/orphan_shards.py says how they
arise and why the grace period keeps shards being written safe). Light: no torch, no workers."""

from __future__ import annotations

import json
from pathlib import Path

import click

from salient_maps.storage.job_options import data_dir_option
from salient_maps.storage.settings import Settings


@click.command("gc")
@click.option("--grace", type=click.FloatRange(min=0), default=None,
              help="Seconds a shard no result names is kept (default SALIENT_ORPHAN_GRACE: 86400).")
@click.option("--listing", is_flag=True,
              help="Also list the store's shards/ for objects with no shard row (from before rows came first).")
@click.option("--dry-run", is_flag=True, help="Only say what would be deleted.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of a line of text.")
@data_dir_option("--data")
def gc(grace, listing, dry_run, as_json, data_dir: Path | None):
    """Delete result shards that no explanation names, older than the grace period."""
    from salient_maps.storage.database import connect
    from salient_maps.storage.objects import open_store
    from salient_maps.storage.orphan_shards import collect

    settings = Settings().with_data_dir(data_dir)
    db = connect(settings.resolved_database_url)
    store = open_store(settings.resolved_object_store_url, settings)
    found = collect(db, store, settings.orphan_grace if grace is None else grace, dry_run=dry_run, listing=listing)
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "shards": found.rows, "unrecorded": found.unrecorded}))
        return
    click.echo(f"{'would delete' if dry_run else 'deleted'}: {found.summary()}")
