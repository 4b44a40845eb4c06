"""The ``salient`` command. Light subcommands live here; heavy ones (``run``, ``demo``, ...) are
plugins from the ``salient.commands`` entry point group, imported only when invoked, so ``--help``
and the light commands never pay for torch."""

from __future__ import annotations

import copy
import sys
from importlib.metadata import entry_points
from pathlib import Path

import click

from salient_maps.storage.job_options import data_dir_option
from salient_maps.storage.settings import Settings

# Shown in --help without importing the plugin.
HEAVY_HELP = {
    "run": "Explain images in-process (no servers): maps, overlays and metadata into --out/--data.",
    "demo": "Explain scikit-image's sample images with the default model and show where the overlays are.",
    "sanity": "Randomise the model's layers top-down and measure how much each method's maps change.",
    "visualize-class": "Synthesise the image a model finds most like one class (Simonyan 2014) and store it.",
    "worker": "Explain queued images (Celery worker for the salient queue; one process per GPU).",
}


class SalientGroup(click.Group):
    def _plugins(self):
        return {ep.name: ep for ep in entry_points(group="salient.commands")}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self._plugins()))

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is not None:
            return command
        ep = self._plugins().get(name)
        if ep is None:
            return None
        try:
            command = ep.load()
        except ImportError as exc:
            return _missing_worker_extra(name, exc)
        return _hinting_missing_extra(name, command)

    def format_commands(self, ctx, formatter):
        rows = []
        for name in self.list_commands(ctx):
            command = super().get_command(ctx, name)
            rows.append((name, command.get_short_help_str(60) if command else HEAVY_HELP.get(name, "")))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _worker_extra_error(name: str, exc: ImportError) -> click.ClickException:
    return click.ClickException(
        f"'salient {name}' needs the worker extra ({exc.name or exc} is not installed): "
        "pip install 'salient-maps[worker]'"
    )


def _missing_worker_extra(name: str, exc: ImportError) -> click.Command:
    @click.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def unavailable():
        raise _worker_extra_error(name, exc)

    return unavailable


def _hinting_missing_extra(name: str, command: click.Command) -> click.Command:
    """Plugins import torch and friends inside the command, so a light install fails there, not at load:
    give the same one-line hint then. An ImportError from salient's own packages is a bug and surfaces."""
    hinting = copy.copy(command)

    def invoke(ctx: click.Context):
        try:
            return command.invoke(ctx)
        except ImportError as exc:
            if (exc.name or "").split(".")[0] == "salient_maps":
                raise
            raise _worker_extra_error(name, exc) from None

    hinting.invoke = invoke  # type: ignore[method-assign]  # this copy's invoke, wrapped; the command is untouched
    return hinting


@click.group(cls=SalientGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """salient: saliency maps for image classifiers, as a reliable bulk job.

    Explain a folder in-process with `salient run`; read what was made with `salient results`.
    Every command takes the data folder (embedded database and objects) as --data; run and results
    also as --out. Settings come from SALIENT_* environment variables (see README).
    """


@main.command()
@data_dir_option("--out", "--data")
@click.option("--job", "job_id", default=None, help="Job id (default: the latest job).")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
def results(data_dir, job_id, fmt):
    """Print one record per explanation (and per failed image) of a job."""
    from salient_maps.storage.results import write_results  # NumPy and the shard readers: not for `submit`

    settings = Settings().with_data_dir(data_dir)
    try:
        write_results(settings, job_id, fmt, sys.stdout)
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.argument("job_id", required=False)
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "parquet"]), default="jsonl", show_default=True)
@click.option("--out", type=click.Path(), default=None,
              help="A file for all records, or a folder (existing, or ending in /) for predictions_00001.FORMAT "
                   "and errors_00001.FORMAT. Default: standard output (jsonl, csv).")
@click.option("--maps", "maps_dir", type=click.Path(path_type=Path), default=None,
              help="Also write every map as MAPS/<image>-<sha256[:8]>/<method>/<class id>.npy (see salient maps).")
@click.option("--overlays", is_flag=True, help="With --maps: also draw each overlay PNG beside its map.")
@data_dir_option("--data")
def export(job_id, fmt, out, maps_dir, overlays, data_dir):
    """Stream a job's records (default: the latest job) as JSON Lines, CSV or Parquet."""
    from salient_maps.storage.results import export_results, iter_results

    settings = Settings().with_data_dir(data_dir)
    try:
        counts = export_results(settings, job_id, fmt, out, stdout=sys.stdout)
        if maps_dir is not None:
            from salient_maps.storage.maps import export_maps

            from .map_commands import _job_style

            style = _job_style(settings, job_id) if overlays else None
            n = export_maps(settings, iter_results(settings, job_id), maps_dir, overlays=overlays, style=style)
            click.echo(f"{n} maps -> {maps_dir}", err=True)
    except (LookupError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if out is not None:
        click.echo(f"{counts['predictions']} predictions, {counts['errors']} items without one -> {out}", err=True)


@main.command()
@click.argument("job_id", required=False)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Report folder (default salient-report-JOB); open OUT/index.html in a browser.")
@click.option("--copy", is_flag=True,
              help="Copy overlays, thumbnails and maps into the folder (always done for a remote store) "
                   "instead of linking into the local object store.")
@data_dir_option("--data")
def report(job_id, out, copy, data_dir):
    """Write a static HTML report of a job (default: the latest): summary, metrics, classes, gallery."""
    from salient_maps.storage.report import build_report

    settings = Settings().with_data_dir(data_dir)
    try:
        summary = build_report(settings, job_id, out, copy=copy)
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{summary.images} images, {summary.explanations} explanations in {summary.seconds:.1f}s: "
               f"{summary.path}")


# Queue-side commands (submit, status, jobs, cancel, db) live in their own module.
from .job_commands import COMMANDS  # noqa: E402

for _command in COMMANDS:
    main.add_command(_command)

# Schedules and their beat.
from .schedule_commands import COMMANDS as SCHEDULE_COMMANDS  # noqa: E402

for _command in SCHEDULE_COMMANDS:
    main.add_command(_command)

from .api_command import api  # noqa: E402

main.add_command(api)

from .reconcile import reconcile  # noqa: E402

main.add_command(reconcile)

from .gc_command import gc  # noqa: E402

main.add_command(gc)

# Reading stored maps back: files and overlays drawn on demand.
from .map_commands import COMMANDS as MAP_COMMANDS  # noqa: E402

for _command in MAP_COMMANDS:
    main.add_command(_command)

# Audits against ground truth and between runs.
from .audit_commands import COMMANDS as AUDIT_COMMANDS  # noqa: E402

for _command in AUDIT_COMMANDS:
    main.add_command(_command)
