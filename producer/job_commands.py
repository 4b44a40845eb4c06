"""Queue-side commands of ``salient``: submit, status, jobs, cancel, db. Light: no torch, no workers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from storage.database import cancel_job, connect, schema_revision
from storage.settings import Settings, mask_url
from storage.sources import SourceError

from .jobs import JobProgress, get_job, list_jobs, wait_for_job

data_dir_option = click.option(
    "--out", "data_dir", type=click.Path(path_type=Path), default=None,
    help="Data folder of the embedded database (default ./salient-data or SALIENT_DATA_DIR); "
         "ignored when SALIENT_DATABASE_URL is set.")


# The same names, types and defaults as `salient run` (tests/pipeline/test_producer.py keeps them in step).
SPEC_OPTIONS = [
    click.option("--model", default="efficientnet_lite0", show_default=True,
                 help="efficientnet_lite0 (bundled ImageNet weights) or a torchvision classifier name."),
    click.option("--weights", help="State-dict file (a path the workers can read) or an s3:// / http(s):// URI."),
    click.option("--layer", help="Target layer as a dotted module path (default: last spatial feature map)."),
    click.option("--methods", default="gradcam,saliency", show_default=True,
                 help="Comma-separated explanation methods, or 'all'."),
    click.option("--topk", type=click.IntRange(1, 1000), default=3, show_default=True,
                 help="Explain the K most probable classes."),
    click.option("--classes", help="Explain these classes instead of the top-k: ids or names (any case), "
                                   "comma-separated, e.g. '281,Egyptian cat'; a name with a comma: use its id."),
    click.option("--labels", help="Class names for a custom model (JSON list or CSV id,name): a path the workers "
                                  "can read, or an s3:// / http(s):// URI."),
    click.option("--localize", is_flag=True, default=False,
                 help="GrabCut each map into a bounding box + mask (Simonyan 2014), stored in each record."),
    click.option("--score", type=click.Choice(["logit", "probability"]), default=None,
                 help="Class score that gradient methods differentiate (default logit)."),
    click.option("--scorecam-weights", type=click.Choice(["probability", "logit-softmax", "cic-softmax"]),
                 default=None, help="Score-CAM channel weights definition (default probability)."),
    click.option("--max-channels", type=click.IntRange(1), default=None,
                 help="Score-CAM: keep only the N channels of largest activation variance."),
    click.option("--smooth", type=click.IntRange(0), default=None,
                 help="SmoothGrad: average gradient methods over N noisy copies."),
    click.option("--noise", type=click.FloatRange(0), default=None,
                 help="SmoothGrad noise level as a fraction of the input range (e.g. 0.15)."),
    click.option("--steps", type=click.IntRange(1), default=None, help="Integrated Gradients steps."),
    click.option("--baseline", type=click.Choice(["black", "blurred"]), default=None,
                 help="Integrated Gradients baseline."),
    click.option("--metrics", default=None,
                 help="Faithfulness metrics per explanation, comma-separated: deletion,insertion,drop."),
    click.option("--metric-steps", type=click.IntRange(1), default=None, help="Deletion/insertion steps (default 16)."),
    click.option("--metric-baseline", type=click.Choice(["black", "blurred"]), default=None,
                 help="Baseline for both curves (default: black for deletion, blurred for insertion)."),
    click.option("--colormap", default=None, help="Overlay colour map: any OpenCV name (jet, viridis, turbo, ...)."),
    click.option("--alpha", type=click.FloatRange(0, 1), default=None, help="Overlay opacity (default 0.4)."),
    click.option("--polarity", type=click.Choice(["positive", "negative", "both"]), default=None,
                 help="Render the signed attribution (e.g. saliency's gradient) instead of the map."),
    click.option("--clip-upper", type=click.FloatRange(0, 100), default=None,
                 help="Percentile above which attributions saturate (default 99.9)."),
    click.option("--clip-lower", type=click.FloatRange(0, 100), default=None,
                 help="Percentile below which attributions count as zero (default 0)."),
    click.option("--overlay", type=click.Choice(["original", "grayscale", "mask-black", "none"]), default=None,
                 help="What the map is drawn on (default original)."),
    click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True,
                 help="Images per model call on the workers."),
    click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True),
]


def spec_options(f):
    for option in reversed(SPEC_OPTIONS):
        f = option(f)
    return f


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
@click.option("--chunk", type=click.IntRange(1), default=None, help="Images per message (default SALIENT_CHUNK_SIZE: 32).")
@click.option("--wait", is_flag=True, help="Show progress (done/failed/total, images/s, ETA) until the job ends.")
@data_dir_option
def submit(sources, name, chunk, wait, data_dir, **spec):
    """Queue every image in SOURCES for the workers and print the job id.

    SOURCES: files, folders, file:// URIs, s3://bucket/prefix, http(s):// URLs, manifests (.txt, .csv,
    .jsonl of URIs or paths) or - for URIs on standard input. Duplicates become one item.
    """
    from kombu.exceptions import OperationalError

    from .submit import build_spec, submit as submit_job

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
